"""aims-billing-mcp: Stripe billing tools for AI agents over MCP, with an embedded offline Stripe sandbox."""

__version__ = "0.1.0"

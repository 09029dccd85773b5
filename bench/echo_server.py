"""The baseline: a bare MCPServer with one echo tool, the floor the SDK itself sets for a stdio tool call."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("echo")


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


if __name__ == "__main__":
    server.run()

"""`python -m aims_billing_mcp ...` is the same as the `aims-billing-mcp` command."""

import sys

from .cli import main

sys.exit(main())

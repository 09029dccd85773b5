"""Security promises, one test per promise."""

"""The Python SDK and the genloom CLI."""

"""One module per service; each has a sync and an async resource class."""

from genloom.resources.tokenizer import AsyncTokenizer, Tokenizer

__all__ = ["AsyncTokenizer", "Tokenizer"]

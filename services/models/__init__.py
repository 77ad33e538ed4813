"""Resolving model names to local Hugging Face model directories (shared by the tokenizer and inference).

Modules: `registry` (names -> directories), `smollm2` (the built-in default model, converted from its GGUF).
"""

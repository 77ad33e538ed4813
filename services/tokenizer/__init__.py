"""The tokenizer service: tokenize, detokenize, count, chat templates and context windows, for several models.

Modules: `settings` (light, imported by the CLI), `store` (loaded tokenizers), `servicer` (the gRPC servicer).
"""

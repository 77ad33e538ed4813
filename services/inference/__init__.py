"""The inference service: engines (`engines/`) behind one protocol (`engine.py`), the gRPC servicer on top.

Modules: `settings` (light, imported by the CLI), `engine` (the protocol and its types), `engines/` (vllm, hf,
openai), `adapters` (LoRA directory validation), `text` (incremental detokenization and stop sequences),
`servicer` (protobuf <-> engine).
"""

"""The inference service: engines (`engines/`) behind one protocol (`engine.py`), the gRPC servicer on top.

Modules: `settings` (light, imported by the CLI), `engine` (the protocol and its types), `engines/` (vllm, hf,
openai; `create_engine`), `adapters` (LoRA directory validation), `sampling` (the one check of sampling parameters,
shared with the task service), `text` (incremental detokenization and stop sequences), `pool` (the main engine's
lifecycle: health checks, restarts), `full_models` (engines of fully fine-tuned models), `serving` (the serving
core: model resolution, adapters, engines; no gRPC), `requests` (protos -> engine requests), `responses` (results ->
protos), `errors` (engine errors -> statuses), `servicer` (the RPCs).
"""

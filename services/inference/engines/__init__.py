"""Engine implementations. Import the one you need; `create_engine()` picks by GENLOOM_ENGINE (the serving core's
default engine factory). Each engine module is imported only when chosen: they pull in torch, vLLM or httpx."""

from __future__ import annotations

from genloom.services.inference.engine import Engine
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.registry import ModelSpec


def create_engine(spec: ModelSpec, settings: InferenceSettings, max_model_len: int) -> Engine:
    """The engine GENLOOM_ENGINE names (auto: vllm when importable, else hf)."""
    import importlib.util

    kind = settings.engine
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if kind == "vllm":
        from genloom.services.inference.engines.vllm import VLLMEngine

        return VLLMEngine(spec.path, spec.name, settings, max_model_len)
    if kind == "hf":
        from genloom.services.inference.engines.hf import HFEngine

        return HFEngine(spec.path, spec.name, settings, max_model_len)
    from genloom.services.inference.engines.openai import OpenAIEngine

    return OpenAIEngine(spec.path, spec.name, settings, max_model_len)

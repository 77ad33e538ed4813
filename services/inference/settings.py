"""Settings of the inference service (which models: server.settings.ModelSettings)."""

from __future__ import annotations

from dataclasses import dataclass

from genloom.services.server.settings import Settings, SettingsError, setting


@dataclass(frozen=True)
class InferenceSettings(Settings):
    engine: str = setting(
        "auto",
        env="ENGINE",
        help="Model runtime: vllm, hf (PyTorch + transformers), openai (a remote "
        "OpenAI-compatible server), or auto (vllm when importable, else hf).",
        choices=("auto", "vllm", "hf", "openai"),
    )
    device: str = setting(
        "auto",
        env="DEVICE",
        help="Device for the hf engine: cpu, cuda, cuda:N, or auto (cuda when available).",
    )
    dtype: str = setting(
        "auto",
        env="DTYPE",
        help="Weights and compute dtype. auto = float32 on CPU (bf16 gives wrong text on CPUs without native "
        "bf16), bfloat16 on GPUs that support it.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    max_batch_size: int = setting(
        32, env="MAX_BATCH_SIZE", help="Most sequences the engine decodes together in one step."
    )
    max_queued_requests: int = setting(
        256,
        env="MAX_QUEUED_REQUESTS",
        help="Requests allowed to wait for a batch slot; more are refused with RESOURCE_EXHAUSTED + RetryInfo.",
    )
    default_max_new_tokens: int = setting(
        256, env="DEFAULT_MAX_NEW_TOKENS", help="max_new_tokens when a request leaves it 0."
    )
    max_logprobs: int = setting(20, env="MAX_LOGPROBS", help="Largest top-N log-probabilities a request may ask for.")
    max_stop_sequences: int = setting(16, env="MAX_STOP_SEQUENCES", help="Most stop sequences per request.")
    score_max_items: int = setting(64, env="SCORE_MAX_ITEMS", help="Most prompts in one Score request.")
    score_max_candidates: int = setting(
        256, env="SCORE_MAX_CANDIDATES", help="Most candidates in one Score request (all items together)."
    )
    enable_lora: bool = setting(True, env="ENABLE_LORA", help="Serve LoRA adapters (costs some speed in vLLM).")
    max_lora_rank: int = setting(64, env="MAX_LORA_RANK", help="Largest LoRA rank an adapter may have.")
    max_loras: int = setting(4, env="MAX_LORAS", help="Adapters kept resident in the engine at once.")
    adapter_roots: str = setting(
        "",
        env="ADAPTER_ROOTS",
        help="Comma-separated directories LoadAdapter may read adapters from (a relative path is taken relative to "
        "the first). Empty = LoadAdapter by path is refused. Never list the fine-tuning artifact store: fine-tuned "
        "adapters are served by their ft: names.",
    )
    max_full_models: int = setting(
        1,
        env="MAX_FULL_MODELS",
        help="Fully fine-tuned models (ft: names) served at once, each by an engine of its own started on first use "
        "(as much memory as the base model); the least recently used idle one is shut down to make room. 0 = don't "
        "serve them.",
    )
    engine_max_restarts: int = setting(
        3,
        env="ENGINE_MAX_RESTARTS",
        help="Times the serving pool restarts a dead engine within GENLOOM_ENGINE_RESTART_WINDOW; one more death "
        "in that window is a crash loop: health stays NOT_SERVING so an orchestrator replaces the process. 0 = never "
        "restart.",
    )
    engine_restart_window: float = setting(
        300.0, env="ENGINE_RESTART_WINDOW", help="Seconds over which engine restarts are counted (crash-loop window)."
    )
    engine_restart_backoff: float = setting(
        1.0,
        env="ENGINE_RESTART_BACKOFF",
        help="Seconds before the first restart of a dead engine; doubles with each further restart in the window.",
    )
    engine_restart_backoff_max: float = setting(
        30.0, env="ENGINE_RESTART_BACKOFF_MAX", help="Longest wait before an engine restart, in seconds."
    )
    engine_restart_wait: float = setting(
        120.0,
        env="ENGINE_RESTART_WAIT",
        help="Longest a request waits for a restarting engine (also bounded by its deadline) before it is answered "
        "UNAVAILABLE with RetryInfo.",
    )
    engine_health_interval: float = setting(
        5.0, env="ENGINE_HEALTH_INTERVAL", help="Seconds between engine health checks (a dead engine is restarted)."
    )
    vllm_gpu_memory_utilization: float = setting(
        0.9, env="VLLM_GPU_MEMORY_UTILIZATION", help="vLLM on GPU: fraction of GPU memory for weights + KV cache."
    )
    vllm_cpu_kvcache_gib: int = setting(
        4,
        env="VLLM_CPU_KVCACHE_GIB",
        help="vLLM on CPU: GiB of KV cache (sets VLLM_CPU_KVCACHE_SPACE unless that is already set).",
    )
    openai_base_url: str = setting(
        "", env="OPENAI_BASE_URL", help="openai engine: the server's base URL, e.g. http://127.0.0.1:8000/v1."
    )
    openai_api_key: str = setting("", env="OPENAI_API_KEY", help="openai engine: bearer token for the server.")
    openai_model: str = setting(
        "", env="OPENAI_MODEL", help="openai engine: the model name the remote server knows (default: its first)."
    )
    openai_timeout: float = setting(
        300.0, env="OPENAI_TIMEOUT", help="openai engine: seconds before a remote call is abandoned."
    )

    def validate(self) -> None:
        for name in ("max_batch_size", "default_max_new_tokens", "score_max_items", "score_max_candidates"):
            if getattr(self, name) < 1:
                raise SettingsError(f"GENLOOM_{name.upper()} must be at least 1")
        if self.max_full_models < 0:
            raise SettingsError("GENLOOM_MAX_FULL_MODELS must be >= 0 (0 = don't serve fully fine-tuned models)")
        if self.max_queued_requests < 0 or self.max_logprobs < 0 or self.max_stop_sequences < 0:
            raise SettingsError("GENLOOM_MAX_QUEUED_REQUESTS, _MAX_LOGPROBS and _MAX_STOP_SEQUENCES must be >= 0")
        if self.engine == "openai" and not self.openai_base_url:
            raise SettingsError("GENLOOM_ENGINE=openai needs GENLOOM_OPENAI_BASE_URL (e.g. http://host:8000/v1)")
        if self.engine_max_restarts < 0:
            raise SettingsError("GENLOOM_ENGINE_MAX_RESTARTS must be >= 0 (0 = never restart a dead engine)")
        for name in ("engine_restart_window", "engine_restart_wait", "engine_health_interval"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"GENLOOM_{name.upper()} must be a positive number of seconds")
        if not 0 <= self.engine_restart_backoff <= self.engine_restart_backoff_max:
            raise SettingsError(
                "GENLOOM_ENGINE_RESTART_BACKOFF must be >= 0 and at most GENLOOM_ENGINE_RESTART_BACKOFF_MAX"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise SettingsError("GENLOOM_VLLM_GPU_MEMORY_UTILIZATION must be in (0, 1]")

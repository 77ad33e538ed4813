"""Settings of the task service: limits, where the tokenizer and inference services are, evaluation defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genloom.services.server.settings import Settings, SettingsError, setting


@dataclass(frozen=True)
class TasksSettings(Settings):
    tokenizer_target: str = setting(
        "",
        env="TASKS_TOKENIZER_TARGET",
        help="gRPC target of the tokenizer service the task service measures prompts with (e.g. "
        "tokenizer:50051). Empty = this server (when it hosts the tokenizer service too).",
    )
    inference_target: str = setting(
        "",
        env="TASKS_INFERENCE_TARGET",
        help="gRPC target of the inference service that generates and scores (e.g. dns:///inference:50051). "
        "Empty = this server (when it hosts the inference service too).",
    )
    upstream_api_key: str = setting(
        "",
        env="TASKS_UPSTREAM_API_KEY",
        help="API key the task service sends to the tokenizer and inference services. Empty = none, or one of "
        "this server's own keys when calling itself.",
    )
    upstream_tls: bool = setting(
        False, env="TASKS_UPSTREAM_TLS", help="Use TLS (system roots) to reach the tokenizer and inference targets."
    )
    max_task_inputs: int = setting(
        64, env="TASKS_MAX_INPUTS", help="Most documents, questions or texts in one task request."
    )
    max_labels: int = setting(100, env="TASKS_MAX_LABELS", help="Most labels in one Classify request.")
    max_examples: int = setting(64, env="TASKS_MAX_EXAMPLES", help="Most worked examples in one task request.")
    max_chunks: int = setting(
        64, env="TASKS_MAX_CHUNKS", help="Most chunks one long document or context may be split into."
    )
    max_concurrency: int = setting(
        32,
        env="TASKS_MAX_CONCURRENCY",
        help="Most inference calls one task request keeps in flight at once (chunks, documents, labels).",
    )
    max_eval_items: int = setting(
        10_000, env="TASKS_MAX_EVAL_ITEMS", help="Most records in one Evaluate dataset or example split."
    )
    max_eval_configs: int = setting(
        16, env="TASKS_MAX_EVAL_CONFIGS", help="Most configurations one Evaluate request compares."
    )
    eval_concurrency: int = setting(
        8, env="TASKS_EVAL_CONCURRENCY", help="Items in flight at once per Evaluate configuration by default."
    )
    data_root: Path | None = setting(
        None,
        env="TASKS_DATA_ROOT",
        help="Directory Evaluate may read JSONL datasets from (EvalDataset.path). Unset = reading datasets from "
        "the server's disk is disabled.",
    )

    def validate(self) -> None:
        for name, env in (
            ("max_task_inputs", "TASKS_MAX_INPUTS"),
            ("max_labels", "TASKS_MAX_LABELS"),
            ("max_examples", "TASKS_MAX_EXAMPLES"),
            ("max_chunks", "TASKS_MAX_CHUNKS"),
            ("max_concurrency", "TASKS_MAX_CONCURRENCY"),
            ("max_eval_items", "TASKS_MAX_EVAL_ITEMS"),
            ("max_eval_configs", "TASKS_MAX_EVAL_CONFIGS"),
            ("eval_concurrency", "TASKS_EVAL_CONCURRENCY"),
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"GENLOOM_{env} must be at least 1")

"""Typed settings: one frozen dataclass per service, each field declared once with its env var, default and help.

The same declaration feeds three places: `from_env()` (servers embedded in other programs, tests), the `genloom
serve` command-line flags (generated from the fields, so a flag can't drift from its env var) and the docs.
Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "GENLOOM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

S = TypeVar("S", bound="Settings")


def bracket(host: str) -> str:
    """An IPv6 literal in brackets, as host:port addresses need it; other hosts unchanged."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def local_address(host: str, port: int | str) -> str:
    """How a process on the same machine reaches a server listening on host:port (a wildcard host: loopback)."""
    reachable = "127.0.0.1" if host.strip() in ("", "0.0.0.0", "::", "[::]") else host.strip()
    return f"{bracket(reachable)}:{port}"


class SettingsError(ValueError):
    """A setting has a value that can't be used; the message names the env var / flag and how to fix it."""


def setting(default: Any, *, env: str, help: str, choices: tuple[str, ...] = ()) -> Any:
    """Declare a settings field: `env` is the name without the GENLOOM_ prefix; the flag is derived from it."""
    return dataclasses.field(default=default, metadata={"env": ENV_PREFIX + env, "help": help, "choices": choices})


@dataclass(frozen=True)
class SettingInfo:
    name: str
    env: str
    flag: str
    help: str
    default: Any
    type: type
    choices: tuple[str, ...]


class Settings:
    """Base for settings dataclasses."""

    @classmethod
    def fields(cls) -> list[SettingInfo]:
        hints = typing.get_type_hints(cls)
        infos = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            env = f.metadata["env"]
            flag = "--" + env.removeprefix(ENV_PREFIX).lower().replace("_", "-")
            infos.append(
                SettingInfo(
                    f.name, env, flag, f.metadata["help"], f.default, _base_type(hints[f.name]), f.metadata["choices"]
                )
            )
        return infos

    @classmethod
    def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
        """Build from environment variables (default: os.environ); keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for info in cls.fields():
            if info.name in overrides:
                continue
            raw = environ.get(info.env)
            if raw is not None:
                values[info.name] = parse_value(info, raw)
        return cls(**values, **overrides)

    def __post_init__(self) -> None:
        for info in self.fields():
            value = getattr(self, info.name)
            if info.choices and value not in info.choices:
                raise SettingsError(f"{info.env} / {info.flag}: {value!r} is not one of {', '.join(info.choices)}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise SettingsError naming the env var to fix."""


def parse_value(info: SettingInfo, raw: str) -> Any:
    raw = raw.strip()
    try:
        if info.type is bool:
            lowered = raw.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected true/false")
        if info.type is int:
            return int(raw)
        if info.type is float:
            return float(raw)
        if info.type is Path:
            return Path(raw).expanduser() if raw else None
    except ValueError as err:
        raise SettingsError(f"{info.env}={raw!r}: {err}; {info.help}") from None
    return raw


def _base_type(hint: Any) -> type:
    """`Path | None` -> Path; plain types unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return typing.cast(type, args[0])
    return typing.cast(type, hint)


def split_list(value: str) -> list[str]:
    """Comma-separated setting -> stripped, non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def default_cache_dir() -> Path:
    """genloom's cache folder: $XDG_CACHE_HOME/genloom, else ~/.cache/genloom."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "genloom"


@dataclass(frozen=True)
class ServerSettings(Settings):
    """How a genloom server listens, authenticates, reports and shuts down."""

    host: str = setting("127.0.0.1", env="HOST", help="Address to listen on. 0.0.0.0 (or ::) for every interface.")
    port: int = setting(50051, env="PORT", help="gRPC port. 0 picks a free port (logged at start).")
    metrics_host: str = setting("127.0.0.1", env="METRICS_HOST", help="Address of the Prometheus metrics endpoint.")
    metrics_port: int = setting(
        -1, env="METRICS_PORT", help="HTTP port for Prometheus metrics (/metrics). 0 picks a free port; -1 disables."
    )
    api_keys: str = setting(
        "",
        env="API_KEYS",
        help="Comma-separated API keys. When any key is set (here or in the keys file), every RPC but health and "
        "reflection needs 'authorization: Bearer <key>' metadata.",
    )
    api_keys_file: Path | None = setting(
        None, env="API_KEYS_FILE", help="File with one API key per line (# comments allowed); added to API_KEYS."
    )
    tls_cert: Path | None = setting(None, env="TLS_CERT", help="PEM certificate chain; with TLS_KEY, serve TLS.")
    tls_key: Path | None = setting(None, env="TLS_KEY", help="PEM private key for TLS_CERT.")
    shutdown_grace: float = setting(
        30.0, env="SHUTDOWN_GRACE", help="Seconds in-flight RPCs may run after SIGTERM before they are cancelled."
    )
    max_message_bytes: int = setting(
        64 * 1024 * 1024,
        env="MAX_MESSAGE_BYTES",
        help="Largest request or response message in bytes (gRPC's own default, 4 MiB, is too small for big "
        "token batches).",
    )
    max_concurrent_rpcs: int = setting(
        0,
        env="MAX_CONCURRENT_RPCS",
        help="RPCs served at once before new ones are refused with RESOURCE_EXHAUSTED. 0 = no limit.",
    )
    max_connection_age: float = setting(
        0.0,
        env="MAX_CONNECTION_AGE",
        help="Seconds after which the server asks a client to reconnect (GOAWAY; calls under way get "
        "SHUTDOWN_GRACE to finish). A reconnecting client resolves its target again, so replicas added by an "
        "autoscaler get their share of long-lived clients. 0 = never.",
    )
    log_level: str = setting("info", env="LOG_LEVEL", help="Log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = setting(
        "text",
        env="LOG_FORMAT",
        help="'text' for people, 'json' for log collectors (one object per line).",
        choices=("text", "json"),
    )

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"GENLOOM_PORT / --port: {self.port} is not a port number (0-65535)")
        if not -1 <= self.metrics_port <= 65535:
            raise SettingsError(f"GENLOOM_METRICS_PORT: {self.metrics_port} must be -1 (off) or 0-65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("TLS needs both GENLOOM_TLS_CERT and GENLOOM_TLS_KEY (or neither)")
        for path in (self.tls_cert, self.tls_key, self.api_keys_file):
            if path is not None and not path.is_file():
                raise SettingsError(f"{path} does not exist or is not a file")
        if self.max_connection_age < 0:
            raise SettingsError("GENLOOM_MAX_CONNECTION_AGE must be >= 0 seconds (0 = never)")
        if self.shutdown_grace < 0:
            raise SettingsError("GENLOOM_SHUTDOWN_GRACE must be >= 0 seconds")
        if self.max_message_bytes < 1024:
            raise SettingsError("GENLOOM_MAX_MESSAGE_BYTES must be at least 1024")

    def load_api_keys(self) -> frozenset[str]:
        keys = set(split_list(self.api_keys))
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        return frozenset(keys)


@dataclass(frozen=True)
class ModelSettings(Settings):
    """Which models a server knows and where converted models are cached."""

    model: str = setting(
        "smollm2-135m-instruct",
        env="MODEL",
        help="Default model: a built-in name, a name from GENLOOM_MODELS, or a local Hugging Face model directory.",
    )
    models: str = setting(
        "",
        env="MODELS",
        help="Extra models loaded at start, as comma-separated name=/path/to/hf-dir pairs (or bare paths).",
    )
    model_cache: Path = setting(
        default_cache_dir() / "models",
        env="MODEL_CACHE",
        help="Directory for converted models (the default model is converted here from its GGUF once).",
    )
    max_model_len: int = setting(
        0, env="MAX_MODEL_LEN", help="Cap on every model's context window in tokens. 0 = the model's own."
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        env="REDIS_URL",
        help="Redis holding fine-tuning jobs, their events and the registry of fine-tuned models "
        "(ft:<base>:<suffix>:<job-id> names); the Celery broker of the training queue too.",
    )
    allow_model_paths: bool = setting(
        False,
        env="ALLOW_MODEL_PATHS",
        help="Let requests name a model directory inside GENLOOM_MODEL_ROOTS as `model` (loaded on first use). Off: "
        "clients can use the configured models only.",
    )
    model_roots: str = setting(
        "",
        env="MODEL_ROOTS",
        help="Comma-separated directories that model paths in requests must lie in (with GENLOOM_ALLOW_MODEL_PATHS); "
        "a relative path is taken relative to the first. Empty = GENLOOM_MODEL_CACHE. Never list the fine-tuning "
        "artifact store: fine-tuned models are served by their ft: names.",
    )
    max_cached_models: int = setting(
        8,
        env="MAX_CACHED_MODELS",
        help="Models named by path kept loaded (tokenizers) at once, beyond the configured ones (never evicted); "
        "the least recently used is dropped to make room.",
    )

    def model_root_paths(self) -> list[Path]:
        """The directories a requested model path must lie in (GENLOOM_MODEL_ROOTS, else the model cache)."""
        roots = [Path(root).expanduser() for root in split_list(self.model_roots)]
        return roots or [self.model_cache]

    def validate(self) -> None:
        if self.max_model_len < 0:
            raise SettingsError("GENLOOM_MAX_MODEL_LEN must be >= 0")
        if self.max_cached_models < 1:
            raise SettingsError("GENLOOM_MAX_CACHED_MODELS must be >= 1")
        for item in split_list(self.models):
            name, sep, path = item.partition("=")
            if sep and (not name.strip() or not path.strip()):
                raise SettingsError(f"GENLOOM_MODELS: {item!r} must look like name=/path/to/model")

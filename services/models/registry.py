"""Model names -> local Hugging Face model directories.

A name is, in order: the built-in default model (converted from its GGUF on first use), a configured alias
(GENLOOM_MODELS), the configured default model (GENLOOM_MODEL, which may be a directory), or, when
GENLOOM_ALLOW_MODEL_PATHS is on, a path to a model directory inside GENLOOM_MODEL_ROOTS.

A directory has one name however a client spells it: a path to a configured model's directory resolves to that
model's configured name, and any other directory to its canonical spelling relative to the first model root
("./org/model"), so caches keyed on names hold one entry per directory and no response names a server path. A
configured directory without a name of its own (GENLOOM_MODEL=/srv/models/mymodel, a bare GENLOOM_MODELS entry) is
named after the directory ("mymodel"); the operator's spelling of it stays a way to ask for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genloom.services.models.smollm2 import DEFAULT_MODEL, ensure_default_model
from genloom.services.server.errors import NotFound, quote
from genloom.services.server.paths import canonical, on_paper, resolve_within
from genloom.services.server.settings import ModelSettings, SettingsError, split_list

logger = logging.getLogger(__name__)

# Built-in models: name -> function(cache_dir, name) that returns their (prepared) directory.
BUILTIN_MODELS: dict[str, Callable[[Path, str], Path]] = {DEFAULT_MODEL: ensure_default_model}
# Files that make a directory a Hugging Face model (weights are optional for the tokenizer service).
_MODEL_MARKERS = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the name clients use and the directory it loads from."""

    name: str
    path: Path


def looks_like_path(name: str) -> bool:
    """Whether a requested model name is meant as a directory rather than a model's name."""
    return "/" in name or name.startswith((".", "~"))


class ModelRegistry:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._aliases: dict[str, Path] = {}
        for item in split_list(settings.models):
            name, sep, path = item.partition("=")
            if not sep:  # a bare path: named after its directory
                path, name = name, _directory_name(name.strip())
            self._aliases[name.strip()] = Path(path.strip()).expanduser()
        self._roots = settings.model_root_paths()
        # canonical directory -> configured name (first wins), for mapping other spellings of it back to the name.
        self._configured_dirs: dict[Path, str] = {}
        for name, directory in self._aliases.items():
            self._configured_dirs.setdefault(canonical(directory), name)
        for name in BUILTIN_MODELS:  # where a built-in model is (or will be) converted to
            self._configured_dirs.setdefault(canonical(settings.model_cache / name), name)
        # The operator's spellings of configured directories -> their names. Only GENLOOM_MODEL's value: the one
        # spelling that services pass around (and clients may have been told), served whatever ALLOW_MODEL_PATHS
        # says, since it is configured.
        self._spellings: dict[str, str] = {}
        self.default_name = settings.model
        if looks_like_path(settings.model) and settings.model not in self._aliases:
            self.default_name = self._name_default_directory(settings.model)
            self._spellings[settings.model] = self.default_name

    def _name_default_directory(self, spelling: str) -> str:
        """The name GENLOOM_MODEL's directory is served under: a GENLOOM_MODELS name for the same directory, else
        the directory's own name (never the path: names are shown to every client)."""
        path = Path(spelling).expanduser()
        directory = canonical(path)
        configured = self._configured_dirs.get(directory)
        if configured is not None:
            return configured
        name = _directory_name(spelling)
        if not name or name in BUILTIN_MODELS or name in self._aliases:
            why = "is already another model's name" if name else "is empty"
            raise SettingsError(
                f"GENLOOM_MODEL={spelling!r}: the directory would be served as {name!r}, which {why}; name it "
                "yourself: GENLOOM_MODELS=<name>=<directory> and GENLOOM_MODEL=<name>"
            )
        self._aliases[name] = path
        self._configured_dirs[directory] = name
        return name

    def configured_names(self) -> list[str]:
        """The default model first, then the GENLOOM_MODELS entries: what a server loads at start."""
        names = [self.default_name]
        names += [n for n in self._aliases if n != self.default_name]
        return names

    def is_configured(self, name: str) -> bool:
        """Whether `name` is one of the models the server is configured with (never evicted from caches)."""
        return name in BUILTIN_MODELS or name in self._aliases

    def resolve(self, name: str, field: str = "model") -> ModelSpec:
        """Resolve a requested model name ("" = the default). Raises NotFound, or for a model path
        PermissionDenied (outside the model roots) / InvalidArgument (unusable). May convert the default model
        (tens of seconds, once per cache), so call it off the event loop. `field` names the request field in
        messages about paths."""
        name = name or self.default_name
        name = self._spellings.get(name, name)
        if name in BUILTIN_MODELS:
            return ModelSpec(name, BUILTIN_MODELS[name](self.settings.model_cache, name))
        if name in self._aliases:
            path = self._aliases[name]
            if not _is_model_dir(path):
                # The directory is the operator's, not the client's to know: it goes to the log only.
                logger.error("model %s is configured as %s, which is not a Hugging Face model directory", name, path)
                raise NotFound(f"model {quote(name)} is configured but its directory is not a model directory")
            return ModelSpec(name, path)
        if looks_like_path(name):
            if not self.settings.allow_model_paths:
                raise NotFound(
                    f"unknown model {quote(name)}: this server serves its configured models only "
                    f"(GENLOOM_ALLOW_MODEL_PATHS is off); known models: {self._known()}"
                )
            return self._resolve_path(name, field)
        raise NotFound(f"unknown model {quote(name)}; known models: {self._known()}")

    def name_of(self, name: str, field: str = "model") -> str:
        """The one name of the model `name` asks for, loading and converting nothing: "" is the default model's
        name, a spelling of a configured model's directory is its name, and (with GENLOOM_ALLOW_MODEL_PATHS) any
        other path is its directory's canonical name. Other names come back as given, known or not. A path is
        looked up on disk (call it off the event loop) and refused as resolve() refuses it."""
        name = name or self.default_name
        name = self._spellings.get(name, name)
        if name in BUILTIN_MODELS or name in self._aliases or not looks_like_path(name):
            return name
        if not self.settings.allow_model_paths:
            return name
        directory = resolve_within(name, self._roots, field=field, kind="dir", setting="GENLOOM_MODEL_ROOTS")
        return self._configured_dirs.get(directory) or self._canonical_name(directory)

    def _resolve_path(self, name: str, field: str) -> ModelSpec:
        # Containment before existence: outside the roots is the same answer whether or not the path exists.
        directory = resolve_within(name, self._roots, field=field, kind="dir", setting="GENLOOM_MODEL_ROOTS")
        configured = self._configured_dirs.get(directory)
        if configured is not None:
            return self.resolve(configured)
        if not _is_model_dir(directory):
            raise NotFound(f"{field}: model path {quote(name)} is not a Hugging Face model directory")
        return ModelSpec(self._canonical_name(directory), directory)

    def _canonical_name(self, directory: Path) -> str:
        """The one name of a directory inside the roots: relative to the first root, so it resolves back to the
        same directory and shows no server path."""
        relative = os.path.relpath(directory, canonical(self._roots[0]))
        return relative if relative.startswith("..") else f"./{relative}"

    def _known(self) -> str:
        names = sorted(n for n in {*BUILTIN_MODELS, *self._aliases} if not looks_like_path(n))
        return ", ".join(names) or "none but the default"


def _directory_name(spelling: str) -> str:
    """The last component of an operator's directory spelling, "." and ".." resolved on paper ("/srv/m/" -> "m")."""
    return on_paper(spelling).name


def _is_model_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any((path / marker).is_file() for marker in _MODEL_MARKERS)
    except OSError:  # a name too long, a loop of links: not a model directory
        return False

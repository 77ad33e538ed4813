"""Loaded tokenizers, by model name: the configured ones at start, local model paths on first use, and fine-tuned
models ("ft:<base>:<suffix>:<job-id>", looked up in the fine-tuned model registry) as their base model's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from genloom.services.finetune.registry import FineTunedModelResolver, is_fine_tuned
from genloom.services.models.registry import ModelRegistry, ModelSpec
from genloom.services.server.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

# transformers uses ~1e30 for "no limit" in model_max_length; anything this large is not a real window.
_NO_LIMIT = 10**8
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class SpecialTokenInfo:
    kind: str
    token: str
    id: int


@dataclass
class LoadedTokenizer:
    """A model's fast tokenizer plus the facts the service reports about it."""

    name: str
    path: Path
    hf: Any  # transformers PreTrainedTokenizerFast (TokenizersBackend in transformers 5)
    vocab_size: int
    context_window: int
    special_tokens: list[SpecialTokenInfo]
    adds_bos_token: bool

    @property
    def backend(self) -> Any:
        """The Rust `tokenizers.Tokenizer`: batched, releases the GIL."""
        return self.hf.backend_tokenizer

    @property
    def chat_template(self) -> str:
        template = self.hf.chat_template
        return template if isinstance(template, str) else ""

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[Any]:
        return self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise InvalidArgument(f"model {self.name!r} has no chat template: send plain text instead")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja2 errors, including a template's own raise_exception()
            raise InvalidArgument(f"the chat template of {self.name!r} rejected the conversation: {err}") from None
        return str(text)

    def decode(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return list(self.hf.batch_decode(sequences, skip_special_tokens=skip_special_tokens))


def load_tokenizer(spec: ModelSpec, max_model_len: int = 0) -> LoadedTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(spec.path))
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{spec.path}: genloom needs a fast (tokenizers) tokenizer; this one is {type(hf).__name__}")
    backend = hf.backend_tokenizer
    vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    context_window = _context_window(spec.path, hf, max_model_len)
    specials: list[SpecialTokenInfo] = []
    seen: set[int] = set()
    for kind in ("bos", "eos", "pad", "unk"):
        token = getattr(hf, f"{kind}_token", None)
        token_id = getattr(hf, f"{kind}_token_id", None)
        if token is not None and token_id is not None:
            specials.append(SpecialTokenInfo(kind, str(token), int(token_id)))
            seen.add(int(token_id))
    for token in hf.all_special_tokens:
        token_id = hf.convert_tokens_to_ids(token)
        if token_id is not None and int(token_id) not in seen:
            specials.append(SpecialTokenInfo("additional", str(token), int(token_id)))
            seen.add(int(token_id))
    with_specials = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    bos_id = getattr(hf, "bos_token_id", None)
    adds_bos = bos_id is not None and len(with_specials) > len(without) and with_specials[0] == bos_id
    logger.info(
        "tokenizer %s loaded from %s: vocab %d, context window %d", spec.name, spec.path, vocab_size, context_window
    )
    return LoadedTokenizer(spec.name, spec.path, hf, vocab_size, context_window, specials, adds_bos)


def _context_window(path: Path, hf: Any, max_model_len: int) -> int:
    window = 0
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)  # multimodal configs nest the language model's
        window = next((int(config[k]) for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), 0)
    tokenizer_limit = int(getattr(hf, "model_max_length", 0) or 0)
    if 0 < tokenizer_limit < _NO_LIMIT:
        window = min(window, tokenizer_limit) if window else tokenizer_limit
    if max_model_len:
        window = min(window, max_model_len) if window else max_model_len
    if window <= 0:
        raise ValueError(
            f"{path}: can't tell the context window (no max_position_embeddings in config.json); "
            "set GENLOOM_MAX_MODEL_LEN"
        )
    return window


class TokenizerStore:
    def __init__(
        self,
        registry: ModelRegistry,
        max_model_len: int = 0,
        loader: Callable[[ModelSpec, int], LoadedTokenizer] = load_tokenizer,
        fine_tuned: FineTunedModelResolver | None = None,
    ) -> None:
        self.registry = registry
        self._max_model_len = max_model_len
        self._loader = loader
        self._loaded: dict[str, LoadedTokenizer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fine_tuned = fine_tuned or FineTunedModelResolver(registry.settings.redis_url)
        # ft name -> its base model's tokenizer under the ft name (kept apart from _loaded: ListTokenizers lists
        # the tokenizers this server loaded, not every fine-tuned name a client has asked about).
        self._fine_tuned_tokenizers: dict[str, LoadedTokenizer] = {}

    async def preload(self) -> None:
        """Load the configured models (default first)."""
        for name in self.registry.configured_names():
            await self.get(name)

    async def get(self, name: str, field: str = "model") -> LoadedTokenizer:
        """The tokenizer for a requested model name ("" = default); loads it on first use. A fine-tuned model's is
        its base model's, reported under the fine-tuned name. Raises NotFound (InvalidArgument for a malformed
        "ft:" name, Unavailable when the fine-tuned model registry can't be reached)."""
        name = name or self.registry.default_name
        if is_fine_tuned(name):
            return await self._get_fine_tuned(name, field)
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._loaded:
                spec = await asyncio.to_thread(self.registry.resolve, name)
                self._loaded[name] = await asyncio.to_thread(self._loader, spec, self._max_model_len)
        return self._loaded[name]

    async def _get_fine_tuned(self, name: str, field: str) -> LoadedTokenizer:
        loaded = self._fine_tuned_tokenizers.get(name)
        if loaded is not None:
            return loaded
        model = await self._fine_tuned.resolve(name, field)
        if is_fine_tuned(model.base_model):
            raise NotFound(f"{field}: fine-tuned model {name!r} is registered with no usable base model")
        # Fine-tuning (LoRA or full) keeps the base model's vocabulary, so its tokenizer is the base model's.
        try:
            base = await self.get(model.base_model)
        except NotFound as err:
            raise NotFound(
                f"{field}: fine-tuned model {name!r} is based on {model.base_model!r}, which this server can't "
                f"load ({err.message})"
            ) from None
        loaded = replace(base, name=name)
        self._fine_tuned_tokenizers[name] = loaded
        return loaded

    def loaded(self) -> list[LoadedTokenizer]:
        """Loaded tokenizers, the default first."""
        default = self.registry.default_name
        return sorted(self._loaded.values(), key=lambda t: (t.name != default, t.name))

    async def close(self) -> None:
        await self._fine_tuned.close()

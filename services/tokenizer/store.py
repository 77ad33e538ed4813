"""Loaded tokenizers, by model name: the configured ones at start, model paths (inside the model roots) on first
use, and fine-tuned models ("ft:<base>:<suffix>:<job-id>", looked up in the fine-tuned model registry) as their base
model's."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from genloom.services.models.finetuned import FineTunedModelResolver, is_fine_tuned
from genloom.services.models.registry import ModelRegistry, ModelSpec
from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied, quote
from genloom.services.server.lru import LRUCache
from genloom.v1 import tokenizer_pb2

logger = logging.getLogger(__name__)

# transformers uses ~1e30 for "no limit" in model_max_length; anything this large is not a real window.
_NO_LIMIT = 10**8
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Fine-tuned names remembered with their base model's name (two short strings each).
_MAX_FINE_TUNED_NAMES = 1024


class _NoTokenizer(Exception):
    """A client-named model directory holds no tokenizer that loads (the details are in the log). Raised by the load
    all concurrent callers share, so it carries nothing of any one caller's: each builds its own message."""


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
            raise InvalidArgument(f"model {quote(self.name)} has no chat template: send plain text instead")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja2 errors, including a template's own raise_exception()
            raise InvalidArgument(
                f"the chat template of {quote(self.name)} rejected the conversation: {quote(str(err), 200)}"
            ) from None
        return str(text)

    def encode_inputs(
        self,
        inputs: Sequence[tokenizer_pb2.TokenizerInput],
        add_special_tokens: bool,
        add_generation_prompt: bool,
    ) -> list[Any]:
        """TokenizerInputs -> encodings in input order: plain texts in one batch, conversations rendered with the chat
        template in another. Raises InvalidArgument naming every bad input ("inputs[i]...")."""
        texts: list[str] = []
        text_slots: list[int] = []
        chats: list[str] = []
        chat_slots: list[int] = []
        violations: list[FieldViolation] = []
        for i, item in enumerate(inputs):
            kind = item.WhichOneof("input")
            if kind == "text":
                texts.append(item.text)
                text_slots.append(i)
            elif kind == "conversation":
                try:
                    messages = conversation_messages(item.conversation, f"inputs[{i}].conversation")
                except InvalidArgument as err:
                    violations.extend(err.violations)
                    continue
                chats.append(self.render_chat(messages, add_generation_prompt))
                chat_slots.append(i)
            else:
                violations.append(FieldViolation(f"inputs[{i}]", "set either text or conversation"))
        InvalidArgument.raise_for(violations)
        out: list[Any] = [None] * len(inputs)
        if texts:
            for slot, enc in zip(text_slots, self.encode(texts, add_special_tokens), strict=True):
                out[slot] = enc
        if chats:
            # The template already placed the special tokens it wants.
            for slot, enc in zip(chat_slots, self.encode(chats, False), strict=True):
                out[slot] = enc
        return out

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
        special_id = hf.convert_tokens_to_ids(token)  # one token in, one id out (a list only for a list in)
        if special_id is not None and not isinstance(special_id, list) and int(special_id) not in seen:
            specials.append(SpecialTokenInfo("additional", str(token), int(special_id)))
            seen.add(int(special_id))
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
    """Tokenizers by canonical model name. The configured models stay loaded; models named by path are kept in a
    least-recently-used cache of GENLOOM_MAX_CACHED_MODELS, so no sequence of requests grows the process without
    bound (every spelling of a directory resolves to one name, hence one entry)."""

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
        self._max_cached = registry.settings.max_cached_models
        # Least recently used first (configured models too, but those are never evicted).
        self._loaded: OrderedDict[str, LoadedTokenizer] = OrderedDict()
        # Loads under way, by canonical name: concurrent first requests share one load (and the entry goes when it
        # ends, so names that fail to load leave nothing behind).
        self._loading: dict[str, asyncio.Task[LoadedTokenizer]] = {}
        self._fine_tuned = fine_tuned or FineTunedModelResolver(registry.settings.redis_url)
        # ft name -> its base model's name (the tokenizer itself stays in _loaded alone: ListTokenizers lists the
        # tokenizers this server loaded, not every fine-tuned name a client has asked about).
        self._fine_tuned_bases: LRUCache[str, str] = LRUCache(_MAX_FINE_TUNED_NAMES)

    async def preload(self) -> None:
        """Load the configured models (default first)."""
        for name in self.registry.configured_names():
            await self.get(name)

    async def get(self, name: str, field: str = "model") -> LoadedTokenizer:
        """The tokenizer for a requested model name ("" = default); loads it on first use. A fine-tuned model's is
        its base model's, reported under the fine-tuned name. Raises NotFound (InvalidArgument for a malformed
        "ft:" name or an unusable path, PermissionDenied for a path outside the model roots, Unavailable when the
        fine-tuned model registry can't be reached)."""
        name = name or self.registry.default_name
        if is_fine_tuned(name):
            return await self._get_fine_tuned(name, field)
        loaded = self._hit(name)
        if loaded is not None:
            return loaded
        spec = await asyncio.to_thread(self.registry.resolve, name, field)
        loaded = self._hit(spec.name)  # another spelling of a model already loaded
        if loaded is not None:
            return loaded
        task = self._loading.get(spec.name)
        if task is None:
            task = asyncio.create_task(self._load(spec), name=f"genloom-tokenizer-load:{spec.name}")
            self._loading[spec.name] = task
            task.add_done_callback(functools.partial(self._load_ended, spec.name))
        try:
            # Shielded: a cancelled caller does not cancel a load others wait for (and the result is kept).
            return await asyncio.shield(task)
        except _NoTokenizer:
            raise InvalidArgument.field(
                field, f"model path {quote(name)} holds no tokenizer this server can load"
            ) from None

    def _hit(self, name: str) -> LoadedTokenizer | None:
        loaded = self._loaded.get(name)
        if loaded is not None:
            self._loaded.move_to_end(name)
        return loaded

    async def _load(self, spec: ModelSpec) -> LoadedTokenizer:
        configured = self.registry.is_configured(spec.name)
        try:
            loaded = await asyncio.to_thread(self._loader, spec, self._max_model_len)
        except Exception:
            if configured:
                raise  # the operator's model: a server fault, reported as such
            # A client-named directory that holds no usable tokenizer is the client's problem; the details name
            # server paths, so they go to the log only.
            logger.warning("model %s: its tokenizer does not load", spec.name, exc_info=True)
            raise _NoTokenizer(spec.name) from None
        self._loaded[spec.name] = loaded
        self._evict()
        return loaded

    def _evict(self) -> None:
        cached = [name for name in self._loaded if not self.registry.is_configured(name)]
        for name in cached[: max(0, len(cached) - self._max_cached)]:  # least recently used first
            del self._loaded[name]
            logger.info("tokenizer %s dropped (least recently used; GENLOOM_MAX_CACHED_MODELS)", name)

    def _load_ended(self, name: str, task: asyncio.Task[LoadedTokenizer]) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here: a failed load is its callers' error, not an asyncio log line

    async def _get_fine_tuned(self, name: str, field: str) -> LoadedTokenizer:
        base_name = self._fine_tuned_bases.get(name)
        if base_name is None:
            model = await self._fine_tuned.resolve(name, field)
            if is_fine_tuned(model.base_model):
                raise NotFound(f"{field}: fine-tuned model {quote(name)} is registered with no usable base model")
            base_name = model.base_model
        # Fine-tuning (LoRA or full) keeps the base model's vocabulary, so its tokenizer is the base model's.
        try:
            base = await self.get(base_name)
        except (NotFound, PermissionDenied, InvalidArgument) as err:
            raise NotFound(
                f"{field}: fine-tuned model {quote(name)} is based on {quote(base_name)}, which this server can't "
                f"load ({err.message})"
            ) from None
        self._fine_tuned_bases.put(name, base_name)
        return replace(base, name=name)

    def loaded(self) -> list[LoadedTokenizer]:
        """Loaded tokenizers, the default first."""
        default = self.registry.default_name
        return sorted(self._loaded.values(), key=lambda t: (t.name != default, t.name))

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        await self._fine_tuned.close()

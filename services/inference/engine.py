"""The engine protocol: what the inference servicer needs from a model runtime (vLLM, transformers, a remote
OpenAI-compatible server), in the spirit of vLLM's EngineClient.

Engines work in token ids. Everything that must behave the same whatever the engine — chat templates,
detokenization across multi-byte characters, stop sequences, context-window checks, validation — lives above
them (tokenizer store, `text.py`, the servicer). An engine only turns prompt ids into generated ids (with
log-probabilities), scores continuations, and manages its requests and adapters.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model's end-of-sequence token (not with ignore_eos)
    STOP_TOKEN = "stop_token"  # one of SamplingOptions.stop_token_ids
    ABORT = "abort"  # abort(request_id) or engine shutdown


class EngineError(Exception):
    """A request failed in the engine but the engine is fine (recoverable)."""


class SamplingError(EngineError):
    """An engine refused a request's sampling parameters (its own check, or the runtime's): the caller's to fix,
    INVALID_ARGUMENT naming the sampling field."""


class EngineDeadError(EngineError):
    """The engine can no longer serve anything (fatal): health goes NOT_SERVING, requests get UNAVAILABLE."""


class RequestFailedError(EngineError):
    """One request failed in the engine for a reason of the engine's own (e.g. the model produced non-finite
    logits for it), not the caller's: it ends with INTERNAL naming its request id, while the engine and the other
    requests go on."""


class EngineOverloadedError(EngineError):
    """The engine could not fit a request right now (e.g. device memory ran out during its prefill): the
    request failed, the engine serves on, and the same request may succeed later (RESOURCE_EXHAUSTED)."""


class AdapterError(EngineError):
    """An adapter can't be loaded (bad directory, wrong base model, rank over the limit, unknown name)."""


@dataclass(frozen=True)
class SamplingOptions:
    """Validated, defaults-resolved sampling parameters (see SamplingParams in inference.proto)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1.0 = no limit
    repetition_penalty: float = 1.0  # 1.0 = none
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None = random
    logprobs: int | None = None  # None = none; 0 = the chosen token's; N = also the top N
    min_new_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions
    adapter: str | None = None  # the name of a loaded adapter, or None for the base model


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probabilities (natural log, raw distribution: log-softmax of the logits before temperature,
    top-k/top-p and penalties) of one generated token and, when asked, the top-N alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class EngineOutput:
    """What one engine step produced for a request. The last output of a request has `finish_reason` set."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # aligned with token_ids when requested
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # with FinishReason.STOP_TOKEN


@dataclass(frozen=True)
class ScoreQuery:
    """Score each continuation as a follow-up of the prompt (ids are concatenated, nothing is added)."""

    prompt_token_ids: Sequence[int]
    continuations: Sequence[Sequence[int]]  # each non-empty
    adapter: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # "vllm" | "hf" | "openai"
    engine_version: str
    model: str  # the served model's name
    source: str  # where the weights came from (a directory, a URL)
    dtype: str  # "float32", "bfloat16", ...
    device: str  # "cpu", "cuda:0", or the remote server's URL
    context_window: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    supports_lora: bool
    max_lora_rank: int
    max_loras: int


class Engine(abc.ABC):
    """A model runtime. One engine serves one base model (and LoRA adapters on top of it)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and run a warm-up generation; return when requests can be served."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Generate for one request. Outputs arrive as tokens are produced; the last has `finish_reason`.

        Cancelling the consuming task (or closing the iterator) must abort the request in the engine at once,
        freeing its slot: `load()` must no longer count it.
        Raises EngineError for a bad request, EngineDeadError when the engine died.
        """

    @abc.abstractmethod
    async def score(self, queries: Sequence[ScoreQuery]) -> list[list[list[float]]]:
        """Per query, per continuation, the log-probability of each continuation token given everything before
        it (natural log, raw distribution). Batched: all queries in as few forward passes as the engine can."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Stop a running request; its stream ends with FinishReason.ABORT. False if it was not running."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine can no longer serve."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """What the engine serves (valid after start())."""

    @abc.abstractmethod
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts right now."""

    @abc.abstractmethod
    async def add_adapter(self, name: str, path: str) -> None:
        """Make a validated PEFT LoRA directory available under `name` (see adapters.py for the checks done
        before this is called). Raises AdapterError."""

    @abc.abstractmethod
    async def remove_adapter(self, name: str) -> None:
        """Forget an adapter. Raises AdapterError if it is unknown."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Abort everything and release the model."""

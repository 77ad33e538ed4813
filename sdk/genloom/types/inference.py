"""Results of the inference service."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from genloom.v1 import common_pb2, inference_pb2

_FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    inference_pb2.FINISH_REASON_STOP_TOKEN: "stop_token",
    inference_pb2.FINISH_REASON_EOS: "eos",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
_SIDE = {common_pb2.TRUNCATION_SIDE_LEFT: "left", common_pb2.TRUNCATION_SIDE_RIGHT: "right"}
_ENGINE = {inference_pb2.ENGINE_VLLM: "vllm", inference_pb2.ENGINE_HF: "hf", inference_pb2.ENGINE_OPENAI: "openai"}
_KIND = {
    inference_pb2.MODEL_KIND_BASE: "base",
    inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER: "fine_tuned_adapter",
    inference_pb2.MODEL_KIND_FINE_TUNED_FULL: "fine_tuned_full",
}


@dataclass(frozen=True)
class Usage:
    """Token accounting."""

    prompt_tokens: int
    """Tokens the model read."""
    completion_tokens: int
    """Tokens the model generated."""
    total_tokens: int
    """Their sum."""

    @classmethod
    def from_pb(cls, pb: common_pb2.Usage) -> Usage:
        return cls(pb.prompt_tokens, pb.completion_tokens, pb.total_tokens)


@dataclass(frozen=True)
class TruncationReport:
    """What the server's context-window check did to a prompt."""

    truncated: bool
    """Whether anything was removed."""
    side: str | None
    """"left" or "right" when truncated."""
    original_prompt_tokens: int
    """Prompt tokens before truncation."""
    prompt_tokens: int
    """Prompt tokens sent to the model."""
    removed_tokens: int
    """original_prompt_tokens - prompt_tokens."""
    removed_messages: int
    """Whole chat messages removed (conversations with left truncation)."""
    context_window: int
    """The model's context window."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.TruncationReport) -> TruncationReport:
        return cls(
            truncated=pb.truncated,
            side=_SIDE.get(pb.side),
            original_prompt_tokens=pb.original_prompt_tokens,
            prompt_tokens=pb.prompt_tokens,
            removed_tokens=pb.removed_tokens,
            removed_messages=pb.removed_messages,
            context_window=pb.context_window,
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and, when asked, its top alternatives."""

    token_id: int
    """The token's id."""
    token: str
    """Its string form."""
    logprob: float
    """Natural-log probability under the raw distribution."""
    top: list[tuple[int, str, float]] = field(default_factory=list)
    """(token id, token, logprob) of the most likely tokens at this position, most likely first."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.TokenLogprob) -> TokenLogprob:
        return cls(pb.token_id, pb.token, pb.logprob, [(t.token_id, t.token, t.logprob) for t in pb.top_logprobs])


@dataclass(frozen=True)
class Timing:
    """Server-side timings in seconds."""

    time_to_first_token: float
    """From receipt of the request to the first generated token."""
    total: float
    """From receipt of the request to the last generated token."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.GenerationTiming) -> Timing:
        return cls(pb.time_to_first_token_s, pb.total_s)


@dataclass(frozen=True)
class Generation:
    """Result of `inference.generate()`."""

    request_id: str
    """The request's id (yours, or assigned by the server)."""
    model: str
    """The model that generated."""
    adapter: str
    """The adapter used ("" for none)."""
    text: str
    """The generated text (stop sequences removed)."""
    token_ids: list[int]
    """The generated token ids."""
    finish_reason: str
    """"length", "stop_sequence", "stop_token", "eos" or "abort"."""
    stop_sequence: str
    """The stop sequence that ended generation, if one did."""
    stop_token_id: int | None
    """The stop token that ended generation, if one did."""
    usage: Usage
    """Token accounting."""
    truncation: TruncationReport
    """What the context-window check did."""
    timing: Timing
    """Server-side timings."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Per generated token, when requested."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.GenerateResponse) -> Generation:
        return cls(
            request_id=pb.request_id,
            model=pb.model.model,
            adapter=pb.model.adapter,
            text=pb.text,
            token_ids=pb.token_ids[:],
            finish_reason=_FINISH.get(pb.finish_reason, "unspecified"),
            stop_sequence=pb.stop_sequence,
            stop_token_id=pb.stop_token_id if pb.HasField("stop_token_id") else None,
            usage=Usage.from_pb(pb.usage),
            truncation=TruncationReport.from_pb(pb.truncation),
            timing=Timing.from_pb(pb.timing),
            logprobs=[TokenLogprob.from_pb(lp) for lp in pb.logprobs],
        )


@dataclass(frozen=True)
class GenerationDelta:
    """New tokens of a streamed generation."""

    token_ids: list[int]
    """The new token ids (may be empty when only held-back text is released)."""
    text: str
    """Text completed by these tokens (may be empty while a character or possible stop sequence is pending)."""
    token_offset: int
    """Index of the first of these tokens within the whole completion."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Per token id, when requested."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.GenerateDelta) -> GenerationDelta:
        return cls(pb.token_ids[:], pb.text, pb.token_offset, [TokenLogprob.from_pb(lp) for lp in pb.logprobs])


@dataclass(frozen=True)
class GenerationFinish:
    """The end of a streamed generation."""

    model: str
    """The model that generated."""
    adapter: str
    """The adapter used ("" for none)."""
    finish_reason: str
    """"length", "stop_sequence", "stop_token", "eos" or "abort"."""
    stop_sequence: str
    """The stop sequence that matched, if any."""
    stop_token_id: int | None
    """The stop token that matched, if any."""
    usage: Usage
    """Token accounting."""
    truncation: TruncationReport
    """What the context-window check did."""
    timing: Timing
    """Server-side timings."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.GenerateFinish) -> GenerationFinish:
        return cls(
            model=pb.model.model,
            adapter=pb.model.adapter,
            finish_reason=_FINISH.get(pb.finish_reason, "unspecified"),
            stop_sequence=pb.stop_sequence,
            stop_token_id=pb.stop_token_id if pb.HasField("stop_token_id") else None,
            usage=Usage.from_pb(pb.usage),
            truncation=TruncationReport.from_pb(pb.truncation),
            timing=Timing.from_pb(pb.timing),
        )


@dataclass(frozen=True)
class CandidateScore:
    """The log-likelihood of one candidate continuation."""

    sum_logprob: float
    """Log-probability of the whole candidate."""
    mean_logprob: float
    """Per-token average (length-normalized)."""
    token_count: int
    """Candidate tokens."""
    token_ids: list[int]
    """The candidate's token ids."""
    token_logprobs: list[float] = field(default_factory=list)
    """Per-token log-probabilities, when requested."""


@dataclass(frozen=True)
class ScoreResult:
    """Scores for one prompt."""

    candidates: list[CandidateScore]
    """One per candidate, in request order."""
    prompt_tokens: int
    """Tokens of the prompt as scored."""
    truncation: TruncationReport
    """What the context-window check did."""

    @property
    def best(self) -> int:
        """Index of the candidate with the highest sum_logprob."""
        return max(range(len(self.candidates)), key=lambda i: self.candidates[i].sum_logprob)


@dataclass(frozen=True)
class Scores:
    """Result of `inference.score()`."""

    model: str
    """The model that scored."""
    results: list[ScoreResult]
    """One per prompt, in order."""
    usage: Usage
    """All tokens prefilled."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.ScoreResponse) -> Scores:
        return cls(
            model=pb.model.model,
            results=[
                ScoreResult(
                    candidates=[
                        CandidateScore(
                            c.sum_logprob, c.mean_logprob, c.token_count, c.token_ids[:], c.token_logprobs[:]
                        )
                        for c in r.candidates
                    ],
                    prompt_tokens=r.prompt_tokens,
                    truncation=TruncationReport.from_pb(r.truncation),
                )
                for r in pb.results
            ],
            usage=Usage.from_pb(pb.usage),
        )


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter the server knows."""

    name: str
    """The name requests use."""
    path: str
    """The path it was loaded from, as given to `load_adapter`; empty for a fine-tuned model's adapter."""
    base_model: str
    """The model it applies to."""
    rank: int
    """LoRA rank."""
    alpha: float
    """LoRA alpha."""
    target_modules: list[str]
    """Modules it adapts."""
    loaded: bool
    """Whether it is loaded now."""
    loaded_at: datetime | None
    """When it was loaded."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.AdapterInfo) -> AdapterInfo:
        return cls(
            name=pb.name,
            path=pb.path,
            base_model=pb.base_model,
            rank=pb.rank,
            alpha=pb.alpha,
            target_modules=list(pb.target_modules),
            loaded=pb.loaded,
            loaded_at=pb.loaded_at.ToDatetime() if pb.HasField("loaded_at") else None,
        )


@dataclass(frozen=True)
class ModelSummary:
    """A model the server can serve."""

    name: str
    """The name to pass as `model`."""
    is_default: bool
    """Whether requests without `model` use it."""
    kind: str
    """"base", "fine_tuned_adapter" or "fine_tuned_full"."""
    context_window: int
    """Context window in tokens."""
    engine: str
    """"vllm", "hf" or "openai"."""
    ready: bool
    """Whether it can serve now."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.ModelSummary) -> ModelSummary:
        return cls(
            pb.name,
            pb.is_default,
            _KIND.get(pb.kind, "unspecified"),
            pb.context_window,
            _ENGINE.get(pb.engine, "unspecified"),
            pb.ready,
        )


@dataclass(frozen=True)
class ModelInfo:
    """Result of `inference.model_info()`."""

    name: str
    """The model's name."""
    engine: str
    """"vllm", "hf" or "openai"."""
    engine_version: str
    """The engine's version."""
    dtype: str
    """Weights/compute dtype."""
    device: str
    """Where it runs."""
    context_window: int
    """Context window in tokens."""
    vocab_size: int
    """Vocabulary size."""
    supports_lora: bool
    """Whether adapters can be served."""
    max_lora_rank: int
    """Largest adapter rank accepted."""
    adapters: list[AdapterInfo]
    """Loaded adapters."""
    running_requests: int
    """Requests generating now."""
    waiting_requests: int
    """Requests waiting for a slot."""
    ready: bool
    """Whether it can serve now."""

    @classmethod
    def from_pb(cls, pb: inference_pb2.GetModelInfoResponse) -> ModelInfo:
        return cls(
            name=pb.name,
            engine=_ENGINE.get(pb.engine, "unspecified"),
            engine_version=pb.engine_version,
            dtype=pb.dtype,
            device=pb.device,
            context_window=pb.context_window,
            vocab_size=pb.vocab_size,
            supports_lora=pb.supports_lora,
            max_lora_rank=pb.max_lora_rank,
            adapters=[AdapterInfo.from_pb(a) for a in pb.adapters],
            running_requests=pb.running_requests,
            waiting_requests=pb.waiting_requests,
            ready=pb.ready,
        )

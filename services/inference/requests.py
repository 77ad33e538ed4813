"""From a request's protos to the engine's request objects: request ids, sampling, prompts, the context window and
truncation, for Generate/GenerateStream (an EngineRequest and its TextAssembler) and Score (ScoreQuery per item).

Every check a request's fields get happens here, the same for every engine; the servicer calls these with the model
the serving core resolved (serving.py), and the checks of sampling parameters themselves are sampling.py's (shared
with the task service).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Container
from dataclasses import dataclass

from genloom.services.inference.engine import Engine, EngineRequest, SamplingOptions, ScoreQuery
from genloom.services.inference.sampling import SamplingLimits, sampling_options
from genloom.services.inference.serving import ResolvedModel
from genloom.services.inference.settings import InferenceSettings
from genloom.services.inference.text import TextAssembler
from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import AlreadyExists, FieldViolation, InvalidArgument, ResourceExhausted, quote
from genloom.services.tokenizer.store import LoadedTokenizer
from genloom.v1 import common_pb2, inference_pb2

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

GenerateRequest = inference_pb2.GenerateRequest | inference_pb2.GenerateStreamRequest


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    report: inference_pb2.TruncationReport


@dataclass
class Generation:
    """A validated generation, ready for the engine."""

    request_id: str
    engine_request: EngineRequest
    assembler: TextAssembler
    prompt: PreparedPrompt
    model: common_pb2.ModelRef
    received: float
    engine: Engine
    tokenizer: LoadedTokenizer


@dataclass
class ScoreJob:
    """A validated Score request: per item its prompt, its candidates' ids and the engine's query."""

    queries: list[ScoreQuery]
    prompts: list[PreparedPrompt]
    candidate_ids: list[list[list[int]]]


def prepare_generation(
    request: GenerateRequest,
    model: ResolvedModel,
    received: float,
    settings: InferenceSettings,
    in_flight: Container[str],
) -> Generation:
    """Validate a Generate/GenerateStream request and turn it into an engine request."""
    engine, tok = model.engine, model.tokenizer
    request_id = request.request_id or uuid.uuid4().hex
    if not REQUEST_ID.match(request_id):
        raise InvalidArgument.field("request_id", "1 to 128 characters from [A-Za-z0-9._:-]")
    if request_id in in_flight:
        raise AlreadyExists(f"request {quote(request_id)} is already in flight")
    check_truncation(request.truncation)
    sampling, stop, skip_special = sampling_for(request.sampling, tok, settings)
    add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
    prompt = prepare_prompt(
        request.prompt, "prompt", tok, add_special, request.truncation, reserve=sampling.max_new_tokens
    )
    _, waiting = engine.load()
    if waiting >= settings.max_queued_requests:
        raise ResourceExhausted(
            f"{waiting} requests are waiting for the engine (limit {settings.max_queued_requests}); retry later",
            retry_after=1.0,
        )
    assembler = TextAssembler(tok.hf, stop, skip_special_tokens=skip_special, min_new_tokens=sampling.min_new_tokens)
    engine_request = EngineRequest(request_id, prompt.token_ids, sampling, adapter=model.engine_adapter)
    return Generation(request_id, engine_request, assembler, prompt, model.echo, received, engine, tok)


def prepare_score(request: inference_pb2.ScoreRequest, model: ResolvedModel, settings: InferenceSettings) -> ScoreJob:
    """Validate a Score request and turn each item into a ScoreQuery (its prompt fitted to the context window with
    room for its longest candidate)."""
    tok = model.tokenizer
    s = settings
    check_truncation(request.truncation)
    if not request.items:
        raise InvalidArgument.field("items", "must contain at least one item")
    if len(request.items) > s.score_max_items:
        raise InvalidArgument.field(
            "items", f"has {len(request.items)} items; the limit is {s.score_max_items} (GENLOOM_SCORE_MAX_ITEMS)"
        )
    total = sum(len(item.candidates) for item in request.items)
    if total > s.score_max_candidates:
        raise InvalidArgument.field(
            "items",
            f"has {total} candidates in all; the limit is {s.score_max_candidates} (GENLOOM_SCORE_MAX_CANDIDATES)",
        )
    add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
    job = ScoreJob([], [], [])
    for i, item in enumerate(request.items):
        field = f"items[{i}]"
        if not item.candidates:
            raise InvalidArgument.field(f"{field}.candidates", "must contain at least one candidate")
        empty = [j for j, c in enumerate(item.candidates) if not c]
        if empty:
            raise InvalidArgument.field(f"{field}.candidates[{empty[0]}]", "candidates must not be empty")
        encoded = [enc.ids for enc in tok.encode(list(item.candidates), False)]
        longest = max(len(ids) for ids in encoded)
        prompt = prepare_prompt(
            item.prompt, f"{field}.prompt", tok, add_special, request.truncation, reserve=longest, for_score=True
        )
        job.prompts.append(prompt)
        job.candidate_ids.append(encoded)
        job.queries.append(ScoreQuery(prompt.token_ids, encoded, adapter=model.engine_adapter))
    return job


def sampling_for(
    params: inference_pb2.SamplingParams, tok: LoadedTokenizer, settings: InferenceSettings
) -> tuple[SamplingOptions, list[str], bool]:
    """The engine's sampling options, the stop sequences and skip_special_tokens of a request's SamplingParams."""
    s = settings
    limits = SamplingLimits(
        default_max_new_tokens=s.default_max_new_tokens,
        vocab_size=tok.vocab_size,
        max_logprobs=s.max_logprobs,
        max_stop_sequences=s.max_stop_sequences,
    )
    options = sampling_options(params, limits)
    skip_special = params.skip_special_tokens if params.HasField("skip_special_tokens") else True
    return options, list(params.stop), skip_special


def prepare_prompt(
    prompt: inference_pb2.Prompt,
    field: str,
    tok: LoadedTokenizer,
    add_special_tokens: bool,
    truncation: common_pb2.TruncationSide,
    *,
    reserve: int,
    for_score: bool = False,
) -> PreparedPrompt:
    """Prompt -> ids that fit the context window with `reserve` tokens to spare (or a clear error)."""
    window = tok.context_window
    kind = prompt.WhichOneof("prompt")
    removed_messages = 0
    original = 0
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument.field(f"{field}.text", "must not be empty")
        ids = tok.encode([prompt.text], add_special_tokens)[0].ids
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        if not ids:
            raise InvalidArgument.field(f"{field}.token_ids", "must contain at least one id")
        bad = [i for i, t in enumerate(ids) if t >= tok.vocab_size]
        if bad:
            raise InvalidArgument.field(
                f"{field}.token_ids.ids[{bad[0]}]",
                f"token id {ids[bad[0]]} is outside the vocabulary (size {tok.vocab_size})",
            )
    elif kind == "conversation":
        messages = conversation_messages(prompt.conversation, f"{field}.conversation")
        ids, removed_messages, original = fit_conversation(messages, field, tok, truncation, window - reserve)
    else:
        raise InvalidArgument.field(field, "set text, conversation or token_ids")
    report = inference_pb2.TruncationReport(
        context_window=window, max_new_tokens=0 if for_score else reserve, original_prompt_tokens=len(ids)
    )
    if removed_messages:
        report.truncated = True
        report.side = common_pb2.TRUNCATION_SIDE_LEFT
        report.removed_messages = removed_messages
        report.original_prompt_tokens = original
    if len(ids) + reserve > window:
        what = "candidate tokens" if for_score else "max_new_tokens"
        if truncation == common_pb2.TRUNCATION_SIDE_UNSPECIFIED or kind == "conversation":
            raise InvalidArgument(
                f"{field}: {len(ids)} prompt tokens + {reserve} {what} = {len(ids) + reserve}, over the model's "
                f"context window of {window} tokens; shorten the prompt, lower {what}, or set truncation",
                [FieldViolation(field, f"{len(ids)} + {reserve} > {window} tokens")],
            )
        keep = window - reserve
        if keep < 1:
            raise InvalidArgument.field(
                "sampling.max_new_tokens" if not for_score else field,
                f"{reserve} leaves no room for a prompt in {window} tokens",
            )
        report.truncated = True
        report.side = truncation
        report.original_prompt_tokens = len(ids)
        ids = ids[-keep:] if truncation == common_pb2.TRUNCATION_SIDE_LEFT else ids[:keep]
    report.prompt_tokens = len(ids)
    report.removed_tokens = report.original_prompt_tokens - len(ids)
    return PreparedPrompt(ids, report)


def fit_conversation(
    messages: list[dict[str, str]], field: str, tok: LoadedTokenizer, truncation: int, budget: int
) -> tuple[list[int], int, int]:
    """Render a conversation; with LEFT truncation drop the oldest non-system messages until it fits.
    Returns (ids, messages removed, tokens before removal)."""

    def render(msgs: list[dict[str, str]]) -> list[int]:
        return list(tok.encode([tok.render_chat(msgs, True)], False)[0].ids)

    ids = render(messages)
    original = len(ids)
    if len(ids) <= budget or truncation == common_pb2.TRUNCATION_SIDE_UNSPECIFIED:
        return ids, 0, original
    if truncation == common_pb2.TRUNCATION_SIDE_RIGHT:
        raise InvalidArgument.field("truncation", "RIGHT truncation is not allowed for conversations: use LEFT")
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    removed = 0
    kept = list(messages)
    while len(ids) > budget and len(kept) - system > 1:
        del kept[system]
        removed += 1
        ids = render(kept)
    if len(ids) > budget:
        raise InvalidArgument.field(
            f"{field}.conversation", f"the last message alone needs {len(ids)} tokens; only {budget} are available"
        )
    return ids, removed, original


def check_truncation(value: int) -> None:
    """An unknown TruncationSide (99, -1: proto3 enums are open) is refused, as the task service does."""
    if value not in common_pb2.TruncationSide.values():
        raise InvalidArgument.field("truncation", f"{value} is not a valid TruncationSide")

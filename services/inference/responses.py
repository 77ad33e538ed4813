"""From the serving core's results to response protos: a generation's deltas and finish (text assembled the same
for every engine), Score results, and the descriptions of models and adapters. Used by the servicer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from pathlib import Path

from genloom.services.inference.engine import EngineDeadError, EngineError, EngineInfo, EngineOutput, FinishReason
from genloom.services.inference.errors import died_while, request_error
from genloom.services.inference.requests import Generation, ScoreJob
from genloom.services.inference.serving import LoadedAdapter, ModelDescription, ServedModels
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.finetuned import FineTunedModel
from genloom.services.tokenizer.store import LoadedTokenizer
from genloom.v1 import common_pb2, inference_pb2

FINISH_TO_PB = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: inference_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}
ENGINE_TO_PB = {"vllm": inference_pb2.ENGINE_VLLM, "hf": inference_pb2.ENGINE_HF, "openai": inference_pb2.ENGINE_OPENAI}


async def generation_events(
    g: Generation, stream: AsyncGenerator[EngineOutput, None]
) -> AsyncGenerator[inference_pb2.GenerateDelta | inference_pb2.GenerateFinish, None]:
    """Drive one generation from its engine outputs: deltas as text becomes final, then the finish. Cancelling the
    caller (client cancel, deadline) closes the engine stream, which aborts the request in the engine."""
    tok = g.tokenizer
    first_token_at: float | None = None
    offset = 0
    last: EngineOutput | None = None
    try:
        async for output in stream:
            if first_token_at is None and output.token_ids:
                first_token_at = time.monotonic()
            text = g.assembler.push(output.token_ids)
            delta = inference_pb2.GenerateDelta(token_ids=output.token_ids, text=text, token_offset=offset)
            if g.engine_request.sampling.logprobs is not None:
                delta.logprobs.extend(logprobs_pb(output, tok))
            offset += len(output.token_ids)
            if output.token_ids or text:
                yield delta
            last = output
            if output.finish_reason is not None or g.assembler.stop_sequence is not None:
                break
    except EngineDeadError:
        # The serving core has told the pool (about the engine the request last ran on, which may not be g.engine).
        raise died_while("generating") from None
    except EngineError as err:
        # A refusal other than sampling is about the prompt (e.g. a remote server's 4xx): the engine checked
        # nothing else.
        raise request_error(err, g.request_id, field="prompt") from None
    finally:
        await stream.aclose()  # aborts the request in the engine if it is still running
    tail = g.assembler.finish()
    if tail:
        yield inference_pb2.GenerateDelta(text=tail, token_offset=offset)
    finished = time.monotonic()
    finish = inference_pb2.GenerateFinish(
        model=g.model,
        usage=common_pb2.Usage(
            prompt_tokens=len(g.prompt.token_ids),
            completion_tokens=offset,
            total_tokens=len(g.prompt.token_ids) + offset,
        ),
        truncation=g.prompt.report,
        timing=inference_pb2.GenerationTiming(
            time_to_first_token_s=(first_token_at or finished) - g.received,
            total_s=finished - g.received,
        ),
    )
    if g.assembler.stop_sequence is not None:
        finish.finish_reason = inference_pb2.FINISH_REASON_STOP_SEQUENCE
        finish.stop_sequence = g.assembler.stop_sequence
    elif last is not None and last.finish_reason is not None:
        finish.finish_reason = FINISH_TO_PB[last.finish_reason]
        if last.finish_reason is FinishReason.STOP_TOKEN and last.stop_token_id is not None:
            finish.stop_token_id = last.stop_token_id
    else:
        finish.finish_reason = inference_pb2.FINISH_REASON_ABORT
    yield finish


def score_response(
    job: ScoreJob, scores: list[list[list[float]]], echo: common_pb2.ModelRef, token_logprobs: bool
) -> inference_pb2.ScoreResponse:
    response = inference_pb2.ScoreResponse(model=echo)
    prefilled = 0
    for prompt, ids_per_candidate, item_scores in zip(job.prompts, job.candidate_ids, scores, strict=True):
        result = response.results.add(prompt_tokens=len(prompt.token_ids), truncation=prompt.report)
        for ids, logprobs in zip(ids_per_candidate, item_scores, strict=True):
            total_lp = float(sum(logprobs))
            candidate = result.candidates.add(
                sum_logprob=total_lp, mean_logprob=total_lp / len(ids), token_count=len(ids), token_ids=ids
            )
            if token_logprobs:
                candidate.token_logprobs.extend(logprobs)
            prefilled += len(prompt.token_ids) + len(ids)
    response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prefilled, total_tokens=prefilled))
    return response


def model_summaries(served: ServedModels) -> list[inference_pb2.ModelSummary]:
    """ListModels: the served model, then the fine-tuned models this server has loaded, by name (others are
    registered in Redis and loaded on first use)."""
    engine, tok = served.ready()
    engine_kind = ENGINE_TO_PB.get(engine.info().engine, inference_pb2.ENGINE_UNSPECIFIED)
    models = [
        inference_pb2.ModelSummary(
            name=served.model_name,
            is_default=True,
            kind=inference_pb2.MODEL_KIND_BASE,
            context_window=tok.context_window,
            engine=engine_kind,
            ready=served.serving,
        )
    ]
    fine_tuned = [
        inference_pb2.ModelSummary(
            name=adapter.name,
            kind=inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER,
            base_model=served.model_name,
            context_window=tok.context_window,
            engine=engine_kind,
            ready=served.serving,
        )
        for adapter in served.adapters.values()
        if adapter.fine_tuned
    ]
    fine_tuned.extend(
        inference_pb2.ModelSummary(
            name=full.model.name,
            kind=inference_pb2.MODEL_KIND_FINE_TUNED_FULL,
            base_model=served.model_name,
            context_window=full.tokenizer.context_window,
            engine=ENGINE_TO_PB.get(full.engine.info().engine, inference_pb2.ENGINE_UNSPECIFIED),
            ready=True,
        )
        for full in served.full_models.running.values()
    )
    models.extend(sorted(fine_tuned, key=lambda m: m.name))
    return models


def model_info(d: ModelDescription, base_model: str, settings: InferenceSettings) -> inference_pb2.GetModelInfoResponse:
    """GetModelInfo's answer for a model the serving core described (`base_model`: the served model's name)."""
    kind = inference_pb2.MODEL_KIND_BASE
    if d.fine_tuned is not None:
        kind = inference_pb2.MODEL_KIND_FINE_TUNED_FULL if d.full else inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER
    info = d.engine.info()
    running, waiting = (0, 0) if d.full and not d.ready else d.engine.load()
    tok, s, lora = d.tokenizer, settings, info.supports_lora and not d.full
    return inference_pb2.GetModelInfoResponse(
        name=d.fine_tuned.name if d.fine_tuned else base_model,
        is_default=d.fine_tuned is None,
        kind=kind,
        base_model=base_model if d.fine_tuned else "",
        source=shown_source(info, d.fine_tuned),
        engine=ENGINE_TO_PB.get(info.engine, inference_pb2.ENGINE_UNSPECIFIED),
        engine_version=info.engine_version,
        dtype=info.dtype,
        device=info.device,
        context_window=tok.context_window,
        vocab_size=tok.vocab_size,
        has_chat_template=bool(tok.chat_template),
        supports_lora=lora,
        max_lora_rank=info.max_lora_rank if lora else 0,
        max_loras=info.max_loras if lora else 0,
        adapters=[adapter_pb(a, base_model) for a in d.adapters],
        default_max_new_tokens=s.default_max_new_tokens,
        max_logprobs=s.max_logprobs,
        max_stop_sequences=s.max_stop_sequences,
        max_score_candidates=s.score_max_candidates,
        max_queued_requests=s.max_queued_requests,
        running_requests=running,
        waiting_requests=waiting,
        ready=d.ready,
    )


def adapter_pb(adapter: LoadedAdapter, base_model: str) -> inference_pb2.AdapterInfo:
    source = inference_pb2.ADAPTER_SOURCE_FINE_TUNE if adapter.fine_tuned else inference_pb2.ADAPTER_SOURCE_LOADED
    pb = inference_pb2.AdapterInfo(
        name=adapter.name,
        path=adapter.spec.shown_path,
        base_model=base_model,
        rank=adapter.spec.rank,
        alpha=adapter.spec.alpha,
        target_modules=adapter.spec.target_modules,
        source=source,
        job_id=adapter.job_id,
        loaded=True,
    )
    pb.loaded_at.FromDatetime(adapter.loaded_at)
    return pb


def logprobs_pb(output: EngineOutput, tok: LoadedTokenizer) -> list[inference_pb2.TokenLogprob]:
    result = []
    for lp in output.logprobs:
        entry = inference_pb2.TokenLogprob(
            token_id=lp.token_id, token=tok.hf.convert_ids_to_tokens(lp.token_id) or "", logprob=lp.logprob
        )
        for token_id, value in lp.top:
            entry.top_logprobs.add(token_id=token_id, token=tok.hf.convert_ids_to_tokens(token_id) or "", logprob=value)
        result.append(entry)
    return result


def shown_source(info: EngineInfo, fine_tuned: FineTunedModel | None) -> str:
    """GetModelInfo's `source` as clients may see it: never a server path. A local model is named by its
    directory's name, a fine-tuned one by its job, a remote one by the remote server's model id."""
    if fine_tuned is not None:
        return f"fine-tuning job {fine_tuned.job_id}"
    if info.engine == "openai":
        return info.source
    return Path(info.source).name

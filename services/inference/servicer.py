"""InferenceService: protobuf in, protobuf out. Each RPC checks what only the request can say, hands the domain
work to the serving core (serving.py: models, adapters, engines and their health) and the request builders
(requests.py: sampling, prompts, truncation -> engine requests), and answers with what responses.py builds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from genloom.services.inference.engine import Engine
from genloom.services.inference.engines import create_engine
from genloom.services.inference.full_models import EngineFactory
from genloom.services.inference.pool import ServingPool
from genloom.services.inference.requests import REQUEST_ID, prepare_generation, prepare_score
from genloom.services.inference.responses import (
    adapter_pb,
    generation_events,
    model_info,
    model_summaries,
    score_response,
)
from genloom.services.inference.serving import ServedModels, TimeLeft
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.errors import InvalidArgument, quote
from genloom.services.server.settings import ModelSettings
from genloom.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    name = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

    def __init__(
        self,
        models: ModelSettings,
        settings: InferenceSettings | None = None,
        engine_factory: EngineFactory = create_engine,
        engine: Engine | None = None,
    ) -> None:
        """`engine`: an already started engine to serve instead of creating one (it is then not shut down by
        close(): its owner does that)."""
        self.models = models
        self.served = ServedModels(models, settings, engine_factory, engine)
        self.settings = self.served.settings

    # -- Service protocol ---------------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    def bind_health(self, report: Callable[[bool], Awaitable[None]]) -> None:
        self.served.bind_health(report)

    @property
    def engine(self) -> Engine | None:
        """The main engine (while it restarts: the dead one, until its replacement is ready)."""
        return self.served.engine

    @property
    def _pool(self) -> ServingPool | None:
        """The main engine's serving pool (tests watch its state)."""
        return self.served.pool

    async def start(self) -> None:
        await self.served.start()

    async def close(self) -> None:
        await self.served.close()

    # -- RPCs -----------------------------------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        received = time.monotonic()
        async with self.served.resolved(request.model, _time_left(context)) as model:
            generation = prepare_generation(request, model, received, self.settings, self.served.in_flight)
            response = inference_pb2.GenerateResponse(request_id=generation.request_id, model=generation.model)
            outputs = self.served.outputs(generation.engine, generation.engine_request, _time_left(context))
            async for event in generation_events(generation, outputs):
                if isinstance(event, inference_pb2.GenerateDelta):
                    response.token_ids.extend(event.token_ids)
                    response.logprobs.extend(event.logprobs)
                else:
                    response.text = generation.assembler.text
                    response.finish_reason = event.finish_reason
                    response.stop_sequence = event.stop_sequence
                    if event.HasField("stop_token_id"):
                        response.stop_token_id = event.stop_token_id
                    response.usage.CopyFrom(event.usage)
                    response.truncation.CopyFrom(event.truncation)
                    response.timing.CopyFrom(event.timing)
        return response

    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        received = time.monotonic()
        async with self.served.resolved(request.model, _time_left(context)) as model:
            generation = prepare_generation(request, model, received, self.settings, self.served.in_flight)
            outputs = self.served.outputs(generation.engine, generation.engine_request, _time_left(context))
            async for event in generation_events(generation, outputs):
                if isinstance(event, inference_pb2.GenerateDelta):
                    yield inference_pb2.GenerateStreamResponse(request_id=generation.request_id, delta=event)
                else:
                    yield inference_pb2.GenerateStreamResponse(request_id=generation.request_id, finish=event)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        async with self.served.resolved(request.model, _time_left(context)) as model:
            job = prepare_score(request, model, self.settings)
            scores = await self.served.score(model.engine, job.queries, model, _time_left(context))
            return score_response(job, scores, model.echo, request.return_token_logprobs)

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        self.served.ready()
        if not request.request_id:
            raise InvalidArgument.field("request_id", "is required")
        if not REQUEST_ID.match(request.request_id):
            # No generation can have such an id (see prepare_generation); refusing it also keeps a huge id out of
            # the logs.
            raise InvalidArgument.field(
                "request_id", f"{quote(request.request_id)} is not 1 to 128 characters from [A-Za-z0-9._:-]"
            )
        engine = self.served.in_flight.get(request.request_id)  # the main engine, or a full fine-tuned model's
        if engine is None:
            return inference_pb2.AbortResponse(aborted=False)
        return inference_pb2.AbortResponse(aborted=await engine.abort(request.request_id))

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=model_summaries(self.served))

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelInfoResponse:
        description = await self.served.describe(request.model)
        return model_info(description, self.served.model_name, self.settings)

    async def LoadAdapter(
        self, request: inference_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LoadAdapterResponse:
        engine = await self.served.acquire(_time_left(context))
        name = request.name
        if not REQUEST_ID.match(name) or ":" in name:
            raise InvalidArgument.field(
                "name", "1 to 128 characters from [A-Za-z0-9._-] (':' is reserved for fine-tuned models)"
            )
        if not request.path:
            raise InvalidArgument.field("path", "is required: a PEFT LoRA adapter directory on the server")
        if request.base_model:
            await self.served.check_model(request.base_model, "base_model")
        loaded = await self.served.load_adapter(engine, name, request.path, replace=request.replace)
        return inference_pb2.LoadAdapterResponse(adapter=adapter_pb(loaded, self.served.model_name))

    async def UnloadAdapter(
        self, request: inference_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UnloadAdapterResponse:
        engine = await self.served.acquire(_time_left(context))
        loaded = await self.served.unload_adapter(engine, request.name)
        pb = adapter_pb(loaded, self.served.model_name)
        pb.loaded = False
        return inference_pb2.UnloadAdapterResponse(adapter=pb)

    async def ListAdapters(
        self, request: inference_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListAdaptersResponse:
        self.served.ready()
        if request.base_model:
            await self.served.check_model(request.base_model, "base_model")
        base = self.served.model_name
        return inference_pb2.ListAdaptersResponse(adapters=[adapter_pb(a, base) for a in self.served.adapters.values()])


def _time_left(context: grpc.aio.ServicerContext) -> TimeLeft:
    """The call's remaining time as the serving core asks for it (None: no deadline)."""

    def remaining() -> float | None:
        left = context.time_remaining()
        return left if left is not None and left < 1e9 else None

    return remaining

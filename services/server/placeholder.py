"""A service from the contract whose implementation has not shipped yet: every RPC answers UNIMPLEMENTED.

Built from the service descriptor, so health, reflection and clients see the real service name and messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from genloom.services.server import errors


class PlaceholderService:
    def __init__(self, descriptor: ServiceDescriptor) -> None:
        self.descriptor = descriptor
        self.name = descriptor.full_name

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in self.descriptor.methods:
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            message = f"{self.name}.{method.name} is not implemented by this genloom server yet"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    _unimplemented_stream(message),
                    request_deserializer=request_cls.FromString,
                    response_serializer=response_cls.SerializeToString,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unimplemented_unary(message),
                    request_deserializer=request_cls.FromString,
                    response_serializer=response_cls.SerializeToString,
                )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.name, handlers),))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _unimplemented_unary(message: str) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise errors.Unimplemented(message)

    return handler


def _unimplemented_stream(message: str) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise errors.Unimplemented(message)
        yield  # an async generator, as streaming handlers are

    return handler

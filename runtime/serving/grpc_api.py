"""gRPC endpoints of the KServe v2 protocol: ``inference.GRPCInferenceService`` on grpc.aio.

The service class and messages are the generated ones that ship with tritonclient (``service_pb2_grpc``,
``service_pb2``, ``model_config_pb2``), built from the published ``grpc_service.proto``. Implemented: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics, RepositoryIndex, ModelInfer
and ModelStreamInfer (requests of one stream run concurrently; responses come as they finish, each carrying its
request id; an error is sent on the stream as ``error_message`` and the stream goes on; a request with parameter
``stream: true`` asking for generated outputs gets one response per token, as Triton's decoupled models send). The
others (repository load/unload, shared memory, trace and log settings) answer UNIMPLEMENTED.

Errors abort the call with the code of ``protocol.error_status``; the restricted header, when configured, is read
from the call's metadata (lower-case keys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from . import generating
from .protocol import (
    BadRequest, InferRequest, InferResponse, decode_grpc_request, encode_grpc_response, error_status,
)

if TYPE_CHECKING:
    from .server import InferenceServer

log = logging.getLogger("reformer_rt.serve")

#: gRPC's own message caps: requests up to the server's body cap, responses as large as gRPC allows.
MAX_SEND_BYTES = 2**31 - 1


class _Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: InferenceServer) -> None:
        self.server = server

    async def _guard(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]],
                     public: bool = False) -> Any:
        """Access control, then ``call``; any exception aborts with its mapped status."""
        try:
            if not public:
                self.server.check_access(dict(context.invocation_metadata() or ()))
            return await call()
        except Exception as exc:
            status = error_status(exc)
            if status.internal:
                log.error("gRPC call failed", exc_info=exc)
            await context.abort(grpc.StatusCode[status.grpc_code], status.message)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=self.server.live)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.server.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            entry = self.server.entry(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=entry.ready and self.server.ready)

        return await self._guard(context, call)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            return service_pb2.ServerMetadataResponse(**self.server.server_metadata())

        return await self._guard(context, call)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            meta = self.server.entry(request.name, request.version).model.metadata()
            message = service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                                        platform=meta["platform"])
            for field, tensors in (("inputs", meta["inputs"]), ("outputs", meta["outputs"])):
                for tensor in tensors:
                    getattr(message, field).add(**tensor)
            return message

        return await self._guard(context, call)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            config = self.server.entry(request.name, request.version).model.config()
            return service_pb2.ModelConfigResponse(config=config)

        return await self._guard(context, call)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            from google.protobuf import json_format

            stats = self.server.statistics(request.name, request.version)
            return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse())

        return await self._guard(context, call)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            message = service_pb2.RepositoryIndexResponse()
            for model in self.server.repository_index():
                message.models.add(**model)
            return message

        return await self._guard(context, call)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            response = await self.server.infer(request.model_name, request.model_version,
                                               lambda: decode_grpc_request(request))
            return encode_grpc_response(response, service_pb2)

        return await self._guard(context, call)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            self.server.check_access(dict(context.invocation_metadata() or ()))
        except Exception as exc:
            status = error_status(exc)
            await context.abort(grpc.StatusCode[status.grpc_code], status.message)
        results: asyncio.Queue = asyncio.Queue()

        async def one(request: Any) -> None:
            try:
                decoded = decode_grpc_request(request)
                if decoded.parameters.get("stream") is True:
                    await self._stream_tokens(request, decoded, results)
                    return
                result = await self.server.infer(request.model_name, request.model_version, lambda: decoded)
                response = encode_grpc_response(result, service_pb2)
                await results.put(service_pb2.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                status = error_status(exc)
                if status.internal:
                    log.error("gRPC stream request failed", exc_info=exc)
                failed = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                await results.put(service_pb2.ModelStreamInferResponse(error_message=status.message,
                                                                       infer_response=failed))

        async def read() -> None:
            tasks = [asyncio.ensure_future(one(request)) async for request in request_iterator]
            await asyncio.gather(*tasks)
            await results.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()

    async def _stream_tokens(self, request: Any, decoded: InferRequest, results: asyncio.Queue) -> None:
        """A generation streamed as one response per token (``generating.py``)."""
        entry = self.server.entry(request.model_name, request.model_version)
        generate = generating.parse_infer(entry.model, decoded)
        if generate is None:
            raise BadRequest("parameter 'stream': streams a generation; ask for generated_ids or generated_text")
        async for event, piece in self.server.generate_stream(request.model_name, request.model_version, generate):
            outputs = [(generating.GENERATED_IDS, np.array([event.token], dtype=np.int64), True)]
            if entry.model.tokenizer is not None:
                outputs.append((generating.GENERATED_TEXT, np.array([piece.encode()], dtype=object), True))
            response = encode_grpc_response(InferResponse(entry.model.name, entry.model.version, request.id, outputs),
                                            service_pb2)
            response.parameters["prompt"].int64_param = event.prompt
            response.parameters["step"].int64_param = event.step
            response.parameters["finished"].bool_param = event.finished
            if event.finished:
                response.parameters["finish_reason"].string_param = event.reason
            await results.put(service_pb2.ModelStreamInferResponse(infer_response=response))
        if decoded.parameters.get("triton_enable_empty_final_response") is True:
            final = service_pb2.ModelInferResponse(model_name=entry.model.name, id=request.id)
            final.parameters["triton_final_response"].bool_param = True
            await results.put(service_pb2.ModelStreamInferResponse(infer_response=final))


class _GrpcListener:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server, self.port = server, port

    async def stop(self) -> None:
        await self.server.stop(grace=5.0)


async def start_grpc(server: InferenceServer) -> _GrpcListener:
    options = server.options
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", options.max_body_bytes),
                                           ("grpc.max_send_message_length", MAX_SEND_BYTES)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(server), grpc_server)
    address = f"{options.host}:{options.grpc_port}"
    try:
        if options.tls_cert is not None:
            assert options.tls_key is not None
            pair = (options.tls_key.read_bytes(), options.tls_cert.read_bytes())
            port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's way of saying the address is taken
        raise OSError(f"gRPC cannot bind {address} ({exc})") from exc
    await grpc_server.start()
    log.info("reformer-rt serve: gRPC (inference.GRPCInferenceService) on %s:%d%s", options.host, port,
             " (TLS)" if options.tls_cert else "")
    return _GrpcListener(grpc_server, port)

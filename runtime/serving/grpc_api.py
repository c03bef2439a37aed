"""gRPC endpoints of the KServe v2 protocol: ``inference.GRPCInferenceService`` on grpc.aio.

The service class and messages are the generated ones that ship with tritonclient (``service_pb2_grpc``,
``service_pb2``, ``model_config_pb2``), built from the published ``grpc_service.proto``. Implemented: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics, RepositoryIndex, ModelInfer
and ModelStreamInfer (requests of one stream run concurrently; responses come as they finish, each carrying its
request id; an error is sent on the stream as ``error_message`` and the stream goes on; a request with parameter
``stream: true`` asking for generated outputs gets one response per token, as Triton's decoupled models send). The
others (repository load/unload, shared memory, trace and log settings) answer UNIMPLEMENTED.

Every unary method goes through one guard (``_guarded``): the host's access check on the call's metadata (lower-case
keys), then the method; any exception aborts the call with the code of ``protocol.error_status``. The servicer
receives a ``Host`` (``host.py``), never a server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from . import generating
from .host import Host, ListenerOptions
from .protocol import BadRequest, InferRequest, InferResponse, decode_grpc_request, encode_grpc_response, error_status

log = logging.getLogger("reformer_rt.serve")

#: gRPC's own message caps: requests up to the listener's body cap, responses as large as gRPC allows.
MAX_SEND_BYTES = 2**31 - 1
Unary = Callable[["_Service", Any, grpc.aio.ServicerContext], Awaitable[Any]]


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    status = error_status(exc)
    if status.internal:
        log.error("gRPC call failed", exc_info=exc)
    await context.abort(grpc.StatusCode[status.grpc_code], status.message)


def _check_access(host: Host, context: grpc.aio.ServicerContext) -> None:
    host.check_access(dict(context.invocation_metadata() or ()))


def _guarded(method: Unary) -> Unary:
    """Access control, then the method; any exception aborts the call with its mapped status."""
    @functools.wraps(method)
    async def call(self: _Service, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_access(self.host, context)
            return await method(self, request, context)
        except Exception as exc:
            await _abort(context, exc)

    return call


class _Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, host: Host) -> None:
        self.host = host

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=self.host.live)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.host.ready)

    @_guarded
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        service = self.host.service(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=service.ready and self.host.ready)

    @_guarded
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(**self.host.server_metadata())

    @_guarded
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.host.service(request.name, request.version).metadata()
        message = service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                                    platform=meta["platform"])
        for field, tensors in (("inputs", meta["inputs"]), ("outputs", meta["outputs"])):
            for tensor in tensors:
                getattr(message, field).add(**tensor)
        return message

    @_guarded
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ModelConfigResponse(config=self.host.service(request.name, request.version).config())

    @_guarded
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        from google.protobuf import json_format

        stats = self.host.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse())

    @_guarded
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        message = service_pb2.RepositoryIndexResponse()
        for model in self.host.repository_index():
            message.models.add(**model)
        return message

    @_guarded
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        service = self.host.service(request.model_name, request.model_version)
        response = await service.infer(lambda: decode_grpc_request(request))
        return encode_grpc_response(response, service_pb2)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_access(self.host, context)
        except Exception as exc:
            await _abort(context, exc)
        results: asyncio.Queue = asyncio.Queue()

        async def one(request: Any) -> None:
            try:
                decoded = decode_grpc_request(request)
                if decoded.parameters.get("stream") is True:
                    await self._stream_tokens(request, decoded, results)
                    return
                service = self.host.service(request.model_name, request.model_version)
                result = await service.infer(lambda: decoded)
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
        service = self.host.service(request.model_name, request.model_version)
        model = service.model
        generate = service.parse_generation(decoded)
        if generate is None:
            raise BadRequest("parameter 'stream': streams a generation; ask for generated_ids or generated_text")
        async for generated in service.generate_stream(generate):
            event = generated.event
            outputs = [(generating.GENERATED_IDS, np.array([event.token], dtype=np.int64), True)]
            if model.tokenizer is not None:
                outputs.append((generating.GENERATED_TEXT, np.array([generated.piece.encode()], dtype=object), True))
            response = encode_grpc_response(InferResponse(model.name, model.version, request.id, outputs),
                                            service_pb2)
            response.parameters["prompt"].int64_param = event.prompt
            response.parameters["step"].int64_param = event.step
            response.parameters["finished"].bool_param = event.finished
            if event.finished:
                response.parameters["finish_reason"].string_param = event.reason
            await results.put(service_pb2.ModelStreamInferResponse(infer_response=response))
        if decoded.parameters.get("triton_enable_empty_final_response") is True:
            final = service_pb2.ModelInferResponse(model_name=model.name, id=request.id)
            final.parameters["triton_final_response"].bool_param = True
            await results.put(service_pb2.ModelStreamInferResponse(infer_response=final))


class _GrpcListener:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server, self.port = server, port

    async def stop(self) -> None:
        await self.server.stop(grace=5.0)


async def start_grpc(host: Host, options: ListenerOptions) -> _GrpcListener:
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", options.max_body_bytes),
                                           ("grpc.max_send_message_length", MAX_SEND_BYTES)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(host), grpc_server)
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

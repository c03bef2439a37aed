"""The KServe v2 / Open Inference Protocol, defined once: tensors in and out of HTTP/REST and gRPC messages, and
the mapping of errors to statuses.

HTTP/REST (``decode_http_request`` / ``encode_http_response``): a JSON body, or -- the binary tensor extension that
tritonclient uses by default -- a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
tensors whose JSON entries carry ``parameters.binary_data_size``, in order. Outputs are returned binary when the
request asks (``outputs[i].parameters.binary_data``, or ``parameters.binary_data_output`` for every output).
gRPC (``decode_grpc_request`` / ``encode_grpc_response``): ``inference.ModelInferRequest`` with typed
``contents`` or ``raw_input_contents``; responses always carry ``raw_output_contents``. The gRPC messages are the
generated classes that ship with tritonclient (``tritonclient.grpc.service_pb2``), built from the published
``grpc_service.proto``.

BYTES tensors, in binary form, are elements each preceded by its length as a little-endian uint32 (as Triton).

Errors: every ``ServingError`` carries its HTTP status and gRPC code (Triton's mapping: 400 / INVALID_ARGUMENT
for a bad request, 404 / NOT_FOUND for an unknown model, 503 / UNAVAILABLE when not ready, overloaded or timed
out, 413 for a body over the cap, 401 / 403 for a missing / wrong access header); any other ``ReformerError`` is
a bad request; anything else is an internal error (500 / INTERNAL) -- a bug, logged with its traceback.
References: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol and Triton's
``docs/protocol/extension_binary_data.md``.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from reformer_rt.models import ReformerError

from ..errors import BackendFailed

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

#: v2 datatype -> numpy dtype (BYTES: an object array of ``bytes``). BF16 has no numpy type and is refused.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NUMPY_TO_DATATYPE = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}


# -------------------------------------------------------------------------------------------------------- errors
class ServingError(ReformerError):
    """An error with its place in the protocol: HTTP status and gRPC status code name."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequest(ServingError):
    http_status, grpc_code = 400, "INVALID_ARGUMENT"


class Unauthenticated(ServingError):
    http_status, grpc_code = 401, "UNAUTHENTICATED"


class PermissionDenied(ServingError):
    http_status, grpc_code = 403, "PERMISSION_DENIED"


class NotFound(ServingError):
    http_status, grpc_code = 404, "NOT_FOUND"


class PayloadTooLarge(ServingError):
    http_status, grpc_code = 413, "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    """Not ready, draining, overloaded (queue full) or timed out in the queue: the client may retry."""

    http_status, grpc_code = 503, "UNAVAILABLE"


@dataclasses.dataclass(frozen=True)
class ErrorStatus:
    http_status: int
    grpc_code: str
    message: str
    retry_after_s: float | None
    internal: bool  # a bug: log it with its traceback


def error_status(exc: BaseException) -> ErrorStatus:
    """Where ``exc`` goes in the protocol (see the module docstring)."""
    if isinstance(exc, ServingError):
        return ErrorStatus(exc.http_status, exc.grpc_code, str(exc), exc.retry_after_s, exc.http_status >= 500
                           and not isinstance(exc, Unavailable))
    if isinstance(exc, BackendFailed):  # the model failed, not the request: logged, with its message
        return ErrorStatus(500, "INTERNAL", str(exc), None, True)
    if isinstance(exc, ReformerError):
        return ErrorStatus(400, "INVALID_ARGUMENT", str(exc), None, False)
    return ErrorStatus(500, "INTERNAL", f"internal error ({type(exc).__name__}); the server log has the details",
                       None, True)


# ------------------------------------------------------------------------------------------------------ messages
@dataclasses.dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str
    id: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None  # requested output -> binary; None: the model's default outputs
    parameters: dict[str, Any]
    binary_output: bool  # the request-level default for outputs (``binary_data_output``)

    def wants_binary(self, name: str) -> bool:
        return self.outputs.get(name, self.binary_output) if self.outputs is not None else self.binary_output


@dataclasses.dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[str, np.ndarray, bool]]  # (name, array, binary)


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[array.dtype]
    except KeyError:
        raise TypeError(f"no v2 datatype for numpy {array.dtype}") from None


def _dtype(datatype: Any, name: str) -> np.dtype:
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not supported; expected one of "
                         f"{sorted(DATATYPES)}")
    return DATATYPES[datatype]


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                        for d in shape):
        raise BadRequest(f"input {name!r}: shape {shape!r}; expected a list of non-negative integers")
    return tuple(shape)


def _elements(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------- BYTES
def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor in binary form: each element as uint32 little-endian length + bytes, row-major."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """``count`` length-prefixed elements from ``buffer``, which must hold exactly those."""
    items: list[bytes] = []
    view, offset = memoryview(buffer), 0
    for _ in range(count):
        if offset + 4 > len(view):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's length prefix; expected "
                             f"{count} elements each preceded by a uint32 length")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise BadRequest(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        items.append(bytes(view[offset:offset + size]))
        offset += size
    if offset != len(view):
        raise BadRequest(f"input {name!r}: {len(view) - offset} bytes left after {count} BYTES elements")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _from_raw(raw: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = _elements(shape)
    if dtype.kind == "O":  # BYTES
        return deserialize_bytes(raw, count, name).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: {len(raw)} bytes of data; expected {count * dtype.itemsize} "
                         f"({count} elements of {dtype.itemsize} bytes for shape {list(shape)})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return serialize_bytes(array)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


# ---------------------------------------------------------------------------------------------------------- HTTP
#: JSON values numpy may read for each kind of datatype: no booleans as numbers, no fractions as integers.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _json_tensor(entry: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    data = entry.get("data")
    if data is None:
        raise BadRequest(f"input {name!r}: no 'data' and no binary_data_size parameter")
    if not isinstance(data, list):  # the protocol's tensor_data is always an array (nested or flat)
        raise BadRequest(f"input {name!r}: 'data' is {json.dumps(data)[:40]}; expected a list of values")
    try:
        if dtype.kind == "O":
            flat = np.array([d.encode() if isinstance(d, str) else d for d in np.asarray(data, dtype=object)
                             .reshape(-1)], dtype=object)
            if not all(isinstance(d, bytes) for d in flat):
                raise TypeError("BYTES elements must be strings")
        else:
            flat = np.asarray(data).reshape(-1)
            if flat.size and flat.dtype.kind not in _JSON_KINDS[dtype.kind]:
                raise TypeError(f"got {'booleans' if flat.dtype.kind == 'b' else flat.dtype} values")
            flat = flat.astype(dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"input {name!r}: 'data' does not hold {_NUMPY_TO_DATATYPE.get(dtype, 'BYTES')} "
                         f"values ({exc})") from exc
    if flat.size != _elements(shape):
        raise BadRequest(f"input {name!r}: {flat.size} values for shape {list(shape)}; expected "
                         f"{_elements(shape)}")
    return flat.reshape(shape)


def decode_http_request(body: bytes, header_length: str | None, model_name: str, model_version: str) -> InferRequest:
    """An infer request from an HTTP body; ``header_length`` is the ``Inference-Header-Content-Length`` value."""
    if header_length is None:
        header_size = len(body)
    else:
        try:
            header_size = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH}: got {header_length!r}; expected the JSON header's size in bytes") \
                from None
        if not 0 <= header_size <= len(body):
            raise BadRequest(f"{HEADER_LENGTH}: got {header_size}; expected at most the body's {len(body)} bytes")
    try:
        header = json.loads(bytes(body[:header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body: not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadRequest("request body: expected a JSON object with an 'inputs' list")
    parameters = _json_parameters(header.get("parameters"), "request")
    binary = memoryview(body)[header_size:]
    offset, inputs = 0, {}
    for entry in header["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("inputs: each entry must be an object with a 'name'")
        name = entry["name"]
        if name in inputs:
            raise BadRequest(f"input {name!r}: given twice")
        dtype, shape = _dtype(entry.get("datatype"), name), _shape(entry.get("shape"), name)
        size = _json_parameters(entry.get("parameters"), f"input {name!r}").get("binary_data_size")
        if size is None:
            inputs[name] = _json_tensor(entry, dtype, shape, name)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r}; expected a size within the "
                             f"{len(binary) - offset} bytes left after the JSON header")
        inputs[name] = _from_raw(binary[offset:offset + size], dtype, shape, name)
        offset += size
    if offset != len(binary):
        raise BadRequest(f"request body: {len(binary) - offset} bytes after the JSON header are not claimed by any "
                         "input's binary_data_size")
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise BadRequest("outputs: expected a list of objects with a 'name'")
        outputs = {}
        for entry in header["outputs"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise BadRequest("outputs: each entry must be an object with a 'name'")
            flags = _json_parameters(entry.get("parameters"), f"output {entry['name']!r}")
            if "classification" in flags:
                raise BadRequest(f"output {entry['name']!r}: the classification extension is not supported; ask "
                                 "for top_k_ids / top_k_log_probs instead")
            outputs[entry["name"]] = bool(flags.get("binary_data", parameters.get("binary_data_output", False)))
    request_id = header.get("id", "")
    return InferRequest(model_name, model_version, request_id if isinstance(request_id, str) else str(request_id),
                        inputs, outputs, parameters, bool(parameters.get("binary_data_output", False)))


def _json_parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return value


def encode_http_response(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """Body and headers: plain JSON, or JSON header + binary tensors when any output is binary."""
    entries, blobs = [], []
    for name, array, binary in response.outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary:
            blob = _raw(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == object:
            entry["data"] = [item.decode(errors="replace") for item in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                              "outputs": entries}
    if response.id:
        header["id"] = response.id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, {"Content-Type": JSON_TYPE}
    return b"".join([text, *blobs]), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# ---------------------------------------------------------------------------------------------------------- gRPC
#: ``InferTensorContents`` field per datatype (FP16 has none: it must come as raw contents).
_CONTENT_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def grpc_parameter(value: Any) -> Any:
    """The Python value of an ``InferParameter`` (its oneof)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def decode_grpc_request(message: Any) -> InferRequest:
    """An infer request from an ``inference.ModelInferRequest``."""
    parameters = {key: grpc_parameter(value) for key, value in message.parameters.items()}
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(f"raw_input_contents: {len(raw)} entries for {len(message.inputs)} inputs; expected one "
                         "per input, in order")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name in inputs:
            raise BadRequest(f"input {name!r}: given twice")
        dtype, shape = _dtype(tensor.datatype, name), _shape(list(tensor.shape), name)
        if raw:
            inputs[name] = _from_raw(raw[index], dtype, shape, name)
            continue
        field = _CONTENT_FIELDS.get(tensor.datatype)
        if field is None:
            raise BadRequest(f"input {name!r}: {tensor.datatype} data must come in raw_input_contents")
        values = list(getattr(tensor.contents, field))
        if len(values) != _elements(shape):
            raise BadRequest(f"input {name!r}: {len(values)} values for shape {list(shape)}; expected "
                             f"{_elements(shape)}")
        if dtype.kind == "O":
            array = np.empty(len(values), dtype=object)
            array[:] = values
        else:
            array = np.asarray(values, dtype=dtype)
        inputs[name] = array.reshape(shape)
    outputs = None
    if len(message.outputs):
        outputs = {}
        for entry in message.outputs:
            if "classification" in entry.parameters:
                raise BadRequest(f"output {entry.name!r}: the classification extension is not supported; ask for "
                                 "top_k_ids / top_k_log_probs instead")
            outputs[entry.name] = True
    return InferRequest(message.model_name, message.model_version, message.id, inputs, outputs, parameters, True)


def encode_grpc_response(response: InferResponse, service_pb2: Any) -> Any:
    """An ``inference.ModelInferResponse`` with raw output contents."""
    message = service_pb2.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                             id=response.id)
    for name, array, _ in response.outputs:
        message.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        message.raw_output_contents.append(_raw(array))
    return message

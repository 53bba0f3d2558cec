"""The node's inference server: Open Inference Protocol (KServe v2 gRPC) over the hosted models.

The server speaks the upstream protocol (``inference.GRPCInferenceService``), so stock KServe and
Triton clients work; it adds the standard gRPC health and reflection services. It knows models
only through a ``ModelHost`` (the agent's runtime, or a ``ModelTable``), and runs every blocking
backend call off the event loop through the host.

ModelReady answers ``ready: false`` for a model the host does not know, as Triton does; the
model-repository index (Triton's ``RepositoryIndex``, advertised as the ``model_repository``
extension) lists every model and multi-exit model the node serves, with its state. Parameters are
read whichever of Triton's kinds they come as (``double_param`` and ``uint64_param`` included).

Status codes: NOT_FOUND for a model the host does not know, UNAVAILABLE while it is loading (or
was unloaded under the request, or a multi-exit hand-off to another node failed), INVALID_ARGUMENT
for a request whose tensors do not match the model (the message names the tensor),
RESOURCE_EXHAUSTED for a request source rate-limited by the orchestrator's mitigation, INTERNAL
for a failure inside the backend.

Multi-exit models (``node_agent.multiexit``) are served under their own name beside the plain
models; a request's source is its OIP parameter ``source`` or else its gRPC metadata ``source``.

Tensor contents may come as ``raw_input_contents`` (row-major, little-endian) or typed
``contents`` (``fp32_contents``, ``int_contents``, ...); outputs always go back as
``raw_output_contents``. A quantized integer input also accepts FP32 data, quantized by the
backend (see ``accelerators.cpu_litert``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelerators.base import (
    NUMPY_DTYPES,
    AcceleratorError,
    Backend,
    EnergySource,
    InferResult,
    Inputs,
    InvalidInput,
    ModelHandle,
    ModelNotLoaded,
    TensorSpec,
)
from edgeward import __version__
from edgeward.grpc_standard import HealthServicer, enable_reflection
from edgeward.oip import grpc_predict_v2_pb2 as pb
from edgeward.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeward.security.authz import RoleGuard, caller, may_use
from edgeward.security.boundary import RequestGuard
from edgeward.security.errors import SecurityError
from edgeward.security.identity import Role
from edgeward.security.tls import RevocationList, TlsFiles
from edgeward.wire import LATENCY_BUCKETS_S

__all__ = [
    "SERVICE_NAME",
    "HandoffFailed",
    "HandoffOnly",
    "InferenceServerError",
    "InferenceServicer",
    "InvalidRequest",
    "LatencySnapshot",
    "LatencyStats",
    "ModelHost",
    "ModelIndexEntry",
    "ModelNotFound",
    "ModelNotReady",
    "ModelTable",
    "RateLimited",
    "float_parameter",
    "infer",
    "int_parameter",
    "lookup",
    "parameter_value",
    "run_blocking",
    "serve",
]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "edgeward"
# Who may call a node's inference API in a TLS fleet: use-case teams, operators, and other nodes
# (multi-exit hand-offs). The orchestrator and brokers have no business here.
CALLER_ROLES = frozenset({Role.TEAM, Role.OPERATOR, Role.NODE})
#: What ServerMetadata advertises beyond the core protocol (Triton's extension names).
EXTENSIONS = ["model_repository"]
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (interpreter, disk) in the event loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --------------------------------------------------------------------------------------- errors


class InferenceServerError(Exception):
    """Base of the errors a request to the inference server can meet before reaching a backend."""


class ModelNotFound(InferenceServerError):
    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"unknown model {name!r}" + (f" version {version!r}" if version else ""))
        self.name = name
        self.version = version


class ModelNotReady(InferenceServerError):
    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"model {name!r}" + (f" version {version!r}" if version else "") + " is loading")
        self.name = name
        self.version = version


class RateLimited(InferenceServerError):
    """The request's source is rate-limited on this model by a mitigation (RESOURCE_EXHAUSTED)."""


class Overloaded(InferenceServerError):
    """The node has as many inferences in flight as it takes (RESOURCE_EXHAUSTED: try again later)."""


class HandoffFailed(InferenceServerError):
    """A multi-exit request could not continue on the node serving its next stage (UNAVAILABLE)."""


class HandoffOnly(InferenceServerError):
    """A client asked for what only a node handing a request on may do (PERMISSION_DENIED)."""


class InvalidRequest(InferenceServerError):
    """A request tensor that cannot be decoded: bad datatype, shape, content size or count."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"{tensor}: {problem}")
        self.tensor = tensor
        self.problem = problem


# ------------------------------------------------------------------------------------ model host


class ModelHost(Protocol):
    """What the server needs from whoever owns the loaded models (the agent's runtime)."""

    def resolve(self, name: str, version: str = "") -> tuple[Backend, ModelHandle] | None:
        """The loaded model to use for (name, version); an empty version lets the host choose."""
        ...

    def loading(self, name: str, version: str = "") -> bool:
        """Whether such a model is being loaded (so a miss is UNAVAILABLE, not NOT_FOUND)."""
        ...

    async def infer(self, backend: Backend, handle: ModelHandle, inputs: Inputs) -> InferResult:
        """Run one inference off the event loop, accounting it in the host's statistics."""
        ...

    def teams(self, name: str, version: str = "") -> set[str]:
        """The teams owning what the host holds under ``name`` ("" for what no team owns; empty when
        it holds nothing or knows no owners): with mutual TLS, a team certificate sees and calls
        only what its team owns (``edgeward.security.authz.may_use``)."""
        ...

    def index(self) -> list[ModelIndexEntry]:
        """Every model the host knows, ready or not, for the repository index."""
        ...


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    """One row of the repository index: ``state`` is READY, LOADING or UNAVAILABLE (Triton's names)."""

    name: str
    version: str
    state: str
    reason: str = ""


def lookup(host: ModelHost, name: str, version: str = "") -> tuple[Backend, ModelHandle]:
    """The model to run, or ``ModelNotReady`` while it loads, or ``ModelNotFound``."""
    found = host.resolve(name, version)
    if found is not None:
        return found
    if host.loading(name, version):
        raise ModelNotReady(name, version)
    raise ModelNotFound(name, version)


async def infer(host: ModelHost, name: str, inputs: Inputs, *, version: str = "") -> InferResult:
    """In-process inference by model name, with the same lookup rules as the gRPC API."""
    backend, handle = lookup(host, name, version)
    return await host.infer(backend, handle, inputs)


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    count: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    energy_j: float
    energy_source: EnergySource


class LatencyStats:
    """Inference count, errors, total energy and the most recent latencies of one model.

    Percentiles are over a ring of the last ``window`` samples rather than a reservoir over the
    model's lifetime: telemetry and the SLO detectors want current figures, and a lifetime
    reservoir hides a recent slowdown. Used from the event loop thread only.
    """

    __slots__ = (
        "_bounds",
        "_ring",
        "buckets",
        "by_kind",
        "count",
        "energy_j",
        "energy_source",
        "errors",
        "latency_sum_s",
    )

    def __init__(self, window: int = 1024) -> None:
        self._ring = np.zeros(window, dtype=np.float64)
        self._bounds = LATENCY_BUCKETS_S
        #: served inferences per histogram bucket (non-cumulative; +Inf last), since the start
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.count = 0
        self.errors = 0
        self.energy_j = 0.0
        self.energy_source: EnergySource = "modelled"
        #: served inferences per accelerator kind, since the start
        self.by_kind: dict[str, int] = {}

    def record(self, latency_s: float, energy_j: float, energy_source: EnergySource, kind: str = "") -> None:
        self._ring[self.count % len(self._ring)] = latency_s
        if kind:
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.buckets[bisect.bisect_left(self._bounds, latency_s)] += 1
        self.latency_sum_s += latency_s
        self.count += 1
        self.energy_j += energy_j
        self.energy_source = energy_source

    def record_error(self) -> None:
        self.errors += 1

    def cumulative_buckets(self) -> list[int]:
        """Counts at or under each bound of ``LATENCY_BUCKETS_S`` (Prometheus ``le``), +Inf left out."""
        return list(itertools.accumulate(self.buckets[:-1]))

    def snapshot(self) -> LatencySnapshot:
        samples = self._ring[: min(self.count, len(self._ring))]
        p50, p95, p99 = np.percentile(samples, (50, 95, 99)) * 1e3 if len(samples) else (0.0, 0.0, 0.0)
        return LatencySnapshot(
            self.count, self.errors, float(p50), float(p95), float(p99), self.energy_j, self.energy_source
        )


class ModelTable:
    """A plain ``ModelHost``: models added and removed explicitly, stats per (name, version).

    For single-process use, benchmarks and tests; an empty version resolves to the version of
    that name added last.
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[str, tuple[Backend, ModelHandle]]] = {}
        self._loading: set[tuple[str, str]] = set()
        self.stats: dict[tuple[str, str], LatencyStats] = {}
        self.in_flight = 0

    def mark_loading(self, name: str, version: str) -> None:
        self._loading.add((name, version))

    def add(self, backend: Backend, handle: ModelHandle) -> None:
        self._loading.discard((handle.name, handle.version))
        self._models.setdefault(handle.name, {})[handle.version] = (backend, handle)
        self.stats.setdefault((handle.name, handle.version), LatencyStats())

    def remove(self, name: str, version: str) -> tuple[Backend, ModelHandle] | None:
        self._loading.discard((name, version))
        versions = self._models.get(name, {})
        removed = versions.pop(version, None)
        if not versions:
            self._models.pop(name, None)
        return removed

    def resolve(self, name: str, version: str = "") -> tuple[Backend, ModelHandle] | None:
        versions = self._models.get(name)
        if not versions:
            return None
        if not version:
            return next(reversed(versions.values()))
        return versions.get(version)

    def loading(self, name: str, version: str = "") -> bool:
        return any(n == name and (not version or v == version) for n, v in self._loading)

    def teams(self, name: str, version: str = "") -> set[str]:
        return set()  # added by hand, no owners known: open to every caller

    def index(self) -> list[ModelIndexEntry]:
        ready = [ModelIndexEntry(n, v, READY) for n, versions in self._models.items() for v in versions]
        return ready + [ModelIndexEntry(n, v, LOADING) for n, v in sorted(self._loading)]

    async def infer(self, backend: Backend, handle: ModelHandle, inputs: Inputs) -> InferResult:
        stats = self.stats.setdefault((handle.name, handle.version), LatencyStats())
        self.in_flight += 1
        started = time.perf_counter()
        try:
            result = await run_blocking(backend.infer, handle, inputs)
        except Exception:
            stats.record_error()
            raise
        finally:
            self.in_flight -= 1
        stats.record(time.perf_counter() - started, result.energy_j, result.energy_source, handle.kind)
        return result


# -------------------------------------------------------------------------------- wire decoding

# Typed contents field per datatype. FP16 has none (raw only); BYTES is not supported here.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays by name (raw contents are not copied)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest("raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(request.inputs):
        label = f"input {tensor.name!r}"
        if tensor.name in arrays:
            raise InvalidRequest(label, "given twice")
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidRequest(label, f"unsupported datatype {tensor.datatype!r}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(label, f"negative dimension in shape {list(shape)}")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(label, "both raw_input_contents and typed contents given")
            data = raw[position]
            if len(data) != count * dtype.itemsize:
                raise InvalidRequest(
                    label,
                    f"raw content has {len(data)} bytes, shape {list(shape)} of {tensor.datatype} "
                    f"needs {count * dtype.itemsize}",
                )
            arrays[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            arrays[tensor.name] = _typed_contents(tensor, label, dtype, shape, count)
    return arrays


def _typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    label: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidRequest(label, f"{tensor.datatype} must be sent as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(label, f"{field} has {len(values)} elements, shape {list(shape)} needs {count}")
    if dtype.kind in "iu" and dtype.itemsize < 8:
        # The wire field is wider than the datatype: refuse values that would wrap around.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidRequest(label, f"{field} holds values outside the {tensor.datatype} range")
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _requested_outputs(request: pb.ModelInferRequest, handle: ModelHandle) -> list[TensorSpec]:
    if not request.outputs:
        return list(handle.outputs)
    by_name = {spec.name: spec for spec in handle.outputs}
    specs = []
    for wanted in request.outputs:
        spec = by_name.get(wanted.name)
        if spec is None:
            raise InvalidRequest(
                f"output {wanted.name!r}", f"not an output of the model; outputs are {list(by_name)}"
            )
        specs.append(spec)
    return specs


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.dtype, shape=spec.shape)


def _status_of(err: Exception) -> grpc.StatusCode:
    if isinstance(err, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, ModelNotReady | ModelNotLoaded | HandoffFailed):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, RateLimited | Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, HandoffOnly):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, InvalidRequest | InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class PipelineHost(Protocol):
    """The multi-exit models a node serves (``node_agent.multiexit.MultiExitHost``)."""

    def get(self, name: str) -> Any | None: ...

    def ready(self, pipeline: Any) -> bool: ...

    def source_of(self, pipeline: str, raw: str) -> str: ...

    def names(self) -> list[str]: ...

    def pipeline_of_stage(self, model: str, version: str) -> str | None: ...

    def metadata(self, pipeline: Any) -> pb.ModelMetadataResponse: ...

    async def infer(
        self, pipeline: Any, request: pb.ModelInferRequest, source: str
    ) -> pb.ModelInferResponse: ...


def parameter_value(param: pb.InferParameter) -> bool | int | float | str | None:
    """An OIP parameter's value, whichever of Triton's five kinds it was sent as (None: unset)."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def int_parameter(request: pb.ModelInferRequest, name: str, default: int) -> int:
    """An integer parameter sent as int64, uint64, or a whole double (tritonclient sends Python
    numbers as int64 or double); anything else is INVALID_ARGUMENT."""
    if name not in request.parameters:
        return default
    value = parameter_value(request.parameters[name])
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"parameters.{name}", f"{value!r} is not an integer")
    return value


def float_parameter(request: pb.ModelInferRequest, name: str) -> float | None:
    """A number parameter sent as double, int64, uint64 or a numeric string (None: not sent)."""
    if name not in request.parameters:
        return None
    value = parameter_value(request.parameters[name])
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        return float(value)
    except ValueError:
        raise InvalidRequest(f"parameters.{name}", f"{value!r} is not a number") from None


def request_source(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> str:
    """The raw source of a request: OIP parameter ``source``, else gRPC metadata ``source``."""
    if "source" in request.parameters:
        value = parameter_value(request.parameters["source"])
        return "" if value is None else str(value)
    for key, meta in context.invocation_metadata() or ():
        if key == "source":
            return meta if isinstance(meta, str) else ""
    return ""


# ------------------------------------------------------------------------------------ servicer


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a ``ModelHost``.

    The server is live and ready whenever it answers: model readiness is per model (ModelReady).
    ModelMetadata reports the backend kind (e.g. ``cpu-litert``) as the platform and the version
    the host resolves as the only version.
    """

    def __init__(self, host: ModelHost, pipelines: PipelineHost | None = None) -> None:
        self._host = host
        self._pipelines = pipelines

    def _hidden(self, name: str, version: str = "") -> bool:
        """Whether the caller may not see ``name``: with mutual TLS a team certificate sees a name only
        if nothing behind it belongs to another team (``may_use``); what it may not see is answered
        as if the node did not hold it, so a team cannot learn which models of other teams a node
        serves. Only a team certificate is looked at: operators, nodes and callers without TLS
        cost no look at the replicas on the way to every inference."""
        who = caller()
        if who is None or who.team is None:
            return False
        teams = set(self._host.teams(name, version))
        pipeline = self._pipelines.get(name) if self._pipelines is not None else None
        if pipeline is not None:  # an operator's pipeline of a team's stages is that team's too
            teams.add(pipeline.owner_team)
            teams.update(stage.owner_team for stage in pipeline.stages)
        return not may_use(who, teams)

    def _stage_refused(self, model: str, version: str) -> None:
        """A team calls a multi-exit model by its pipeline's name, not its stages one by one: that
        went past the pipeline's rate limit and exit counts (the slowdown defence), stage by stage.
        (The same model version deployed on its own besides is refused too, on a node where it is a
        stage.)"""
        who = caller()
        pipelines = self._pipelines
        pipeline = pipelines.pipeline_of_stage(model, version) if pipelines is not None else None
        if pipeline is not None and who is not None and who.team is not None:
            raise HandoffOnly(f"model {model!r} is a stage of the multi-exit model {pipeline!r}: call that")

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        # As Triton: an unknown model is simply not ready (OK, ready=false), never an error.
        if self._hidden(request.name, request.version):
            return pb.ModelReadyResponse(ready=False)
        pipeline = self._pipelines.get(request.name) if self._pipelines is not None else None
        if pipeline is not None:
            return pb.ModelReadyResponse(ready=self._pipelines.ready(pipeline))  # type: ignore[union-attr]
        return pb.ModelReadyResponse(ready=self._host.resolve(request.name, request.version) is not None)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = list(self._host.index())
        if self._pipelines is not None:
            for name in self._pipelines.names():
                pipeline = self._pipelines.get(name)
                ready = pipeline is not None and self._pipelines.ready(pipeline)
                entries.append(
                    ModelIndexEntry(
                        name,
                        pipeline.version if pipeline is not None else "",
                        READY if ready else UNAVAILABLE,
                        "" if ready else "a stage held here is not loaded yet",
                    )
                )
        response = pb.RepositoryIndexResponse()
        for e in sorted(entries, key=lambda e: (e.name, e.version, e.state)):
            if self._hidden(e.name):
                continue
            if not request.ready or e.state == READY:
                response.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return response

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        if self._hidden(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(ModelNotFound(request.name, request.version)))
        pipeline = self._pipelines.get(request.name) if self._pipelines is not None else None
        if pipeline is not None and (not request.version or request.version == pipeline.version):
            try:
                return self._pipelines.metadata(pipeline)  # type: ignore[union-attr]
            except InferenceServerError as err:
                await context.abort(_status_of(err), str(err))
        try:
            backend, handle = lookup(self._host, request.name, request.version)
        except InferenceServerError as err:
            await context.abort(_status_of(err), str(err))
        return pb.ModelMetadataResponse(
            name=handle.name,
            versions=[handle.version],
            platform=backend.kind,
            inputs=[_tensor_metadata(spec) for spec in handle.inputs],
            outputs=[_tensor_metadata(spec) for spec in handle.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if self._hidden(request.model_name, request.model_version):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, str(ModelNotFound(request.model_name, request.model_version))
            )
        pipelines = self._pipelines
        pipeline = pipelines.get(request.model_name) if pipelines is not None else None
        if pipeline is not None:
            assert pipelines is not None
            try:
                source = pipelines.source_of(pipeline.name, request_source(request, context))
                return await pipelines.infer(pipeline, request, source)
            except (InferenceServerError, AcceleratorError) as err:
                failure: Exception = err
            except Exception as err:
                log.exception("ModelInfer %s failed", request.model_name)
                failure = err
            await context.abort(_status_of(failure), str(failure))
            raise AssertionError("unreachable: abort raises")
        try:
            backend, handle = lookup(self._host, request.model_name, request.model_version)
            self._stage_refused(handle.name, handle.version)
            inputs = decode_inputs(request)
            wanted = _requested_outputs(request, handle)
            result = await self._host.infer(backend, handle, inputs)
        except (InferenceServerError, AcceleratorError) as err:
            failure = err
        # Anything else is a bug in a backend or host: report INTERNAL, keep serving.
        except Exception as err:
            log.exception("ModelInfer %s failed", request.model_name)
            failure = err
        else:
            return _response(request, handle, wanted, result.outputs)
        await context.abort(_status_of(failure), str(failure))
        raise AssertionError("unreachable: abort raises")


def _response(
    request: pb.ModelInferRequest,
    handle: ModelHandle,
    wanted: list[TensorSpec],
    outputs: Mapping[str, np.ndarray],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=handle.name, model_version=handle.version, id=request.id)
    for spec in wanted:
        array = outputs[spec.name]
        response.outputs.add(name=spec.name, datatype=spec.dtype, shape=array.shape)
        # The wire is little-endian; on little-endian hosts this is a no-op view.
        response.raw_output_contents.append(np.ascontiguousarray(array, spec.numpy_dtype).tobytes())
    return response


async def serve(
    host: ModelHost,
    bind: str = "127.0.0.1:0",
    pipelines: PipelineHost | None = None,
    tls: TlsFiles | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the inference, health and reflection services on ``bind``; returns (server, port).

    With ``tls`` (the node's certificate) the server speaks mutual TLS only: callers need a team,
    operator or node certificate of the fleet CA (`CALLER_ROLES`), not revoked in ``tls.crl_file``.
    Either way a request that does not decode is INVALID_ARGUMENT. The caller stops it
    (``await server.stop(grace)``).
    """
    guard = RequestGuard() if tls is None else RoleGuard(CALLER_ROLES, _revocations(tls))
    # Without this, a second server on a fixed port would silently share it (SO_REUSEPORT).
    server = grpc.aio.server(interceptors=[guard], options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(host, pipelines), server)
    health_servicer = HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([SERVICE_NAME], server)
    try:
        port = (
            server.add_insecure_port(bind)
            if tls is None
            else server.add_secure_port(bind, tls.server_credentials())
        )
    except (RuntimeError, SecurityError) as err:
        raise InferenceServerError(f"cannot bind inference server to {bind}: {err}") from err
    await server.start()
    log.info(
        "inference server listening on %s (port %d, %s)", bind, port, "mutual TLS" if tls else "plaintext"
    )
    return server, port


def _revocations(tls: TlsFiles) -> RevocationList | None:
    try:
        return None if tls.crl_file is None else RevocationList(tls.crl_file, tls.ca_file)
    except SecurityError as err:
        raise InferenceServerError(f"cannot read the CRL: {err}") from err

"""Multi-exit (early-exit) models on the node: stage by stage, stopping at the first confident exit.

A multi-exit model is a chain of deployed stage models (each a replica like any other) that the
orchestrator names and wires with a ``ServePipelines`` command. A request for the model's name on
the node's Open Inference Protocol API runs the stages held here in order; stage k's
``exit_probs`` decide whether to stop (top probability >= the stage's threshold; the last stage
always stops), otherwise its ``features`` feed stage k+1. A stage served by another node is reached
over that node's inference API: the request is handed off with the OIP parameter ``stage`` and
the quantised features, and the answer travels back to the caller.

Quantised hand-off: each stage was quantised on its own, so stage k's output scale differs from
stage k+1's input scale (0.119045 vs 0.118743 on the automotive model). ``requantize`` maps the
integers through the real values, q2 = round((q1 - zp1) * s1 / s2) + zp2, instead of passing them
on as if the scales matched.

Per request source (OIP parameter or gRPC metadata ``source``; a bounded set per model, the rest
``other``) the node counts answered requests per exit, exits forced by a latency budget, and
requests refused by a rate limit; the agent reports them in its telemetry. Mitigations from the
orchestrator (``Mitigate``) apply per (model, source): a token-bucket rate limit (refused with
RESOURCE_EXHAUSTED) and a latency budget (the node stops at the most confident exit reached
before the next stage would overrun the budget).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from accelerators.base import NUMPY_DTYPES, Quantization, TensorSpec, datatype_of
from edgeward.oip import grpc_predict_v2_pb2 as pb
from edgeward.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeward.security.authz import caller
from edgeward.security.identity import Identity, Role
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from edgeward.v1 import node_pb2

from .inference_server import (
    HandoffFailed,
    HandoffOnly,
    InvalidRequest,
    ModelHost,
    RateLimited,
    decode_inputs,
    float_parameter,
    int_parameter,
    lookup,
)

log = logging.getLogger(__name__)

EXIT_PROBS = "exit_probs"
FEATURES = "features"
EXIT = "exit"
#: ModelMetadata's platform of a multi-exit model (its stages run on the backends ModelMetadata
#: of each stage model names).
PLATFORM = "edgeward-multi-exit"
STAGE_PARAM = "stage"
SOURCE_PARAM = "source"
SCALE_PARAM = "quant_scale"
ZERO_POINT_PARAM = "quant_zero_point"
OTHER = "other"
MAX_SOURCES = 16  # per model: bounds telemetry and the orchestrator's detector rows
SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")


def _identity_source(who: Identity) -> str:
    """The source of a fleet client: its certificate's CN, or a digest of it when that is too long."""
    cn = who.common_name
    return cn if len(cn) <= 40 else "id:" + hashlib.sha256(cn.encode()).hexdigest()[:16]


HANDOFF_TIMEOUT_S = 5.0
_EWMA = 0.2


@dataclass(frozen=True)
class Stage:
    model_name: str
    model_version: str
    threshold: float
    endpoint: str  # "" : on this node
    node_id: str = ""  # the node behind endpoint (a TLS hand-off checks its certificate names it)
    owner_team: str = ""  # the team owning the stage's model ("" none)


@dataclass(frozen=True)
class Pipeline:
    name: str
    version: str
    stages: tuple[Stage, ...]
    owner_team: str = ""  # the team owning the pipeline's name ("" none): who may call it with TLS

    @classmethod
    def from_pb(cls, msg: node_pb2.MultiExitPipeline) -> Pipeline:
        return cls(
            msg.name,
            msg.version,
            tuple(
                Stage(s.model_name, s.model_version, s.threshold, s.endpoint, s.node_id, s.owner_team)
                for s in msg.stages
            ),
            msg.owner_team,
        )


@dataclass
class _Counters:
    exits: np.ndarray
    forced: int = 0
    refused: int = 0


@dataclass
class _Bucket:
    """Token bucket: ``rate`` requests per second, bursts of up to ``max(1, rate)``."""

    rate: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = max(1.0, self.rate)

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class ExitResult:
    """Where a request left the model: 1-based exit, its class probabilities, whether forced."""

    probs: np.ndarray
    exit_index: int
    forced: bool


def requantize(value: np.ndarray, source: Quantization | None, target: TensorSpec) -> np.ndarray:
    """``value`` (integers quantised with ``source``, or real numbers when None) as ``target`` wants it."""
    dtype = target.numpy_dtype
    quant = target.quantization
    if source is not None and quant is not None and value.dtype == dtype and source == quant:
        return value
    real = value.astype(np.float64)
    if source is not None:
        real = (real - source.zero_point) * source.scale
    if quant is None or dtype.kind == "f":
        return real.astype(dtype)
    scaled = real / quant.scale
    rounded = np.trunc(scaled + np.copysign(0.5, scaled))  # half away from zero, as TFLite
    info = np.iinfo(dtype)
    return np.clip(rounded + quant.zero_point, info.min, info.max).astype(dtype)


def stage_outputs(outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, TensorSpec | None]:
    """(exit head, features) of a stage model: by signature name where the runtime keeps it, else by
    shape: the exit head is the [batch, classes] output, the features the other one."""
    by_name = {s.name: s for s in outputs}
    if EXIT_PROBS in by_name:
        return by_name[EXIT_PROBS], by_name.get(FEATURES)
    heads = [s for s in outputs if len(s.shape) == 2]
    rest = [s for s in outputs if len(s.shape) != 2]
    if len(heads) != 1 or len(rest) > 1:
        shapes = [list(s.shape) for s in outputs]
        raise InvalidRequest("outputs", f"not a multi-exit stage: outputs of shapes {shapes}")
    return heads[0], rest[0] if rest else None


def dequantize(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.quantization is None:
        return value.astype(np.float32)
    q = spec.quantization
    return ((value.astype(np.float32) - q.zero_point) * q.scale).astype(np.float32)


class MultiExitHost:
    """The multi-exit models this node serves, their exit counters and mitigations."""

    def __init__(self, host: ModelHost, node_id: str, tls: TlsFiles | None = None) -> None:
        """``tls``: this node's certificate; hand-offs then use mutual TLS and check that the
        next node's certificate is that node's (its id, from the orchestrator's wiring)."""
        self._host = host
        self.node_id = node_id
        self._tls = tls
        self._pipelines: dict[str, Pipeline] = {}
        self._stage_models: dict[tuple[str, str], str] = {}  # stage (model, version) -> its pipeline
        self._counters: dict[tuple[str, str], _Counters] = {}
        self._sources: dict[str, set[str]] = {}
        self._mitigations: dict[tuple[str, str], node_pb2.Mitigation] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._seconds: dict[tuple[str, int], float] = {}  # EWMA of each stage's wall time
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    # ------------------------------------------------------------ desired state

    def configure(self, pipelines: Iterable[node_pb2.MultiExitPipeline]) -> None:
        wanted = {p.name: Pipeline.from_pb(p) for p in pipelines}
        for name, p in wanted.items():
            if not p.stages:
                raise ValueError(f"multi-exit model {name!r} has no stages")
        if wanted != self._pipelines:
            log.info("serving multi-exit models %s", sorted(wanted) or "none")
        self._pipelines = wanted
        self._stage_models = {
            (s.model_name, s.model_version): p.name for p in wanted.values() for s in p.stages
        }

    def pipeline_of_stage(self, model: str, version: str) -> str | None:
        """The multi-exit model that version ``version`` of ``model`` is a stage of here, if any."""
        return self._stage_models.get((model, version))

    def mitigate(self, mitigations: Iterable[node_pb2.Mitigation]) -> None:
        wanted = {(m.model_name, m.source): m for m in mitigations}
        for key, m in wanted.items():
            old = self._mitigations.get(key)
            if old is None or old.rate_limit_rps != m.rate_limit_rps:
                self._buckets.pop(key, None)
            if m.rate_limit_rps > 0:
                self._buckets.setdefault(key, _Bucket(m.rate_limit_rps))
            log.warning(
                "mitigation on %s from source %s: rate limit %.3g req/s, latency budget %.3g ms (%s)",
                *key,
                m.rate_limit_rps,
                m.latency_budget_ms,
                m.reason,
            )
        for key in set(self._mitigations) - set(wanted):
            self._buckets.pop(key, None)
            log.info("mitigation on %s from source %s lifted", *key)
        self._mitigations = wanted

    @property
    def mitigations(self) -> dict[tuple[str, str], node_pb2.Mitigation]:
        return dict(self._mitigations)

    def get(self, name: str) -> Pipeline | None:
        return self._pipelines.get(name)

    def names(self) -> list[str]:
        return sorted(self._pipelines)

    def metadata(self, pipeline: Pipeline) -> pb.ModelMetadataResponse:
        """What a client sends this node for ``pipeline`` and gets back: the input of the first
        stage held here (stage 1 on the node clients call), and the exit outputs. ``ModelNotReady``
        or ``ModelNotFound`` while that stage is not loaded."""
        local = next((k for k, st in enumerate(pipeline.stages, 1) if not st.endpoint), None)
        if local is None:
            raise HandoffFailed(f"no stage of {pipeline.name!r} is held on node {self.node_id}")
        stage = pipeline.stages[local - 1]
        _, handle = lookup(self._host, stage.model_name, stage.model_version)
        spec = handle.inputs[0]
        probs, _ = stage_outputs(handle.outputs)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=[pipeline.version],
            platform=PLATFORM,
            inputs=[
                tensor(name=spec.name if local == 1 else FEATURES, datatype=spec.dtype, shape=spec.shape)
            ],
            outputs=[
                tensor(name=EXIT_PROBS, datatype="FP32", shape=[1, probs.shape[-1]]),
                tensor(name=EXIT, datatype="INT32", shape=[1]),
            ],
        )

    def ready(self, pipeline: Pipeline) -> bool:
        """Whether every local stage is loaded (remote stages are their nodes' business)."""
        for stage in pipeline.stages:
            if not stage.endpoint and self._host.resolve(stage.model_name, stage.model_version) is None:
                return False
        return True

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # ------------------------------------------------------------ sources and counters

    def source_of(self, pipeline: str, raw: str) -> str:
        """The bounded source label of a request: unknown, malformed or excess sources are ``other``.

        In a TLS fleet a client's source is its certificate: its own label goes under it
        (``team:smart-home:ci/cam-1``), a missing, malformed or excess one leaves the certificate alone
        (``team:smart-home:ci``), so no client is counted, or rate-limited, as another. Hand-offs keep
        the source the first node gave the request."""
        who = caller()
        fallback = OTHER
        if who is not None and who.role is not Role.NODE:
            fallback = _identity_source(who)
            raw = f"{fallback}/{raw}" if raw else fallback
        if not raw or not SOURCE_RE.fullmatch(raw):
            return fallback
        known = self._sources.setdefault(pipeline, set())
        if raw in known or raw == fallback != OTHER:
            return raw
        if len(known) >= MAX_SOURCES:
            return fallback
        known.add(raw)
        return raw

    def _counter(self, pipeline: Pipeline, source: str) -> _Counters:
        key = (pipeline.name, source)
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = _Counters(np.zeros(len(pipeline.stages), np.int64))
        elif len(counters.exits) < len(pipeline.stages):
            counters.exits = np.r_[
                counters.exits, np.zeros(len(pipeline.stages) - len(counters.exits), np.int64)
            ]
        return counters

    def exit_stats(self) -> list[node_pb2.ExitStats]:
        out = []
        for (name, source), c in sorted(self._counters.items()):
            pipeline = self._pipelines.get(name)
            out.append(
                node_pb2.ExitStats(
                    model_name=name,
                    model_version=pipeline.version if pipeline else "",
                    source=source,
                    requests=int(c.exits.sum()) + c.forced,
                    exits=[int(n) for n in c.exits],
                    forced=c.forced,
                    refused=c.refused,
                )
            )
        return out

    # ------------------------------------------------------------ serving

    async def infer(
        self, pipeline: Pipeline, request: pb.ModelInferRequest, source: str
    ) -> pb.ModelInferResponse:
        first = int_parameter(request, STAGE_PARAM, 1)
        who = caller()
        if first != 1 and who is not None and who.role is not Role.NODE:
            # Requests enter at stage 1, where they are rate-limited and counted per source.
            raise HandoffOnly(
                f"parameters.{STAGE_PARAM}: only a node handing a request on enters past stage 1"
            )
        if not 1 <= first <= len(pipeline.stages):
            raise InvalidRequest(
                f"parameters.{STAGE_PARAM}",
                f"{first} is not a stage of {pipeline.name!r} (1..{len(pipeline.stages)})",
            )
        arrays = decode_inputs(request)
        if len(arrays) != 1:
            raise InvalidRequest("inputs", f"a multi-exit model takes one input tensor, got {len(arrays)}")
        for wanted in request.outputs:
            if wanted.name not in (EXIT_PROBS, EXIT):
                raise InvalidRequest(f"output {wanted.name!r}", f"outputs are {[EXIT_PROBS, EXIT]}")
        value = next(iter(arrays.values()))
        # A hand-off's quantisation parameters come from nodes only (requantising a client's tensor
        # cost tens of ms of the event loop a request). A node hands a request on with its client's
        # source; one this pipeline is not wired to (any node certificate of the fleet) is counted,
        # and rate-limited, as itself: it could have had another client's traffic counted and limited.
        node = who is not None and who.role is Role.NODE
        quant = self._handoff_quant(request) if who is None or node else None
        if first == 1 and node and who is not None and who.name not in {s.node_id for s in pipeline.stages}:
            source = _identity_source(who)
        key = (pipeline.name, source)
        mitigation = self._mitigations.get(key) if first == 1 else None
        if first == 1:
            bucket = self._buckets.get(key)
            if bucket is not None and not bucket.allow():
                self._counter(pipeline, source).refused += 1
                raise RateLimited(
                    f"source {source!r} of model {pipeline.name!r} is limited to "
                    f"{bucket.rate:g} requests/s on node {self.node_id} ({mitigation.reason if mitigation else ''})"
                )
        budget_s = mitigation.latency_budget_ms / 1e3 if mitigation is not None else 0.0
        result = await self._run(pipeline, first, value, quant, source, request.id, budget_s)
        if first == 1:
            counters = self._counter(pipeline, source)
            if result.forced:
                counters.forced += 1
            else:
                counters.exits[result.exit_index - 1] += 1
        return _response(request, pipeline, result)

    @staticmethod
    def _handoff_quant(request: pb.ModelInferRequest) -> Quantization | None:
        value = float_parameter(request, SCALE_PARAM)  # sent as a string; a double is taken too
        if value is None:
            return None
        if not np.isfinite(value) or value <= 0:
            raise InvalidRequest(f"parameters.{SCALE_PARAM}", f"{value!r} is not a positive number")
        return Quantization(value, int_parameter(request, ZERO_POINT_PARAM, 0))

    async def _run(
        self,
        pipeline: Pipeline,
        first: int,
        value: np.ndarray,
        quant: Quantization | None,
        source: str,
        request_id: str,
        budget_s: float,
    ) -> ExitResult:
        started = time.perf_counter()
        best: ExitResult | None = None
        last = len(pipeline.stages)
        for k in range(first, last + 1):
            stage = pipeline.stages[k - 1]
            if best is not None and budget_s > 0:
                expected = self._seconds.get((pipeline.name, k), 0.0)
                if time.perf_counter() - started + expected > budget_s:
                    return ExitResult(best.probs, best.exit_index, forced=True)
            t0 = time.perf_counter()
            if stage.endpoint:
                result = await self._handoff(pipeline, k, stage, value, quant, source, request_id)
                self._observe(pipeline.name, k, time.perf_counter() - t0)
                return result
            backend, handle = lookup(self._host, stage.model_name, stage.model_version)
            spec = handle.inputs[0]
            given = value if (quant is None and k == first) else requantize(value, quant, spec)
            out = await self._host.infer(backend, handle, {spec.name: given})
            self._observe(pipeline.name, k, time.perf_counter() - t0)
            probs_spec, features_spec = stage_outputs(handle.outputs)
            probs = dequantize(out.outputs[probs_spec.name], probs_spec).reshape(-1)
            exit_result = ExitResult(probs, k, forced=False)
            if k == last or float(probs.max()) >= stage.threshold:
                return exit_result
            if best is None or float(probs.max()) > float(best.probs.max()):
                best = exit_result
            if features_spec is None:
                raise HandoffFailed(
                    f"stage {k} of {pipeline.name!r} has no features output for stage {k + 1}"
                )
            value = out.outputs[features_spec.name]
            quant = features_spec.quantization
        raise AssertionError("unreachable: the last stage always exits")

    def _observe(self, name: str, stage: int, seconds: float) -> None:
        key = (name, stage)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else old + _EWMA * (seconds - old)

    async def _handoff(
        self,
        pipeline: Pipeline,
        stage: int,
        target: Stage,
        value: np.ndarray,
        quant: Quantization | None,
        source: str,
        request_id: str,
    ) -> ExitResult:
        endpoint = target.endpoint
        channel = self._channels.get((endpoint, target.node_id))
        if channel is None:
            channel = grpc_aio_channel(endpoint, self._tls, server_name=target.node_id or None)
            self._channels[(endpoint, target.node_id)] = channel
        parameters = {
            STAGE_PARAM: pb.InferParameter(int64_param=stage),
            SOURCE_PARAM: pb.InferParameter(string_param=source),
        }
        if quant is not None:
            parameters[SCALE_PARAM] = pb.InferParameter(string_param=repr(quant.scale))
            parameters[ZERO_POINT_PARAM] = pb.InferParameter(int64_param=quant.zero_point)
        array = np.ascontiguousarray(value)
        request = pb.ModelInferRequest(
            model_name=pipeline.name,
            model_version=pipeline.version,
            id=request_id,
            parameters=parameters,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=FEATURES, datatype=datatype_of(array.dtype), shape=list(array.shape)
                )
            ],
            raw_input_contents=[array.tobytes()],
        )
        try:
            response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=HANDOFF_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            raise HandoffFailed(
                f"stage {stage} of {pipeline.name!r} on {endpoint}: {err.code().name}: {err.details()}"
            ) from err
        outputs = _outputs(response)
        try:
            probs, exit_index = outputs[EXIT_PROBS].reshape(-1), int(outputs[EXIT].reshape(-1)[0])
        except (KeyError, IndexError) as err:
            raise HandoffFailed(
                f"stage {stage} of {pipeline.name!r} on {endpoint}: malformed answer"
            ) from err
        if not stage <= exit_index <= len(pipeline.stages):
            raise HandoffFailed(
                f"stage {stage} of {pipeline.name!r} on {endpoint}: exit {exit_index} out of range"
            )
        return ExitResult(probs.astype(np.float32), exit_index, forced=False)


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        if dtype is None or len(raw) != int(np.prod(tensor.shape)) * dtype.itemsize:
            continue
        out[tensor.name] = np.frombuffer(raw, dtype).reshape(tuple(tensor.shape))
    return out


def _response(request: pb.ModelInferRequest, pipeline: Pipeline, result: ExitResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=pipeline.name, model_version=pipeline.version, id=request.id)
    response.parameters[EXIT].int64_param = result.exit_index
    response.parameters["forced_exit"].bool_param = result.forced
    tensors: dict[str, Any] = {
        EXIT_PROBS: result.probs.reshape(1, -1).astype("<f4"),
        EXIT: np.array([result.exit_index], "<i4"),
    }
    wanted = [o.name for o in request.outputs] or [EXIT_PROBS, EXIT]
    for name in wanted:
        array = tensors[name]
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response

"""The contract every accelerator backend implements, its value objects and its error tree.

A backend is synchronous: ``load``, ``infer`` and ``unload`` block the calling thread, and asyncio
callers go through one executor helper (``node_agent.inference_server.run_blocking``). Tensor
datatypes are named as in the Open Inference Protocol ("FP32", "INT8", "UINT8", ...), so the
same strings appear in capabilities, model metadata and on the wire.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Self

import numpy as np
from pydantic import BaseModel, ValidationError

EnergySource = Literal["measured", "modelled"]

#: Open Inference Protocol datatype name -> numpy dtype (little-endian, as the raw wire format).
#: BYTES has no fixed-size numpy equivalent and no backend here runs string tensors.
NUMPY_DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_OF = {dtype.newbyteorder("="): name for name, dtype in NUMPY_DTYPES.items()}

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def datatype_of(dtype: np.dtype[Any] | type) -> str:
    """The protocol datatype name of a numpy dtype; ``InvalidModel`` if it has none."""
    try:
        return _DATATYPE_OF[np.dtype(dtype).newbyteorder("=")]
    except (KeyError, TypeError) as err:
        raise InvalidModel("unsupported_dtype", f"tensor dtype {dtype!r} has no protocol datatype") from err


# --------------------------------------------------------------------------------------- errors


class AcceleratorError(Exception):
    """Base of every error raised by the accelerators package.

    ``event_id`` is the stable, machine-readable name of the failure (``component.sub.event``)
    that the agent reports and the CLI/TUI show as is.
    """

    event_id: ClassVar[str] = "accelerator.error"


class BackendUnavailable(AcceleratorError):
    """A backend kind cannot be created or used here (library missing, unknown kind, closed)."""

    event_id = "accelerator.backend.unavailable"

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"backend {kind!r} unavailable: {reason}")
        self.kind = kind
        self.reason = reason


class InvalidConfig(AcceleratorError):
    """A backend's configuration was rejected (unknown key, out-of-range value)."""

    event_id = "accelerator.config.invalid"

    def __init__(self, kind: str, problems: Sequence[str]) -> None:
        super().__init__(f"invalid config for backend {kind!r}: " + "; ".join(problems))
        self.kind = kind
        self.problems = tuple(problems)


class InvalidModel(AcceleratorError):
    """Model bytes that are not a usable model: empty, too large, wrong format, malformed.

    ``code`` is one of ``empty``, ``too_large``, ``not_tflite``, ``malformed``,
    ``digest_mismatch``, ``unsupported_dtype``, ``unsupported_op`` (a builtin op or op version
    unknown to the inspecting runtime).
    """

    event_id = "accelerator.model.invalid"

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"invalid model ({code}): {detail}")
        self.code = code
        self.detail = detail


class ModelRefused(AcceleratorError):
    """A valid model this backend will not run: it uses ops or datatypes outside its capabilities."""

    event_id = "accelerator.model.refused"

    def __init__(
        self,
        reason: str,
        *,
        offending_ops: Iterable[str] = (),
        offending_dtypes: Iterable[str] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offending_ops = tuple(sorted(offending_ops))
        self.offending_dtypes = tuple(sorted(offending_dtypes))


class ModelNotLoaded(AcceleratorError):
    """The handle was unloaded (or belongs to a closed backend)."""

    event_id = "accelerator.model.not_loaded"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"model {name!r} version {version!r} is not loaded")
        self.name = name
        self.version = version


class InferenceFailed(AcceleratorError):
    """The runtime failed while running a model on inputs that passed validation."""

    event_id = "accelerator.infer.failed"

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"inference of {name!r} failed: {detail}")
        self.name = name
        self.detail = detail


class InvalidInput(AcceleratorError):
    """An inference input does not match the model: missing, unexpected, wrong dtype or shape."""

    event_id = "accelerator.input.invalid"

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"input {tensor!r}: {problem}")
        self.tensor = tensor
        self.problem = problem


# -------------------------------------------------------------------------------- value objects


@dataclass(frozen=True, slots=True)
class PowerModel:
    """Board power used to model energy where it cannot be measured.

    ``idle_w`` is drawn whenever the board is on; ``active_w`` while it computes one inference.
    Modelled energy of an inference = idle_w * wall_s + (active_w - idle_w) * busy_s.
    """

    idle_w: float
    active_w: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.active_w:
            raise ValueError(f"need 0 <= idle_w <= active_w, got {self.idle_w} and {self.active_w}")

    def energy_j(self, wall_s: float, busy_s: float) -> float:
        return self.idle_w * wall_s + (self.active_w - self.idle_w) * busy_s

    def watts(self, busy_share: float) -> float:
        """Mean power over an inference busy for ``busy_share`` of its wall time (0 to 1):
        ``energy_j(wall_s, busy_share * wall_s) == watts(busy_share) * wall_s``."""
        return self.idle_w + (self.active_w - self.idle_w) * busy_share


@dataclass(frozen=True, slots=True)
class ModelWork:
    """The work of one inference of a model, from its tensor shapes alone
    (``accelerators.tflite_model.model_work``): what a :class:`CostModel` predicts from.

    ``macs``: multiply-accumulates of the matrix ops (convolutions, fully connected);
    ``elements``: elements the other ops touch (pooling, softmax, elementwise); ``mac_layers`` and
    ``element_layers``: how many ops of each sort (reshapes, which only relabel a buffer, are
    neither); ``weight_bytes``: constant operands; ``io_bytes``: the model's inputs and outputs.
    """

    macs: int
    elements: int
    mac_layers: int
    element_layers: int
    weight_bytes: int
    io_bytes: int


@dataclass(frozen=True, slots=True)
class CostModel:
    """An accelerator's analytic latency model, for predictions before a node has profiled a model
    (the scheduler's cold start; docs/scheduler.md). Per inference of a :class:`ModelWork`::

        compute  = macs / macs_per_s + elements / elements_per_s
                   + (mac_layers + element_layers) * layer_overhead_s
        transfer = (io_bytes + weights beyond weight_cache_bytes) / link_bytes_per_s  (0 without a link)
        latency  = invoke_overhead_s + transfer + compute;  busy = compute

    and energy is the backend's :class:`PowerModel` over (latency, busy). It is the backends' own
    timing model where they are simulated (exact while the weights fit on chip; where they do not,
    the simulated FPGA engine streams them all and overlaps that with compute, so the two differ),
    and a sustained fraction of the nominal peak for the CPU (``cpu_litert``).
    """

    invoke_overhead_s: float
    macs_per_s: float
    elements_per_s: float
    layer_overhead_s: float = 0.0
    #: bytes per second between host memory and the device; 0: the device computes in host memory
    link_bytes_per_s: float = 0.0
    #: weights that stay on the device; with a link, the rest streams in every inference
    weight_cache_bytes: int = 0

    def __post_init__(self) -> None:
        rates = (self.macs_per_s, self.elements_per_s)
        if min(rates) <= 0 or min(self.invoke_overhead_s, self.layer_overhead_s, self.link_bytes_per_s) < 0:
            raise ValueError(f"cost model figures must be positive (rates) or non-negative: {self}")

    def latency(self, work: ModelWork) -> tuple[float, float]:
        """(latency, busy time) of one inference, in seconds."""
        compute = (
            work.macs / self.macs_per_s
            + work.elements / self.elements_per_s
            + (work.mac_layers + work.element_layers) * self.layer_overhead_s
        )
        transfer = 0.0
        if self.link_bytes_per_s > 0:
            streamed = max(0, work.weight_bytes - self.weight_cache_bytes)
            transfer = (work.io_bytes + streamed) / self.link_bytes_per_s
        return self.invoke_overhead_s + transfer + compute, compute


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can run: the scheduler's filter and the backend's own refusal use this."""

    kind: str
    device: str
    simulated: bool
    dtypes: frozenset[str]
    #: None: any op the runtime itself supports.
    ops: frozenset[str] | None
    memory_bytes: int
    peak_gops: float
    power: PowerModel
    #: how latency follows from a model's work, for predictions (None: unknown, profiles only)
    cost: CostModel | None = None

    def why_not(self, *, dtypes: Iterable[str], ops: Iterable[str]) -> ModelRefused | None:
        """The refusal for a model computing in ``dtypes`` with ``ops``, or None if it fits."""
        bad_dtypes = set(dtypes) - self.dtypes
        bad_ops = set() if self.ops is None else set(ops) - self.ops
        if not bad_dtypes and not bad_ops:
            return None
        parts = []
        if bad_dtypes:
            parts.append("unsupported datatypes " + ", ".join(sorted(bad_dtypes)))
        if bad_ops:
            parts.append("unsupported ops " + ", ".join(sorted(bad_ops)))
        return ModelRefused(
            f"{self.kind}: " + "; ".join(parts), offending_ops=bad_ops, offending_dtypes=bad_dtypes
        )


@dataclass(frozen=True, slots=True)
class Quantization:
    """Per-tensor affine quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output. ``shape`` uses -1 for a variable-size dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    quantization: Quantization | None = None

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return NUMPY_DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What inspecting a model file tells: its signature, ops, datatypes, size and digest.

    ``dtypes`` are the datatypes the model computes in: those of its inputs and of every op's
    results (constant operands such as int32 biases or reshape shapes are not counted).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]
    dtypes: frozenset[str]
    size: int
    sha256: str
    #: the work of one inference (None: its shapes could not be read); see :class:`CostModel`
    work: ModelWork | None = None


@dataclass(frozen=True, slots=True)
class ModelArtifact:
    """A model to load: its identity, its bytes (or a file holding them) and their SHA-256."""

    name: str
    version: str
    source: bytes | Path = field(repr=False)
    sha256: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name must not be empty")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @classmethod
    def from_bytes(cls, name: str, version: str, data: bytes) -> Self:
        return cls(name, version, data, hashlib.sha256(data).hexdigest())

    def read(self) -> bytes:
        """The model bytes, checked against ``sha256`` (``InvalidModel`` on mismatch)."""
        data = self.source if isinstance(self.source, bytes) else self.source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise InvalidModel("digest_mismatch", f"{self.name}: sha256 {digest}, expected {self.sha256}")
        return data


_handle_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """A model loaded on one backend. Opaque apart from its identity and tensor signature."""

    name: str
    version: str
    sha256: str
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    id: int = field(default_factory=lambda: next(_handle_ids))


class InferResult(NamedTuple):
    """Outputs by tensor name, plus the wall time and energy of this one inference.

    A named tuple, not a frozen dataclass: one is built per inference, and a frozen dataclass's
    ``__init__`` costs about 1 us, a tenth of a small model's invoke.
    """

    outputs: dict[str, np.ndarray]
    latency_s: float
    energy_j: float
    energy_source: EnergySource


@dataclass(frozen=True, slots=True)
class Profile:
    """Latency and energy of a model on a backend, measured over ``runs`` inferences."""

    runs: int
    p50_ms: float
    p95_ms: float
    joules_per_inference: float
    energy_source: EnergySource


# ------------------------------------------------------------------------------------- backend

Inputs = Mapping[str, np.ndarray] | Sequence[np.ndarray]


class Backend(abc.ABC):
    """One accelerator kind behind the common interface.

    Subclasses set ``kind``, implement the abstract methods, and are registered by kind in
    ``accelerators.registry``; the class itself is the factory (``probe`` then ``from_config``).
    """

    kind: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]

    @classmethod
    def probe(cls) -> str | None:
        """Why this kind cannot be created here (library or device missing), or None if it can."""
        return None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Validate ``config`` against ``config_model`` (``InvalidConfig`` naming every bad field)
        and build the backend from the validated settings."""
        try:
            validated = cls.config_model.model_validate(dict(config))
        except ValidationError as err:
            problems = [f"{'.'.join(map(str, e['loc'])) or '<config>'}: {e['msg']}" for e in err.errors()]
            raise InvalidConfig(cls.kind, problems) from err
        return cls(validated)  # type: ignore[call-arg]

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def load(self, model: ModelArtifact) -> ModelHandle:
        """Load a model; ``InvalidModel`` for bad bytes, ``ModelRefused`` when it cannot run here."""

    @abc.abstractmethod
    def infer(self, handle: ModelHandle, inputs: Inputs) -> InferResult:
        """Run one inference. ``inputs`` by name, or positionally in ``handle.inputs`` order."""

    @abc.abstractmethod
    def unload(self, handle: ModelHandle) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Unload everything and release the device; the backend is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def profile(self, model: ModelArtifact, runs: int = 50, *, warmup: int = 3) -> Profile:
        """Load ``model``, run it ``warmup + runs`` times on seeded random inputs, unload it."""
        if runs < 1:
            raise ValueError("runs must be >= 1")
        handle = self.load(model)
        try:
            rng = np.random.default_rng(0)
            inputs = [random_tensor(spec, rng) for spec in handle.inputs]
            for _ in range(warmup):
                self.infer(handle, inputs)
            results = [self.infer(handle, inputs) for _ in range(runs)]
        finally:
            self.unload(handle)
        latencies_ms = np.array([r.latency_s for r in results]) * 1e3
        measured = all(r.energy_source == "measured" for r in results)
        return Profile(
            runs=runs,
            p50_ms=float(np.percentile(latencies_ms, 50)),
            p95_ms=float(np.percentile(latencies_ms, 95)),
            joules_per_inference=float(np.mean([r.energy_j for r in results])),
            energy_source="measured" if measured else "modelled",
        )


def random_tensor(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Random data of the spec's dtype and shape (variable dimensions taken as 1)."""
    shape = tuple(1 if d < 0 else d for d in spec.shape)
    dtype = spec.numpy_dtype
    if dtype.kind == "f":
        return rng.uniform(-1.0, 1.0, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)

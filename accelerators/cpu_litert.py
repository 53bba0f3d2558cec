"""cpu-litert: models run on the host CPU by the LiteRT interpreter (XNNPACK delegate by default).

The interpreter is ai-edge-litert's, or tflite_runtime's where only that is installed.

Threading: the backend is synchronous. Each loaded model has its own interpreter guarded by its
own lock, so inferences on one model run one at a time while different models run in parallel
(the interpreter releases the GIL while it computes).

Inputs: every input must be a numpy array of the model's shape and dtype, with one conversion:
a quantized integer input (INT8/UINT8/INT16 with a scale) also accepts a floating array, which is
quantized as the TFLite QUANTIZE op does it, in float32: q = round_half_away(x / scale) +
zero_point, clamped to the integer type's range. Outputs are returned as the model produces them
(quantized outputs stay integers; dequantize with ``TensorSpec.quantization``).

Energy: where the package's RAPL counter is readable (Intel/AMD x86 Linux, usually root only)
the energy of each inference is measured as the counter's difference across the invoke; it
covers the whole CPU package, other work included. Elsewhere it is modelled from the configured
power model: idle_w * wall time + (active_w - idle_w) * CPU time of the invoking thread (with
num_threads > 1 the helper threads' CPU time is not counted).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from accelerators.base import (
    NUMPY_DTYPES,
    Backend,
    BackendUnavailable,
    Capabilities,
    InferenceFailed,
    InferResult,
    Inputs,
    InvalidInput,
    ModelArtifact,
    ModelHandle,
    ModelNotLoaded,
    PowerModel,
    TensorSpec,
)
from accelerators.tflite_model import (
    allocate,
    check_container,
    describe,
    interpreter_runtime,
    open_interpreter,
)

log = logging.getLogger(__name__)

KIND = "cpu-litert"
RAPL_PACKAGE_COUNTER = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
#: Datatypes the builtin CPU kernels compute in.
CPU_DTYPES = frozenset({"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32"})


class PowerConfig(BaseModel):
    """The board's power model, used where energy cannot be measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    idle_w: float = Field(default=3.0, ge=0, title="Idle power (W)", description="Board power when idle.")
    active_w: float = Field(
        default=8.0, ge=0, title="Active power (W)", description="Board power while running an inference."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.active_w < self.idle_w:
            raise ValueError("active_w must be >= idle_w")
        return self


class CpuLitertConfig(BaseModel):
    """Configuration of the cpu-litert backend (validated without touching the device)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        title="Threads per model",
        description="Interpreter threads of each loaded model.",
    )
    xnnpack: bool = Field(
        default=True, title="XNNPACK", description="Delegate supported ops to XNNPACK, the runtime's default."
    )
    power: PowerConfig = Field(
        default_factory=PowerConfig, title="Power model", description="Idle and active board power."
    )
    peak_gops: float = Field(
        default=20.0, gt=0, title="Peak GOPS", description="Nominal throughput; profiles refine predictions."
    )
    memory_bytes: int | None = Field(
        default=None,
        ge=0,
        title="Memory (bytes)",
        description="Memory offered to models; None: physical memory.",
    )
    energy_counter: Path | None = Field(
        default=RAPL_PACKAGE_COUNTER,
        title="Energy counter",
        description="A powercap energy_uj file to measure energy with; None: always model it.",
    )
    dtypes: frozenset[str] = Field(
        default=CPU_DTYPES, title="Datatypes", description="Datatypes models may compute in (protocol names)."
    )
    ops: frozenset[str] | None = Field(
        default=None, title="Ops", description="Builtin op names allowed; None: whatever the runtime has."
    )

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - NUMPY_DTYPES.keys()
        if unknown:
            raise ValueError(f"unknown datatypes {sorted(unknown)}; known: {sorted(NUMPY_DTYPES)}")
        return value


class RaplCounter:
    """A powercap energy counter (microjoules, wrapping at max_energy_range_uj), kept open."""

    def __init__(self, fd: int, wrap_uj: int) -> None:
        self._fd = fd
        self._wrap_uj = wrap_uj

    @classmethod
    def open(cls, path: Path) -> RaplCounter | None:
        """The counter at ``path``, or None if it is absent or unreadable (RAPL is root-only)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            log.debug("energy counter %s not usable (%s); energy will be modelled", path, err)
            return None
        try:
            counter = cls(fd, int((path.parent / "max_energy_range_uj").read_text()) + 1)
            counter.read_uj()
        except (OSError, ValueError) as err:
            os.close(fd)
            log.debug("energy counter %s not usable (%s); energy will be modelled", path, err)
            return None
        return counter

    def read_uj(self) -> int:
        return int(os.pread(self._fd, 32, 0))

    def joules(self, start_uj: int, end_uj: int) -> float:
        return ((end_uj - start_uj) % self._wrap_uj) / 1e6

    def close(self) -> None:
        os.close(self._fd)


@dataclass(slots=True)
class _Input:
    """An input resolved at load time, so that ``infer`` does no lookups."""

    spec: TensorSpec
    index: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # currently allocated shape
    # (scale as float32, zero point, min, max) for quantized integer inputs
    quant: tuple[np.float32, int, int, int] | None

    def check(self, value: object) -> np.ndarray:
        name = self.spec.name
        if not isinstance(value, np.ndarray):
            raise InvalidInput(name, f"expected a numpy array, got {type(value).__name__}")
        if value.dtype != self.dtype:
            if self.quant is None or value.dtype.kind != "f":
                raise InvalidInput(name, f"dtype {value.dtype}, expected {self.spec.dtype} ({self.dtype})")
            value = self._quantize(value)
        if value.shape != self.shape:
            signature = self.spec.shape
            if len(value.shape) != len(signature) or any(
                s >= 0 and s != v for s, v in zip(signature, value.shape, strict=True)
            ):
                raise InvalidInput(name, f"shape {list(value.shape)}, expected {list(signature)}")
        return value

    def _quantize(self, value: np.ndarray) -> np.ndarray:
        assert self.quant is not None
        scale, zero_point, low, high = self.quant
        scaled = value.astype(np.float32, copy=False) / scale
        rounded = np.trunc(scaled + np.copysign(np.float32(0.5), scaled))
        if np.isnan(rounded).any():
            raise InvalidInput(self.spec.name, "NaN values cannot be quantized")
        return np.clip(rounded + zero_point, low, high).astype(self.dtype)


class _Loaded:
    """One loaded model: its interpreter, the lock serialising it, pre-resolved tensor indices."""

    __slots__ = ("by_name", "dynamic", "handle", "inputs", "interpreter", "lock", "outputs")

    def __init__(self, handle: ModelHandle, interpreter: Any) -> None:
        self.handle = handle
        self.interpreter: Any = interpreter
        self.lock = threading.Lock()
        self.inputs = tuple(
            _Input(spec, detail["index"], spec.numpy_dtype, tuple(map(int, detail["shape"])), _quant(spec))
            for spec, detail in zip(handle.inputs, interpreter.get_input_details(), strict=True)
        )
        self.by_name = {slot.spec.name: pos for pos, slot in enumerate(self.inputs)}
        self.dynamic = any(d < 0 for spec in handle.inputs for d in spec.shape)
        self.outputs = tuple(
            (spec.name, detail["index"])
            for spec, detail in zip(handle.outputs, interpreter.get_output_details(), strict=True)
        )

    def bind(self, inputs: Inputs) -> list[np.ndarray]:
        """Inputs in model order, validated (and float inputs of quantized tensors quantized)."""
        slots = self.inputs
        if isinstance(inputs, Mapping):
            for name in inputs:
                if name not in self.by_name:
                    raise InvalidInput(name, f"not an input of the model; inputs are {list(self.by_name)}")
            try:
                values: Sequence[object] = [inputs[slot.spec.name] for slot in slots]
            except KeyError as err:
                raise InvalidInput(err.args[0], "missing") from None
        else:
            values = inputs
            if len(values) != len(slots):
                missing = slots[len(values)].spec.name if len(values) < len(slots) else f"#{len(slots)}"
                raise InvalidInput(missing, f"got {len(values)} inputs, the model takes {len(slots)}")
        return [slot.check(value) for slot, value in zip(slots, values, strict=True)]


def _quant(spec: TensorSpec) -> tuple[np.float32, int, int, int] | None:
    dtype = spec.numpy_dtype
    if spec.quantization is None or dtype.kind not in "iu":
        return None
    info = np.iinfo(dtype)
    return np.float32(spec.quantization.scale), spec.quantization.zero_point, int(info.min), int(info.max)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class CpuLitertBackend(Backend):
    """Runs TFLite models on the CPU with the LiteRT interpreter; real, never simulated."""

    kind = KIND
    config_model = CpuLitertConfig

    def __init__(self, config: CpuLitertConfig | None = None) -> None:
        self.config = config or CpuLitertConfig()
        runtime = interpreter_runtime()
        self._counter = RaplCounter.open(self.config.energy_counter) if self.config.energy_counter else None
        self._capabilities = Capabilities(
            kind=KIND,
            device=f"{platform.machine() or 'cpu'} x{os.cpu_count() or 1} ({runtime.name})",
            simulated=False,
            dtypes=self.config.dtypes,
            ops=self.config.ops,
            memory_bytes=_physical_memory() if self.config.memory_bytes is None else self.config.memory_bytes,
            peak_gops=self.config.peak_gops,
            power=PowerModel(self.config.power.idle_w, self.config.power.active_w),
        )
        self._loaded: dict[int, _Loaded] = {}
        self._closed = False

    @classmethod
    def probe(cls) -> str | None:
        try:
            interpreter_runtime()
        except BackendUnavailable as err:
            return err.reason
        return None

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def energy_measured(self) -> bool:
        return self._counter is not None

    def load(self, model: ModelArtifact) -> ModelHandle:
        if self._closed:
            raise BackendUnavailable(KIND, "backend is closed")
        data = model.read()
        check_container(data)
        interpreter = open_interpreter(
            data, num_threads=self.config.num_threads, default_delegates=self.config.xnnpack
        )
        inputs, outputs, ops, dtypes = describe(interpreter)
        refusal = self._capabilities.why_not(dtypes=dtypes, ops=ops)
        if refusal is not None:
            raise refusal
        allocate(interpreter)
        handle = ModelHandle(model.name, model.version, model.sha256, KIND, inputs, outputs)
        self._loaded[handle.id] = _Loaded(handle, interpreter)
        log.info(
            "loaded %s:%s (%d bytes, ops %s) with %d thread(s)",
            model.name,
            model.version,
            len(data),
            ",".join(ops),
            self.config.num_threads,
        )
        return handle

    def infer(self, handle: ModelHandle, inputs: Inputs) -> InferResult:
        loaded = self._loaded.get(handle.id)
        if loaded is None:
            raise ModelNotLoaded(handle.name, handle.version)
        arrays = loaded.bind(inputs)
        counter = self._counter
        with loaded.lock:
            interpreter = loaded.interpreter
            if interpreter is None:
                raise ModelNotLoaded(handle.name, handle.version)
            if loaded.dynamic:
                self._resize(loaded, arrays)
            start_uj = counter.read_uj() if counter else 0
            start = time.perf_counter()
            start_cpu = time.thread_time()
            try:
                for slot, array in zip(loaded.inputs, arrays, strict=True):
                    interpreter.set_tensor(slot.index, array)
                interpreter.invoke()
                outputs = {name: interpreter.get_tensor(index) for name, index in loaded.outputs}
            except (ValueError, RuntimeError) as err:
                raise InferenceFailed(handle.name, str(err)) from err
            busy_s = time.thread_time() - start_cpu
            wall_s = time.perf_counter() - start
            end_uj = counter.read_uj() if counter else 0
        if counter:
            return InferResult(outputs, wall_s, counter.joules(start_uj, end_uj), "measured")
        return InferResult(outputs, wall_s, self._capabilities.power.energy_j(wall_s, busy_s), "modelled")

    @staticmethod
    def _resize(loaded: _Loaded, arrays: list[np.ndarray]) -> None:
        """Re-allocate for inputs whose variable dimensions changed (already checked by ``bind``)."""
        resized = False
        for slot, array in zip(loaded.inputs, arrays, strict=True):
            if array.shape != slot.shape:
                loaded.interpreter.resize_tensor_input(slot.index, array.shape)
                slot.shape = array.shape
                resized = True
        if resized:
            allocate(loaded.interpreter)

    def unload(self, handle: ModelHandle) -> None:
        loaded = self._loaded.pop(handle.id, None)
        if loaded is None:
            return
        with loaded.lock:  # wait for an inference in flight
            loaded.interpreter = None
        log.info("unloaded %s:%s", handle.name, handle.version)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for loaded in list(self._loaded.values()):
            self.unload(loaded.handle)
        if self._counter is not None:
            self._counter.close()
            self._counter = None

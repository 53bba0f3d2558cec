"""cpu-litert: models run on the host CPU by the LiteRT interpreter (XNNPACK delegate by default).

The interpreter is ai-edge-litert's, or tflite_runtime's where only that is installed.

Threading: the backend is synchronous. Each loaded model has its own interpreter guarded by its
own lock, so inferences on one model run one at a time while different models run in parallel
(the interpreter releases the GIL while it computes).

Inputs: numpy arrays by name or in model order, of the model's dtype and shape; a quantized
integer input also accepts floating data, quantized as TFLite's QUANTIZE op does it (see
``accelerators.execution``). Outputs are returned as the model produces them (quantized outputs
stay integers; dequantize with ``TensorSpec.quantization``).

Timing "modelled" (a board whose CPU is not this machine's, as in ``edgeward up``'s simulated
boards): the outputs are still this interpreter's, but latency and energy come from the cost
model (``peak_gops`` x ``sustained_fraction``) and the power model, like the simulated
accelerators, and the capabilities say ``simulated``.

Energy: where the package's RAPL counter is readable (Intel/AMD x86 Linux, usually root only)
the energy of each inference is measured as the counter's difference across the invoke; it
covers the whole CPU package, other work included. Elsewhere it is modelled from the configured
power model: idle_w * wall time + (active_w - idle_w) * busy time, where the wall time is
measured on every inference and the busy time is that wall time times the invoking thread's CPU
share, measured on one inference in ``execution.CPU_SAMPLE_EVERY`` (with num_threads > 1 the
helper threads' CPU time is not counted).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from accelerators.base import (
    NUMPY_DTYPES,
    Backend,
    BackendUnavailable,
    Capabilities,
    CostModel,
    InferResult,
    Inputs,
    ModelArtifact,
    ModelHandle,
    ModelNotLoaded,
    ModelRefused,
    PowerModel,
)
from accelerators.execution import InterpreterSession, modelled_result
from accelerators.tflite_model import (
    allocate,
    check_container,
    describe,
    inspect_tflite,
    interpreter_runtime,
    open_interpreter,
    runtime_problem,
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
    # Coral's benchmark table (coral.ai/docs/edgetpu/benchmarks/, "Embedded CPU": a quad Cortex-A53
    # at 1.5 GHz) times MobileNet v1 224 at 164 ms: 569 M MACs (Howard et al. 2017), i.e. 1.14 G
    # operations, so 6.9 GOPS of the 48 GOPS nominal peak the hardware catalog gives that CPU.
    sustained_fraction: float = Field(
        default=0.145,
        gt=0,
        le=1,
        title="Sustained share of the peak",
        description="Share of peak_gops a model sustains, for predictions before the node has profiled "
        "it (the scheduler's cold start); the default is a quad Cortex-A53's on MobileNet v1 (Coral).",
    )
    # Measured: backend.infer costs 2.2-3.0 us more than a bare invoke() on x86_64
    # (bench/inference_overhead.py, docs/benchmarks.md); the interpreter's own fixed cost is in
    # the sustained share.
    invoke_overhead_s: float = Field(
        default=2.5e-6,
        ge=0,
        le=1,
        title="Fixed cost per inference (s)",
        description="Per-inference cost apart from the model's work, for cold-start predictions.",
    )
    timing: Literal["host", "modelled"] = Field(
        default="host",
        title="Timing",
        description="host: latency and energy from this machine's wall time (the real CPU); modelled: "
        "from the cost model (peak_gops x sustained_fraction) for a board whose CPU is not this one, "
        "outputs still computed here, and the backend says it is simulated.",
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
        device = f"{platform.machine() or 'cpu'} x{os.cpu_count() or 1} ({runtime.name})"
        modelled = self.config.timing == "modelled"
        if modelled:
            device = f"{self.config.peak_gops:g} GOPS board CPU (simulated timing; outputs from {device})"
        self._capabilities = Capabilities(
            kind=KIND,
            device=device,
            simulated=modelled,
            dtypes=self.config.dtypes,
            ops=self.config.ops,
            memory_bytes=_physical_memory() if self.config.memory_bytes is None else self.config.memory_bytes,
            peak_gops=self.config.peak_gops,
            power=PowerModel(self.config.power.idle_w, self.config.power.active_w),
            cost=CostModel(
                invoke_overhead_s=self.config.invoke_overhead_s,
                # A multiply-accumulate is two operations of the peak.
                macs_per_s=self.config.peak_gops * 1e9 * self.config.sustained_fraction / 2,
                elements_per_s=self.config.peak_gops * 1e9 * self.config.sustained_fraction,
            ),
        )
        self._power = self._capabilities.power
        self._loaded: dict[int, InterpreterSession] = {}
        self._modelled: dict[
            int, tuple[float, float]
        ] = {}  # handle id -> (latency, busy) with timing "modelled"
        self._closed = False

    @classmethod
    def probe(cls) -> str | None:
        return runtime_problem()

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
        self._loaded[handle.id] = InterpreterSession(handle, interpreter, self._power, self._counter)
        if self.config.timing == "modelled":
            # The work as the catalog reads it: from the model's own ops, not the delegate's.
            work = inspect_tflite(data).work
            if work is None or self._capabilities.cost is None:
                raise ModelRefused(f"{KIND}: cannot model this model's timing (its work could not be read)")
            self._modelled[handle.id] = self._capabilities.cost.latency(work)
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
        session = self._loaded.get(handle.id)
        if session is None:
            raise ModelNotLoaded(handle.name, handle.version)
        timing = self._modelled.get(handle.id)
        if timing is None:
            return session.infer(inputs)
        # A simulated board's CPU: this machine's time to compute the outputs is not the board's.
        return modelled_result(self._power, session.infer(inputs).outputs, *timing)

    def unload(self, handle: ModelHandle) -> None:
        session = self._loaded.pop(handle.id, None)
        self._modelled.pop(handle.id, None)
        if session is None:
            return
        session.close()  # waits for an inference in flight
        log.info("unloaded %s:%s", handle.name, handle.version)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for session in list(self._loaded.values()):
            self.unload(session.handle)
        if self._counter is not None:
            self._counter.close()
            self._counter = None

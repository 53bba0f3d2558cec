"""asic-edgetpu: an Edge-TPU-like int8 accelerator, simulated and labelled so.

There is no Edge TPU here, and this backend does not pretend otherwise: ``simulated=True``, the
device name says "simulated", and latency and energy come from the datasheet model below, not
from a measurement. What it reproduces faithfully is the contract of such a device:

- a **compile step** (``EdgeTpuCompiler``) that, like the Edge TPU compiler, accepts only fully
  integer-quantized models with static shapes whose every op is on the device's list, and refuses
  anything else with the offending ops and datatypes (it does not fall back to the CPU);
- **the math** of the CPU reference: the LiteRT interpreter with its reference kernels
  (``OpResolverType.BUILTIN_REF``), the same outputs the fpga-pynq simulator reproduces bit for
  bit. (A real Edge TPU's outputs differ from the CPU's by rounding.)

Datasheet model, per inference: ``invoke_overhead_s`` + input and output transfers over the host
link + parameters beyond the on-chip cache, streamed over the link + compute, where compute is
(2 x MACs + elementwise operations) at the peak rate times a sustained utilisation. Energy =
idle power x latency + (active - idle) power x compute time. Figures and sources are in
``EdgeTpuDatasheet``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from accelerators.base import (
    Backend,
    BackendUnavailable,
    Capabilities,
    CostModel,
    InferResult,
    Inputs,
    InvalidModel,
    ModelArtifact,
    ModelHandle,
    ModelNotLoaded,
    ModelRefused,
    PowerModel,
    TensorSpec,
)
from accelerators.cpu_litert import PowerConfig
from accelerators.execution import InterpreterSession, modelled_result
from accelerators.tflite_model import (
    LayerCost,
    allocate,
    check_container,
    describe,
    interpreter_runtime,
    layer_costs,
    open_interpreter,
    runtime_problem,
)

__all__ = [
    "EDGETPU_OPS",
    "KIND",
    "AsicEdgeTpuBackend",
    "AsicEdgeTpuConfig",
    "EdgeTpuCompiler",
    "EdgeTpuDatasheet",
]

log = logging.getLogger(__name__)

KIND = "asic-edgetpu"
MEASUREMENT_COMPONENT = "accelerator.asic-edgetpu.firmware"

#: The Edge TPU's supported operations, as TFLite builtin op names (Coral, "TensorFlow models on
#: the Edge TPU", coral.ai/docs/edgetpu/models-intro/#supported-operations). Per-op limits listed
#: there (e.g. MEAN without batch reduction) are not checked.
EDGETPU_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
    }
)
#: Fully integer models only: the Edge TPU has no float datapath.
EDGETPU_DTYPES = frozenset({"INT8", "UINT8"})


@dataclass(frozen=True, slots=True)
class EdgeTpuDatasheet:
    """The figures the latency and energy model uses, each with its source."""

    # "An individual Edge TPU can perform 4 trillion (fixed-point) operations per second
    # (4 TOPS), using only 2 watts of power" (coral.ai/docs/edgetpu/faq/).
    peak_ops_per_s: float = 4e12
    active_w: float = 2.0
    # Estimate, not a datasheet figure: the accelerator idle but powered.
    idle_w: float = 0.5
    # Sustained fraction of the peak, derived from Coral's published benchmark: MobileNet v1
    # (1.14 G operations, 569 M MACs per Howard et al. 2017) takes 2.2 ms on the Dev Board
    # (coral.ai/docs/edgetpu/benchmarks/), i.e. 0.52 TOPS, 13 % of 4 TOPS.
    utilisation: float = 0.13
    # "The Edge TPU has roughly 8 MB of SRAM that can cache the model's parameter data"
    # (coral.ai/docs/edgetpu/compiler/); parameters beyond it stream from host memory per inference.
    parameter_cache_bytes: int = 8 * 2**20
    # Host link, PCIe Gen2 x1 (M.2 and Mini PCIe modules, the Dev Board's SoM): 5 GT/s with
    # 8b/10b coding = 500 MB/s (PCI Express Base Specification 2.0). The USB Accelerator's USB 3.0
    # link (5 Gb/s, 8b/10b: 500 MB/s raw) is taken at 60 % for protocol overhead (estimate).
    link_bytes_per_s: float = 500e6
    # Estimate: driver call, DMA set-up and completion interrupt per invocation.
    invoke_overhead_s: float = 100e-6

    def latency(self, layers: tuple[LayerCost, ...], io_bytes: int) -> tuple[float, float]:
        """(latency, compute time) of one inference."""
        operations = sum(2 * layer.macs + layer.elements for layer in layers)
        compute_s = operations / (self.peak_ops_per_s * self.utilisation)
        weights = sum(layer.weight_bytes for layer in layers)
        streamed = max(0, weights - self.parameter_cache_bytes)
        transfer_s = (io_bytes + streamed) / self.link_bytes_per_s
        return self.invoke_overhead_s + transfer_s + compute_s, compute_s

    @property
    def cost(self) -> CostModel:
        """This model in the scheduler's summary form (the same figures: a MAC is two operations)."""
        rate = self.peak_ops_per_s * self.utilisation
        return CostModel(
            invoke_overhead_s=self.invoke_overhead_s,
            macs_per_s=rate / 2,
            elements_per_s=rate,
            link_bytes_per_s=self.link_bytes_per_s,
            weight_cache_bytes=self.parameter_cache_bytes,
        )


INTERFACES: Mapping[str, EdgeTpuDatasheet] = {
    "pcie": EdgeTpuDatasheet(),
    "usb3": EdgeTpuDatasheet(link_bytes_per_s=300e6),
}


class AsicEdgeTpuConfig(BaseModel):
    """Configuration of the asic-edgetpu backend (validated without touching anything)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interface: Literal["pcie", "usb3"] = Field(
        default="pcie",
        title="Host interface",
        description="pcie: M.2, Mini PCIe or the Dev Board's SoM; usb3: the USB Accelerator.",
    )
    power: PowerConfig | None = Field(
        default=None,
        title="Power model",
        description="Idle and active power; None: the datasheet's (idle estimate, 2 W active).",
    )
    ops: frozenset[str] = Field(
        default=EDGETPU_OPS,
        title="Ops",
        description="Builtin ops the compiler maps to the device (a subset of the Edge TPU's list).",
    )

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - EDGETPU_OPS
        if unknown:
            raise ValueError(f"not Edge TPU ops: {sorted(unknown)}")
        return value


@dataclass(frozen=True, slots=True)
class CompiledModel:
    """What the compile step accepted: the model's signature, ops and per-layer work."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]
    layers: tuple[LayerCost, ...]

    @property
    def io_bytes(self) -> int:
        return sum(int(np.prod(s.shape)) * s.numpy_dtype.itemsize for s in (*self.inputs, *self.outputs))


class EdgeTpuCompiler:
    """The compile step: full-integer models with the device's ops and static shapes, or a refusal."""

    def __init__(self, ops: frozenset[str] = EDGETPU_OPS, dtypes: frozenset[str] = EDGETPU_DTYPES) -> None:
        self.ops = ops
        self.dtypes = dtypes

    def compile(self, data: bytes) -> CompiledModel:
        check_container(data)
        interpreter = open_interpreter(data, default_delegates=False)
        inputs, outputs, ops, dtypes = describe(interpreter)
        bad_dtypes = dtypes - self.dtypes
        bad_ops = set(ops) - self.ops
        if bad_dtypes or bad_ops:
            parts = []
            if bad_dtypes:
                parts.append(
                    "datatypes " + ", ".join(sorted(bad_dtypes)) + " (only full-integer models compile)"
                )
            if bad_ops:
                parts.append("ops " + ", ".join(sorted(bad_ops)))
            raise ModelRefused(
                f"{KIND}: cannot compile " + "; ".join(parts),
                offending_ops=bad_ops,
                offending_dtypes=bad_dtypes,
            )
        if any(d < 0 for spec in (*inputs, *outputs) for d in spec.shape):
            raise ModelRefused(f"{KIND}: cannot compile dynamic shapes; the model has variable dimensions")
        allocate(interpreter)
        details = {d["index"]: d for d in interpreter.get_tensor_details()}
        for node in interpreter._get_ops_details():
            # The reference SOFTMAX kernel aborts the process (a TFLITE_CHECK on its final shift)
            # when a row of 512 or more near-equal values sums past its Q12.19 range.
            if node["op_name"] == "SOFTMAX" and details[int(node["inputs"][0])]["shape"][-1] >= 512:
                raise ModelRefused(
                    f"{KIND}: cannot compile SOFTMAX over 512 or more classes (reference kernel overflow)",
                    offending_ops=["SOFTMAX"],
                )
        return CompiledModel(inputs, outputs, ops, layer_costs(interpreter))


def reference_interpreter(data: bytes) -> Any:
    """A LiteRT interpreter over already checked bytes, with the portable reference kernels."""
    runtime = interpreter_runtime()
    try:
        interpreter = runtime.interpreter(
            model_content=bytes(data),
            num_threads=1,
            experimental_op_resolver_type=runtime.op_resolver_type.BUILTIN_REF,
        )
        interpreter.allocate_tensors()
    # The bytes passed the verifier in the compile step; anything raised now is still the model's.
    except Exception as err:
        raise InvalidModel("malformed", str(err).splitlines()[0][:300] if str(err) else repr(err)) from err
    return interpreter


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One compiled model: the reference interpreter's session and the datasheet's timing."""

    session: InterpreterSession
    compiled: CompiledModel
    latency_s: float
    busy_s: float


class AsicEdgeTpuBackend(Backend):
    """A simulated Edge-TPU-like accelerator: compile, reference math, datasheet latency and energy."""

    kind = KIND
    config_model = AsicEdgeTpuConfig

    def __init__(self, config: AsicEdgeTpuConfig | None = None) -> None:
        self.config = config or AsicEdgeTpuConfig()
        self.datasheet = INTERFACES[self.config.interface]
        self.compiler = EdgeTpuCompiler(self.config.ops)
        descriptor = json.dumps(
            {
                "device": "edgeward-edgetpu-sim",
                "version": 1,
                "simulated": True,
                "datasheet": asdict(self.datasheet),
                "ops": sorted(self.compiler.ops),
            },
            sort_keys=True,
        ).encode()
        self._firmware_sha256 = hashlib.sha256(descriptor).hexdigest()
        power = self.config.power
        self._capabilities = Capabilities(
            kind=KIND,
            device=f"Edge TPU class ASIC, {self.config.interface} (simulated, {self._firmware_sha256[:12]})",
            simulated=True,
            dtypes=self.compiler.dtypes,
            ops=self.compiler.ops,
            memory_bytes=self.datasheet.parameter_cache_bytes,
            peak_gops=self.datasheet.peak_ops_per_s / 1e9,
            power=PowerModel(self.datasheet.idle_w, self.datasheet.active_w)
            if power is None
            else PowerModel(power.idle_w, power.active_w),
            cost=self.datasheet.cost,
        )
        self._loaded: dict[int, _Loaded] = {}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def probe(cls) -> str | None:
        return runtime_problem()

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def measurements(self) -> dict[str, str]:
        """Attestation measurements: component id -> sha256 (hex) of the simulated device's description."""
        return {MEASUREMENT_COMPONENT: self._firmware_sha256}

    def load(self, model: ModelArtifact) -> ModelHandle:
        if self._closed:
            raise BackendUnavailable(KIND, "backend is closed")
        data = model.read()
        compiled = self.compiler.compile(data)
        interpreter = reference_interpreter(data)
        timing = self.datasheet.latency(compiled.layers, compiled.io_bytes)
        handle = ModelHandle(model.name, model.version, model.sha256, KIND, compiled.inputs, compiled.outputs)
        session = InterpreterSession(handle, interpreter, self._capabilities.power)
        with self._lock:
            self._loaded[handle.id] = _Loaded(session, compiled, *timing)
        log.info(
            "compiled %s:%s for %s (%d MACs, %.3f ms modelled)",
            model.name,
            model.version,
            self._capabilities.device,
            sum(layer.macs for layer in compiled.layers),
            timing[0] * 1e3,
        )
        return handle

    def infer(self, handle: ModelHandle, inputs: Inputs) -> InferResult:
        loaded = self._loaded.get(handle.id)
        if loaded is None:
            raise ModelNotLoaded(handle.name, handle.version)
        # The host's time to run the reference kernels is not the device's: only the outputs count.
        outputs = loaded.session.infer(inputs).outputs
        return modelled_result(self._capabilities.power, outputs, loaded.latency_s, loaded.busy_s)

    def unload(self, handle: ModelHandle) -> None:
        with self._lock:
            loaded = self._loaded.pop(handle.id, None)
        if loaded is None:
            return
        loaded.session.close()  # waits for an inference in flight
        log.info("unloaded %s:%s", handle.name, handle.version)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for loaded in list(self._loaded.values()):
            self.unload(loaded.session.handle)

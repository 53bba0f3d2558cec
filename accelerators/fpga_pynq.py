"""fpga-pynq: full-int8 models on edgeward's int8 engine overlay, driven through the PYNQ API.

One driver (``_EngineDriver``) speaks to the overlay the way PYNQ code does: ``Overlay(bitstream)``,
``allocate(shape, dtype)`` for physically contiguous buffers, the engine's AXI-Lite registers
through ``write``/``read``, and an AXI DMA (``sendchannel``/``recvchannel`` ``transfer``/``wait``)
for activations. Two overlays answer it:

- **hardware**: the ``pynq`` package on a Zynq board, with a bitstream (and its ``.hwh``) that
  implements the engine's register map below. edgeward ships no such bitstream, and this path
  cannot be tested here (no board, no ``pynq``); it is written against the PYNQ 3.x API.
- **simulated** (``SimulatedOverlay``): the same calls, answered in-process. The engine reads the
  program (the model file) from its simulated DDR and computes with ``accelerators.int8_reference``,
  bit-exact with LiteRT's reference int8 kernels. Latency and energy come from ``TimingModel``,
  not from the host's clock: the backend reports what the modelled board would take, the
  capabilities say ``simulated=True`` and the device name says "simulated".

Register map of the int8 engine (AXI-Lite, 32-bit registers; an HLS-style control register):

==========  ======  =========================================================================
CTRL        0x00    bit 0 AP_START (write 1), bit 1 AP_DONE, bit 2 AP_IDLE (read)
COMMAND     0x10    1 LOAD the program at PROGRAM_* into SLOT, 2 RUN SLOT, 3 UNLOAD SLOT
SLOT        0x18    model slot
PROGRAM_LO  0x20    device address of the program buffer, low and high words
PROGRAM_HI  0x24
PROGRAM_LEN 0x28    program length in bytes
STATUS      0x30    0 ok; otherwise an error code (1 bad program, 2 unknown slot, 3 no space)
CYCLES_LO   0x38    engine clock cycles the last command kept the compute units busy
CYCLES_HI   0x3C
==========  ======  =========================================================================

RUN streams every input, concatenated in model order, in through the DMA's send channel and the
outputs, concatenated, back through the receive channel.

Host-side checks come first on both paths: ``load`` compiles the model with
``Int8Program.compile`` (which refuses float models and ops without an int8 kernel, listing them)
before anything is sent to the device. Energy is always modelled (``energy_source="modelled"``):
the PYNQ-Z2 has no power monitor (discuss.pynq.io/t/how-to-measure-power-consumption/523), and
reading the ZCU104's PMBus rails is not implemented.

Attestation: ``measurements()`` gives the sha256 of what configures the fabric, under the
component id ``accelerator.fpga-pynq.bitstream``: the bitstream file on hardware, and on the
simulator the canonical description of the simulated design (board, timing figures, ops), so a
verifier can tell a simulated node from a real one and pin either.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from accelerators.base import (
    AcceleratorError,
    Backend,
    BackendUnavailable,
    Capabilities,
    CostModel,
    InferenceFailed,
    InferResult,
    Inputs,
    ModelArtifact,
    ModelHandle,
    ModelNotLoaded,
    ModelRefused,
    PowerModel,
)
from accelerators.cpu_litert import PowerConfig
from accelerators.execution import InputBinder, modelled_result
from accelerators.int8_reference import SUPPORTED_OPS, Int8Program
from accelerators.tflite_model import LayerCost, runtime_problem

__all__ = [
    "BOARDS",
    "KIND",
    "FpgaPynqBackend",
    "FpgaPynqConfig",
    "SimulatedOverlay",
    "TimingEstimate",
    "TimingModel",
]

log = logging.getLogger(__name__)

KIND = "fpga-pynq"
MEASUREMENT_COMPONENT = "accelerator.fpga-pynq.bitstream"
ENGINE_IP = "int8_engine_0"
DMA_IP = "axi_dma_0"

# Register offsets and commands (see the module docstring).
CTRL, COMMAND, SLOT, PROGRAM_LO, PROGRAM_HI, PROGRAM_LEN, STATUS, CYCLES_LO, CYCLES_HI = (
    0x00,
    0x10,
    0x18,
    0x20,
    0x24,
    0x28,
    0x30,
    0x38,
    0x3C,
)
AP_START, AP_DONE, AP_IDLE = 0x1, 0x2, 0x4
CMD_LOAD, CMD_RUN, CMD_UNLOAD = 1, 2, 3
STATUS_OK, STATUS_BAD_PROGRAM, STATUS_NO_SLOT, STATUS_NO_SPACE = 0, 1, 2, 3
# How long the driver polls AP_DONE on hardware before giving up.
COMMAND_TIMEOUT_S = 5.0


# -------------------------------------------------------------------------------- timing model


@dataclass(frozen=True, slots=True)
class TimingEstimate:
    """What one inference costs on the modelled board."""

    latency_s: float
    busy_s: float
    cycles: int


@dataclass(frozen=True, slots=True)
class TimingModel:
    """Latency and power of the int8 engine on one board.

    Per inference: ``invoke_overhead_s`` (driver register writes, DMA set-up, completion), the
    input and output DMA transfers at ``dma_bytes_per_s``, and per layer the longer of its compute
    time and its weight streaming time. Compute: ``ceil(macs / macs_per_cycle)`` cycles on the MAC
    array, or ``ceil(elements / vector_lanes)`` on the vector unit, plus
    ``layer_overhead_cycles``. Weights stay in on-chip RAM when the whole model's fit in
    ``on_chip_weight_bytes`` (loaded once, at ``load``); otherwise they stream from DDR every
    inference. Activations that do not fit ``activation_buffer_bytes`` spill to DDR and back.
    Energy = ``static_w`` * latency + ``dynamic_w`` * busy time.
    """

    board: str
    clock_hz: float
    macs_per_cycle: int
    vector_lanes: int
    layer_overhead_cycles: int
    dma_bytes_per_s: float
    invoke_overhead_s: float
    on_chip_weight_bytes: int
    activation_buffer_bytes: int
    static_w: float
    dynamic_w: float
    memory_bytes: int

    @property
    def peak_gops(self) -> float:
        return 2 * self.macs_per_cycle * self.clock_hz / 1e9

    def estimate(self, layers: tuple[LayerCost, ...], io_bytes: int) -> TimingEstimate:
        weights_resident = sum(layer.weight_bytes for layer in layers) <= self.on_chip_weight_bytes
        cycles = 0
        layer_time = 0.0
        for layer in layers:
            if layer.macs:
                compute = math.ceil(layer.macs / self.macs_per_cycle) + self.layer_overhead_cycles
            elif layer.elements:
                compute = math.ceil(layer.elements / self.vector_lanes) + self.layer_overhead_cycles
            else:
                compute = 0  # a reshape relabels the buffer
            streamed = 0 if weights_resident else layer.weight_bytes
            if layer.input_bytes + layer.output_bytes > self.activation_buffer_bytes:
                streamed += layer.input_bytes + layer.output_bytes
            cycles += compute
            layer_time += max(compute / self.clock_hz, streamed / self.dma_bytes_per_s)
        latency = self.invoke_overhead_s + io_bytes / self.dma_bytes_per_s + layer_time
        return TimingEstimate(latency_s=latency, busy_s=cycles / self.clock_hz, cycles=cycles)

    def load_time_s(self, program_bytes: int) -> float:
        return self.invoke_overhead_s + program_bytes / self.dma_bytes_per_s

    @property
    def power(self) -> PowerModel:
        return PowerModel(self.static_w, self.static_w + self.dynamic_w)

    @property
    def cost(self) -> CostModel:
        """This model in the scheduler's summary form (the same figures; per-layer rounding and
        the overlap of streamed weights with compute aside)."""
        return CostModel(
            invoke_overhead_s=self.invoke_overhead_s,
            macs_per_s=self.macs_per_cycle * self.clock_hz,
            elements_per_s=self.vector_lanes * self.clock_hz,
            layer_overhead_s=self.layer_overhead_cycles / self.clock_hz,
            link_bytes_per_s=self.dma_bytes_per_s,
            weight_cache_bytes=self.on_chip_weight_bytes,
        )


BOARDS: Mapping[str, TimingModel] = {
    # TUL PYNQ-Z2: Zynq-7000 XC7Z020 (dual Cortex-A9 650 MHz), 512 MB DDR3.
    "pynq-z2": TimingModel(
        board="PYNQ-Z2",
        # PYNQ's default PL clock FCLK0 is 100 MHz (pynq.readthedocs.io, "Overlay Design
        # Methodology" / pynq.ps.Clocks).
        clock_hz=100e6,
        # Design figure: a 16x8 int8 systolic array, one MAC per DSP48E1 per cycle, 128 of the
        # XC7Z020's 220 DSP48E1 slices (Xilinx DS190, Zynq-7000 SoC Data Sheet: Overview).
        macs_per_cycle=128,
        vector_lanes=16,  # design figure: 16-lane int32 post-processing unit
        layer_overhead_cycles=256,  # design estimate: descriptor fetch, pipeline fill and drain
        # AXI DMA with a 64-bit AXI4-Stream at 100 MHz into a 64-bit S_AXI_HP port: 8 B x 100 MHz
        # peak (Xilinx PG021 AXI DMA product guide; UG585 Zynq-7000 TRM, AXI_HP interfaces).
        dma_bytes_per_s=800e6,
        # Estimate: Python-level MMIO writes plus DMA transfer()/wait() on the Cortex-A9 cost
        # tens of microseconds per call.
        invoke_overhead_s=50e-6,
        # The XC7Z020 has 140 x 36 Kb BRAM = 630 KB (DS190): half for weights, a fifth for
        # activations, the rest for FIFOs and the program.
        on_chip_weight_bytes=315 * 1024,
        activation_buffer_bytes=126 * 1024,
        # Estimates, not datasheet figures (the board has no power monitor; measure with a USB
        # meter): about 2 W for the board with Linux up and the PL configured, about 1 W more
        # with the MAC array busy at 100 MHz (Xilinx Power Estimator class figure for ~130 DSPs
        # and their BRAM traffic on a -1 XC7Z020).
        static_w=2.0,
        dynamic_w=1.0,
        memory_bytes=512 * 2**20,  # 512 MB DDR3 (TUL PYNQ-Z2 board specification)
    ),
    # AMD/Xilinx ZCU104: Zynq UltraScale+ XCZU7EV (quad Cortex-A53 1.2 GHz), 2 GB PS DDR4.
    "zcu104": TimingModel(
        board="ZCU104",
        # A DPU-class engine: 4096 int8 operations (2048 MACs) per cycle at 300 MHz, the B4096
        # configuration of the Xilinx DPUCZDX8G (PG338 DPU product guide; ZCU104 DPU TRD clock).
        clock_hz=300e6,
        macs_per_cycle=2048,
        vector_lanes=64,  # design figure
        layer_overhead_cycles=512,  # design estimate
        # 128-bit S_AXI_HP ports (UG1085 Zynq UltraScale+ TRM) at 300 MHz: 16 B x 300 MHz peak.
        dma_bytes_per_s=4.8e9,
        invoke_overhead_s=20e-6,  # estimate: PYNQ MMIO and DMA calls on the Cortex-A53
        # The XCZU7EV has 11 Mb BRAM and 27 Mb UltraRAM (DS891, Zynq UltraScale+ MPSoC
        # overview): 2 MiB for weights, 512 KiB for activations.
        on_chip_weight_bytes=2 * 2**20,
        activation_buffer_bytes=512 * 1024,
        # Estimates, not datasheet figures (the ZCU104's PMBus rails can measure them through
        # pynq.pmbus): about 9 W for the board idle with Linux up, about 6 W more with a
        # B4096-class engine busy at 300 MHz.
        static_w=9.0,
        dynamic_w=6.0,
        memory_bytes=2 * 2**30,  # 2 GB PS DDR4 (ZCU104 board user guide, UG1267)
    ),
}


# ------------------------------------------------------------------------------------- config


class FpgaPynqConfig(BaseModel):
    """Configuration of the fpga-pynq backend (validated without touching the device)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    board: Literal["pynq-z2", "zcu104"] = Field(
        default="pynq-z2", title="Board", description="Board whose timing and power figures apply."
    )
    mode: Literal["auto", "hardware", "simulated"] = Field(
        default="auto",
        title="Mode",
        description="hardware: the pynq package and a bitstream; simulated: the in-process overlay; "
        "auto: hardware when both are there, simulated otherwise.",
    )
    bitstream: Path | None = Field(
        default=None,
        title="Bitstream",
        description="The engine overlay's .bit file (with its .hwh beside it).",
    )
    power: PowerConfig | None = Field(
        default=None,
        title="Power model",
        description="Board idle and active power; None: the board's figures (static, static + dynamic).",
    )
    ops: frozenset[str] = Field(
        default=SUPPORTED_OPS,
        title="Ops",
        description="Builtin ops the overlay has kernels for (a subset of the int8 reference's).",
    )

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - SUPPORTED_OPS
        if unknown:
            raise ValueError(f"no int8 kernel for {sorted(unknown)}; known: {sorted(SUPPORTED_OPS)}")
        return value


# --------------------------------------------------------------------------- simulated overlay


class SimulatedBuffer(np.ndarray):
    """A ``pynq.allocate`` buffer: a numpy array with a device address, in simulated DDR."""

    device_address: int
    _memory: SimulatedMemory | None

    @property
    def physical_address(self) -> int:
        return self.device_address

    def flush(self) -> None:
        """Caches are coherent in the simulation; the call is kept for the PYNQ call order."""

    def invalidate(self) -> None:
        """See ``flush``."""

    def freebuffer(self) -> None:
        memory, self._memory = getattr(self, "_memory", None), None
        if memory is not None:
            memory.free(self)

    close = freebuffer


class SimulatedMemory:
    """The board DDR that ``allocate`` carves buffers from, with a capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._buffers: dict[int, SimulatedBuffer] = {}
        self._next_address = 0x1000_0000  # a bump allocator: addresses are never reused
        self.used_bytes = 0

    def allocate(self, shape: Any, dtype: Any = np.uint8) -> SimulatedBuffer:
        array = np.zeros(shape, dtype=dtype)
        with self._lock:
            if self.used_bytes + array.nbytes > self.capacity_bytes:
                raise MemoryError(
                    f"cannot allocate {array.nbytes} bytes: {self.used_bytes} of {self.capacity_bytes} in use"
                )
            buffer = array.view(SimulatedBuffer)
            buffer.device_address = self._next_address
            self._next_address += -(-max(array.nbytes, 1) // 4096) * 4096  # page aligned
            buffer._memory = self
            self._buffers[buffer.device_address] = buffer
            self.used_bytes += array.nbytes
        return buffer

    def free(self, buffer: SimulatedBuffer) -> None:
        with self._lock:
            if self._buffers.pop(buffer.device_address, None) is not None:
                self.used_bytes -= buffer.nbytes

    def read(self, address: int, length: int) -> bytes:
        with self._lock:
            buffer = self._buffers.get(address)
        if buffer is None or buffer.nbytes < length:
            raise KeyError(address)
        return bytes(buffer.view(np.uint8).reshape(-1)[:length])


class _SimulatedChannel:
    """One direction of the simulated AXI DMA."""

    def __init__(self, on_transfer: Callable[[], None]) -> None:
        self.buffer: SimulatedBuffer | None = None
        self._on_transfer = on_transfer

    def transfer(self, buffer: SimulatedBuffer, start: int = 0, nbytes: int = 0) -> None:
        self.buffer = buffer
        self._on_transfer()

    def wait(self) -> None:
        """Transfers complete within ``transfer`` in the simulation."""

    @property
    def idle(self) -> bool:
        return True


class _SimulatedDma:
    def __init__(self, on_transfer: Callable[[], None]) -> None:
        self.sendchannel = _SimulatedChannel(on_transfer)
        self.recvchannel = _SimulatedChannel(on_transfer)


class _SimulatedEngine:
    """The int8 engine's register file and behaviour: programs by slot, runs on the DMA streams."""

    def __init__(self, memory: SimulatedMemory, timing: TimingModel, ops: frozenset[str]) -> None:
        self._memory = memory
        self._timing = timing
        self._ops = ops
        self._registers: dict[int, int] = {CTRL: AP_IDLE}
        self._programs: dict[int, tuple[Int8Program, TimingEstimate]] = {}
        self._pending_run: int | None = None
        self.dma: _SimulatedDma | None = None

    def read(self, offset: int) -> int:
        return self._registers.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        self._registers[offset] = int(value) & 0xFFFFFFFF
        if offset == CTRL and value & AP_START:
            self._registers[CTRL] = 0  # busy
            self._start()

    def _finish(self, status: int, cycles: int = 0) -> None:
        self._registers[STATUS] = status
        self._registers[CYCLES_LO] = cycles & 0xFFFFFFFF
        self._registers[CYCLES_HI] = cycles >> 32
        self._registers[CTRL] = AP_DONE | AP_IDLE

    def _start(self) -> None:
        command, slot = self._registers.get(COMMAND, 0), self._registers.get(SLOT, 0)
        if command == CMD_LOAD:
            address = self._registers.get(PROGRAM_LO, 0) | self._registers.get(PROGRAM_HI, 0) << 32
            try:
                program = Int8Program.compile(
                    self._memory.read(address, self._registers.get(PROGRAM_LEN, 0)), ops=self._ops
                )
            except (KeyError, AcceleratorError) as err:
                log.debug("simulated engine refused the program in slot %d: %s", slot, err)
                self._finish(STATUS_BAD_PROGRAM)
                return
            io_bytes = sum(int(np.prod(s.shape)) for s in (*program.inputs, *program.outputs))
            self._programs[slot] = (program, self._timing.estimate(program.layers, io_bytes))
            self._finish(
                STATUS_OK, math.ceil(self._timing.load_time_s(program.weight_bytes) * self._timing.clock_hz)
            )
        elif command == CMD_UNLOAD:
            self._finish(STATUS_OK if self._programs.pop(slot, None) else STATUS_NO_SLOT)
        elif command == CMD_RUN:
            if slot not in self._programs:
                self._finish(STATUS_NO_SLOT)
                return
            self._pending_run = slot
            self.stream()
        else:
            self._finish(STATUS_BAD_PROGRAM)

    def stream(self) -> None:
        """Run the pending RUN once both DMA channels have a buffer."""
        dma = self.dma
        if self._pending_run is None or dma is None:
            return
        source, sink = dma.sendchannel.buffer, dma.recvchannel.buffer
        if source is None or sink is None:
            return
        slot, self._pending_run = self._pending_run, None
        dma.sendchannel.buffer = dma.recvchannel.buffer = None
        program, estimate = self._programs[slot]
        stream = source.view(np.ndarray).view(np.int8).reshape(-1)
        arrays, offset = [], 0
        for spec in program.inputs:
            size = int(np.prod(spec.shape))
            arrays.append(stream[offset : offset + size].reshape(spec.shape))
            offset += size
        results = np.concatenate([out.reshape(-1) for out in program.run(arrays)])
        sink.view(np.ndarray).view(np.int8).reshape(-1)[: results.size] = results
        self._finish(STATUS_OK, estimate.cycles)


class SimulatedOverlay:
    """A PYNQ ``Overlay`` of the int8 engine, simulated: ``int8_engine_0`` and ``axi_dma_0``.

    ``descriptor`` is the canonical description of the simulated design; its sha256 stands in
    for the bitstream's in measurements.
    """

    def __init__(self, timing: TimingModel, ops: frozenset[str]) -> None:
        self.memory = SimulatedMemory(timing.memory_bytes)
        engine = _SimulatedEngine(self.memory, timing, ops)
        self.axi_dma_0 = _SimulatedDma(engine.stream)
        engine.dma = self.axi_dma_0
        self.int8_engine_0 = engine
        self.descriptor = json.dumps(
            {
                "design": "edgeward-int8-engine",
                "version": 1,
                "simulated": True,
                "timing": asdict(timing),
                "ops": sorted(ops),
            },
            sort_keys=True,
        ).encode()

    def allocate(self, shape: Any, dtype: Any = np.uint8) -> SimulatedBuffer:
        return self.memory.allocate(shape, dtype)

    def free(self) -> None:
        """Nothing to release: the simulated fabric is garbage collected with the overlay."""


# ------------------------------------------------------------------------------------- driver


class _EngineDriver:
    """The int8 engine behind PYNQ calls; the same code drives the board and the simulator."""

    def __init__(self, overlay: Any, allocate: Callable[..., Any]) -> None:
        self._engine = getattr(overlay, ENGINE_IP)
        self._dma = getattr(overlay, DMA_IP)
        self._allocate = allocate
        self._lock = threading.Lock()  # one command at a time: the engine is a single device

    @staticmethod
    def address(buffer: Any) -> int:
        # PYNQ 3 renamed physical_address to device_address.
        return int(getattr(buffer, "device_address", None) or buffer.physical_address)

    def allocate(self, nbytes: int) -> Any:
        return self._allocate(shape=(max(nbytes, 1),), dtype=np.uint8)

    def _command(self, command: int, slot: int) -> tuple[int, int]:
        """Start ``command`` on ``slot``; with the lock held. Returns (status, cycles)."""
        self._engine.write(COMMAND, command)
        self._engine.write(SLOT, slot)
        self._engine.write(CTRL, AP_START)
        return self._status()

    def _status(self) -> tuple[int, int]:
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while not self._engine.read(CTRL) & AP_DONE:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the int8 engine did not finish within {COMMAND_TIMEOUT_S} s")
            time.sleep(0)  # hardware: yield while the engine works
        cycles = self._engine.read(CYCLES_LO) | self._engine.read(CYCLES_HI) << 32
        return self._engine.read(STATUS), cycles

    def load(self, slot: int, program: Any, length: int) -> int:
        """Hand the program buffer to the engine; returns the engine status."""
        program.flush()
        address = self.address(program)
        with self._lock:
            self._engine.write(PROGRAM_LO, address & 0xFFFFFFFF)
            self._engine.write(PROGRAM_HI, address >> 32)
            self._engine.write(PROGRAM_LEN, length)
            status, _ = self._command(CMD_LOAD, slot)
        return status

    def unload(self, slot: int) -> None:
        with self._lock:
            self._command(CMD_UNLOAD, slot)

    def run(self, slot: int, source: Any, sink: Any) -> tuple[int, int]:
        """One inference: start RUN, stream ``source`` in and ``sink`` out. Returns (status, cycles)."""
        source.flush()
        with self._lock:
            self._engine.write(COMMAND, CMD_RUN)
            self._engine.write(SLOT, slot)
            self._engine.write(CTRL, AP_START)
            self._dma.recvchannel.transfer(sink)
            self._dma.sendchannel.transfer(source)
            self._dma.sendchannel.wait()
            self._dma.recvchannel.wait()
            status, cycles = self._status()
        sink.invalidate()
        return status, cycles


# ------------------------------------------------------------------------------------ backend


@dataclass(slots=True)
class _Loaded:
    """One loaded model: its slot, host-side program, device buffers and lock."""

    handle: ModelHandle
    binder: InputBinder
    slot: int
    program: Int8Program
    program_buffer: Any
    source: Any
    sink: Any
    estimate: TimingEstimate
    lock: threading.Lock
    loaded: bool = True


def _pynq() -> Any:
    return importlib.import_module("pynq")


class FpgaPynqBackend(Backend):
    """Full-int8 models on the int8 engine overlay: on a PYNQ board, or simulated (and labelled so)."""

    kind = KIND
    config_model = FpgaPynqConfig

    def __init__(self, config: FpgaPynqConfig | None = None) -> None:
        self.config = config or FpgaPynqConfig()
        self.timing = BOARDS[self.config.board]
        self.simulated = self._choose_simulation(self.config)
        if self.simulated:
            overlay = SimulatedOverlay(self.timing, self.config.ops)
            self._bitstream_sha256 = hashlib.sha256(overlay.descriptor).hexdigest()
            self._driver = _EngineDriver(overlay, overlay.allocate)
            self._overlay: Any = overlay
            device = f"{self.timing.board} int8 engine (simulated, design {self._bitstream_sha256[:12]})"
        else:
            self._overlay, device = self._download()
            self._driver = _EngineDriver(self._overlay, _pynq().allocate)
        power = (
            self.timing.power
            if self.config.power is None
            else PowerModel(self.config.power.idle_w, self.config.power.active_w)
        )
        self._capabilities = Capabilities(
            kind=KIND,
            device=device,
            simulated=self.simulated,
            dtypes=frozenset({"INT8"}),
            ops=self.config.ops,
            memory_bytes=self.timing.memory_bytes,
            peak_gops=self.timing.peak_gops,
            power=power,
            cost=self.timing.cost,
        )
        self._loaded: dict[int, _Loaded] = {}
        self._slots = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def probe(cls) -> str | None:
        # The host compiles every model with the LiteRT interpreter, on both paths.
        return runtime_problem()

    @staticmethod
    def _choose_simulation(config: FpgaPynqConfig) -> bool:
        if config.mode == "simulated":
            return True
        try:
            _pynq()
        except ImportError as err:
            if config.mode == "hardware":
                raise BackendUnavailable(KIND, f"the pynq package is not importable: {err}") from err
            if config.bitstream is not None:
                log.warning("pynq is not importable; using the simulated overlay, not %s", config.bitstream)
            return True
        if config.bitstream is None:
            if config.mode == "hardware":
                raise BackendUnavailable(KIND, "hardware mode needs a bitstream")
            return True
        return False

    def _download(self) -> tuple[Any, str]:
        """Program the fabric with the configured bitstream (hardware path; untested here)."""
        bitstream = self.config.bitstream
        assert bitstream is not None
        try:
            data = bitstream.read_bytes()
            overlay = _pynq().Overlay(str(bitstream))
        except Exception as err:  # pynq raises assorted types for a missing board or a bad file
            raise BackendUnavailable(KIND, f"cannot load overlay {bitstream.name}: {err}") from err
        self._bitstream_sha256 = hashlib.sha256(data).hexdigest()
        for ip in (ENGINE_IP, DMA_IP):
            if not hasattr(overlay, ip):
                raise BackendUnavailable(KIND, f"overlay {bitstream.name} has no {ip}")
        return overlay, f"{self.timing.board} int8 engine ({bitstream.name})"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def measurements(self) -> dict[str, str]:
        """Attestation measurements: component id -> sha256 (hex) of what configures the fabric."""
        return {MEASUREMENT_COMPONENT: self._bitstream_sha256}

    def load(self, model: ModelArtifact) -> ModelHandle:
        if self._closed:
            raise BackendUnavailable(KIND, "backend is closed")
        data = model.read()
        refusal_prefix = f"{KIND}: "
        try:
            program = Int8Program.compile(data, ops=self.config.ops)
        except ModelRefused as err:
            raise ModelRefused(
                refusal_prefix + err.reason,
                offending_ops=err.offending_ops,
                offending_dtypes=err.offending_dtypes,
            ) from err
        io_in = sum(int(np.prod(s.shape)) for s in program.inputs)
        io_out = sum(int(np.prod(s.shape)) for s in program.outputs)
        slot = next(self._slots)
        buffers: list[Any] = []
        try:
            try:
                program_buffer = self._driver.allocate(len(data))
                buffers.append(program_buffer)
                source = self._driver.allocate(io_in)
                buffers.append(source)
                sink = self._driver.allocate(io_out)
                buffers.append(sink)
            except MemoryError as err:
                raise ModelRefused(f"{refusal_prefix}not enough device memory: {err}") from err
            program_buffer[: len(data)] = np.frombuffer(data, dtype=np.uint8)
            try:
                status = self._driver.load(slot, program_buffer, len(data))
            except TimeoutError as err:
                raise BackendUnavailable(KIND, str(err)) from err
            if status != STATUS_OK:
                raise ModelRefused(f"{refusal_prefix}the engine refused the program (status {status})")
        except BaseException:
            for buffer in buffers:
                buffer.freebuffer()
            raise
        estimate = self.timing.estimate(program.layers, io_in + io_out)
        handle = ModelHandle(model.name, model.version, model.sha256, KIND, program.inputs, program.outputs)
        with self._lock:
            self._loaded[handle.id] = _Loaded(
                handle,
                InputBinder.of(program.inputs),
                slot,
                program,
                program_buffer,
                source,
                sink,
                estimate,
                threading.Lock(),
            )
        log.info(
            "loaded %s:%s into slot %d of %s (%d MACs, %.3f ms modelled)",
            model.name,
            model.version,
            slot,
            self._capabilities.device,
            program.macs,
            estimate.latency_s * 1e3,
        )
        return handle

    def infer(self, handle: ModelHandle, inputs: Inputs) -> InferResult:
        loaded = self._loaded.get(handle.id)
        if loaded is None:
            raise ModelNotLoaded(handle.name, handle.version)
        arrays = loaded.binder.bind(inputs)
        with loaded.lock:
            if not loaded.loaded:
                raise ModelNotLoaded(handle.name, handle.version)
            stream = loaded.source.view(np.int8).reshape(-1)
            offset = 0
            for array in arrays:
                stream[offset : offset + array.size] = array.reshape(-1)
                offset += array.size
            start = time.perf_counter()
            try:
                status, cycles = self._driver.run(loaded.slot, loaded.source, loaded.sink)
            except TimeoutError as err:
                raise InferenceFailed(handle.name, str(err)) from err
            wall_s = time.perf_counter() - start
            if status != STATUS_OK:
                raise InferenceFailed(handle.name, f"engine status {status}")
            results = loaded.sink.view(np.int8).reshape(-1)
            outputs, offset = {}, 0
            for spec in handle.outputs:
                size = int(np.prod(spec.shape))
                outputs[spec.name] = np.array(results[offset : offset + size]).reshape(spec.shape)
                offset += size
        if self.simulated:
            # The board's modelled time, not the host's time to simulate it.
            latency_s, busy_s = loaded.estimate.latency_s, loaded.estimate.busy_s
        else:
            latency_s, busy_s = wall_s, min(wall_s, cycles / self.timing.clock_hz)
        return modelled_result(self._capabilities.power, outputs, latency_s, busy_s)

    def unload(self, handle: ModelHandle) -> None:
        with self._lock:
            loaded = self._loaded.pop(handle.id, None)
        if loaded is None:
            return
        with loaded.lock:  # wait for an inference in flight
            loaded.loaded = False
            try:
                self._driver.unload(loaded.slot)
            except TimeoutError as err:  # the buffers are freed regardless; the slot is abandoned
                log.warning("unloading slot %d of %s: %s", loaded.slot, self._capabilities.device, err)
            for buffer in (loaded.program_buffer, loaded.source, loaded.sink):
                buffer.freebuffer()
        log.info("unloaded %s:%s from slot %d", handle.name, handle.version, loaded.slot)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for loaded in list(self._loaded.values()):
            self.unload(loaded.handle)
        free = getattr(self._overlay, "free", None)
        if free is not None:
            free()

    @property
    def device_memory_used(self) -> int:
        """Bytes of simulated DDR in use (0 on hardware, where PYNQ's CMA keeps the books)."""
        overlay = self._overlay
        return overlay.memory.used_bytes if isinstance(overlay, SimulatedOverlay) else 0

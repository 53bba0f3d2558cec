"""What the backends share around one inference: binding inputs, running a LiteRT interpreter,
timing it, and turning time into energy.

- ``InputBinder``: a model's inputs resolved once at load (names, dtypes, shapes, quantization);
  it checks what a caller passes and names the tensor and the problem when it does not fit. Every
  backend takes inputs the same way: numpy arrays by name or in model order, of the input's dtype
  and shape, and for a quantized integer input also floating data, quantized as TFLite's QUANTIZE
  op does it, in float32: q = round_half_away(x / scale) + zero_point, clamped to the integer
  type's range.
- ``InterpreterSession``: one loaded model on a LiteRT interpreter (cpu-litert, asic-edgetpu),
  with the lock that serialises it and its tensor indices resolved at load. ``infer`` sets the
  inputs, invokes, reads the outputs, and measures the wall time of all that (and the energy,
  with a counter) or models the energy from it.
- ``modelled_result``: an inference's result with energy modelled from a power model, its latency
  and its busy time, for the simulated accelerators.

Per-call cost matters: the use cases' models invoke in 10-60 us, so the hot path does no lookups
and validates in two tiers. An input that is an ``ndarray`` of the input's exact dtype goes
straight to ``set_tensor``, whose native checks refuse a wrong shape or size; only then, or for
any other value, the full check runs and names the tensor and the problem.

CPU time: on the VMs and boards edgeward targets, reading a thread's CPU clock is a system call
(about 1 us, where the wall clock costs 0.1 us), so ``infer`` reads it around the first
inference and one in ``CPU_SAMPLE_EVERY`` after, and keeps the model's CPU share (CPU time over
wall time) as a moving average. Every inference's busy time is its own measured wall time times
that share, so modelled energy stays proportional to measured time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from accelerators.base import (
    InferenceFailed,
    InferResult,
    Inputs,
    InvalidInput,
    ModelHandle,
    ModelNotLoaded,
    PowerModel,
    TensorSpec,
)
from accelerators.tflite_model import allocate

__all__ = ["CPU_SAMPLE_EVERY", "InputBinder", "InputSlot", "InterpreterSession", "modelled_result"]

#: One inference in this many has its CPU time measured (the first one always).
CPU_SAMPLE_EVERY = 16
#: Weight of a new CPU-share sample in the moving average.
CPU_SHARE_WEIGHT = 0.25

_ndarray = np.ndarray
_perf_counter_ns = time.perf_counter_ns
_thread_time_ns = time.thread_time_ns
_new_tuple = tuple.__new__


def modelled_result(
    power: PowerModel, outputs: dict[str, np.ndarray], latency_s: float, busy_s: float
) -> InferResult:
    """An inference's result with energy modelled from ``power``: idle over the latency, active while busy."""
    # tuple.__new__, as namedtuple's own _make does: the generated __new__ is a Python-level call
    # through type() that costs as much as the rest of this function.
    return _new_tuple(InferResult, (outputs, latency_s, power.energy_j(latency_s, busy_s), "modelled"))


class InputSlot:
    """One model input resolved at load time, so that binding does no lookups."""

    __slots__ = ("dtype", "index", "name", "position", "quant", "shape", "spec")

    def __init__(self, spec: TensorSpec, position: int, index: int, shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.name = spec.name
        self.position = position  # in the model's inputs
        self.index = index  # the interpreter's tensor index
        self.dtype = spec.numpy_dtype
        self.shape = shape  # the shape currently allocated (variable dimensions resolved)
        # (scale as float32, zero point, min, max) for quantized integer inputs
        self.quant: tuple[np.float32, int, int, int] | None = None
        if spec.quantization is not None and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self.quant = (
                np.float32(spec.quantization.scale),
                spec.quantization.zero_point,
                int(info.min),
                int(info.max),
            )

    def check(self, value: object) -> np.ndarray:
        """``value`` as this input takes it (quantized if it must be); ``InvalidInput`` otherwise."""
        if not isinstance(value, np.ndarray):
            raise InvalidInput(self.name, f"expected a numpy array, got {type(value).__name__}")
        if value.dtype != self.dtype:
            if self.quant is None or value.dtype.kind != "f":
                raise InvalidInput(
                    self.name, f"dtype {value.dtype}, expected {self.spec.dtype} ({self.dtype})"
                )
            value = self._quantize(value)
        if value.shape != self.shape:
            signature = self.spec.shape
            if len(value.shape) != len(signature) or any(
                s >= 0 and s != v for s, v in zip(signature, value.shape, strict=True)
            ):
                raise InvalidInput(self.name, f"shape {list(value.shape)}, expected {list(signature)}")
        return value

    def _quantize(self, value: np.ndarray) -> np.ndarray:
        assert self.quant is not None
        scale, zero_point, low, high = self.quant
        scaled = value.astype(np.float32, copy=False) / scale
        rounded = np.trunc(scaled + np.copysign(np.float32(0.5), scaled))
        if np.isnan(rounded).any():
            raise InvalidInput(self.name, "NaN values cannot be quantized")
        return np.clip(rounded + zero_point, low, high).astype(self.dtype)


class InputBinder:
    """A model's inputs in model order; takes them by name or by position and checks them."""

    __slots__ = ("by_name", "count", "names", "slots")

    def __init__(self, slots: Sequence[InputSlot]) -> None:
        self.slots = tuple(slots)
        self.names = tuple(slot.name for slot in self.slots)
        self.count = len(self.names)
        self.by_name = {name: pos for pos, name in enumerate(self.names)}

    @classmethod
    def of(cls, specs: Sequence[TensorSpec]) -> InputBinder:
        """A binder for a model with static shapes whose inputs are not interpreter tensors."""
        return cls([InputSlot(spec, pos, pos, spec.shape) for pos, spec in enumerate(specs)])

    def values(self, inputs: Inputs) -> Sequence[object]:
        """The caller's values in model order, not yet checked; ``InvalidInput`` for a missing,
        unexpected or surplus input."""
        if isinstance(inputs, Mapping):
            return self._by_name(inputs)
        if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
            return self._by_position(inputs)
        raise InvalidInput(
            "<inputs>", f"expected arrays by name or in model order, got {type(inputs).__name__}"
        )

    def _by_name(self, inputs: Mapping[str, object]) -> list[object]:
        for name in inputs:
            if name not in self.by_name:
                raise InvalidInput(str(name), f"not an input of the model; inputs are {list(self.names)}")
        for name in self.names:
            if name not in inputs:
                raise InvalidInput(name, "missing")
        return [inputs[name] for name in self.names]

    def _by_position(self, inputs: Sequence[object]) -> Sequence[object]:
        count, expected = len(inputs), len(self.names)
        if count != expected:
            missing = self.names[count] if count < expected else f"#{expected}"
            raise InvalidInput(missing, f"got {count} inputs, the model takes {expected}")
        return inputs

    def bind(self, inputs: Inputs) -> list[np.ndarray]:
        """Every input checked (and float data for quantized inputs quantized), in model order."""
        return [slot.check(value) for slot, value in zip(self.slots, self.values(inputs), strict=True)]


class EnergyCounter(Protocol):
    """A cumulative energy counter in microjoules (``cpu_litert.RaplCounter``)."""

    def read_uj(self) -> int: ...

    def joules(self, start_uj: int, end_uj: int) -> float: ...


class InterpreterSession:
    """One loaded model on its own LiteRT interpreter, and what one inference of it costs.

    ``lock`` serialises the interpreter (it is not thread-safe); ``close`` drops the interpreter
    under it, after an inference in flight. Energy is the ``counter``'s difference across the
    inference where there is a counter (``measured``), else ``power`` applied to the measured wall
    time and the busy time derived from it (``modelled``, see the module docstring).
    """

    __slots__ = (
        "_get_tensor",
        "_invoke",
        "_set_tensor",
        "binder",
        "calls",
        "counter",
        "cpu_share",
        "dynamic",
        "handle",
        "interpreter",
        "lock",
        "outputs",
        "power",
        "watts",
    )

    def __init__(
        self, handle: ModelHandle, interpreter: Any, power: PowerModel, counter: EnergyCounter | None = None
    ) -> None:
        self.handle = handle
        self.interpreter: Any = interpreter
        self.power = power
        self.counter = counter
        self.lock = threading.Lock()
        self.binder = InputBinder(
            [
                InputSlot(spec, pos, int(detail["index"]), tuple(map(int, detail["shape"])))
                for pos, (spec, detail) in enumerate(
                    zip(handle.inputs, interpreter.get_input_details(), strict=True)
                )
            ]
        )
        self.outputs = tuple(
            (spec.name, int(detail["index"]))
            for spec, detail in zip(handle.outputs, interpreter.get_output_details(), strict=True)
        )
        self.dynamic = any(d < 0 for spec in handle.inputs for d in spec.shape)
        # Bound once: the interpreter's public methods, without a lookup per call.
        self._set_tensor: Any = interpreter.set_tensor
        self._invoke: Any = interpreter.invoke
        self._get_tensor: Any = interpreter.get_tensor
        self.calls = 0
        self.cpu_share = 1.0
        self.watts = power.watts(1.0)

    def infer(self, inputs: Inputs) -> InferResult:
        """Set the inputs (checking them), invoke, copy the outputs out by name, and account for
        the wall time and energy of all that. ``ModelNotLoaded`` after ``close``."""
        binder = self.binder
        kind = inputs.__class__
        by_name = kind is dict
        values: Any = inputs  # by name or in model order; each is checked against its slot below
        if not (by_name or kind is list or kind is tuple) or len(inputs) != binder.count:
            values = binder.values(inputs)  # the caller's values in model order, or InvalidInput
            by_name = False
        # acquire/release, not "with": half the cost, and this runs once per inference.
        lock = self.lock
        lock.acquire()
        try:
            set_tensor = self._set_tensor
            if set_tensor is None:
                raise ModelNotLoaded(self.handle.name, self.handle.version)
            if self.dynamic:
                values = self._resize(binder.values(values))
                by_name = False
            counter = self.counter
            if counter is not None:
                start_uj = counter.read_uj()
            calls = self.calls
            self.calls = calls + 1
            sample = not calls % CPU_SAMPLE_EVERY
            if sample:
                start_cpu = _thread_time_ns()
            start = _perf_counter_ns()
            try:
                for slot in binder.slots:
                    value = values[slot.name] if by_name else values[slot.position]
                    if value.__class__ is not _ndarray or value.dtype is not slot.dtype:
                        value = slot.check(value)
                    try:
                        set_tensor(slot.index, value)
                    except ValueError as err:
                        slot.check(value)  # names the tensor and the problem (a wrong shape)
                        raise InferenceFailed(self.handle.name, str(err)) from err
            except KeyError:  # as many names as inputs, but not theirs
                binder.values(inputs)  # raises InvalidInput naming the first wrong one
                raise
            try:
                self._invoke()
            except (ValueError, RuntimeError) as err:
                raise InferenceFailed(self.handle.name, str(err)) from err
            get_tensor = self._get_tensor
            outputs = {}
            for name, index in self.outputs:
                outputs[name] = get_tensor(index)
            wall_ns = _perf_counter_ns() - start
            if sample:
                cpu_ns = _thread_time_ns() - start_cpu
                share = min(1.0, cpu_ns / wall_ns) if wall_ns > 0 else 1.0
                self.cpu_share = (
                    share if calls == 0 else self.cpu_share + CPU_SHARE_WEIGHT * (share - self.cpu_share)
                )
                self.watts = self.power.watts(self.cpu_share)
            if counter is not None:
                joules = counter.joules(start_uj, counter.read_uj())
                return _new_tuple(InferResult, (outputs, wall_ns * 1e-9, joules, "measured"))
        finally:
            lock.release()
        wall_s = wall_ns * 1e-9
        # = power.energy_j(wall_s, wall_s * cpu_share), without two calls per inference
        return _new_tuple(InferResult, (outputs, wall_s, wall_s * self.watts, "modelled"))

    def _resize(self, values: Sequence[object]) -> list[np.ndarray]:
        """Check every input and re-allocate for those whose variable dimensions changed."""
        arrays = [slot.check(value) for slot, value in zip(self.binder.slots, values, strict=True)]
        resized = False
        for slot, array in zip(self.binder.slots, arrays, strict=True):
            if array.shape != slot.shape:
                self.interpreter.resize_tensor_input(slot.index, array.shape)
                slot.shape = array.shape
                resized = True
        if resized:
            allocate(self.interpreter)
        return arrays

    def close(self) -> None:
        """Drop the interpreter once an inference in flight has finished."""
        with self.lock:
            self.interpreter = None
            self._set_tensor = self._invoke = self._get_tensor = None

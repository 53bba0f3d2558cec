"""Full-int8 TFLite models executed in numpy, bit-exact with LiteRT's reference kernels.

This is the arithmetic of the fpga-pynq backend's simulated overlay: ``Int8Program.compile``
reads a model once (tensor shapes, quantization and constant tensors through the LiteRT
interpreter; builtin options from the flatbuffer), refuses what it cannot run with the offending
ops, and precomputes every fixed-point multiplier; ``Int8Program.run`` then evaluates the graph.

"Bit-exact" means equal to the LiteRT interpreter run with ``OpResolverType.BUILTIN_REF``, its
portable reference kernels (``tflite/kernels/internal/reference/``): integer fixed-point
arithmetic, plus one double-precision rescaling in FULLY_CONNECTED, so the results are the same
on every platform. LiteRT's default kernels are not the reference: its optimized x86 kernels
(NEON semantics emulated on SSE in the matrix-vector path, a float32 lookup table in SOFTMAX)
and its XNNPACK delegate (float32 requantization) round differently, by a few LSB.

Per op, as the reference kernels compute it:

- CONV_2D, DEPTHWISE_CONV_2D: int32 sums of (input - input_zp) * weight plus the int32 bias,
  rescaled by ``MultiplyByQuantizedMultiplier`` with the per-channel multiplier and shift of
  ``QuantizeMultiplier(input_scale * weight_scale / output_scale)`` (gemmlowp's double rounding:
  saturating rounding doubling high multiply, then rounding right shift), plus the output zero
  point, clamped to the fused activation's range.
- FULLY_CONNECTED: the same sums, rescaled in double precision:
  ``round(acc * (input_scale * weight_scale / output_scale))``, halves away from zero.
- ADD: the ``left_shift = 20`` rescaling of ``add.cc`` with three quantized multipliers.
- MAX_POOL_2D: the window maximum; AVERAGE_POOL_2D: the sum over the window's in-image elements
  divided by their count, rounded half away from zero.
- MEAN: integer sum, rescaled with 1/N folded into the quantized multiplier
  (``reference_ops::QuantizedMeanOrSum``).
- SOFTMAX: gemmlowp fixed point: input differences in Q5.26, ``exp_on_negative_values``, the sum
  in Q12.19, its reciprocal by Newton-Raphson (``one_over_one_plus_x_for_x_in_0_1``).
- RESHAPE; QUANTIZE from int8 to int8 (a requantization with one multiplier).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from accelerators.base import InvalidInput, InvalidModel, ModelRefused, TensorSpec
from accelerators.tflite_model import (
    LayerCost,
    allocate,
    check_container,
    describe,
    layer_costs,
    open_interpreter,
)

__all__ = [
    "SUPPORTED_OPS",
    "Int8Program",
    "LayerCost",
    "layer_costs",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
]

#: Builtin ops this module computes.
SUPPORTED_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "FULLY_CONNECTED",
        "MAX_POOL_2D",
        "MEAN",
        "QUANTIZE",
        "RESHAPE",
        "SOFTMAX",
    }
)

_INT8_MIN, _INT8_MAX = -128, 127
_INT32_MIN = -(2**31)

# tflite schema enums (schema.fbs): Padding and ActivationFunctionType.
_PADDING_SAME, _PADDING_VALID = 0, 1
_ACT_NONE, _ACT_RELU, _ACT_RELU_N1_TO_1, _ACT_RELU6 = 0, 1, 2, 3
_ACTIVATION_NAMES = {4: "TANH", 5: "SIGN_BIT"}


# ------------------------------------------------------------------------- fixed-point arithmetic


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``real ~= multiplier * 2**(shift - 31)``, multiplier in Q31."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = int(_round_half_away_array(np.float64(fraction * (1 << 31))))
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(fixed), shift


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: Any, shift: Any) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier`` (double rounding) on int64 arrays.

    ``x`` holds int32 values; ``multiplier`` and ``shift`` broadcast against it (per channel on
    the last axis, or scalars).
    """
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    # x * (1 << left) is an int32 multiplication in C; it wraps.
    shifted = _wrap_int32(x.astype(np.int64) << left)
    high = _saturating_rounding_doubling_high_mul(shifted, multiplier)
    return _rounding_divide_by_pot(high, right)


def _wrap_int32(x: np.ndarray) -> np.ndarray:
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def _saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    product = a * b  # |a|, |b| < 2**31: fits int64
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    # C integer division by 2**31 truncates toward zero.
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
    return np.where((a == _INT32_MIN) & (b == _INT32_MIN), 2**31 - 1, high)


def _rounding_divide_by_pot(x: np.ndarray, exponent: Any) -> np.ndarray:
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def _round_half_away_array(x: Any) -> np.ndarray:
    """C's ``round`` on float64 values, exactly (no ``x + 0.5`` rounding error), as int64."""
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.abs(x)
    floor = np.floor(magnitude)
    rounded = floor + (magnitude - floor >= 0.5)  # the difference is exact below 2**52
    return (np.sign(x) * rounded).astype(np.int64)


def _count_leading_zeros_u32(x: np.ndarray) -> np.ndarray:
    """Leading zero bits of uint32 values held in int64 (32 for zero)."""
    _, bit_length = np.frexp(x.astype(np.float64))  # exact: x < 2**32
    return 32 - bit_length.astype(np.int64)


# gemmlowp fixed point (fixedpoint/fixedpoint.h) on int64 arrays holding int32 raw values.


def _fx_mul(a: Any, b: Any) -> np.ndarray:
    """FixedPoint multiplication: the raw values' saturating rounding doubling high multiply."""
    return _saturating_rounding_doubling_high_mul(
        np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    )


def _fx_saturating_shift_left(x: np.ndarray, exponent: int) -> np.ndarray:
    """``SaturatingRoundingMultiplyByPOT`` with a positive exponent."""
    threshold = (1 << (31 - exponent)) - 1
    shifted = _wrap_int32(x << exponent)
    return np.where(x > threshold, 2**31 - 1, np.where(x < -threshold, _INT32_MIN, shifted))


def _fx_exp_on_interval_between_negative_one_quarter_and_0_excl(a: np.ndarray) -> np.ndarray:
    """exp(a) for a in [-1/4, 0), Q0.31 in and out (a Taylor expansion around -1/8)."""
    constant_term = 1895147668  # exp(-1/8)
    constant_1_over_3 = 715827883
    x = a + (1 << 28)  # a + 1/8
    x2 = _fx_mul(x, x)
    x3 = _fx_mul(x2, x)
    x4 = _fx_mul(x2, x2)
    x4_over_4 = _rounding_divide_by_pot(x4, np.int64(2))
    polynomial = _rounding_divide_by_pot(_fx_mul(x4_over_4 + x3, constant_1_over_3) + x2, np.int64(1))
    return constant_term + _fx_mul(constant_term, x + polynomial)


def _fx_exp_on_negative_values_q5_26(a: np.ndarray) -> np.ndarray:
    """exp(a) for a <= 0 in Q5.26, result in Q0.31 (``exp_on_negative_values<int32, 5>``)."""
    fractional_bits = 26
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _fx_exp_on_interval_between_negative_one_quarter_and_0_excl(
        _fx_saturating_shift_left(a_mod_quarter_minus_one_quarter, 5)  # Rescale<0> from Q5.26
    )
    remainder = a_mod_quarter_minus_one_quarter - a
    # exp(-2**k) multipliers in Q0.31 for the barrel shifter, k = -2 .. 4 (kIntegerBits = 5).
    for exponent, multiplier in (
        (-2, 1672461947),
        (-1, 1302514674),
        (0, 790015084),
        (1, 290630308),
        (2, 39332535),
        (3, 720401),
        (4, 242),
    ):
        bit = (remainder >> (fractional_bits + exponent)) & 1
        result = np.where(bit != 0, _fx_mul(result, multiplier), result)
    return np.where(a == 0, 2**31 - 1, result)


def _fx_one_over_one_plus_x_for_x_in_0_1(a: np.ndarray) -> np.ndarray:
    """1 / (1 + a) for a in [0, 1), Q0.31 in and out, by three Newton-Raphson steps."""
    total = a + (2**31 - 1)
    half_denominator = np.where(total >= 0, (total + 1) // 2, -((-(total - 1)) // 2))  # RoundingHalfSum
    constant_48_over_17 = 1515870810  # Q2.29
    constant_neg_32_over_17 = -1010580540  # Q2.29
    x = constant_48_over_17 + _fx_mul(half_denominator, constant_neg_32_over_17)
    one_q2_29 = 1 << 29
    for _ in range(3):
        half_denominator_times_x = _fx_mul(half_denominator, x)
        one_minus = one_q2_29 - half_denominator_times_x
        x = x + _fx_saturating_shift_left(_fx_mul(x, one_minus), 2)  # Q4.27 -> Q2.29
    return _fx_saturating_shift_left(x, 1)  # ExactMulByPot<-1> then Rescale<0>: Q1.30 -> Q0.31


# -------------------------------------------------------------------------- flatbuffer options


class _Table:
    """Just enough of a flatbuffers table reader to get at operators' builtin options.

    The interpreter has verified the buffer before anything reads it here; out-of-range offsets
    still surface as ``struct.error``/``IndexError`` and become ``InvalidModel``.
    """

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def _field(self, slot: int) -> int:
        if not self.buf:  # an absent table: every field has its default
            return 0
        vtable = self.pos - struct.unpack_from("<i", self.buf, self.pos)[0]
        vtable_size = struct.unpack_from("<H", self.buf, vtable)[0]
        entry = 4 + 2 * slot
        if entry >= vtable_size:
            return 0
        offset = struct.unpack_from("<H", self.buf, vtable + entry)[0]
        return self.pos + offset if offset else 0

    def scalar(self, slot: int, fmt: str, default: Any) -> Any:
        at = self._field(slot)
        return struct.unpack_from("<" + fmt, self.buf, at)[0] if at else default

    def table(self, slot: int) -> _Table | None:
        at = self._field(slot)
        return _Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0]) if at else None

    def _vector(self, slot: int) -> tuple[int, int]:
        at = self._field(slot)
        if not at:
            return 0, 0
        start = at + struct.unpack_from("<I", self.buf, at)[0]
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def tables(self, slot: int) -> list[_Table]:
        start, length = self._vector(slot)
        return [
            _Table(self.buf, start + 4 * i + struct.unpack_from("<I", self.buf, start + 4 * i)[0])
            for i in range(length)
        ]

    def ints(self, slot: int) -> tuple[int, ...]:
        start, length = self._vector(slot)
        return struct.unpack_from(f"<{length}i", self.buf, start) if length else ()


@dataclass(frozen=True, slots=True)
class _Operator:
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: _Table | None


def _read_operators(data: bytes) -> list[_Operator]:
    """Inputs, outputs and builtin options of the primary subgraph's operators, in order."""
    # Slots from tflite's schema.fbs: Model.subgraphs = 2; SubGraph.operators = 3;
    # Operator.inputs = 1, outputs = 2, builtin_options = 4.
    model = _Table(data, struct.unpack_from("<I", data, 0)[0])
    subgraphs = model.tables(2)
    if not subgraphs:
        raise InvalidModel("malformed", "model has no subgraph")
    return [_Operator(op.ints(1), op.ints(2), op.table(4)) for op in subgraphs[0].tables(3)]


# ---------------------------------------------------------------------------------- the program


@dataclass(frozen=True, slots=True)
class _Tensor:
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int

    @property
    def scale(self) -> float:
        return float(self.scales[0]) if self.scales.size else 0.0

    @property
    def zero_point(self) -> int:
        return int(self.zero_points[0]) if self.zero_points.size else 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


Kernel = Callable[[dict[int, np.ndarray]], None]


class _Unsupported(Exception):
    """An op this module cannot run in the form the model uses (a detail of a refusal)."""

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(f"{op}: {detail}")
        self.op = op


class Int8Program:
    """A full-int8 model compiled for numpy execution; immutable and safe to share between threads."""

    def __init__(
        self,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        ops: tuple[str, ...],
        input_indices: tuple[int, ...],
        output_indices: tuple[int, ...],
        constants: dict[int, np.ndarray],
        kernels: tuple[Kernel, ...],
        layers: tuple[LayerCost, ...],
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.ops = ops
        self.layers = layers
        self._input_indices = input_indices
        self._output_indices = output_indices
        self._constants = constants
        self._kernels = kernels

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @classmethod
    def compile(cls, data: bytes, *, ops: Iterable[str] = SUPPORTED_OPS) -> Int8Program:
        """Read and check a model; ``InvalidModel`` for bad bytes, ``ModelRefused`` for what cannot run.

        ``ops`` narrows the ops accepted (an overlay built without some kernels).
        """
        allowed = frozenset(ops) & SUPPORTED_OPS
        check_container(data)
        interpreter = open_interpreter(data, default_delegates=False)
        inputs, outputs, op_names, dtypes = describe(interpreter)
        bad_dtypes = dtypes - {"INT8"}
        bad_ops = set(op_names) - allowed
        if bad_dtypes or bad_ops:
            parts = []
            if bad_dtypes:
                parts.append("datatypes " + ", ".join(sorted(bad_dtypes)) + " (the kernels are int8 only)")
            if bad_ops:
                parts.append("ops " + ", ".join(sorted(bad_ops)))
            raise ModelRefused(
                "int8 kernels cannot run " + "; ".join(parts),
                offending_ops=bad_ops,
                offending_dtypes=bad_dtypes,
            )
        if any(d < 0 for spec in (*inputs, *outputs) for d in spec.shape):
            raise ModelRefused("int8 kernels need static shapes; the model has variable dimensions")
        allocate(interpreter)
        try:
            operators = _read_operators(data)
        except (struct.error, IndexError) as err:
            raise InvalidModel("malformed", f"cannot read operators: {err}") from err
        nodes = interpreter._get_ops_details()
        if len(nodes) != len(operators):
            raise InvalidModel("malformed", "operator count differs between flatbuffer and interpreter")
        tensors = {
            detail["index"]: _Tensor(
                index=detail["index"],
                shape=tuple(int(d) for d in detail["shape"]),
                dtype=np.dtype(detail["dtype"]),
                scales=np.asarray(detail["quantization_parameters"]["scales"], dtype=np.float32),
                zero_points=np.asarray(detail["quantization_parameters"]["zero_points"], dtype=np.int64),
                quantized_dimension=int(detail["quantization_parameters"]["quantized_dimension"]),
            )
            for detail in interpreter.get_tensor_details()
        }
        produced = {int(i) for node in nodes for i in node["outputs"]}
        graph_inputs = tuple(int(d["index"]) for d in interpreter.get_input_details())
        constants: dict[int, np.ndarray] = {}
        for node in nodes:
            for index in map(int, node["inputs"]):
                if index >= 0 and index not in produced and index not in graph_inputs:
                    constants[index] = interpreter.get_tensor(index)
        builder = _Builder(tensors, constants)
        kernels: list[Kernel] = []
        problems: list[_Unsupported] = []
        for node, operator in zip(nodes, operators, strict=True):
            node_inputs = tuple(int(i) for i in node["inputs"])
            node_outputs = tuple(int(i) for i in node["outputs"])
            if node_inputs != operator.inputs or node_outputs != operator.outputs:
                raise InvalidModel(
                    "malformed", f"operator {node['index']} differs between flatbuffer and interpreter"
                )
            try:
                kernel = builder.build(node["op_name"], node_inputs, node_outputs, operator.options)
            except _Unsupported as err:
                problems.append(err)
                continue
            except (struct.error, IndexError) as err:
                raise InvalidModel(
                    "malformed", f"cannot read options of operator {node['index']}: {err}"
                ) from err
            kernels.append(kernel)
        if problems:
            raise ModelRefused(
                "int8 kernels cannot run " + "; ".join(str(p) for p in problems),
                offending_ops={p.op for p in problems},
            )
        return cls(
            inputs=inputs,
            outputs=outputs,
            ops=op_names,
            input_indices=graph_inputs,
            output_indices=tuple(int(d["index"]) for d in interpreter.get_output_details()),
            constants=constants,
            kernels=tuple(kernels),
            layers=layer_costs(interpreter),
        )

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``arrays`` (int8, in ``inputs`` order, of the inputs' shapes)."""
        if len(arrays) != len(self.inputs):
            raise InvalidInput("<inputs>", f"got {len(arrays)} inputs, the model takes {len(self.inputs)}")
        values: dict[int, np.ndarray] = dict(self._constants)
        for spec, index, array in zip(self.inputs, self._input_indices, arrays, strict=True):
            if array.dtype != np.int8 or array.shape != spec.shape:
                raise InvalidInput(
                    spec.name, f"expected int8 {list(spec.shape)}, got {array.dtype} {list(array.shape)}"
                )
            values[index] = array
        for kernel in self._kernels:
            kernel(values)
        return [np.array(values[index], dtype=np.int8) for index in self._output_indices]


# --------------------------------------------------------------------------------- layer costs

# ------------------------------------------------------------------------------------- inputs


# ------------------------------------------------------------------------------------- kernels


def _activation_range(activation: int, scale: float, zero_point: int, op: str) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized`` for int8 outputs."""

    def quantize(value: float) -> int:
        # zero_point + round(f / scale) with f / scale in float32, as the kernel computes it.
        return zero_point + int(_round_half_away_array(np.float64(np.float32(value) / np.float32(scale))))

    if activation == _ACT_NONE:
        return _INT8_MIN, _INT8_MAX
    if activation == _ACT_RELU:
        return max(_INT8_MIN, quantize(0.0)), _INT8_MAX
    if activation == _ACT_RELU6:
        return max(_INT8_MIN, quantize(0.0)), min(_INT8_MAX, quantize(6.0))
    if activation == _ACT_RELU_N1_TO_1:
        return max(_INT8_MIN, quantize(-1.0)), min(_INT8_MAX, quantize(1.0))
    name = _ACTIVATION_NAMES.get(activation, str(activation))
    raise _Unsupported(op, f"fused activation {name}")


def _same_or_valid(padding: int, op: str) -> None:
    if padding not in (_PADDING_SAME, _PADDING_VALID):
        raise _Unsupported(op, f"padding type {padding}")


def _out_size_and_pad(padding: int, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """``ComputeOutSize`` and the leading padding of ``ComputePaddingWithOffset``."""
    effective = (kernel - 1) * dilation + 1
    out = (size + stride - (1 if padding == _PADDING_SAME else effective)) // stride
    total = max(0, (out - 1) * stride + effective - size)
    return out, total // 2


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    out: tuple[int, int],
    fill: int,
) -> np.ndarray:
    """(N, OH, OW, C, KH, KW) windows of an NHWC tensor, padded with ``fill``."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw), (oh, ow) = kernel, stride, dilation, pad, out
    need_h = (oh - 1) * sh + (kh - 1) * dh + 1
    need_w = (ow - 1) * sw + (kw - 1) * dw + 1
    padded = np.full((n, max(need_h, ph + h), max(need_w, pw + w), c), fill, dtype=x.dtype)
    padded[:, ph : ph + h, pw : pw + w, :] = x
    view = np.lib.stride_tricks.sliding_window_view(
        padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2)
    )
    return view[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw, :, ::dh, ::dw]


@dataclass(frozen=True, slots=True)
class _Requant:
    """Per-channel (or per-tensor) output rescaling of an accumulating op."""

    multiplier: np.ndarray
    shift: np.ndarray
    output_zero_point: int
    low: int
    high: int

    def apply(self, acc: np.ndarray) -> np.ndarray:
        scaled = multiply_by_quantized_multiplier(acc, self.multiplier, self.shift) + self.output_zero_point
        return np.clip(scaled, self.low, self.high).astype(np.int8)


class _Builder:
    """Turns one graph node into a kernel closure and its cost."""

    def __init__(self, tensors: dict[int, _Tensor], constants: dict[int, np.ndarray]) -> None:
        self.tensors = tensors
        self.constants = constants

    def build(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table | None
    ) -> Kernel:
        method = getattr(self, "_" + op.lower(), None)
        if method is None:
            raise _Unsupported(op, "no int8 kernel")
        return method(op, inputs, outputs, options or _Table(b"", 0))

    # helpers

    def _int8(self, op: str, *indices: int) -> list[_Tensor]:
        found = []
        for index in indices:
            tensor = self.tensors[index]
            if tensor.dtype != np.int8:
                raise _Unsupported(op, f"tensor {index} is {tensor.dtype}, not int8")
            if tensor.scales.size != 1 and index not in self.constants:
                raise _Unsupported(op, f"activation tensor {index} is not per-tensor quantized")
            found.append(tensor)
        return found

    def _constant(self, op: str, index: int, what: str) -> np.ndarray:
        if index not in self.constants:
            raise _Unsupported(op, f"{what} must be a constant tensor")
        return self.constants[index]

    def _bias(self, op: str, inputs: tuple[int, ...], channels: int) -> np.ndarray:
        if len(inputs) < 3 or inputs[2] < 0:
            return np.zeros(channels, dtype=np.int64)
        bias = self._constant(op, inputs[2], "bias")
        if bias.dtype != np.int32 or bias.shape != (channels,):
            raise _Unsupported(op, f"bias must be int32 [{channels}], got {bias.dtype} {list(bias.shape)}")
        return bias.astype(np.int64)

    def _weight_scales(self, op: str, weights: _Tensor, channels: int, axis: int) -> np.ndarray:
        """Per-output-channel weight scales (a per-tensor scale repeated); symmetric weights only."""
        if np.any(weights.zero_points != 0):
            raise _Unsupported(op, "int8 weights must be symmetric (zero point 0)")
        if weights.scales.size not in (1, channels):
            raise _Unsupported(op, f"{weights.scales.size} weight scales for {channels} channels")
        if weights.scales.size > 1 and weights.quantized_dimension != axis:
            raise _Unsupported(op, f"weights quantized along axis {weights.quantized_dimension}, not {axis}")
        return np.broadcast_to(weights.scales, (channels,))

    def _requant(
        self, op: str, x: _Tensor, weights: _Tensor, out: _Tensor, channels: int, activation: int, axis: int
    ) -> _Requant:
        # effective scale = input_scale * weight_scale / output_scale, in double from float32 values
        pairs = [
            quantize_multiplier(float(x.scales[0]) * float(s) / float(out.scales[0]))
            for s in self._weight_scales(op, weights, channels, axis)
        ]
        low, high = _activation_range(activation, out.scale, out.zero_point, op)
        return _Requant(
            multiplier=np.array([m for m, _ in pairs], dtype=np.int64),
            shift=np.array([s for _, s in pairs], dtype=np.int64),
            output_zero_point=out.zero_point,
            low=low,
            high=high,
        )

    # ops

    def _conv_2d(self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table) -> Kernel:
        # Conv2DOptions: padding 0, stride_w 1, stride_h 2, fused_activation_function 3,
        # dilation_w_factor 4, dilation_h_factor 5.
        padding = options.scalar(0, "b", _PADDING_SAME)
        stride = (options.scalar(2, "i", 1), options.scalar(1, "i", 1))
        activation = options.scalar(3, "b", _ACT_NONE)
        dilation = (options.scalar(5, "i", 1), options.scalar(4, "i", 1))
        _same_or_valid(padding, op)
        x, weights, out = self._int8(op, inputs[0], inputs[1], outputs[0])
        kernel_w = self._constant(op, inputs[1], "filter")
        oc, kh, kw, ic = kernel_w.shape
        n, h, w, c = x.shape
        if c != ic:
            raise _Unsupported(op, f"grouped convolution ({c} input channels, filter has {ic})")
        oh, ph = _out_size_and_pad(padding, h, kh, stride[0], dilation[0])
        ow, pw = _out_size_and_pad(padding, w, kw, stride[1], dilation[1])
        if out.shape != (n, oh, ow, oc):
            raise _Unsupported(op, f"output shape {list(out.shape)}, expected {[n, oh, ow, oc]}")
        bias = self._bias(op, inputs, oc)
        requant = self._requant(op, x, weights, out, oc, activation, axis=0)
        # (OC, C*KH*KW) in the windows' (C, KH, KW) order; float64 products of int8 values and
        # their sums stay exact integers far beyond any model's accumulation depth.
        matrix = kernel_w.transpose(0, 3, 1, 2).reshape(oc, -1).astype(np.float64).T
        zp = x.zero_point
        src, dst = inputs[0], outputs[0]

        def conv(values: dict[int, np.ndarray]) -> None:
            win = _windows(values[src], (kh, kw), stride, dilation, (ph, pw), (oh, ow), zp)
            patches = (win.reshape(n * oh * ow, -1).astype(np.float64) - zp) @ matrix
            acc = patches.astype(np.int64) + bias
            values[dst] = requant.apply(acc).reshape(n, oh, ow, oc)

        return conv

    def _depthwise_conv_2d(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table
    ) -> Kernel:
        # DepthwiseConv2DOptions: padding 0, stride_w 1, stride_h 2, depth_multiplier 3,
        # fused_activation_function 4, dilation_w_factor 5, dilation_h_factor 6.
        padding = options.scalar(0, "b", _PADDING_SAME)
        stride = (options.scalar(2, "i", 1), options.scalar(1, "i", 1))
        activation = options.scalar(4, "b", _ACT_NONE)
        dilation = (options.scalar(6, "i", 1), options.scalar(5, "i", 1))
        _same_or_valid(padding, op)
        x, weights, out = self._int8(op, inputs[0], inputs[1], outputs[0])
        kernel_w = self._constant(op, inputs[1], "filter")
        _, kh, kw, oc = kernel_w.shape
        n, h, w, c = x.shape
        if oc % c:
            raise _Unsupported(op, f"{oc} output channels is not a multiple of {c} input channels")
        multiplier = oc // c
        oh, ph = _out_size_and_pad(padding, h, kh, stride[0], dilation[0])
        ow, pw = _out_size_and_pad(padding, w, kw, stride[1], dilation[1])
        if out.shape != (n, oh, ow, oc):
            raise _Unsupported(op, f"output shape {list(out.shape)}, expected {[n, oh, ow, oc]}")
        bias = self._bias(op, inputs, oc)
        requant = self._requant(op, x, weights, out, oc, activation, axis=3)
        taps = kernel_w[0].transpose(2, 0, 1).astype(np.float64)  # (OC, KH, KW)
        zp = x.zero_point
        src, dst = inputs[0], outputs[0]

        def depthwise(values: dict[int, np.ndarray]) -> None:
            win = _windows(values[src], (kh, kw), stride, dilation, (ph, pw), (oh, ow), zp)
            win = np.repeat(win, multiplier, axis=3).astype(np.float64) - zp  # output channel ic*M + m
            acc = np.einsum("nhwckl,ckl->nhwc", win, taps).astype(np.int64) + bias
            values[dst] = requant.apply(acc)

        return depthwise

    def _fully_connected(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table
    ) -> Kernel:
        # FullyConnectedOptions: fused_activation_function 0, weights_format 1, keep_num_dims 2.
        activation = options.scalar(0, "b", _ACT_NONE)
        if options.scalar(1, "b", 0) != 0:
            raise _Unsupported(op, "shuffled weights format")
        x, weights, out = self._int8(op, inputs[0], inputs[1], outputs[0])
        matrix = self._constant(op, inputs[1], "weights")
        if matrix.ndim != 2:
            raise _Unsupported(op, f"weights of rank {matrix.ndim}")
        units, depth = matrix.shape
        size = int(np.prod(x.shape))
        if size % depth:
            raise _Unsupported(op, f"input of {size} elements is not a multiple of depth {depth}")
        rows = size // depth
        bias = self._bias(op, inputs, units)
        # The reference kernel rescales in double: round(acc * in_scale * w_scale / out_scale).
        effective = np.array(
            [
                float(x.scales[0]) * float(s) / float(out.scales[0])
                for s in self._weight_scales(op, weights, units, 0)
            ]
        )
        low, high = _activation_range(activation, out.scale, out.zero_point, op)
        weights_t = matrix.astype(np.float64).T
        zp, zp_out = x.zero_point, out.zero_point
        src, dst, out_shape = inputs[0], outputs[0], out.shape

        def fully_connected(values: dict[int, np.ndarray]) -> None:
            lhs = values[src].reshape(rows, depth).astype(np.float64) - zp
            acc = (lhs @ weights_t).astype(np.int64) + bias
            scaled = _round_half_away_array(_wrap_int32(acc).astype(np.float64) * effective) + zp_out
            values[dst] = np.clip(scaled, low, high).astype(np.int8).reshape(out_shape)

        return fully_connected

    def _add(self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table) -> Kernel:
        # AddOptions: fused_activation_function 0.
        activation = options.scalar(0, "b", _ACT_NONE)
        a, b, out = self._int8(op, inputs[0], inputs[1], outputs[0])
        if np.broadcast_shapes(a.shape, b.shape) != out.shape:
            raise _Unsupported(op, f"shapes {list(a.shape)} + {list(b.shape)} -> {list(out.shape)}")
        left_shift = 20
        # add.cc: 2 * max(float scales) is a float; the quotients are doubles.
        twice_max = float(np.float32(2) * np.float32(max(a.scale, b.scale)))
        m1, s1 = quantize_multiplier(a.scale / twice_max)
        m2, s2 = quantize_multiplier(b.scale / twice_max)
        mo, so = quantize_multiplier(twice_max / float(np.float32(1 << left_shift) * np.float32(out.scale)))
        low, high = _activation_range(activation, out.scale, out.zero_point, op)
        za, zb, zo = a.zero_point, b.zero_point, out.zero_point
        src_a, src_b, dst = inputs[0], inputs[1], outputs[0]

        def add(values: dict[int, np.ndarray]) -> None:
            va = (values[src_a].astype(np.int64) - za) << left_shift
            vb = (values[src_b].astype(np.int64) - zb) << left_shift
            total = multiply_by_quantized_multiplier(va, m1, s1)
            total += multiply_by_quantized_multiplier(vb, m2, s2)
            result = multiply_by_quantized_multiplier(total, mo, so) + zo
            values[dst] = np.clip(result, low, high).astype(np.int8)

        return add

    def _pool(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table, average: bool
    ) -> Kernel:
        # Pool2DOptions: padding 0, stride_w 1, stride_h 2, filter_width 3, filter_height 4,
        # fused_activation_function 5.
        padding = options.scalar(0, "b", _PADDING_SAME)
        stride = (options.scalar(2, "i", 1), options.scalar(1, "i", 1))
        kernel = (options.scalar(4, "i", 1), options.scalar(3, "i", 1))
        activation = options.scalar(5, "b", _ACT_NONE)
        _same_or_valid(padding, op)
        x, out = self._int8(op, inputs[0], outputs[0])
        if (x.scale, x.zero_point) != (out.scale, out.zero_point):
            raise _Unsupported(op, "input and output quantization differ")
        n, h, w, c = x.shape
        oh, ph = _out_size_and_pad(padding, h, kernel[0], stride[0], 1)
        ow, pw = _out_size_and_pad(padding, w, kernel[1], stride[1], 1)
        if out.shape != (n, oh, ow, c):
            raise _Unsupported(op, f"output shape {list(out.shape)}, expected {[n, oh, ow, c]}")
        low, high = _activation_range(activation, out.scale, out.zero_point, op)
        geometry = (kernel, stride, (1, 1), (ph, pw), (oh, ow))
        # Count of real (unpadded) elements under each window.
        ones = _windows(np.ones((1, h, w, 1), np.int64), *geometry, 0)
        counts = ones.sum(axis=(-1, -2))  # (1, OH, OW, 1)
        src, dst = inputs[0], outputs[0]

        def pool(values: dict[int, np.ndarray]) -> None:
            x_val = values[src].astype(np.int64)
            if average:
                acc = _windows(x_val, *geometry, 0).sum(axis=(-1, -2))
                half = counts // 2
                # C integer division truncates toward zero; the kernel rounds half away from zero.
                mean = np.where(acc > 0, (acc + half) // counts, -((-acc + half) // counts))
            else:
                mean = _windows(x_val, *geometry, _INT8_MIN - 1).max(axis=(-1, -2))
            values[dst] = np.clip(mean, low, high).astype(np.int8)

        return pool

    def _max_pool_2d(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table
    ) -> Kernel:
        return self._pool(op, inputs, outputs, options, average=False)

    def _average_pool_2d(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table
    ) -> Kernel:
        return self._pool(op, inputs, outputs, options, average=True)

    def _mean(self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table) -> Kernel:
        # keep_dims (ReducerOptions) only shapes the output tensor, which the interpreter resolved.
        x, out = self._int8(op, inputs[0], outputs[0])
        axis_values = self._constant(op, inputs[1], "axis").reshape(-1)
        axes = tuple(sorted({int(a) % len(x.shape) for a in axis_values}))
        count = int(np.prod([x.shape[a] for a in axes]))
        zp_in, zp_out = x.zero_point, out.zero_point
        src, dst, out_shape = inputs[0], outputs[0], out.shape
        # reference_ops::QuantizedMeanOrSum: 1/count folded into the multiplier.
        multiplier, shift = quantize_multiplier(float(x.scale) / float(out.scale))
        fold = min(count.bit_length() - 1, 32, 31 + shift)
        multiplier = (multiplier << fold) // count
        shift -= fold

        def mean(values: dict[int, np.ndarray]) -> None:
            acc = values[src].astype(np.int64).sum(axis=axes) - zp_in * count
            result = multiply_by_quantized_multiplier(_wrap_int32(acc), multiplier, shift) + zp_out
            values[dst] = np.clip(result, _INT8_MIN, _INT8_MAX).astype(np.int8).reshape(out_shape)

        return mean

    def _softmax(self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table) -> Kernel:
        # SoftmaxOptions: beta 0.
        beta = options.scalar(0, "f", 0.0)
        x, out = self._int8(op, inputs[0], outputs[0])
        if (out.scale, out.zero_point) != (float(np.float32(1 / 256)), _INT8_MIN):
            raise _Unsupported(op, "int8 output must have scale 1/256 and zero point -128")
        # PreprocessSoftmaxScaling with 5 integer bits for the scaled differences (Q5.26).
        real = min(float(np.float32(beta)) * float(x.scales[0]) * (1 << 26), (1 << 31) - 1.0)
        multiplier, left_shift = quantize_multiplier(real)
        if left_shift < 0:
            raise _Unsupported(op, "input scale times beta is too small")
        # CalculateInputRadius(5, left_shift): differences below -radius contribute nothing.
        diff_min = -math.floor(((1 << 5) - 1) * (1 << 26) / (1 << left_shift))
        src, dst = inputs[0], outputs[0]

        def softmax(values: dict[int, np.ndarray]) -> None:
            x_val = values[src].astype(np.int64)
            rows = x_val.reshape(-1, x_val.shape[-1])
            diff = rows - rows.max(axis=1, keepdims=True)
            used = diff >= diff_min
            # MultiplyByQuantizedMultiplierGreaterThanOne: the left shift, then the high multiply.
            scaled = _fx_mul(_wrap_int32(np.where(used, diff, 0) << left_shift), multiplier)
            exps = _fx_exp_on_negative_values_q5_26(scaled)  # Q0.31
            # Sum in Q12.19 (Rescale<12>), then its reciprocal (GetReciprocal).
            total = np.where(used, _rounding_divide_by_pot(exps, np.int64(12)), 0).sum(axis=1, keepdims=True)
            headroom_plus_one = _count_leading_zeros_u32(total)
            bits_over_unit = 12 - headroom_plus_one
            shifted_minus_one = _wrap_int32(((total << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31))
            reciprocal = _fx_one_over_one_plus_x_for_x_in_0_1(shifted_minus_one)
            exponent = bits_over_unit + 31 - 8
            unsaturated = _rounding_divide_by_pot(_fx_mul(reciprocal, exps), exponent)
            result = np.where(used, np.clip(unsaturated + _INT8_MIN, _INT8_MIN, _INT8_MAX), _INT8_MIN)
            values[dst] = result.astype(np.int8).reshape(x_val.shape)

        return softmax

    def _reshape(self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table) -> Kernel:
        x, out = self._int8(op, inputs[0], outputs[0])
        if (x.scale, x.zero_point) != (out.scale, out.zero_point):
            raise _Unsupported(op, "input and output quantization differ")
        src, dst, out_shape = inputs[0], outputs[0], out.shape

        def reshape(values: dict[int, np.ndarray]) -> None:
            values[dst] = values[src].reshape(out_shape)

        return reshape

    def _quantize(
        self, op: str, inputs: tuple[int, ...], outputs: tuple[int, ...], options: _Table
    ) -> Kernel:
        x, out = self._int8(op, inputs[0], outputs[0])
        multiplier, shift = quantize_multiplier(float(x.scale) / float(out.scale))
        zp_in, zp_out = x.zero_point, out.zero_point
        src, dst = inputs[0], outputs[0]

        def requantize(values: dict[int, np.ndarray]) -> None:
            shifted = values[src].astype(np.int64) - zp_in
            result = multiply_by_quantized_multiplier(shifted, multiplier, shift) + zp_out
            values[dst] = np.clip(result, _INT8_MIN, _INT8_MAX).astype(np.int8)

        return requantize

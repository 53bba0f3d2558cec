"""Tiny .tflite models written directly as flatbuffers, for op-by-op tests of the accelerator backends.

The LiteRT wheel ships the generated schema module with its object API, so a test can describe a
graph (tensors, constant buffers, operators with their options) and serialise it without
TensorFlow. Weights come from a seeded generator: the models are random but reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TENSOR_TYPES = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.int32): schema.TensorType.INT32,
}

# Op versions that the int8 kernels are registered under in LiteRT.
_VERSIONS = {
    "ADD": 2,
    "AVERAGE_POOL_2D": 2,
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 4,
    "MAX_POOL_2D": 2,
    "MEAN": 2,
    "QUANTIZE": 2,
    "RESHAPE": 1,
    "SOFTMAX": 2,
    "TANH": 2,
    "LOGISTIC": 2,
}


class GraphBuilder:
    """One subgraph: add tensors and operators, then ``build`` the model bytes."""

    def __init__(self) -> None:
        self._tensors: list[Any] = []
        self._buffers: list[Any] = [schema.BufferT()]  # buffer 0 is the empty sentinel
        self._operators: list[Any] = []
        self._opcodes: dict[str, int] = {}
        self._versions: dict[str, int] = {}

    def tensor(
        self,
        shape: Sequence[int],
        dtype: Any = np.int8,
        *,
        scale: float | Sequence[float] | None = None,
        zero_point: int | Sequence[int] = 0,
        data: np.ndarray | None = None,
        axis: int = 0,
        signature: Sequence[int] | None = None,
    ) -> int:
        tensor = schema.TensorT()
        tensor.shape = list(shape)
        if signature is not None:  # -1 marks a variable dimension
            tensor.shapeSignature = list(signature)
        tensor.type = _TENSOR_TYPES[np.dtype(dtype)]
        tensor.name = f"t{len(self._tensors)}"
        tensor.buffer = 0
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.ascontiguousarray(data, dtype=dtype).view(np.uint8).reshape(-1)
            self._buffers.append(buffer)
            tensor.buffer = len(self._buffers) - 1
        if scale is not None:
            scales = [float(scale)] if np.isscalar(scale) else [float(s) for s in scale]  # type: ignore[arg-type]
            zero_points = (
                [int(zero_point)] * len(scales) if np.isscalar(zero_point) else list(zero_point)  # type: ignore[arg-type]
            )
            quant = schema.QuantizationParametersT()
            quant.scale = scales
            quant.zeroPoint = zero_points
            quant.quantizedDimension = axis
            tensor.quantization = quant
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def op(
        self,
        name: str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: Any = None,
        *,
        version: int | None = None,
    ) -> None:
        if name not in self._opcodes:
            self._opcodes[name] = len(self._opcodes)
        operator = schema.OperatorT()
        operator.opcodeIndex = self._opcodes[name]
        operator.inputs = list(inputs)
        operator.outputs = list(outputs)
        if options is not None:
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            operator.builtinOptions = options
        self._operators.append(operator)
        self._versions[name] = version or _VERSIONS.get(name, 1)

    def build(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        subgraph = schema.SubGraphT()
        subgraph.tensors = self._tensors
        subgraph.inputs = list(inputs)
        subgraph.outputs = list(outputs)
        subgraph.operators = self._operators
        model = schema.ModelT()
        model.version = 3
        model.description = "edgeward test model"
        model.subgraphs = [subgraph]
        model.buffers = self._buffers
        model.operatorCodes = []
        for name in self._opcodes:  # insertion order == opcode index
            code = schema.OperatorCodeT()
            code.builtinCode = getattr(schema.BuiltinOperator, name)
            code.deprecatedBuiltinCode = min(code.builtinCode, 127)
            code.version = self._versions[name]
            model.operatorCodes.append(code)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def options(kind: str, **fields: Any) -> Any:
    """A builtin options object, e.g. ``options("Conv2DOptions", strideW=2, padding=PADDING_VALID)``."""
    value = getattr(schema, kind + "T")()
    for key, field_value in fields.items():
        if not hasattr(value, key):
            raise AttributeError(f"{kind} has no field {key}")
        setattr(value, key, field_value)
    return value


PADDING_SAME = schema.Padding.SAME
PADDING_VALID = schema.Padding.VALID
RELU = schema.ActivationFunctionType.RELU
RELU6 = schema.ActivationFunctionType.RELU6
RELU_N1_TO_1 = schema.ActivationFunctionType.RELU_N1_TO_1
TANH = schema.ActivationFunctionType.TANH


def weights(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    return rng.integers(-127, 128, shape, dtype=np.int8)


def per_channel_scales(rng: np.random.Generator, channels: int) -> list[float]:
    return [float(s) for s in rng.uniform(0.002, 0.02, channels).astype(np.float32)]


def bias(rng: np.random.Generator, channels: int) -> np.ndarray:
    return rng.integers(-2000, 2000, channels, dtype=np.int32)


# ----------------------------------------------------------------------------- one-op models
#
# Each factory returns the bytes of a model with one int8 input, one op (or a short chain) and
# one int8 output. Scales are chosen so that outputs spread over most of the int8 range, with
# negative values (no activation) unless an activation is asked for.

_INPUT_SCALE = 0.05


def _spread_scale(depth: int, weight_scale: float) -> float:
    """An output scale that maps about +-3 sigma of an int8 dot product of ``depth`` terms to +-120."""
    sigma = np.sqrt(depth) * 73.0 * 74.0 * _INPUT_SCALE * weight_scale
    return float(np.float32(3 * sigma / 120))


def conv_model(
    rng: np.random.Generator,
    input_shape: Sequence[int] = (1, 9, 9, 3),
    channels: int = 8,
    kernel: tuple[int, int] = (3, 3),
    stride: tuple[int, int] = (1, 1),
    padding: int = PADDING_SAME,
    dilation: tuple[int, int] = (1, 1),
    activation: int = 0,
    per_channel: bool = True,
) -> bytes:
    """CONV_2D; output shape from TFLite's SAME/VALID rules."""
    n, h, w, c = input_shape
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    if padding == PADDING_SAME:
        oh, ow = -(-h // stride[0]), -(-w // stride[1])
    else:
        oh, ow = (h - eff[0]) // stride[0] + 1, (w - eff[1]) // stride[1] + 1
    scales = per_channel_scales(rng, channels) if per_channel else per_channel_scales(rng, 1)
    g = GraphBuilder()
    x = g.tensor(input_shape, scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    f = g.tensor((channels, *kernel, c), scale=scales, data=weights(rng, (channels, *kernel, c)))
    b = g.tensor((channels,), np.int32, scale=[_INPUT_SCALE * s for s in scales], data=bias(rng, channels))
    out_scale = _spread_scale(kernel[0] * kernel[1] * c, float(np.mean(scales)))
    y = g.tensor((n, oh, ow, channels), scale=out_scale, zero_point=int(rng.integers(-20, 20)))
    g.op(
        "CONV_2D",
        [x, f, b],
        [y],
        options(
            "Conv2DOptions",
            padding=padding,
            strideH=stride[0],
            strideW=stride[1],
            dilationHFactor=dilation[0],
            dilationWFactor=dilation[1],
            fusedActivationFunction=activation,
        ),
    )
    return g.build([x], [y])


def depthwise_model(
    rng: np.random.Generator,
    input_shape: Sequence[int] = (1, 9, 9, 4),
    multiplier: int = 1,
    kernel: tuple[int, int] = (3, 3),
    stride: tuple[int, int] = (1, 1),
    padding: int = PADDING_SAME,
    activation: int = 0,
) -> bytes:
    n, h, w, c = input_shape
    channels = c * multiplier
    if padding == PADDING_SAME:
        oh, ow = -(-h // stride[0]), -(-w // stride[1])
    else:
        oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    scales = per_channel_scales(rng, channels)
    g = GraphBuilder()
    x = g.tensor(input_shape, scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    f = g.tensor((1, *kernel, channels), scale=scales, data=weights(rng, (1, *kernel, channels)), axis=3)
    b = g.tensor((channels,), np.int32, scale=[_INPUT_SCALE * s for s in scales], data=bias(rng, channels))
    y = g.tensor(
        (n, oh, ow, channels),
        scale=_spread_scale(kernel[0] * kernel[1], float(np.mean(scales))),
        zero_point=int(rng.integers(-20, 20)),
    )
    g.op(
        "DEPTHWISE_CONV_2D",
        [x, f, b],
        [y],
        options(
            "DepthwiseConv2DOptions",
            padding=padding,
            strideH=stride[0],
            strideW=stride[1],
            depthMultiplier=multiplier,
            dilationHFactor=1,
            dilationWFactor=1,
            fusedActivationFunction=activation,
        ),
    )
    return g.build([x], [y])


def fully_connected_model(
    rng: np.random.Generator,
    batch: int = 1,
    depth: int = 32,
    units: int = 8,
    per_channel: bool = True,
    activation: int = 0,
) -> bytes:
    scales = per_channel_scales(rng, units) if per_channel else per_channel_scales(rng, 1)
    g = GraphBuilder()
    x = g.tensor((batch, depth), scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    f = g.tensor((units, depth), scale=scales, data=weights(rng, (units, depth)))
    b = g.tensor((units,), np.int32, scale=[_INPUT_SCALE * s for s in scales], data=bias(rng, units))
    y = g.tensor(
        (batch, units),
        scale=_spread_scale(depth, float(np.mean(scales))),
        zero_point=int(rng.integers(-20, 20)),
    )
    g.op(
        "FULLY_CONNECTED",
        [x, f, b],
        [y],
        options("FullyConnectedOptions", fusedActivationFunction=activation),
    )
    return g.build([x], [y])


def add_model(
    rng: np.random.Generator,
    shape_a: Sequence[int] = (1, 4, 4, 8),
    shape_b: Sequence[int] | None = None,
    activation: int = 0,
) -> bytes:
    """ADD of the input and a constant tensor (broadcast if ``shape_b`` differs)."""
    shape_b = shape_a if shape_b is None else shape_b
    g = GraphBuilder()
    x = g.tensor(shape_a, scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    c = g.tensor(
        shape_b,
        scale=float(np.float32(rng.uniform(0.02, 0.2))),
        zero_point=int(rng.integers(-20, 20)),
        data=weights(rng, shape_b),
    )
    out_shape = np.broadcast_shapes(tuple(shape_a), tuple(shape_b))
    y = g.tensor(
        out_shape, scale=float(np.float32(rng.uniform(0.05, 0.2))), zero_point=int(rng.integers(-20, 20))
    )
    g.op("ADD", [x, c], [y], options("AddOptions", fusedActivationFunction=activation))
    return g.build([x], [y])


def pool_model(
    rng: np.random.Generator,
    op: str = "AVERAGE_POOL_2D",
    input_shape: Sequence[int] = (1, 9, 9, 4),
    window: tuple[int, int] = (3, 3),
    stride: tuple[int, int] = (2, 2),
    padding: int = PADDING_SAME,
    activation: int = 0,
) -> bytes:
    n, h, w, c = input_shape
    if padding == PADDING_SAME:
        oh, ow = -(-h // stride[0]), -(-w // stride[1])
    else:
        oh, ow = (h - window[0]) // stride[0] + 1, (w - window[1]) // stride[1] + 1
    zero_point = int(rng.integers(-20, 20))
    g = GraphBuilder()
    x = g.tensor(input_shape, scale=_INPUT_SCALE, zero_point=zero_point)
    y = g.tensor((n, oh, ow, c), scale=_INPUT_SCALE, zero_point=zero_point)
    g.op(
        op,
        [x],
        [y],
        options(
            "Pool2DOptions",
            padding=padding,
            strideH=stride[0],
            strideW=stride[1],
            filterHeight=window[0],
            filterWidth=window[1],
            fusedActivationFunction=activation,
        ),
    )
    return g.build([x], [y])


def mean_model(
    rng: np.random.Generator,
    input_shape: Sequence[int] = (1, 6, 6, 8),
    axes: Sequence[int] = (1, 2),
    keep_dims: bool = False,
) -> bytes:
    out_shape = [d for i, d in enumerate(input_shape) if i not in axes or keep_dims]
    if keep_dims:
        out_shape = [1 if i in axes else d for i, d in enumerate(input_shape)]
    g = GraphBuilder()
    x = g.tensor(input_shape, scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    a = g.tensor((len(axes),), np.int32, data=np.array(axes, np.int32))
    y = g.tensor(
        out_shape, scale=float(np.float32(rng.uniform(0.005, 0.03))), zero_point=int(rng.integers(-20, 20))
    )
    g.op("MEAN", [x, a], [y], options("ReducerOptions", keepDims=keep_dims))
    return g.build([x], [y])


def softmax_model(
    rng: np.random.Generator, shape: Sequence[int] = (1, 10), input_scale: float = 0.1, beta: float = 1.0
) -> bytes:
    g = GraphBuilder()
    x = g.tensor(shape, scale=input_scale, zero_point=int(rng.integers(-20, 20)))
    y = g.tensor(shape, scale=1 / 256, zero_point=-128)
    g.op("SOFTMAX", [x], [y], options("SoftmaxOptions", beta=beta))
    return g.build([x], [y])


def requantize_model(rng: np.random.Generator, shape: Sequence[int] = (1, 64)) -> bytes:
    """QUANTIZE from int8 to int8 with another scale and zero point."""
    g = GraphBuilder()
    x = g.tensor(shape, scale=_INPUT_SCALE, zero_point=int(rng.integers(-20, 20)))
    y = g.tensor(
        shape, scale=float(np.float32(rng.uniform(0.02, 0.1))), zero_point=int(rng.integers(-20, 20))
    )
    g.op("QUANTIZE", [x], [y])
    return g.build([x], [y])


def tanh_model(shape: Sequence[int] = (1, 16)) -> bytes:
    """An int8 TANH: a valid model with an op the int8 overlay has no kernel for."""
    g = GraphBuilder()
    x = g.tensor(shape, scale=_INPUT_SCALE, zero_point=0)
    y = g.tensor(shape, scale=1 / 128, zero_point=0)
    g.op("TANH", [x], [y])
    return g.build([x], [y])


def chain_model(rng: np.random.Generator) -> bytes:
    """CONV_2D -> DEPTHWISE_CONV_2D -> ADD -> MAX_POOL_2D -> RESHAPE -> FULLY_CONNECTED -> SOFTMAX."""
    g = GraphBuilder()
    zp = int(rng.integers(-20, 20))
    x = g.tensor((1, 8, 8, 2), scale=_INPUT_SCALE, zero_point=zp)
    s1 = per_channel_scales(rng, 6)
    f1 = g.tensor((6, 3, 3, 2), scale=s1, data=weights(rng, (6, 3, 3, 2)))
    b1 = g.tensor((6,), np.int32, scale=[_INPUT_SCALE * s for s in s1], data=bias(rng, 6))
    h1_scale = _spread_scale(18, float(np.mean(s1)))
    h1 = g.tensor((1, 8, 8, 6), scale=h1_scale, zero_point=-128)
    g.op(
        "CONV_2D",
        [x, f1, b1],
        [h1],
        options("Conv2DOptions", strideH=1, strideW=1, fusedActivationFunction=RELU),
    )
    s2 = per_channel_scales(rng, 6)
    f2 = g.tensor((1, 3, 3, 6), scale=s2, data=weights(rng, (1, 3, 3, 6)), axis=3)
    b2 = g.tensor((6,), np.int32, scale=[h1_scale * s for s in s2], data=bias(rng, 6))
    h2_scale = float(np.float32(h1_scale * 2))
    h2 = g.tensor((1, 8, 8, 6), scale=h2_scale, zero_point=0)
    g.op(
        "DEPTHWISE_CONV_2D",
        [h1, f2, b2],
        [h2],
        options(
            "DepthwiseConv2DOptions", strideH=1, strideW=1, depthMultiplier=1, fusedActivationFunction=RELU6
        ),
    )
    h3 = g.tensor((1, 8, 8, 6), scale=float(np.float32(h2_scale * 1.5)), zero_point=-10)
    g.op("ADD", [h2, h1], [h3], options("AddOptions"))
    h4 = g.tensor((1, 4, 4, 6), scale=float(np.float32(h2_scale * 1.5)), zero_point=-10)
    g.op(
        "MAX_POOL_2D",
        [h3],
        [h4],
        options("Pool2DOptions", strideH=2, strideW=2, filterHeight=2, filterWidth=2, padding=PADDING_VALID),
    )
    shape = g.tensor((2,), np.int32, data=np.array([1, 96], np.int32))
    h5 = g.tensor((1, 96), scale=float(np.float32(h2_scale * 1.5)), zero_point=-10)
    g.op("RESHAPE", [h4, shape], [h5], options("ReshapeOptions", newShape=[1, 96]))
    s3 = per_channel_scales(rng, 5)
    f3 = g.tensor((5, 96), scale=s3, data=weights(rng, (5, 96)))
    b3 = g.tensor((5,), np.int32, scale=[h2_scale * 1.5 * s for s in s3], data=bias(rng, 5))
    h6 = g.tensor((1, 5), scale=0.1, zero_point=3)
    g.op("FULLY_CONNECTED", [h5, f3, b3], [h6], options("FullyConnectedOptions"))
    y = g.tensor((1, 5), scale=1 / 256, zero_point=-128)
    g.op("SOFTMAX", [h6], [y], options("SoftmaxOptions", beta=1.0))
    return g.build([x], [y])


def hard_swish_model(shape: Sequence[int] = (1, 16)) -> bytes:
    """An int8 HARD_SWISH: LiteRT runs it; neither the int8 overlay nor the Edge TPU list has it."""
    g = GraphBuilder()
    x = g.tensor(shape, scale=_INPUT_SCALE, zero_point=0)
    y = g.tensor(shape, scale=_INPUT_SCALE, zero_point=0)
    g.op("HARD_SWISH", [x], [y])
    return g.build([x], [y])


def dynamic_batch_model(rng: np.random.Generator) -> bytes:
    """FULLY_CONNECTED whose batch dimension is variable (shape signature -1)."""
    g = GraphBuilder()
    x = g.tensor((1, 16), scale=_INPUT_SCALE, zero_point=0, signature=(-1, 16))
    scales = per_channel_scales(rng, 4)
    f = g.tensor((4, 16), scale=scales, data=weights(rng, (4, 16)))
    b = g.tensor((4,), np.int32, scale=[_INPUT_SCALE * s for s in scales], data=bias(rng, 4))
    y = g.tensor((1, 4), scale=0.1, zero_point=0, signature=(-1, 4))
    g.op("FULLY_CONNECTED", [x, f, b], [y], options("FullyConnectedOptions"))
    return g.build([x], [y])

"""Run a committed use-case model with the LiteRT interpreter, in float, whatever the model's dtypes.

numpy and the interpreter only: the same code evaluates the models at build time and runs them on
the nodes, so the accuracies in the model cards are the accuracies of this code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError:  # pragma: no cover - older boards ship only the standalone runtime
    from tflite_runtime.interpreter import (  # type: ignore[import-not-found,no-redef]
        Interpreter,
        OpResolverType,
    )


@dataclass(frozen=True)
class TensorSignature:
    """One named input or output of a model's serving signature."""

    name: str  # the signature key, stable across converter versions
    tensor: str  # the tensor's name in the flatbuffer, e.g. ``serving_default_<name>:0``
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    def as_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {
            "name": self.name,
            "tensor": self.tensor,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        card["quantization"] = (
            {"scale": self.scale, "zero_point": self.zero_point} if self.quantized else None
        )
        return card


class LiteModel:
    """A .tflite model with named float inputs and outputs; int8 models are (de)quantised here."""

    def __init__(self, path: str | Path, num_threads: int = 1) -> None:
        self.path = Path(path)
        self._interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        signature = self._interpreter.get_signature_runner("serving_default")
        self.inputs = [self._describe(n, d) for n, d in signature.get_input_details().items()]
        self.outputs = [self._describe(n, d) for n, d in signature.get_output_details().items()]

    @staticmethod
    def _describe(name: str, detail: dict[str, Any]) -> TensorSignature:
        scale, zero_point = detail["quantization"]
        return TensorSignature(
            name=name,
            tensor=str(detail["name"]),
            index=int(detail["index"]),
            shape=tuple(int(s) for s in detail["shape"]),
            dtype=np.dtype(detail["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch-1 inference; float arrays in (without the batch axis), float arrays out."""
        for sig in self.inputs:
            value = np.asarray(inputs[sig.name], dtype=np.float32).reshape(sig.shape)
            if sig.quantized:
                info = np.iinfo(sig.dtype)
                value = np.clip(np.round(value / sig.scale) + sig.zero_point, info.min, info.max)
            self._interpreter.set_tensor(sig.index, value.astype(sig.dtype))
        self._interpreter.invoke()
        result = {}
        for sig in self.outputs:
            value = self._interpreter.get_tensor(sig.index)
            if sig.quantized:
                value = (value.astype(np.float32) - sig.zero_point) * sig.scale
            result[sig.name] = value[0].astype(np.float32)
        return result


def op_names(path: str | Path) -> list[str]:
    """Sorted distinct builtin op names of a model, as a node checks them against its delegate.

    Read without the default XNNPACK delegate, which would otherwise replace the ops it takes
    over by a single DELEGATE node.
    """
    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})

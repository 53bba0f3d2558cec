"""TFLite model files: finding the interpreter, opening untrusted bytes safely, inspecting them.

The orchestrator calls ``inspect_tflite`` when a model is pushed; the cpu-litert backend opens
models through the same ``open_interpreter`` so both judge a file the same way. Model bytes are
untrusted: cheap container checks run first (size cap, the ``TFL3`` flatbuffer file identifier),
then the interpreter's own flatbuffer verifier; whatever the native wrapper raises on a malformed
file becomes ``InvalidModel``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from accelerators.base import (
    BackendUnavailable,
    InvalidModel,
    ModelInfo,
    ModelRefused,
    Quantization,
    TensorSpec,
    datatype_of,
)

__all__ = [
    "MAX_MODEL_BYTES",
    "InterpreterRuntime",
    "ModelInfo",
    "check_container",
    "describe",
    "inspect_tflite",
    "interpreter_runtime",
    "open_interpreter",
    "runtime_problem",
]

log = logging.getLogger(__name__)

#: Larger files are refused before any parsing (edge models are a few MB at most).
MAX_MODEL_BYTES = 256 * 2**20

# A flatbuffer starts with a 4-byte root offset followed by the schema's file identifier.
_IDENTIFIER = b"TFL3"
_IDENTIFIER_SLICE = slice(4, 8)

# Node name the runtime gives to a delegate kernel that replaced a set of ops.
_DELEGATE_NODE = "DELEGATE"

_MISSING_BUILTIN = re.compile(r"Didn't find op for builtin opcode '([^']+)' version '(\d+)'")
_MISSING_CUSTOM = re.compile(r"unresolved custom op: (\S+?)\.?(?:\s|$)")


@dataclass(frozen=True, slots=True)
class InterpreterRuntime:
    """The importable TFLite interpreter: ai-edge-litert, or tflite_runtime where only that exists."""

    name: str
    interpreter: Any
    op_resolver_type: Any


@functools.cache
def interpreter_runtime() -> InterpreterRuntime:
    """The interpreter to use; ``BackendUnavailable`` if neither package is importable."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        runtime = InterpreterRuntime("ai-edge-litert", Interpreter, OpResolverType)
    except ImportError as litert_err:
        try:
            from tflite_runtime.interpreter import (  # type: ignore[import-not-found,no-redef]
                Interpreter,
                OpResolverType,
            )
        except ImportError as err:
            raise BackendUnavailable(
                "tflite", f"neither ai-edge-litert ({litert_err}) nor tflite_runtime ({err}) is importable"
            ) from err
        runtime = InterpreterRuntime("tflite-runtime", Interpreter, OpResolverType)
    # Op inspection relies on this (private, long-standing) method; very old runtimes lack it.
    if not hasattr(runtime.interpreter, "_get_ops_details"):
        raise BackendUnavailable("tflite", f"{runtime.name} is too old: no op inspection")
    return runtime


def runtime_problem() -> str | None:
    """Why no interpreter runtime can be used here, or None: the ``probe`` of every backend that
    needs one (cpu-litert runs models on it; the simulated accelerators compile with it)."""
    try:
        interpreter_runtime()
    except BackendUnavailable as err:
        return err.reason
    return None


def check_container(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Cheap checks before any parsing: non-empty, within the cap, TFLite file identifier."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidModel("not_tflite", f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidModel("empty", "model file is empty")
    if len(data) > max_bytes:
        raise InvalidModel("too_large", f"{len(data)} bytes exceeds the {max_bytes}-byte cap")
    if len(data) < 8 or bytes(data[_IDENTIFIER_SLICE]) != _IDENTIFIER:
        raise InvalidModel("not_tflite", "no TFL3 file identifier at offset 4")


def open_interpreter(data: bytes, *, num_threads: int = 1, default_delegates: bool = True) -> Any:
    """Build an interpreter over ``data`` (not yet allocated).

    ``InvalidModel`` if the bytes are not a valid model, ``ModelRefused`` if the runtime lacks a
    builtin op (or op version) the model uses. ``default_delegates`` keeps XNNPACK on.
    """
    runtime = interpreter_runtime()
    resolver = runtime.op_resolver_type
    try:
        return runtime.interpreter(
            model_content=bytes(data),
            num_threads=num_threads,
            experimental_op_resolver_type=(
                resolver.AUTO if default_delegates else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            ),
        )
    # The native wrapper raises assorted types on malformed flatbuffers (ValueError,
    # UnicodeDecodeError from tensor names, RuntimeError), so anything it raises is the model's fault.
    except Exception as err:
        raise _model_error(err) from err


def allocate(interpreter: Any) -> None:
    """Allocate tensors, converting the runtime's errors (unresolved ops, bad tensor sizes)."""
    try:
        interpreter.allocate_tensors()
    except Exception as err:
        raise _model_error(err) from err


def _model_error(err: Exception) -> InvalidModel | ModelRefused:
    message = str(err).strip()
    builtin = _MISSING_BUILTIN.findall(message)
    custom = _MISSING_CUSTOM.findall(message)
    if builtin or custom:
        missing = [f"{op} version {v}" for op, v in builtin] + [f"custom op {op}" for op in custom]
        return ModelRefused(
            "runtime lacks " + ", ".join(missing), offending_ops=[op for op, _ in builtin] + custom
        )
    return InvalidModel("malformed", message.splitlines()[0][:300] if message else repr(err))


def describe(
    interpreter: Any,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[str, ...], frozenset[str]]:
    """Inputs, outputs, op names (first-seen order) and compute datatypes of the primary subgraph."""
    try:
        inputs = tuple(_spec(d) for d in interpreter.get_input_details())
        outputs = tuple(_spec(d) for d in interpreter.get_output_details())
        ops: dict[str, None] = {}
        dtypes = {spec.dtype for spec in inputs}
        for node in interpreter._get_ops_details():
            if node["op_name"] == _DELEGATE_NODE:
                continue
            ops[node["op_name"]] = None
            dtypes.update(datatype_of(t) for t in node["result_types"])
    except InvalidModel:
        raise
    except Exception as err:
        raise InvalidModel("malformed", f"cannot read model structure: {err}") from err
    return inputs, outputs, tuple(ops), frozenset(dtypes)


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail["quantization"]
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    return TensorSpec(
        name=detail["name"],
        dtype=datatype_of(detail["dtype"]),
        shape=tuple(int(d) for d in shape),
        quantization=Quantization(float(scale), int(zero_point)) if scale else None,
    )


def inspect_tflite(data: bytes, *, max_bytes: int = MAX_MODEL_BYTES) -> ModelInfo:
    """Signature, ops, datatypes, size and SHA-256 of a .tflite file; ``InvalidModel`` if it is not one.

    Ops are those of the primary subgraph (control-flow bodies in other subgraphs are not listed).
    A custom op this runtime cannot resolve is listed, not an error: another backend may have it.
    A builtin op (version) this runtime does not know cannot be inspected and is ``InvalidModel``.
    """
    check_container(data, max_bytes)
    try:
        interpreter = open_interpreter(data, default_delegates=False)
    except ModelRefused as err:
        raise InvalidModel("unsupported_op", f"cannot inspect: {err.reason}") from err
    inputs, outputs, ops, dtypes = describe(interpreter)
    try:
        # Allocation catches what the verifier lets through (tensor sizes that do not add up).
        allocate(interpreter)
    except ModelRefused as err:
        if any(op not in ops for op in err.offending_ops):
            raise InvalidModel("malformed", str(err)) from err
    return ModelInfo(
        inputs=inputs,
        outputs=outputs,
        ops=ops,
        dtypes=dtypes,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )

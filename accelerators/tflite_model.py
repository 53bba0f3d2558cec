"""TFLite model files: finding the interpreter, opening untrusted bytes safely, inspecting them.

The orchestrator calls ``inspect_tflite_isolated`` when a model is pushed; the cpu-litert backend
opens models through the same ``open_interpreter`` so both judge a file the same way. Model bytes
are untrusted: cheap container checks run first (size cap, the ``TFL3`` flatbuffer file
identifier), then the interpreter's own flatbuffer verifier; whatever the native wrapper raises on a
malformed file becomes ``InvalidModel``. The runtime is native code, and its verifier does not
catch every malformed file: a crafted one can crash the process that opens it (a segmentation fault,
found by tests/fuzz), so bytes from outside are first inspected in a child process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import select
import signal
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from accelerators.base import (
    NUMPY_DTYPES,
    BackendUnavailable,
    InvalidModel,
    ModelInfo,
    ModelRefused,
    ModelWork,
    Quantization,
    TensorSpec,
    datatype_of,
)
from edgeward.security.confine import Confinement, confine_process, landlock_abi, seccomp_supported

__all__ = [
    "MAX_MODEL_BYTES",
    "InterpreterRuntime",
    "LayerCost",
    "ModelInfo",
    "check_container",
    "describe",
    "inspect_tflite",
    "inspect_tflite_isolated",
    "interpreter_runtime",
    "layer_costs",
    "model_work",
    "open_interpreter",
    "runtime_problem",
]

log = logging.getLogger(__name__)

#: Larger files are refused before any parsing (edge models are a few MB at most).
MAX_MODEL_BYTES = 256 * 2**20
#: An isolated inspection still running after this long is ended and the model refused.
INSPECT_TIMEOUT_S = 60.0

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
            from tflite_runtime.interpreter import (
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
    try:
        work: ModelWork | None = model_work(layer_costs(interpreter), (*inputs, *outputs))
    except Exception as err:  # a shape the cost walk cannot read: no cold-start prediction, still a model
        log.info("model work not computed: %s", err)
        work = None
    return ModelInfo(
        inputs=inputs,
        outputs=outputs,
        ops=ops,
        dtypes=dtypes,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        work=work,
    )


def inspect_tflite_isolated(
    data: bytes, *, max_bytes: int = MAX_MODEL_BYTES, timeout_s: float = INSPECT_TIMEOUT_S
) -> ModelInfo:
    """:func:`inspect_tflite` in a child process, for bytes from outside (a push).

    A model that crashes the TFLite runtime (a signal in native code) or holds it past ``timeout_s``
    costs that child, not the caller: it is refused as ``malformed``. The child is forked from
    multiprocessing's fork server, which has this module and the runtime loaded, so a call costs
    about 20 ms (the first one in a process also starts the server, about 0.25 s). The container
    checks run here first: an empty, oversized or foreign file never reaches a child.
    """
    check_container(data, max_bytes)
    context = _isolation_context()
    receive, send = context.Pipe(duplex=False)
    try:
        child = context.Process(
            target=_inspect_in_child,
            args=(send, bytes(data), max_bytes, timeout_s),
            name="edgeward-inspect",
            daemon=True,
        )
        try:
            child.start()
        finally:
            send.close()  # the child's end: with it closed here, a dead child reads as EOF
        outcome = _answer(receive, child, timeout_s, data)
    finally:
        receive.close()
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "invalid":
        raise InvalidModel(*value)
    raise RuntimeError(f"inspecting the model failed in its child process: {value}")


def _answer(receive: Any, child: Any, timeout_s: float, data: bytes) -> tuple[str, Any]:
    """The child's answer; the child is ended and reaped whatever happens."""
    try:
        blob = _read_answer(receive.fileno(), time.monotonic() + timeout_s, timeout_s)
        if blob is not None:  # None: the child died before it answered
            return _decode_answer(blob, data)
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
    if child.exitcode is not None and child.exitcode < 0:  # ended by a signal: the runtime crashed
        raise InvalidModel(
            "malformed", f"the TFLite runtime crashed reading the model ({_ended(child.exitcode)})"
        )
    raise RuntimeError(f"the model's inspection ended without an answer ({_ended(child.exitcode)})")


def _read_answer(fd: int, deadline: float, timeout_s: float) -> bytes | None:
    """The one message the child sends (``Connection.send_bytes``: a 4-byte big-endian length, then
    the bytes), read by ``deadline`` whatever the child does (a child that sends half a message and
    stalls is not waited for); None at EOF. A length beyond ``ANSWER_MAX_BYTES`` refuses the model."""

    def read(n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise InvalidModel("malformed", f"inspecting the model took longer than {timeout_s:g} s")
            chunk = os.read(fd, n - len(out))
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    header = read(4)
    if header is None:
        return None
    (size,) = struct.unpack("!i", header)
    if not 0 <= size <= ANSWER_MAX_BYTES:
        raise InvalidModel("malformed", "the model's inspection answered nonsense")
    return read(size)


# ------------------------------------------------------------------ the child's answer, as data
# The child runs native code on untrusted bytes: were a crafted model to take it over, what it sends
# back must still be harmless. So the answer is JSON of plain values (never a pickle, which the
# reader would execute), read up to ANSWER_MAX_BYTES and checked field by field; the size and digest
# are the parent's own. A well-behaved child never sends anything else: a bad answer refuses the model.

#: The longest answer read from the child (a model's signature, ops and work: a few kB).
ANSWER_MAX_BYTES = 1 << 20
_MAX_TENSORS = 1024
_MAX_RANK = 16
_MAX_TEXT = 1024
_WORK_FIELDS = ("macs", "elements", "mac_layers", "element_layers", "weight_bytes", "io_bytes")


def _encode_answer(kind: str, value: Any) -> bytes:
    if kind == "ok":
        info: ModelInfo = value

        def tensor(t: TensorSpec) -> dict[str, Any]:
            q = t.quantization
            return {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "quantization": None if q is None else [q.scale, q.zero_point],
            }

        work = info.work
        value = {
            "inputs": [tensor(t) for t in info.inputs],
            "outputs": [tensor(t) for t in info.outputs],
            "ops": list(info.ops),
            "dtypes": sorted(info.dtypes),
            "work": None if work is None else {f: getattr(work, f) for f in _WORK_FIELDS},
        }
    return json.dumps([kind, value]).encode()  # a NaN scale is the model's, as in process


def _decode_answer(blob: bytes, data: bytes) -> tuple[str, Any]:
    """The child's answer as ("ok", ModelInfo), ("invalid", (code, detail)) or ("error", text);
    anything else refuses the model (InvalidModel)."""
    try:
        kind, value = json.loads(blob)
        if kind == "ok":
            return kind, _model_info(value, data)
        if kind == "invalid":
            code, detail = value
            return kind, (_text(code), _text(detail))
        if kind == "error":
            return kind, _text(value)
        raise ValueError(f"unknown answer {kind!r}")
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as err:
        log.warning("a model's isolated inspection answered nonsense: %s", str(err)[:200])
        raise InvalidModel("malformed", "the model's inspection answered nonsense") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise ValueError("a text field is not a short string")
    return value


def _count(value: Any, low: int = 0, high: int = 2**63 - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{str(value)[:40]} is not an integer in [{low}, {high}]")
    return value


def _items(value: Any, most: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"not a list of at most {most} items")
    return value


def _tensor(value: Any) -> TensorSpec:
    if not isinstance(value, dict) or set(value) != {"name", "dtype", "shape", "quantization"}:
        raise ValueError("a tensor is not {name, dtype, shape, quantization}")
    dtype = _text(value["dtype"])
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unknown datatype {dtype[:20]!r}")
    shape = tuple(_count(d, -1) for d in _items(value["shape"], _MAX_RANK))
    q = value["quantization"]
    quantization = None
    if q is not None:
        scale, zero_point = _items(q, 2)
        if type(scale) not in (int, float):
            raise ValueError("a quantization scale is not a number")
        quantization = Quantization(float(scale), _count(zero_point, -(2**31), 2**31 - 1))
    return TensorSpec(_text(value["name"]), dtype, shape, quantization)


def _model_info(value: Any, data: bytes) -> ModelInfo:
    if not isinstance(value, dict) or set(value) != {"inputs", "outputs", "ops", "dtypes", "work"}:
        raise ValueError("a model is not {inputs, outputs, ops, dtypes, work}")
    work = value["work"]
    if work is not None:
        if not isinstance(work, dict) or set(work) != set(_WORK_FIELDS):
            raise ValueError(f"the work is not {{{', '.join(_WORK_FIELDS)}}}")
        work = ModelWork(*(_count(work[f]) for f in _WORK_FIELDS))
    return ModelInfo(
        inputs=tuple(_tensor(t) for t in _items(value["inputs"], _MAX_TENSORS)),
        outputs=tuple(_tensor(t) for t in _items(value["outputs"], _MAX_TENSORS)),
        ops=tuple(_text(o) for o in _items(value["ops"], _MAX_TENSORS * 16)),
        dtypes=frozenset(_text(d) for d in _items(value["dtypes"], 64)),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        work=work,
    )


@functools.cache
def _isolation_context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    abi = landlock_abi()
    log.log(
        logging.INFO if abi and seccomp_supported() else logging.WARNING,
        "model inspection children are confined with %s and %s%s",
        f"Landlock ABI {abi}" if abi else "no Landlock (this kernel does not offer it)",
        "seccomp" if seccomp_supported() else "no seccomp (not on this architecture or interpreter)",
        "" if abi else ": they can read what the orchestrator's user can (docs/security.md)",
    )
    if not seccomp_supported():
        log.warning(
            "without seccomp, model inspection children can change the orchestrator user's files "
            "(Landlock, where the kernel offers it, covers some of it) and signal its processes"
        )
    return context


def confine(cpu_s: float) -> Confinement:
    """Narrow what this process can do before it reads untrusted bytes with native code
    (``edgeward.security.confine``): with seccomp it changes no file, opens no socket, runs no
    program and signals no process but itself; with Landlock it reads no file either; in any case
    it grows no file, leaves no core dump and gets ``cpu_s`` of CPU. The interpreter runtime is
    imported first: the child could not read its files afterwards."""
    interpreter_runtime()
    return confine_process(cpu_s)


def _inspect_in_child(send: Any, data: bytes, max_bytes: int, cpu_s: float) -> None:
    try:
        confine(cpu_s)
        outcome: tuple[str, Any] = ("ok", inspect_tflite(data, max_bytes=max_bytes))
    except InvalidModel as err:
        outcome = ("invalid", (err.code, err.detail))
    except Exception as err:  # a bug here, not the model's fault: the caller raises it
        outcome = ("error", f"{type(err).__name__}: {err}")
    try:
        answer = _encode_answer(*outcome)
    except Exception as err:  # a bug here, not the model's fault: the caller raises it
        answer = _encode_answer("error", f"{type(err).__name__}: {err}")
    send.send_bytes(answer)
    send.close()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


# ------------------------------------------------------------------------------------- work


@dataclass(frozen=True, slots=True)
class LayerCost:
    """The work of one op, as an accelerator's timing model needs it.

    ``macs``: multiply-accumulates; ``elements``: elements an elementwise/reduction unit touches;
    ``weight_bytes``: constant operands (weights, biases); activations in and out in bytes.
    """

    op: str
    macs: int
    elements: int
    weight_bytes: int
    input_bytes: int
    output_bytes: int


_MAC_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"}
_VIEW_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS"}


def layer_costs(interpreter: Any) -> tuple[LayerCost, ...]:
    """The work of every op of an interpreter's primary subgraph, from tensor shapes alone.

    Multiply-accumulates for the matrix ops; for the others, one element per input element
    (pooling, reductions, softmax) or output element (elementwise), whichever is larger; none
    for reshapes, which only relabel a buffer.
    """
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    nodes = interpreter._get_ops_details()
    produced = {int(i) for node in nodes for i in node["outputs"]}
    graph_inputs = {int(d["index"]) for d in interpreter.get_input_details()}

    def size(index: int) -> int:
        return int(np.prod(details[index]["shape"], dtype=np.int64))

    def nbytes(index: int) -> int:
        return size(index) * np.dtype(details[index]["dtype"]).itemsize

    costs = []
    for node in nodes:
        op = node["op_name"]
        inputs = [int(i) for i in node["inputs"] if i >= 0]
        outputs = [int(i) for i in node["outputs"]]
        constant = [i for i in inputs if i not in produced and i not in graph_inputs]
        variable = [i for i in inputs if i not in constant]
        out_elements = sum(size(i) for i in outputs)
        macs = elements = 0
        if op in _MAC_OPS and len(inputs) >= 2:
            if op == "TRANSPOSE_CONV":  # inputs: output shape, filter (OC, KH, KW, IC), input
                oc, kh, kw, _ = details[inputs[1]]["shape"]
                macs = size(inputs[2]) * int(kh) * int(kw) * int(oc)
            elif op == "DEPTHWISE_CONV_2D":  # filter (1, KH, KW, OC)
                macs = out_elements * int(np.prod(details[inputs[1]]["shape"][1:3]))
            elif op == "CONV_2D":  # filter (OC, KH, KW, IC)
                macs = out_elements * int(np.prod(details[inputs[1]]["shape"][1:]))
            else:  # FULLY_CONNECTED weights (units, depth); BATCH_MATMUL (..., K, N)
                shape = details[inputs[1]]["shape"]
                macs = out_elements * int(shape[-1] if op == "FULLY_CONNECTED" else shape[-2])
        elif op not in _VIEW_OPS:
            elements = max(out_elements, sum(size(i) for i in variable))
        costs.append(
            LayerCost(
                op=op,
                macs=macs,
                elements=elements,
                weight_bytes=0 if op in _VIEW_OPS else sum(nbytes(i) for i in constant),
                input_bytes=sum(nbytes(i) for i in variable),
                output_bytes=sum(nbytes(i) for i in outputs),
            )
        )
    return tuple(costs)


def model_work(layers: Iterable[LayerCost], io: Iterable[TensorSpec]) -> ModelWork:
    """The totals of ``layers`` and the bytes of the model's inputs and outputs ``io`` (variable
    dimensions taken as 1), as a cost model reads them."""
    layers = tuple(layers)
    io_bytes = sum(
        int(np.prod([max(d, 1) for d in spec.shape], dtype=np.int64)) * spec.numpy_dtype.itemsize
        for spec in io
    )
    return ModelWork(
        macs=sum(layer.macs for layer in layers),
        elements=sum(layer.elements for layer in layers if not layer.macs),
        mac_layers=sum(1 for layer in layers if layer.macs),
        element_layers=sum(1 for layer in layers if not layer.macs and layer.elements),
        weight_bytes=sum(layer.weight_bytes for layer in layers),
        io_bytes=io_bytes,
    )

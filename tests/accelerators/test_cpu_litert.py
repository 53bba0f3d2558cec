"""cpu-litert backend, model inspection and the backend registry, on the committed industrial models
with the real LiteRT interpreter."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from signal import SIGSEGV
from typing import Any

import numpy as np
import pytest
import tiny_models

from accelerators import registry
from accelerators.base import (
    BackendUnavailable,
    InvalidConfig,
    InvalidInput,
    InvalidModel,
    ModelArtifact,
    ModelNotLoaded,
    ModelRefused,
    Quantization,
)
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig, RaplCounter
from accelerators.registry import BackendRegistry
from accelerators.tflite_model import (
    ANSWER_MAX_BYTES,
    _answer,
    _decode_answer,
    _encode_answer,
    inspect_tflite,
    inspect_tflite_isolated,
    interpreter_runtime,
)
from edgeward.security.confine import landlock_abi, seccomp_supported
from usecases import model_path

MODELS = Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models"
F32 = MODELS / "vibration_cnn_f32.tflite"
INT8 = MODELS / "vibration_cnn_int8.tflite"


@pytest.fixture(scope="module")
def f32_bytes() -> bytes:
    return F32.read_bytes()


@pytest.fixture(scope="module")
def int8_bytes() -> bytes:
    return INT8.read_bytes()


@pytest.fixture
def backend() -> Any:
    with CpuLitertBackend(CpuLitertConfig(energy_counter=None)) as created:
        yield created


def bare_invoke(data: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The reference: a bare interpreter with default options, as a user would run it."""
    interpreter = interpreter_runtime().interpreter(model_content=data)
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def bare_invoke_on(interpreter: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def signal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ inference


def test_f32_outputs_equal_bare_interpreter(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
    (spec,) = handle.inputs
    assert (spec.dtype, spec.shape, spec.quantization) == ("FP32", (1, 1024, 1), None)
    for seed in range(3):
        x = signal(spec.shape, seed)
        result = backend.infer(handle, {spec.name: x})
        (expected,) = bare_invoke(f32_bytes, [x])
        (out_spec,) = handle.outputs
        np.testing.assert_array_equal(result.outputs[out_spec.name], expected)
        assert result.latency_s > 0
        assert result.energy_j > 0
        assert result.energy_source == "modelled"


def test_int8_outputs_equal_bare_interpreter(backend: CpuLitertBackend, int8_bytes: bytes) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration-int8", "1", int8_bytes))
    (spec,) = handle.inputs
    assert spec.dtype == "INT8"
    assert isinstance(spec.quantization, Quantization)
    x = np.random.default_rng(1).integers(-128, 127, spec.shape, dtype=np.int8, endpoint=True)
    result = backend.infer(handle, [x])  # positional form
    (expected,) = bare_invoke(int8_bytes, [x])
    (out_spec,) = handle.outputs
    assert out_spec.dtype == "INT8"
    np.testing.assert_array_equal(result.outputs[out_spec.name], expected)


def reference_quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Element by element, in float32, rounding half away from zero (TFLite's QUANTIZE)."""
    out = []
    for value in x.ravel():
        scaled = float(np.float32(value) / np.float32(scale))
        rounded = int(math.copysign(math.floor(abs(scaled) + 0.5), scaled))
        out.append(min(127, max(-128, rounded + zero_point)))
    return np.array(out, dtype=np.int8).reshape(x.shape)


def test_int8_model_accepts_float_input_and_quantizes_it(
    backend: CpuLitertBackend, int8_bytes: bytes
) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration-int8", "1", int8_bytes))
    (spec,) = handle.inputs
    assert spec.quantization is not None
    x = signal(spec.shape, 2) * 4  # wide enough to saturate at both ends
    x.ravel()[:3] = [0.5 * spec.quantization.scale, -1.5 * spec.quantization.scale, 1e6]  # ties, clamp
    quantized = reference_quantize(x, spec.quantization.scale, spec.quantization.zero_point)
    result = backend.infer(handle, {spec.name: x})
    (expected,) = bare_invoke(int8_bytes, [quantized])
    np.testing.assert_array_equal(result.outputs[handle.outputs[0].name], expected)
    # the same call with float64 data gives the same answer
    again = backend.infer(handle, {spec.name: x.astype(np.float64)})
    np.testing.assert_array_equal(again.outputs[handle.outputs[0].name], expected)


@pytest.mark.parametrize(
    ("inputs", "tensor", "problem"),
    [
        (lambda name, x: {name: x.astype(np.float64)}, "serving_default_vibration:0", "dtype float64"),
        (lambda name, x: {name: x.reshape(1, 1024)}, "serving_default_vibration:0", "shape [1, 1024]"),
        (lambda name, x: {name: x[:, :512]}, "serving_default_vibration:0", "expected [1, 1024, 1]"),
        (lambda name, x: {}, "serving_default_vibration:0", "missing"),
        (lambda name, x: {name: x, "extra": x}, "extra", "not an input of the model"),
        (lambda name, x: [], "serving_default_vibration:0", "got 0 inputs"),
        (lambda name, x: [x, x], "#1", "got 2 inputs"),
        (lambda name, x: {name: x.tolist()}, "serving_default_vibration:0", "expected a numpy array"),
        (lambda name, x: {"vibration": x}, "vibration", "not an input of the model"),
        (lambda name, x: x, "<inputs>", "expected arrays by name or in model order, got ndarray"),
        (lambda name, x: iter([x]), "<inputs>", "got list_iterator"),
    ],
    ids=[
        "dtype",
        "rank",
        "size",
        "missing",
        "unexpected",
        "too-few",
        "too-many",
        "not-array",
        "wrong-name",
        "bare-array",
        "iterator",
    ],
)
def test_invalid_inputs_name_the_tensor(
    backend: CpuLitertBackend, f32_bytes: bytes, inputs: Any, tensor: str, problem: str
) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
    name = handle.inputs[0].name
    with pytest.raises(InvalidInput) as caught:
        backend.infer(handle, inputs(name, signal((1, 1024, 1))))
    assert caught.value.tensor == tensor
    assert problem in caught.value.problem


def test_int8_model_refuses_to_quantize_nan(backend: CpuLitertBackend, int8_bytes: bytes) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration-int8", "1", int8_bytes))
    x = signal((1, 1024, 1))
    x[0, 7, 0] = np.nan
    x[0, 8, 0] = np.inf  # infinities saturate like any out-of-range value
    with pytest.raises(InvalidInput, match="NaN"):
        backend.infer(handle, [x])
    x[0, 7, 0] = -np.inf
    backend.infer(handle, [x])


def test_int8_model_rejects_integer_input_of_another_type(
    backend: CpuLitertBackend, int8_bytes: bytes
) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration-int8", "1", int8_bytes))
    with pytest.raises(InvalidInput, match="dtype int32, expected INT8"):
        backend.infer(handle, [np.zeros((1, 1024, 1), np.int32)])


def test_unloaded_handle_and_closed_backend(f32_bytes: bytes) -> None:
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    artifact = ModelArtifact.from_bytes("vibration", "1", f32_bytes)
    handle = backend.load(artifact)
    backend.unload(handle)
    backend.unload(handle)  # idempotent
    with pytest.raises(ModelNotLoaded):
        backend.infer(handle, [signal((1, 1024, 1))])
    kept = backend.load(artifact)
    backend.close()
    with pytest.raises(ModelNotLoaded):
        backend.infer(kept, [signal((1, 1024, 1))])
    with pytest.raises(BackendUnavailable, match="closed"):
        backend.load(artifact)


def test_profile(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    profile = backend.profile(ModelArtifact.from_bytes("vibration", "1", f32_bytes), runs=20)
    assert profile.runs == 20
    assert 0 < profile.p50_ms <= profile.p95_ms
    assert profile.joules_per_inference > 0
    assert profile.energy_source == "modelled"


def test_infer_overhead_against_bare_invoke(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    """The backend's fixed cost per call over a bare set/invoke/get on the same interpreter stays
    small (bench/inference_overhead.py measures it on every use-case model; target 1.10 there,
    a looser bound here against regressions on a shared machine)."""
    handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
    x = signal((1, 1024, 1))
    interpreter = backend._loaded[handle.id].interpreter
    in_index = interpreter.get_input_details()[0]["index"]
    out_index = interpreter.get_output_details()[0]["index"]
    inputs = {handle.inputs[0].name: x}

    def bare() -> None:
        interpreter.set_tensor(in_index, x)
        interpreter.invoke()
        interpreter.get_tensor(out_index)

    def wrapped() -> None:
        backend.infer(handle, inputs)

    def per_call_us(fn: Any, n: int = 200) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - start) / n / 1e3

    per_call_us(bare), per_call_us(wrapped)  # warm up
    ratios = []
    for block in range(20):  # ABBA: adjacent blocks see the same machine load
        first, second = (bare, wrapped) if block % 2 == 0 else (wrapped, bare)
        a, b = per_call_us(first), per_call_us(second)
        ratios.append(b / a if first is bare else a / b)
    ratio = statistics.median(ratios)
    print(f"\ncpu-litert infer / bare invoke: {ratio:.3f}")
    # The target (1.10) is measured by the bench on a quiet machine; here only a gross regression
    # (a fixed cost that doubles a ~30 us call) fails, so a shared, noisy CI box cannot flake it.
    assert ratio < 2.0


def test_modelled_energy_follows_measured_time(f32_bytes: bytes) -> None:
    """With idle = active power, energy is power x measured wall time exactly; with idle = 0 W it
    is the busy time, which the sampled CPU share keeps near the thread's real CPU time."""
    flat = CpuLitertConfig(energy_counter=None, power={"idle_w": 2.0, "active_w": 2.0})
    with CpuLitertBackend(flat) as backend:
        handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
        for _ in range(40):
            result = backend.infer(handle, [signal((1, 1024, 1))])
            assert result.energy_j == pytest.approx(2.0 * result.latency_s, rel=1e-9)
    busy_only = CpuLitertConfig(energy_counter=None, power={"idle_w": 0.0, "active_w": 1.0})
    with CpuLitertBackend(busy_only) as backend:
        handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
        x = signal((1, 1024, 1))
        ratios = []
        for _ in range(400):
            cpu_start = time.thread_time()
            result = backend.infer(handle, [x])
            cpu_s = time.thread_time() - cpu_start  # the call's CPU time, the wrapper's included
            # 1 W while busy, nothing idle: the joules are the modelled busy seconds
            assert 0 < result.energy_j <= result.latency_s * (1 + 1e-9)
            assert result.energy_source == "modelled"
            ratios.append(result.energy_j / cpu_s)
    # a median: a call preempted off the CPU has a long wall time but little CPU time
    assert 0.6 < statistics.median(ratios) < 1.1


def test_dynamic_batch_is_resized_per_call(backend: CpuLitertBackend) -> None:
    data = tiny_models.dynamic_batch_model(np.random.default_rng(3))
    handle = backend.load(ModelArtifact.from_bytes("dynamic", "1", data))
    (spec,) = handle.inputs
    assert spec.shape == (-1, 16)
    rng = np.random.default_rng(4)
    for batch in (3, 1, 5, 5):
        x = rng.integers(-128, 127, (batch, 16), dtype=np.int8, endpoint=True)
        got = backend.infer(handle, {spec.name: x}).outputs[handle.outputs[0].name]
        interpreter = interpreter_runtime().interpreter(model_content=data)
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
        interpreter.allocate_tensors()
        (expected,) = bare_invoke_on(interpreter, [x])
        assert got.shape == (batch, 4)
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(InvalidInput, match=r"shape \[2, 8\], expected \[-1, 16\]"):
        backend.infer(handle, [np.zeros((2, 8), np.int8)])


def test_strided_input_gives_the_same_outputs(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    handle = backend.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
    wide = signal((1, 2048, 1), 6)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    name = handle.outputs[0].name
    got = backend.infer(handle, [strided]).outputs[name]
    np.testing.assert_array_equal(got, backend.infer(handle, [np.ascontiguousarray(strided)]).outputs[name])


# ------------------------------------------------------------------------- refusal and integrity


def test_fp32_only_backend_refuses_int8_model(f32_bytes: bytes, int8_bytes: bytes) -> None:
    with CpuLitertBackend.from_config({"dtypes": ["FP32"], "energy_counter": None}) as fp32_only:
        assert fp32_only.capabilities.dtypes == {"FP32"}
        with pytest.raises(ModelRefused) as caught:
            fp32_only.load(ModelArtifact.from_bytes("vibration-int8", "1", int8_bytes))
        assert caught.value.offending_dtypes == ("INT8",)
        assert caught.value.offending_ops == ()
        assert "INT8" in caught.value.reason
        fp32_only.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))  # still fine


def test_op_allowlist_refuses_other_ops(f32_bytes: bytes) -> None:
    config = {"ops": ["CONV_2D", "RESHAPE"], "energy_counter": None}
    with CpuLitertBackend.from_config(config) as conv_only, pytest.raises(ModelRefused) as caught:
        conv_only.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
    assert caught.value.offending_ops == ("FULLY_CONNECTED", "MEAN", "SOFTMAX")


def test_digest_mismatch_is_refused(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    artifact = ModelArtifact("vibration", "1", f32_bytes, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(InvalidModel) as caught:
        backend.load(artifact)
    assert caught.value.code == "digest_mismatch"


def test_artifact_from_path(backend: CpuLitertBackend, f32_bytes: bytes) -> None:
    artifact = ModelArtifact("vibration", "1", F32, hashlib.sha256(f32_bytes).hexdigest())
    assert "source" not in repr(artifact)
    handle = backend.load(artifact)
    assert handle.sha256 == artifact.sha256


# ------------------------------------------------------------------------------------ inspection


def test_inspect_committed_models(f32_bytes: bytes, int8_bytes: bytes) -> None:
    f32 = inspect_tflite(f32_bytes)
    int8 = inspect_tflite(int8_bytes)
    for info, data in ((f32, f32_bytes), (int8, int8_bytes)):
        assert info.size == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert {"CONV_2D", "FULLY_CONNECTED"} <= set(info.ops)
        assert "DELEGATE" not in info.ops
        assert [s.shape for s in info.inputs] == [(1, 1024, 1)]
    assert f32.dtypes == {"FP32"}
    assert "INT8" in int8.dtypes
    assert int8.inputs[0].quantization is not None
    assert f32.inputs[0].quantization is None


def _mutations(data: bytes) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = [data[:n] for n in (8, 64, len(data) // 2, len(data) - 1)]
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 8))):
            mutated[int(rng.integers(8, len(data)))] = int(rng.integers(0, 256))
        out.append(bytes(mutated))
    return out


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 a zip file, not a model", "not_tflite"),
        (b"1234", "not_tflite"),
        (np.random.default_rng(3).bytes(4096), "not_tflite"),
        (b"\x10\x00\x00\x00TFL3" + np.random.default_rng(4).bytes(4096), "malformed"),
        (b"\x00\x00\x00\x00TFL3", "malformed"),
    ],
    ids=["empty", "zip", "short", "random", "random-with-identifier", "identifier-only"],
)
def test_garbage_is_invalid_model(backend: CpuLitertBackend, data: bytes, code: str) -> None:
    with pytest.raises(InvalidModel) as caught:
        inspect_tflite(data)
    assert caught.value.code == code
    with pytest.raises(InvalidModel):
        backend.load(ModelArtifact.from_bytes("garbage", "1", data))


def test_isolated_inspection_answers_as_the_in_process_one(f32_bytes: bytes, int8_bytes: bytes) -> None:
    """What a push runs (a child process per model) tells the same as inspecting in process, and
    refuses the same files with the same codes; no child is left behind."""
    for data in (f32_bytes, int8_bytes):
        assert inspect_tflite_isolated(data) == inspect_tflite(data)
    for data in (
        b"",
        b"1234",
        b"\x10\x00\x00\x00TFL3" + np.random.default_rng(4).bytes(4096),
        f32_bytes[:-9],
    ):
        with pytest.raises(InvalidModel) as in_process:
            inspect_tflite(data)
        with pytest.raises(InvalidModel) as isolated:
            inspect_tflite_isolated(data)
        assert (isolated.value.code, isolated.value.detail) == (
            in_process.value.code,
            in_process.value.detail,
        )
    assert not multiprocessing.active_children()


def test_a_model_that_crashes_the_runtime_is_refused_and_the_caller_goes_on(int8_bytes: bytes) -> None:
    crasher = bytearray(int8_bytes)
    crasher[8] = 0x08  # one byte of the root table's offsets: found by the fuzz suite
    # In process, the LiteRT interpreter dies on it (shown in a throwaway interpreter, not this one).
    # Should a later runtime read it safely, this fails: find another crasher (tests/fuzz) for the
    # isolation to contain.
    alone = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom accelerators.tflite_model import inspect_tflite\n"
            "inspect_tflite(sys.stdin.buffer.read())",
        ],
        input=bytes(crasher),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert alone.returncode == -SIGSEGV, (alone.returncode, alone.stderr[-500:])
    with pytest.raises(InvalidModel) as caught:
        inspect_tflite_isolated(bytes(crasher))
    assert (caught.value.code, caught.value.detail) == (
        "malformed",
        "the TFLite runtime crashed reading the model (signal SIGSEGV)",
    )
    assert inspect_tflite_isolated(int8_bytes) == inspect_tflite(int8_bytes), "and the next one works"
    assert not multiprocessing.active_children()


def test_isolated_inspection_ends_a_child_past_its_time(int8_bytes: bytes) -> None:
    with pytest.raises(InvalidModel) as caught:
        inspect_tflite_isolated(int8_bytes, timeout_s=0.0)  # no child answers before it started
    assert (caught.value.code, caught.value.detail) == (
        "malformed",
        "inspecting the model took longer than 0 s",
    )
    assert not multiprocessing.active_children(), "the child was ended"
    assert inspect_tflite_isolated(int8_bytes).size == len(int8_bytes), "and the next one works"


def mutated(answer: bytes, change) -> bytes:
    """An honest answer with ``change`` applied to its model description."""
    kind, model = json.loads(answer)
    change(model)
    return json.dumps([kind, model]).encode()


class _Payload:
    """Unpickling this writes a file: what a child taken over by a crafted model might send."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (self.path.write_text, ("the parent ran the child's code",))


def test_a_subverted_childs_answer_is_data_checked_not_code(int8_bytes: bytes, tmp_path: Path) -> None:
    """The child reads untrusted bytes with native code; were it taken over, its answer must not run
    in the parent (a pickle would) nor pass for a model's description unchecked."""
    honest = _encode_answer("ok", inspect_tflite(int8_bytes))
    assert _decode_answer(honest, int8_bytes) == ("ok", inspect_tflite(int8_bytes))
    marker = tmp_path / "ran"
    answers = {
        "a pickle": pickle.dumps(("ok", _Payload(marker))),
        "an unknown datatype": honest.replace(b'"dtype": "INT8"', b'"dtype": "EVIL"', 1),
        "a zero point past int32": mutated(
            honest, lambda m: m["inputs"][0].update(quantization=[0.5, 2**31])
        ),
        "a scale past any float": mutated(honest, lambda m: m["inputs"][0].update(quantization=[10**400, 0])),
        "a count past int64": mutated(honest, lambda m: m["work"].update(macs=2**63)),
        "a negative dimension": mutated(honest, lambda m: m["outputs"][0].update(shape=[-2, 3])),
        "a field missing": b'["ok", {"inputs": []}]',
        "a negative count": honest.replace(b'"macs": ', b'"macs": -', 1),
        "another kind": b'["exec", "print(1)"]',
        "deep nesting": b"[" * 200_000,
        "longer than any answer": b" " * (ANSWER_MAX_BYTES + 1),
    }
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=os.getpid)  # a real child that has ended, as after an answer
    child.start()
    child.join(60)
    for what, blob in answers.items():
        receive, send = context.Pipe(duplex=False)

        def write(blob: bytes = blob, send: Any = send) -> None:
            with contextlib.suppress(BrokenPipeError):  # the reader stopped (an answer too long)
                send.send_bytes(blob)

        sender = threading.Thread(target=write)  # an answer past the pipe's buffer
        sender.start()
        with pytest.raises(InvalidModel) as caught:
            _answer(receive, child, 5.0, int8_bytes)
        receive.close()
        sender.join(30)
        send.close()
        assert (caught.value.code, caught.value.detail) == (
            "malformed",
            "the model's inspection answered nonsense",
        ), what
    assert not marker.exists()
    # Half an answer, the pipe held open: refused at the deadline, not waited for.
    receive, send = context.Pipe(duplex=False)
    os.write(send.fileno(), struct.pack("!i", 100) + b"[" * 10)
    with pytest.raises(InvalidModel) as caught:
        _answer(receive, child, 0.5, int8_bytes)
    assert caught.value.detail == "inspecting the model took longer than 0.5 s"
    receive.close()
    send.close()


_CONFINED_CHILD = """
import errno, fcntl, json, os, resource, socket, sys
from accelerators.tflite_model import confine, inspect_tflite
new, existing, answer = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = sys.stdin.buffer.read()
confinement = confine(30)

def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err.errno))

def write_new():
    with open(new, "wb", buffering=0) as fh:
        fh.write(b"x")

def truncate():
    with open(existing, "r+b") as fh:
        fh.truncate(0)

found = {
    "landlock": confinement.landlock_abi,
    "seccomp": confinement.seccomp,
    "write_new": attempt(write_new),
    "truncate": attempt(truncate),
    "read": attempt(lambda: open(existing, "rb").read()),
    "tcp": attempt(lambda: socket.socket().connect(("127.0.0.1", 9))),
    "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
    "exec": attempt(lambda: os.execv(sys.executable, [sys.executable, "-c", "pass"])),
    "signal": attempt(lambda: os.kill(os.getppid(), 0)),
    "group": attempt(lambda: os.kill(0, 0)),
    "itself": attempt(lambda: os.kill(os.getpid(), 0)),
    "chmod": attempt(lambda: os.chmod(existing, 0o644)),
    "truncate_path": attempt(lambda: os.truncate(existing, 0)),
    "remove": attempt(lambda: os.unlink(existing)),
    "limits": attempt(lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)),
    "own_limits": attempt(lambda: resource.prlimit(0, resource.RLIMIT_NOFILE)),
    "priority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)),
    "sigio_owner": attempt(lambda: fcntl.fcntl(answer, fcntl.F_SETOWN, os.getppid())),
    "inputs": len(inspect_tflite(data).inputs),
}
os.write(answer, json.dumps(found).encode())
"""


def test_the_inspection_child_is_confined(tmp_path: Path, int8_bytes: bytes) -> None:
    """What the child gives up before it reads the model (in a throwaway interpreter: it is for
    good): with seccomp it writes, truncates, removes and re-permissions no file, opens no socket,
    runs no program and signals no process but itself; with Landlock it reads no file either (the
    orchestrator's keys stay out of reach); without either, a write still fails (RLIMIT_FSIZE 0,
    and does not kill it). The model is read all the same, and its output goes nowhere."""
    new, existing = tmp_path / "written", tmp_path / "secret"
    existing.write_bytes(b"the orchestrator's key")
    read, write = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CONFINED_CHILD, str(new), str(existing), str(write)],
            input=int8_bytes,
            pass_fds=(write,),
            capture_output=True,
            timeout=120,
            check=False,
        )
        os.close(write)
        found = json.loads(os.read(read, 10_000))
    finally:
        os.close(read)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == done.stderr == b""
    assert found["inputs"] == 1
    assert existing.read_bytes() == b"the orchestrator's key"
    assert (found["landlock"] > 0) == (landlock_abi() > 0) and found["landlock"] <= landlock_abi()
    assert found["seccomp"] == seccomp_supported()
    assert found["itself"] == "done"  # a signal to itself stays possible (abort)
    if found["seccomp"]:  # first at every call: EPERM, whatever Landlock would say
        assert not new.exists()
        for what in ("write_new", "truncate", "truncate_path", "chmod", "remove", "tcp", "udp", "exec"):
            assert found[what] == "EPERM", (what, found)
        for what in ("signal", "group", "limits", "priority", "sigio_owner"):
            assert found[what] == "EPERM", (what, found)
        assert found["own_limits"] == "done"
    if not found["landlock"]:
        assert found["read"] == "done"
        if not found["seccomp"]:
            assert found["write_new"] == "EFBIG"  # RLIMIT_FSIZE alone
        pytest.skip("this kernel offers no Landlock: the child can read what its user can")
    assert found["read"] == "EACCES"
    if not found["seccomp"]:
        assert not new.exists()
        assert (found["write_new"], found["truncate"], found["remove"]) == ("EACCES", "EACCES", "EACCES")
        if found["landlock"] >= 4:
            assert found["tcp"] == "EACCES"
        if found["landlock"] >= 6:
            assert found["signal"] == "EPERM"


def test_size_cap(f32_bytes: bytes) -> None:
    with pytest.raises(InvalidModel) as caught:
        inspect_tflite(f32_bytes, max_bytes=1024)
    assert caught.value.code == "too_large"


def test_mutated_models_never_escape_as_other_errors(int8_bytes: bytes) -> None:
    outcomes = {"ok": 0, "invalid": 0}
    for data in _mutations(int8_bytes):
        try:
            inspect_tflite(data)
        except InvalidModel:
            outcomes["invalid"] += 1
        else:
            outcomes["ok"] += 1
    assert outcomes["invalid"] > 0
    assert sum(outcomes.values()) == 154


# -------------------------------------------------------------------------------------- energy


def test_rapl_counter_measures_and_wraps(tmp_path: Path, f32_bytes: bytes) -> None:
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999990\n")
    (zone / "max_energy_range_uj").write_text("999999\n")
    counter = RaplCounter.open(zone / "energy_uj")
    assert counter is not None
    try:
        assert counter.read_uj() == 999990
        assert counter.joules(999990, 10) == pytest.approx(20e-6)  # wrapped past 999999
    finally:
        counter.close()
    with CpuLitertBackend(CpuLitertConfig(energy_counter=zone / "energy_uj")) as measured:
        assert measured.energy_measured
        handle = measured.load(ModelArtifact.from_bytes("vibration", "1", f32_bytes))
        result = measured.infer(handle, [signal((1, 1024, 1))])
        assert (result.energy_source, result.energy_j) == ("measured", 0.0)  # the fake never moves


def test_missing_energy_counter_falls_back_to_model(tmp_path: Path) -> None:
    assert RaplCounter.open(tmp_path / "absent" / "energy_uj") is None
    with CpuLitertBackend(CpuLitertConfig(energy_counter=tmp_path / "absent")) as modelled:
        assert not modelled.energy_measured


# ------------------------------------------------------------------------------------ registry


def test_registry_creates_cpu_litert() -> None:
    assert registry.available()["cpu-litert"] == "ok"
    with registry.create("cpu-litert", {"num_threads": 2, "power": {"idle_w": 1, "active_w": 4}}) as created:
        assert isinstance(created, CpuLitertBackend)
        caps = created.capabilities
        assert (caps.kind, caps.simulated, caps.ops) == ("cpu-litert", False, None)
        assert (caps.power.idle_w, caps.power.active_w) == (1, 4)
        assert caps.memory_bytes > 0


def test_registry_rejects_bad_config_and_unknown_kind() -> None:
    with pytest.raises(InvalidConfig) as caught:
        registry.create("cpu-litert", {"num_thread": 2, "power": {"idle_w": 5, "active_w": 1}})
    problems = " | ".join(caught.value.problems)
    assert "num_thread" in problems
    assert "active_w must be >= idle_w" in problems
    with pytest.raises(InvalidConfig, match="unknown datatypes"):
        registry.create("cpu-litert", {"dtypes": ["FP8"]})
    with pytest.raises(BackendUnavailable, match="unknown kind"):
        registry.create("tpu-imaginary")


class _MissingLibrary:
    """A factory whose vendor library is absent."""

    @staticmethod
    def probe() -> str | None:
        return "libimaginary.so not found"

    @staticmethod
    def from_config(config: Any) -> Any:
        raise AssertionError("must not be called")


def test_missing_interpreter_library_reports_unavailable() -> None:
    interpreter_runtime.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for module in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime"):
                patch.setitem(sys.modules, module, None)  # import of these now fails
            status = BackendRegistry().available()["cpu-litert"]
            assert status.startswith("unavailable: neither ai-edge-litert")
            with pytest.raises(BackendUnavailable, match="tflite_runtime"):
                registry.create("cpu-litert")
    finally:
        interpreter_runtime.cache_clear()
    assert registry.available()["cpu-litert"] == "ok"


def test_registry_reports_unavailable_instead_of_raising() -> None:
    """Missing vendor libraries, as built-in targets and explicit registrations (entry points:
    test_registry.py)."""
    reg = BackendRegistry({**registry.BUILTINS, "fpga-missing": "no_such_vendor_sdk:Overlay"}, discover=False)
    reg.register("asic-missing", _MissingLibrary)
    report = reg.available()
    assert report["cpu-litert"] == "ok"
    assert report["asic-missing"] == "unavailable: libimaginary.so not found"
    assert report["fpga-missing"].startswith("unavailable: cannot import no_such_vendor_sdk:Overlay")
    with pytest.raises(BackendUnavailable, match=r"libimaginary\.so"):
        reg.create("asic-missing")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("cpu-litert", CpuLitertBackend)


def test_modelled_timing_is_a_simulated_board_cpu_with_this_interpreters_outputs() -> None:
    """``timing: modelled`` (a board whose CPU is not this machine's): latency and energy from the
    cost model and the power model, whatever this machine's speed; outputs as the real CPU's."""
    data = model_path("industrial", "int8").read_bytes()
    options = {"energy_counter": None, "peak_gops": 5.2, "power": {"idle_w": 2.0, "active_w": 3.0}}
    with (
        CpuLitertBackend.from_config({**options, "timing": "modelled"}) as board,
        CpuLitertBackend.from_config(options) as host,
    ):
        assert board.capabilities.simulated and "simulated" in board.capabilities.device
        assert not host.capabilities.simulated
        work = inspect_tflite(data).work
        assert work is not None and board.capabilities.cost is not None
        latency_s, busy_s = board.capabilities.cost.latency(work)
        assert latency_s == pytest.approx((2 * work.macs + work.elements) / (5.2e9 * 0.145) + 2.5e-6)
        x = np.zeros([d if d > 0 else 1 for d in inspect_tflite(data).inputs[0].shape], np.int8)
        results = []
        for backend in (board, host):
            handle = backend.load(ModelArtifact.from_bytes("v", "1", data))
            results.append(backend.infer(handle, [x]))
        assert results[0].latency_s == latency_s
        assert results[0].energy_j == pytest.approx(2.0 * latency_s + 1.0 * busy_s)
        assert results[0].energy_source == "modelled"
        for name, out in results[1].outputs.items():
            np.testing.assert_array_equal(results[0].outputs[name], out)

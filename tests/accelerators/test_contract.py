"""The backend contract, run against every built-in backend kind with the same model set.

Model set: the committed industrial models (float32 and full-int8), a small int8 graph that
exercises most int8 kernels (CONV_2D, DEPTHWISE_CONV_2D, ADD, MAX_POOL_2D, RESHAPE,
FULLY_CONNECTED, SOFTMAX), and an int8 HARD_SWISH model, which LiteRT runs but neither the int8
overlay nor the Edge TPU has. A backend must load exactly what its capabilities admit and refuse
the rest naming the offending ops and datatypes.

The CPU reference is the LiteRT interpreter with its portable reference kernels
(``BUILTIN_REF``). The simulated accelerators reproduce it exactly on int8 models; cpu-litert
runs LiteRT's optimized kernels (XNNPACK by default), which round differently: its int8 outputs
must stay within ``CPU_INT8_TOLERANCE_LSB`` of the reference (13 LSB measured on the industrial
model) and pick the same class on real windows; its float outputs must match closely.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models

from accelerators import registry
from accelerators.base import (
    NUMPY_DTYPES,
    Backend,
    BackendUnavailable,
    InvalidInput,
    InvalidModel,
    ModelArtifact,
    ModelNotLoaded,
    ModelRefused,
    random_tensor,
)
from accelerators.tflite_model import inspect_tflite, interpreter_runtime
from usecases.industrial import generator as industrial

MODELS = Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models"
KINDS = sorted(registry.BUILTINS)
#: Contract-level options: cpu-litert models its energy here even where RAPL is readable.
OPTIONS: dict[str, dict[str, Any]] = {"cpu-litert": {"energy_counter": None}}
#: Backends whose int8 outputs must equal the CPU reference bit for bit.
EXACT_INT8 = {"fpga-pynq", "asic-edgetpu"}
CPU_INT8_TOLERANCE_LSB = 24


@pytest.fixture(scope="module")
def model_set() -> dict[str, bytes]:
    return {
        "industrial-f32": (MODELS / "vibration_cnn_f32.tflite").read_bytes(),
        "industrial-int8": (MODELS / "vibration_cnn_int8.tflite").read_bytes(),
        "int8-chain": tiny_models.chain_model(np.random.default_rng(2024)),
        "int8-hard-swish": tiny_models.hard_swish_model(),
    }


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    """Real (synthetic) accelerometer windows, float32, two per class."""
    x, _ = industrial.make_dataset(2, seed=99)
    return x


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(kind: str) -> Iterator[Backend]:
    with registry.create(kind, OPTIONS.get(kind, {})) as created:
        yield created


def artifact(name: str, data: bytes) -> ModelArtifact:
    return ModelArtifact.from_bytes(name, "1", data)


def reference_outputs(data: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The CPU reference: LiteRT's reference kernels on the same inputs."""
    runtime = interpreter_runtime()
    interpreter = runtime.interpreter(
        model_content=data, experimental_op_resolver_type=runtime.op_resolver_type.BUILTIN_REF
    )
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def accepts(backend: Backend, data: bytes) -> bool:
    info = inspect_tflite(data)
    return backend.capabilities.why_not(dtypes=info.dtypes, ops=info.ops) is None


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    scaled = x.astype(np.float32) / np.float32(scale)
    return np.clip(np.trunc(scaled + np.copysign(np.float32(0.5), scaled)) + zero_point, -128, 127).astype(
        np.int8
    )


# ---------------------------------------------------------------------------------- capabilities


def test_capabilities_are_coherent(kind: str, backend: Backend) -> None:
    caps = backend.capabilities
    assert caps.kind == kind
    assert backend.kind == kind
    assert caps.dtypes
    assert caps.dtypes <= NUMPY_DTYPES.keys()
    assert caps.ops is None or caps.ops
    assert caps.memory_bytes > 0
    assert caps.peak_gops > 0
    assert 0 <= caps.power.idle_w <= caps.power.active_w
    if caps.simulated:
        assert "simulated" in caps.device  # a simulation always says so


def test_registry_reports_every_kind_available(kind: str) -> None:
    assert registry.available()[kind] == "ok"


# ------------------------------------------------------------------------------- load / refuse


@pytest.mark.parametrize("name", ["industrial-f32", "industrial-int8", "int8-chain", "int8-hard-swish"])
def test_loads_exactly_what_capabilities_admit(
    backend: Backend, model_set: dict[str, bytes], name: str
) -> None:
    data = model_set[name]
    info = inspect_tflite(data)
    expected = backend.capabilities.why_not(dtypes=info.dtypes, ops=info.ops)
    if expected is None:
        handle = backend.load(artifact(name, data))
        assert (handle.kind, handle.sha256) == (backend.kind, info.sha256)
        assert handle.inputs == info.inputs
        assert handle.outputs == info.outputs
        backend.unload(handle)
        return
    with pytest.raises(ModelRefused) as caught:
        backend.load(artifact(name, data))
    assert caught.value.offending_ops == expected.offending_ops
    assert caught.value.offending_dtypes == expected.offending_dtypes
    assert caught.value.event_id == "accelerator.model.refused"


def test_every_backend_refuses_something_or_runs_everything(
    backend: Backend, model_set: dict[str, bytes]
) -> None:
    """The simulated int8 accelerators refuse the float model; the CPU runs every model."""
    refused = {name for name, data in model_set.items() if not accepts(backend, data)}
    if backend.capabilities.ops is None:
        assert refused == set()
    else:
        assert {"industrial-f32", "int8-hard-swish"} <= refused
        assert {"industrial-int8", "int8-chain"}.isdisjoint(refused)


def test_refusal_names_the_ops_a_narrowed_backend_lacks(kind: str, model_set: dict[str, bytes]) -> None:
    data = model_set["industrial-int8"]
    ops = set(inspect_tflite(data).ops)
    with registry.create(kind, OPTIONS.get(kind, {})) as full:
        allowed = (full.capabilities.ops or ops) - {"SOFTMAX", "MEAN"}
    with (
        registry.create(kind, {**OPTIONS.get(kind, {}), "ops": sorted(allowed)}) as narrowed,
        pytest.raises(ModelRefused) as caught,
    ):
        narrowed.load(artifact("vibration", data))
    assert caught.value.offending_ops == ("MEAN", "SOFTMAX")
    assert "SOFTMAX" in caught.value.reason


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x00\x00\x00TFL3", b"not a model at all"], ids=["empty", "truncated", "text"]
)
def test_garbage_is_invalid_model(backend: Backend, data: bytes) -> None:
    with pytest.raises(InvalidModel):
        backend.load(artifact("garbage", data))


# ------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("name", ["industrial-int8", "int8-chain"])
def test_int8_outputs_agree_with_cpu_reference(
    kind: str, backend: Backend, model_set: dict[str, bytes], name: str
) -> None:
    data = model_set[name]
    handle = backend.load(artifact(name, data))
    rng = np.random.default_rng(5)
    for _ in range(8):
        inputs = [random_tensor(spec, rng) for spec in handle.inputs]
        result = backend.infer(handle, inputs)
        for spec, expected in zip(handle.outputs, reference_outputs(data, inputs), strict=True):
            got = result.outputs[spec.name]
            assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
            if kind in EXACT_INT8:
                np.testing.assert_array_equal(got, expected)
            else:
                assert np.abs(got.astype(int) - expected.astype(int)).max() <= CPU_INT8_TOLERANCE_LSB


def test_int8_classes_agree_with_cpu_reference_on_real_windows(
    backend: Backend, model_set: dict[str, bytes], windows: np.ndarray
) -> None:
    """Float windows go in as they come from pre-processing; the backend quantizes them."""
    data = model_set["industrial-int8"]
    handle = backend.load(artifact("vibration", data))
    (spec,) = handle.inputs
    assert spec.quantization is not None
    for window in windows:
        result = backend.infer(handle, {spec.name: window[None]})
        (expected,) = reference_outputs(
            data, [quantize(window[None], spec.quantization.scale, spec.quantization.zero_point)]
        )
        got = result.outputs[handle.outputs[0].name]
        assert int(np.argmax(got)) == int(np.argmax(expected))
        if backend.kind in EXACT_INT8:
            np.testing.assert_array_equal(got, expected)


def test_float_outputs_agree_with_cpu_reference(
    backend: Backend, model_set: dict[str, bytes], windows: np.ndarray
) -> None:
    data = model_set["industrial-f32"]
    if not accepts(backend, data):
        pytest.skip(f"{backend.kind} runs no float32 model (refusal covered above)")
    handle = backend.load(artifact("vibration-f32", data))
    for window in windows[:4]:
        result = backend.infer(handle, [window[None]])
        (expected,) = reference_outputs(data, [window[None]])
        np.testing.assert_allclose(result.outputs[handle.outputs[0].name], expected, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- stats, inputs


def test_stats_are_present_and_positive(backend: Backend, model_set: dict[str, bytes]) -> None:
    handle = backend.load(artifact("vibration", model_set["industrial-int8"]))
    rng = np.random.default_rng(1)
    for _ in range(3):
        result = backend.infer(handle, [random_tensor(spec, rng) for spec in handle.inputs])
        assert result.latency_s > 0
        assert result.energy_j > 0
        assert result.energy_source in ("measured", "modelled")
        if backend.capabilities.simulated:
            assert result.energy_source == "modelled"


def test_invalid_inputs_are_refused(backend: Backend, model_set: dict[str, bytes]) -> None:
    handle = backend.load(artifact("vibration", model_set["industrial-int8"]))
    (spec,) = handle.inputs
    good = np.zeros(spec.shape, np.int8)
    cases: list[tuple[Any, str]] = [
        ({}, spec.name),  # missing
        ({spec.name: good, "extra": good}, "extra"),
        ([good, good], "#1"),
        ([np.zeros((1, 512, 1), np.int8)], spec.name),  # shape
        ([np.zeros(spec.shape, np.int16)], spec.name),  # dtype
        ([good.tolist()], spec.name),  # not an array
        ({"input": good}, "input"),  # as many names as inputs, but not theirs
        (good, "<inputs>"),  # neither by name nor in model order
    ]
    for inputs, tensor in cases:
        with pytest.raises(InvalidInput) as caught:
            backend.infer(handle, inputs)
        assert caught.value.tensor == tensor


# ----------------------------------------------------------------------------------- lifecycle


def test_unload_frees_the_handle(backend: Backend, model_set: dict[str, bytes]) -> None:
    handle = backend.load(artifact("vibration", model_set["industrial-int8"]))
    inputs = [np.zeros(spec.shape, spec.numpy_dtype) for spec in handle.inputs]
    backend.infer(handle, inputs)
    backend.unload(handle)
    with pytest.raises(ModelNotLoaded):
        backend.infer(handle, inputs)
    backend.unload(handle)  # a second unload is a no-op
    again = backend.load(artifact("vibration", model_set["industrial-int8"]))
    assert again.id != handle.id
    backend.infer(again, inputs)


def test_closed_backend_refuses_work(kind: str, model_set: dict[str, bytes]) -> None:
    created = registry.create(kind, OPTIONS.get(kind, {}))
    handle = created.load(artifact("vibration", model_set["industrial-int8"]))
    created.close()
    created.close()  # idempotent
    with pytest.raises(ModelNotLoaded):
        created.infer(handle, [np.zeros(spec.shape, np.int8) for spec in handle.inputs])
    with pytest.raises(BackendUnavailable):
        created.load(artifact("vibration", model_set["industrial-int8"]))


def test_profile_is_sane(backend: Backend, model_set: dict[str, bytes]) -> None:
    profile = backend.profile(artifact("vibration", model_set["industrial-int8"]), runs=5, warmup=1)
    assert profile.runs == 5
    assert 0 < profile.p50_ms <= profile.p95_ms < 10_000
    assert profile.joules_per_inference > 0
    assert profile.energy_source in ("measured", "modelled")


def test_concurrent_inference_is_consistent(backend: Backend, model_set: dict[str, bytes]) -> None:
    data = model_set["int8-chain"]
    handles = [backend.load(artifact(f"chain-{i}", data)) for i in range(2)]
    rng = np.random.default_rng(9)
    inputs = [[random_tensor(spec, rng) for spec in handles[0].inputs] for _ in range(4)]
    expected = [backend.infer(handles[0], x).outputs for x in inputs]
    failures: list[BaseException] = []

    def worker(handle: Any) -> None:
        try:
            for _ in range(5):
                for x, want in zip(inputs, expected, strict=True):
                    got = backend.infer(handle, x).outputs
                    for name, array in want.items():
                        np.testing.assert_array_equal(got[name], array)
        except BaseException as err:  # reported by the main thread
            failures.append(err)

    threads = [
        threading.Thread(target=worker, args=(h,), name=f"contract-{i}") for i, h in enumerate(handles * 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[0]


# ------------------------------------------------------------------------------------ cost model


def test_the_cost_model_predicts_what_a_simulated_backend_reports(
    kind: str, backend: Backend, model_set: dict[str, bytes]
) -> None:
    """What the scheduler predicts before a node has profiled a model (docs/scheduler.md, "Cold
    start") is, for a simulated backend, what the backend itself will report."""
    caps = backend.capabilities
    assert caps.cost is not None
    if not caps.simulated:
        pytest.skip(f"{kind} here reports this machine's time; its cost model is an estimate")
    data = model_set["industrial-int8"]
    work = inspect_tflite(data).work
    assert work is not None and work.macs > 0
    latency_s, busy_s = caps.cost.latency(work)
    profile = backend.profile(artifact("industrial-int8", data), 3)
    assert profile.p95_ms == pytest.approx(latency_s * 1e3, rel=1e-3)
    assert profile.joules_per_inference == pytest.approx(caps.power.energy_j(latency_s, busy_s), rel=1e-3)

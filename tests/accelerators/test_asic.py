"""asic-edgetpu: the compile step's acceptance and refusals, reference math, the datasheet model,
measurements and configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from accelerators import registry
from accelerators.asic_edgetpu import (
    EDGETPU_OPS,
    INTERFACES,
    MEASUREMENT_COMPONENT,
    AsicEdgeTpuBackend,
    AsicEdgeTpuConfig,
    EdgeTpuCompiler,
    EdgeTpuDatasheet,
)
from accelerators.base import InvalidConfig, ModelArtifact, ModelRefused
from accelerators.int8_reference import LayerCost
from accelerators.tflite_model import interpreter_runtime

MODELS = Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models"


@pytest.fixture
def backend() -> Iterator[AsicEdgeTpuBackend]:
    with AsicEdgeTpuBackend() as created:
        yield created


def reference(data: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    runtime = interpreter_runtime()
    interpreter = runtime.interpreter(
        model_content=data, experimental_op_resolver_type=runtime.op_resolver_type.BUILTIN_REF
    )
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


# ---------------------------------------------------------------------------------- compile step


def test_compile_refuses_float_models_listing_datatypes() -> None:
    with pytest.raises(ModelRefused) as caught:
        EdgeTpuCompiler().compile((MODELS / "vibration_cnn_f32.tflite").read_bytes())
    assert caught.value.offending_dtypes == ("FP32",)
    assert caught.value.offending_ops == ()
    assert "only full-integer models compile" in caught.value.reason


def test_compile_refuses_ops_off_the_device_list() -> None:
    with pytest.raises(ModelRefused) as caught:
        EdgeTpuCompiler().compile(tiny_models.hard_swish_model())
    assert caught.value.offending_ops == ("HARD_SWISH",)
    assert caught.value.reason == "asic-edgetpu: cannot compile ops HARD_SWISH"


def test_compile_refuses_dynamic_shapes_and_huge_softmax() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ModelRefused, match="dynamic shapes"):
        EdgeTpuCompiler().compile(tiny_models.dynamic_batch_model(rng))
    with pytest.raises(ModelRefused, match="512 or more classes") as caught:
        EdgeTpuCompiler().compile(tiny_models.softmax_model(rng, (1, 1000)))
    assert caught.value.offending_ops == ("SOFTMAX",)
    EdgeTpuCompiler().compile(tiny_models.softmax_model(rng, (1, 500)))  # below the limit


def test_compile_accepts_int8_models_and_counts_their_work() -> None:
    compiled = EdgeTpuCompiler().compile((MODELS / "vibration_cnn_int8.tflite").read_bytes())
    assert compiled.ops == ("RESHAPE", "CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX")
    assert sum(layer.macs for layer in compiled.layers) == 1_216_640
    assert compiled.io_bytes == 1024 + 4


def test_tanh_is_on_the_edge_tpu_list(backend: AsicEdgeTpuBackend) -> None:
    """Unlike the int8 overlay, the Edge TPU runs TANH: the same model, a different answer."""
    data = tiny_models.tanh_model()
    handle = backend.load(ModelArtifact.from_bytes("tanh", "1", data))
    x = np.arange(-128, 128, 16, dtype=np.int8).reshape(1, 16)
    np.testing.assert_array_equal(
        backend.infer(handle, [x]).outputs[handle.outputs[0].name], reference(data, [x])[0]
    )


@pytest.mark.parametrize(
    "name",
    ["conv", "depthwise", "fully_connected", "add", "pool", "mean", "softmax", "requantize", "chain"],
)
def test_outputs_are_the_cpu_reference(backend: AsicEdgeTpuBackend, name: str) -> None:
    rng = np.random.default_rng(11)
    factory = getattr(tiny_models, f"{name}_model")
    data = factory(rng)
    handle = backend.load(ModelArtifact.from_bytes(name, "1", data))
    for _ in range(5):
        inputs = [rng.integers(-128, 128, spec.shape, dtype=np.int8) for spec in handle.inputs]
        result = backend.infer(handle, inputs)
        for spec, expected in zip(handle.outputs, reference(data, inputs), strict=True):
            np.testing.assert_array_equal(result.outputs[spec.name], expected)


# ----------------------------------------------------------------------------- datasheet model


def test_datasheet_figures_and_latency_model() -> None:
    sheet = EdgeTpuDatasheet()
    assert (sheet.peak_ops_per_s, sheet.active_w) == (4e12, 2.0)  # 4 TOPS at 2 W
    assert sheet.peak_ops_per_s / sheet.active_w == 2e12  # "2 TOPS per watt"
    layers = (
        LayerCost("CONV_2D", macs=1_000_000, elements=0, weight_bytes=10_000, input_bytes=1, output_bytes=1),
        LayerCost("SOFTMAX", macs=0, elements=1000, weight_bytes=0, input_bytes=1, output_bytes=1),
    )
    latency, compute = sheet.latency(layers, io_bytes=5000)
    expected_compute = (2 * 1_000_000 + 1000) / (4e12 * 0.13)
    assert compute == pytest.approx(expected_compute)
    assert latency == pytest.approx(100e-6 + 5000 / 500e6 + expected_compute)
    # Parameters beyond the 8 MiB cache stream over the host link on every inference.
    big = (
        LayerCost(
            "FULLY_CONNECTED", macs=1, elements=0, weight_bytes=9 * 2**20, input_bytes=1, output_bytes=1
        ),
    )
    assert sheet.latency(big, 0)[0] == pytest.approx(100e-6 + 2**20 / 500e6 + 2 / (4e12 * 0.13))


def test_inference_reports_modelled_latency_and_energy(backend: AsicEdgeTpuBackend) -> None:
    data = (MODELS / "vibration_cnn_int8.tflite").read_bytes()
    compiled = EdgeTpuCompiler().compile(data)
    latency, compute = EdgeTpuDatasheet().latency(compiled.layers, compiled.io_bytes)
    handle = backend.load(ModelArtifact.from_bytes("v", "1", data))
    result = backend.infer(handle, [np.zeros((1, 1024, 1), np.int8)])
    assert result.latency_s == pytest.approx(latency)
    assert result.energy_j == pytest.approx(0.5 * latency + (2.0 - 0.5) * compute)
    assert result.energy_source == "modelled"
    profile = backend.profile(ModelArtifact.from_bytes("v", "1", data), runs=3, warmup=0)
    assert profile.p50_ms == pytest.approx(latency * 1e3)
    with AsicEdgeTpuBackend(AsicEdgeTpuConfig(interface="usb3")) as usb:
        slow = usb.infer(
            usb.load(ModelArtifact.from_bytes("v", "1", data)), [np.zeros((1, 1024, 1), np.int8)]
        )
        assert slow.latency_s > result.latency_s
    assert INTERFACES["usb3"].link_bytes_per_s < INTERFACES["pcie"].link_bytes_per_s


def test_capabilities_say_simulated(backend: AsicEdgeTpuBackend) -> None:
    caps = backend.capabilities
    assert caps.simulated
    assert "simulated" in caps.device
    assert caps.dtypes == frozenset({"INT8", "UINT8"})
    assert caps.ops == EDGETPU_OPS
    assert (caps.peak_gops, caps.memory_bytes) == (4000.0, 8 * 2**20)


def test_measurement_is_stable_and_names_the_configuration(backend: AsicEdgeTpuBackend) -> None:
    digest = backend.measurements()[MEASUREMENT_COMPONENT]
    assert len(digest) == 64
    assert digest[:12] in backend.capabilities.device
    with AsicEdgeTpuBackend() as twin:
        assert twin.measurements() == backend.measurements()
    with AsicEdgeTpuBackend(AsicEdgeTpuConfig(interface="usb3")) as usb:
        assert usb.measurements()[MEASUREMENT_COMPONENT] != digest


# -------------------------------------------------------------------------------------- config


def test_config_is_validated() -> None:
    with pytest.raises(InvalidConfig) as caught:
        registry.create(
            "asic-edgetpu", {"interface": "thunderbolt", "ops": ["CONV_2D", "HARD_SWISH"], "tops": 8}
        )
    problems = " | ".join(caught.value.problems)
    assert "interface" in problems
    assert "not Edge TPU ops: ['HARD_SWISH']" in problems
    assert "tops" in problems


def test_narrowed_ops_refuse_with_the_missing_op() -> None:
    with registry.create("asic-edgetpu", {"ops": sorted(EDGETPU_OPS - {"MEAN"})}) as narrowed:
        assert narrowed.capabilities.ops == EDGETPU_OPS - {"MEAN"}
        with pytest.raises(ModelRefused) as caught:
            narrowed.load(
                ModelArtifact.from_bytes("v", "1", (MODELS / "vibration_cnn_int8.tflite").read_bytes())
            )
    assert caught.value.offending_ops == ("MEAN",)

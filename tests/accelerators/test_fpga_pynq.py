"""fpga-pynq: the int8 kernels' bit-exactness op by op, the PYNQ-shaped driver on the simulated
overlay (and on a stand-in ``pynq`` module for the hardware branch), the timing model,
attestation measurements and configuration."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
from tiny_models import PADDING_SAME, PADDING_VALID, RELU, RELU6, RELU_N1_TO_1

from accelerators import fpga_pynq, registry
from accelerators.base import BackendUnavailable, InvalidConfig, ModelArtifact, ModelRefused
from accelerators.fpga_pynq import (
    BOARDS,
    CMD_LOAD,
    CTRL,
    MEASUREMENT_COMPONENT,
    PROGRAM_LEN,
    STATUS_BAD_PROGRAM,
    STATUS_OK,
    FpgaPynqBackend,
    FpgaPynqConfig,
    SimulatedOverlay,
    TimingModel,
    _EngineDriver,
)
from accelerators.int8_reference import (
    SUPPORTED_OPS,
    Int8Program,
    LayerCost,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from accelerators.tflite_model import inspect_tflite, interpreter_runtime

USECASES = Path(__file__).resolve().parents[2] / "usecases"
INT8_USECASE_MODELS = sorted(USECASES.glob("*/models/*int8*.tflite"))


@pytest.fixture
def backend() -> Iterator[FpgaPynqBackend]:
    with FpgaPynqBackend(FpgaPynqConfig(mode="simulated")) as created:
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


def assert_bit_exact(backend: FpgaPynqBackend, data: bytes, runs: int = 12, seed: int = 0) -> None:
    """Random inputs, plus both saturating extremes, against LiteRT's reference kernels."""
    handle = backend.load(ModelArtifact.from_bytes("m", "1", data))
    rng = np.random.default_rng(seed)
    cases = [[np.full(s.shape, v, np.int8) for s in handle.inputs] for v in (-128, 127)]
    cases += [[rng.integers(-128, 128, s.shape, dtype=np.int8) for s in handle.inputs] for _ in range(runs)]
    for inputs in cases:
        result = backend.infer(handle, inputs)
        for spec, expected in zip(handle.outputs, reference(data, inputs), strict=True):
            np.testing.assert_array_equal(result.outputs[spec.name], expected, err_msg=spec.name)
    backend.unload(handle)


# ------------------------------------------------------------------------- bit-exact, op by op

RNG = np.random.default_rng(20251124)
OP_MODELS = {
    "conv-same-per-channel": tiny_models.conv_model(RNG),
    "conv-valid-stride2-per-tensor": tiny_models.conv_model(
        RNG, (1, 10, 7, 5), 8, (3, 2), (2, 2), PADDING_VALID, per_channel=False
    ),
    "conv-5x5-relu6-batch2": tiny_models.conv_model(
        RNG, (2, 8, 8, 4), 6, (5, 5), (2, 1), PADDING_SAME, (1, 1), RELU6
    ),
    "conv-dilated": tiny_models.conv_model(RNG, (1, 9, 9, 3), 8, (3, 3), (1, 1), PADDING_SAME, (2, 2)),
    "conv-relu-n1-to-1": tiny_models.conv_model(
        RNG, (1, 3, 3, 16), 8, activation=RELU_N1_TO_1, padding=PADDING_VALID
    ),
    "conv-1x1-output": tiny_models.conv_model(RNG, (1, 1, 1, 16), 16, (1, 1), activation=RELU),
    "depthwise": tiny_models.depthwise_model(RNG),
    "depthwise-multiplier2-valid-stride2": tiny_models.depthwise_model(
        RNG, (1, 10, 9, 3), 2, (3, 3), (2, 2), PADDING_VALID
    ),
    "fully-connected-per-channel": tiny_models.fully_connected_model(RNG),
    "fully-connected-per-tensor-relu": tiny_models.fully_connected_model(RNG, 2, 64, 10, False, RELU),
    "fully-connected-batch4": tiny_models.fully_connected_model(RNG, 4, 17, 3),
    "add": tiny_models.add_model(RNG),
    "add-broadcast-relu": tiny_models.add_model(RNG, (1, 4, 4, 8), (8,), RELU),
    "average-pool-same": tiny_models.pool_model(RNG),
    "average-pool-valid-relu": tiny_models.pool_model(
        RNG, "AVERAGE_POOL_2D", (2, 5, 5, 2), (3, 3), (1, 1), PADDING_VALID, RELU
    ),
    "max-pool-same": tiny_models.pool_model(RNG, "MAX_POOL_2D"),
    "max-pool-valid": tiny_models.pool_model(RNG, "MAX_POOL_2D", (1, 8, 7, 3), (2, 2), (2, 2), PADDING_VALID),
    "mean-hw": tiny_models.mean_model(RNG),
    "mean-hw-keep-dims": tiny_models.mean_model(RNG, keep_dims=True),
    "mean-3d": tiny_models.mean_model(RNG, (1, 32, 32), (1,)),
    "mean-channels": tiny_models.mean_model(RNG, (2, 3, 3, 4), (3,), True),
    "softmax": tiny_models.softmax_model(RNG),
    "softmax-rows-coarse": tiny_models.softmax_model(RNG, (3, 4), 0.5),
    "softmax-fine-beta": tiny_models.softmax_model(RNG, (2, 6), 0.02, 0.5),
    # 511 classes at most: the reference kernel aborts on near-uniform rows of 512 or more.
    "softmax-500": tiny_models.softmax_model(RNG, (1, 500), 0.05),
    "requantize": tiny_models.requantize_model(RNG),
    "chain": tiny_models.chain_model(RNG),
}


@pytest.mark.parametrize("name", sorted(OP_MODELS))
def test_int8_kernels_are_bit_exact(backend: FpgaPynqBackend, name: str) -> None:
    assert_bit_exact(backend, OP_MODELS[name])


def test_op_models_cover_every_kernel() -> None:
    covered = set().union(*(inspect_tflite(data).ops for data in OP_MODELS.values()))
    assert covered == SUPPORTED_OPS


@pytest.mark.parametrize("path", INT8_USECASE_MODELS, ids=lambda p: p.name)
def test_use_case_models_are_bit_exact_or_refused_by_op(backend: FpgaPynqBackend, path: Path) -> None:
    """Every committed int8 model runs bit-exact, or is refused naming exactly its missing ops."""
    data = path.read_bytes()
    missing = set(inspect_tflite(data).ops) - SUPPORTED_OPS
    if missing:
        with pytest.raises(ModelRefused) as caught:
            backend.load(ModelArtifact.from_bytes(path.stem, "1", data))
        assert set(caught.value.offending_ops) == missing
    else:
        assert_bit_exact(backend, data, runs=10)


# ---------------------------------------------------------------------- fixed-point arithmetic


def gemmlowp_multiply(x: int, multiplier: int, shift: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier, transcribed one integer at a time."""
    left, right = max(shift, 0), max(-shift, 0)
    a = ((x * (1 << left) + 2**31) % 2**32) - 2**31
    if a == multiplier == -(2**31):
        high = 2**31 - 1
    else:
        product = a * multiplier
        nudged = product + (1 << 30 if product >= 0 else 1 - (1 << 30))
        high = int(nudged / 2**31) if abs(nudged) < 2**52 else (abs(nudged) >> 31) * (1 if nudged > 0 else -1)
    mask = (1 << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if remainder > threshold else 0)


def test_multiply_by_quantized_multiplier_matches_scalar_transcription() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [rng.integers(-(2**31), 2**31, 2000), [0, 1, -1, 2**31 - 1, -(2**31), 12345, -12345]]
    ).astype(np.int64)
    for multiplier, shift in [
        (1 << 30, 0),
        (1518500250, -7),
        (2**31 - 1, -31),
        (1073741824, 3),
        (1987654321, -1),
    ]:
        got = multiply_by_quantized_multiplier(x, multiplier, shift)
        expected = [gemmlowp_multiply(int(v), multiplier, shift) for v in x]
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (0.0, (0, 0)),
        (0.5, (1 << 30, 0)),
        (1.0, (1 << 30, 1)),
        (0.75, (1610612736, 0)),
        (2.0**-40, (0, 0)),  # below 2**-31 flushes to zero
        (1 - 2.0**-33, (1 << 30, 1)),  # rounds up to 2**31: halved, shift bumped
    ],
)
def test_quantize_multiplier(real: float, expected: tuple[int, int]) -> None:
    assert quantize_multiplier(real) == expected
    multiplier, shift = quantize_multiplier(real)
    assert math.isclose(multiplier * 2.0 ** (shift - 31), real, rel_tol=2**-30, abs_tol=2**-31)


# ----------------------------------------------------------------------- refusal and the driver


def test_float_model_and_unknown_ops_are_refused(backend: FpgaPynqBackend) -> None:
    float_model = (USECASES / "industrial" / "models" / "vibration_cnn_f32.tflite").read_bytes()
    with pytest.raises(ModelRefused) as caught:
        backend.load(ModelArtifact.from_bytes("f32", "1", float_model))
    assert (caught.value.offending_dtypes, caught.value.offending_ops) == (("FP32",), ())
    assert caught.value.reason.startswith("fpga-pynq: ")
    with pytest.raises(ModelRefused) as caught:
        backend.load(ModelArtifact.from_bytes("tanh", "1", tiny_models.tanh_model()))
    assert caught.value.offending_ops == ("TANH",)
    assert backend.device_memory_used == 0


def test_dynamic_shapes_are_refused(backend: FpgaPynqBackend) -> None:
    with pytest.raises(ModelRefused, match="static shapes"):
        backend.load(ModelArtifact.from_bytes("dyn", "1", tiny_models.dynamic_batch_model(RNG)))


def test_unsupported_fused_activation_is_refused_with_its_op() -> None:
    data = tiny_models.conv_model(np.random.default_rng(1), activation=tiny_models.TANH)
    with pytest.raises(ModelRefused, match="fused activation TANH") as caught:
        Int8Program.compile(data)
    assert caught.value.offending_ops == ("CONV_2D",)


def test_softmax_over_many_classes_saturates_instead_of_aborting() -> None:
    """LiteRT's reference SOFTMAX aborts the process (a TFLITE_CHECK on the final shift) when a
    row of 512 or more near-equal values sums past 2**28 in Q12.19; the engine carries the same
    arithmetic on with the wider shift and gives the right answer, 1/1000 -> 0 -> -128."""
    program = Int8Program.compile(tiny_models.softmax_model(np.random.default_rng(1), (1, 1000), 0.05))
    (uniform,) = program.run([np.full((1, 1000), 127, np.int8)])
    np.testing.assert_array_equal(uniform, np.full((1, 1000), -128, np.int8))
    peaked = np.full((1, 1000), -128, np.int8)
    peaked[0, 7] = 127
    (one_hot,) = program.run([peaked])
    assert one_hot[0, 7] == 127  # exp(-12.75) * 999 is negligible next to exp(0)


def test_device_memory_is_allocated_and_freed(backend: FpgaPynqBackend) -> None:
    data = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    handle = backend.load(ModelArtifact.from_bytes("v", "1", data))
    assert backend.device_memory_used >= len(data) + 1024 + 4  # program, input and output buffers
    backend.unload(handle)
    assert backend.device_memory_used == 0


def test_out_of_device_memory_is_a_refusal_and_leaks_nothing(
    backend: FpgaPynqBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = backend._overlay
    assert isinstance(overlay, SimulatedOverlay)
    data = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    monkeypatch.setattr(overlay.memory, "capacity_bytes", len(data) + 10)  # room for the program only
    with pytest.raises(ModelRefused, match="not enough device memory"):
        backend.load(ModelArtifact.from_bytes("v", "1", data))
    assert backend.device_memory_used == 0


def test_engine_rejects_a_bad_program_at_the_register_level() -> None:
    overlay = SimulatedOverlay(BOARDS["pynq-z2"], SUPPORTED_OPS)
    driver = _EngineDriver(overlay, overlay.allocate)
    garbage = overlay.allocate((64,), np.uint8)
    assert driver.load(7, garbage, 64) == STATUS_BAD_PROGRAM
    model = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    program = overlay.allocate((len(model),), np.uint8)
    program[:] = np.frombuffer(model, np.uint8)
    assert driver.load(7, program, len(model)) == STATUS_OK
    engine = overlay.int8_engine_0
    assert (engine.read(CTRL), engine.read(PROGRAM_LEN)) == (0x6, len(model))  # AP_DONE | AP_IDLE
    assert engine.read(0x10) == CMD_LOAD
    garbage.freebuffer()
    program.freebuffer()
    assert overlay.memory.used_bytes == 0


def test_measurement_is_the_design_digest(backend: FpgaPynqBackend) -> None:
    overlay = backend._overlay
    digest = backend.measurements()[MEASUREMENT_COMPONENT]
    assert digest == hashlib.sha256(overlay.descriptor).hexdigest()
    assert digest[:12] in backend.capabilities.device
    with FpgaPynqBackend(FpgaPynqConfig(mode="simulated")) as twin:
        assert twin.measurements() == backend.measurements()  # stable: a verifier can pin it
    with FpgaPynqBackend(FpgaPynqConfig(mode="simulated", board="zcu104")) as other:
        assert other.measurements()[MEASUREMENT_COMPONENT] != digest
    with FpgaPynqBackend(FpgaPynqConfig(mode="simulated", ops=SUPPORTED_OPS - {"ADD"})) as narrowed:
        assert narrowed.measurements()[MEASUREMENT_COMPONENT] != digest


# ---------------------------------------------------------------------------- hardware branch


class _FakePynq(types.ModuleType):
    """A stand-in ``pynq`` whose Overlay is the simulated one: exercises the hardware branch only."""

    def __init__(self) -> None:
        super().__init__("pynq")
        self.overlays: list[SimulatedOverlay] = []

    def Overlay(self, path: str) -> SimulatedOverlay:
        overlay = SimulatedOverlay(BOARDS["pynq-z2"], SUPPORTED_OPS)
        overlay.bitstream = path  # type: ignore[attr-defined]
        self.overlays.append(overlay)
        return overlay

    def allocate(self, shape: Any, dtype: Any = np.uint8) -> Any:
        return self.overlays[-1].allocate(shape, dtype)


def test_hardware_mode_without_pynq_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynq", None)
    with pytest.raises(BackendUnavailable, match="pynq package is not importable"):
        registry.create("fpga-pynq", {"mode": "hardware", "bitstream": str(tmp_path / "engine.bit")})


def test_auto_mode_without_pynq_simulates_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynq", None)
    with (
        caplog.at_level(logging.WARNING, logger="accelerators.fpga_pynq"),
        FpgaPynqBackend(FpgaPynqConfig(bitstream=tmp_path / "engine.bit")) as created,
    ):
        assert created.simulated
        assert created.capabilities.simulated
        assert "simulated" in created.capabilities.device
    assert "engine.bit" in caplog.text


def test_hardware_branch_drives_the_pynq_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _FakePynq()
    monkeypatch.setitem(sys.modules, "pynq", fake)
    bitstream = tmp_path / "engine.bit"
    bitstream.write_bytes(b"\x00\x09\x0f\xf0 not really a bitstream")
    data = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    with FpgaPynqBackend(FpgaPynqConfig(mode="hardware", bitstream=bitstream)) as created:
        assert not created.simulated
        assert not created.capabilities.simulated
        assert "engine.bit" in created.capabilities.device
        assert created.measurements() == {
            MEASUREMENT_COMPONENT: hashlib.sha256(bitstream.read_bytes()).hexdigest()
        }
        assert fake.overlays[0].bitstream == str(bitstream)  # type: ignore[attr-defined]
        handle = created.load(ModelArtifact.from_bytes("v", "1", data))
        x = np.random.default_rng(4).integers(-128, 128, (1, 1024, 1), dtype=np.int8)
        result = created.infer(handle, [x])
        np.testing.assert_array_equal(result.outputs[handle.outputs[0].name], reference(data, [x])[0])
        assert result.latency_s > 0  # wall time on hardware
        assert result.energy_source == "modelled"
        created.unload(handle)
        assert fake.overlays[0].memory.used_bytes == 0


def test_hardware_mode_needs_a_bitstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynq", _FakePynq())
    with pytest.raises(BackendUnavailable, match="needs a bitstream"):
        FpgaPynqBackend(FpgaPynqConfig(mode="hardware"))


# -------------------------------------------------------------------------------- timing model


def test_timing_model_arithmetic() -> None:
    timing = TimingModel(
        board="test",
        clock_hz=100e6,
        macs_per_cycle=100,
        vector_lanes=10,
        layer_overhead_cycles=50,
        dma_bytes_per_s=1e9,
        invoke_overhead_s=10e-6,
        on_chip_weight_bytes=1000,
        activation_buffer_bytes=10_000,
        static_w=2.0,
        dynamic_w=1.0,
        memory_bytes=2**20,
    )
    layers = (
        LayerCost("CONV_2D", macs=10_000, elements=0, weight_bytes=500, input_bytes=100, output_bytes=100),
        LayerCost("RESHAPE", macs=0, elements=0, weight_bytes=0, input_bytes=100, output_bytes=100),
        LayerCost("SOFTMAX", macs=0, elements=95, weight_bytes=0, input_bytes=100, output_bytes=100),
    )
    estimate = timing.estimate(layers, io_bytes=2000)
    cycles = (100 + 50) + 0 + (10 + 50)
    assert estimate.cycles == cycles
    assert estimate.busy_s == pytest.approx(cycles / 100e6)
    assert estimate.latency_s == pytest.approx(10e-6 + 2000 / 1e9 + cycles / 100e6)
    assert timing.power.energy_j(estimate.latency_s, estimate.busy_s) == pytest.approx(
        2.0 * estimate.latency_s + 1.0 * estimate.busy_s
    )
    # Weights that do not fit on chip stream every inference: the conv layer becomes DMA-bound.
    heavy = (
        LayerCost("CONV_2D", macs=10_000, elements=0, weight_bytes=500_000, input_bytes=1, output_bytes=1),
    )
    assert timing.estimate(heavy, 0).latency_s == pytest.approx(10e-6 + 500_000 / 1e9)
    # Activations that overflow the buffer spill to DDR and back.
    spill = (LayerCost("ADD", macs=0, elements=10, weight_bytes=0, input_bytes=20_000, output_bytes=10_000),)
    assert timing.estimate(spill, 0).latency_s == pytest.approx(10e-6 + 30_000 / 1e9)


def test_simulated_latency_is_the_modelled_board_time(backend: FpgaPynqBackend) -> None:
    data = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    program = Int8Program.compile(data)
    expected = BOARDS["pynq-z2"].estimate(program.layers, 1024 + 4)
    handle = backend.load(ModelArtifact.from_bytes("v", "1", data))
    result = backend.infer(handle, [np.zeros((1, 1024, 1), np.int8)])
    assert result.latency_s == pytest.approx(expected.latency_s)
    assert result.energy_j == pytest.approx(2.0 * expected.latency_s + 1.0 * expected.busy_s)
    # 1.2 M MACs on 128 MACs/cycle at 100 MHz: about 0.1 ms of compute, plus overheads.
    assert 0.1e-3 < result.latency_s < 0.5e-3
    with FpgaPynqBackend(FpgaPynqConfig(mode="simulated", board="zcu104")) as zcu104:
        fast = zcu104.infer(
            zcu104.load(ModelArtifact.from_bytes("v", "1", data)), [np.zeros((1, 1024, 1), np.int8)]
        )
        assert fast.latency_s < result.latency_s


def test_board_figures() -> None:
    assert BOARDS["pynq-z2"].peak_gops == pytest.approx(25.6)
    assert BOARDS["zcu104"].peak_gops == pytest.approx(1228.8)
    for timing in BOARDS.values():
        assert timing.power.idle_w == timing.static_w
        assert timing.power.active_w == timing.static_w + timing.dynamic_w


# ------------------------------------------------------------------------------------- config


def test_config_is_validated() -> None:
    with pytest.raises(InvalidConfig) as caught:
        registry.create("fpga-pynq", {"board": "zcu102", "ops": ["CONV_2D", "LSTM"], "colour": "red"})
    problems = " | ".join(caught.value.problems)
    assert "board" in problems
    assert "no int8 kernel for ['LSTM']" in problems
    assert "colour" in problems


def test_power_override_and_agent_defaults() -> None:
    """The node agent passes its board power in ``power``; it replaces the board figures."""
    with registry.create(
        "fpga-pynq", {"mode": "simulated", "power": {"idle_w": 1.5, "active_w": 4}}
    ) as created:
        assert (created.capabilities.power.idle_w, created.capabilities.power.active_w) == (1.5, 4)


def test_an_engine_that_never_finishes_is_reported_not_waited_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _FakePynq()
    monkeypatch.setitem(sys.modules, "pynq", fake)
    monkeypatch.setattr(fpga_pynq, "COMMAND_TIMEOUT_S", 0.05)
    bitstream = tmp_path / "engine.bit"
    bitstream.write_bytes(b"bits")
    data = (USECASES / "industrial" / "models" / "vibration_cnn_int8.tflite").read_bytes()
    with FpgaPynqBackend(FpgaPynqConfig(mode="hardware", bitstream=bitstream)) as created:
        engine = fake.overlays[0].int8_engine_0
        monkeypatch.setattr(engine, "_start", lambda: None)  # hangs: AP_DONE never comes
        with pytest.raises(BackendUnavailable, match="did not finish"):
            created.load(ModelArtifact.from_bytes("v", "1", data))
        assert fake.overlays[0].memory.used_bytes == 0

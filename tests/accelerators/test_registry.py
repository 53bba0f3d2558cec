"""Third-party backends through real entry points: a distribution's dist-info directory on
sys.path, found by importlib.metadata as an installed package would be."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from accelerators import registry
from accelerators.base import BackendUnavailable, InvalidConfig, ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend
from accelerators.registry import BackendRegistry

MODEL = (
    Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models" / "vibration_cnn_int8.tflite"
)

PLUGIN_MODULES = {
    # A working third-party backend: the CPU backend published under its own kind.
    "good": '''
        from accelerators.cpu_litert import CpuLitertBackend

        class VendorCpuBackend(CpuLitertBackend):
            """A vendor's build of the CPU backend."""

        NOT_A_FACTORY = "a string"
    ''',
    # A vendor library missing on this machine.
    "broken": """
        raise ImportError("libvendor_npu.so.1: cannot open shared object file")
    """,
    # A probe that fails instead of answering, and a constructor that fails on a busy device.
    "faulty": """
        class ProbeCrashes:
            @staticmethod
            def probe():
                raise RuntimeError("driver returned -5")

            @staticmethod
            def from_config(config):
                raise AssertionError("must not be called")

        class DeviceBusy:
            @staticmethod
            def probe():
                return None

            @staticmethod
            def from_config(config):
                raise OSError(16, "Device or resource busy", "/dev/npu0")
    """,
}

ENTRY_POINTS = {
    "vendor-cpu": "{good}:VendorCpuBackend",
    "vendor-npu": "{broken}:NpuBackend",
    "probe-crashes": "{faulty}:ProbeCrashes",
    "device-busy": "{faulty}:DeviceBusy",
    "no-such-attribute": "{good}:Missing",
    "not-a-factory": "{good}:NOT_A_FACTORY",
    "cpu-litert": "{broken}:Shadow",  # a built-in kind: ignored
}


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An installed distribution with one plugin module per case; module names are unique per
    test so that no import is served from an earlier test's sys.modules."""
    suffix = uuid.uuid4().hex[:8]
    modules = {case: f"edgeward_plugin_{case}_{suffix}" for case in PLUGIN_MODULES}
    for case, source in PLUGIN_MODULES.items():
        (tmp_path / f"{modules[case]}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"edgeward_test_plugins_{suffix}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: edgeward-test-plugins-{suffix}\nVersion: 1.0\n"
    )
    lines = [f"{name} = {target.format(**modules)}" for name, target in ENTRY_POINTS.items()]
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import caches
    yield modules
    for name in modules.values():
        sys.modules.pop(name, None)


def test_entry_points_are_discovered_and_failures_reported(plugins: dict[str, str]) -> None:
    reg = BackendRegistry()
    assert set(ENTRY_POINTS) <= set(reg.kinds())
    report = reg.available()
    assert report["vendor-cpu"] == "ok"
    assert report["cpu-litert"] == "ok"  # the built-in, not the shadowing entry point
    assert report["vendor-npu"] == (
        f"unavailable: cannot import {plugins['broken']}:NpuBackend: "
        "libvendor_npu.so.1: cannot open shared object file"
    )
    assert report["probe-crashes"] == "unavailable: probe failed: RuntimeError: driver returned -5"
    assert report["no-such-attribute"].startswith(f"unavailable: cannot import {plugins['good']}:Missing")
    assert report["not-a-factory"] == (
        f"unavailable: {plugins['good']}:NOT_A_FACTORY is not a backend factory (no probe/from_config)"
    )
    assert report["device-busy"] == "ok"  # its probe passes; creating it fails (below)


def test_a_working_plugin_runs_models(plugins: dict[str, str]) -> None:
    reg = BackendRegistry()
    with reg.create("vendor-cpu", {"energy_counter": None}) as backend:
        assert type(backend).__module__ == plugins["good"]
        assert isinstance(backend, CpuLitertBackend)
        handle = backend.load(ModelArtifact.from_bytes("vibration", "1", MODEL.read_bytes()))
        (spec,) = handle.inputs
        result = backend.infer(handle, {spec.name: np.zeros(spec.shape, np.int8)})
        assert result.outputs[handle.outputs[0].name].shape == (1, 4)
        with pytest.raises(InvalidConfig, match="num_thread"):
            reg.create("vendor-cpu", {"num_thread": 2})  # the plugin's config model still applies


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("vendor-npu", "libvendor_npu.so.1"),
        ("probe-crashes", "probe failed: RuntimeError: driver returned -5"),
        ("device-busy", r"cannot create: OSError: \[Errno 16\] Device or resource busy: '/dev/npu0'"),
        ("not-a-factory", "is not a backend factory"),
    ],
)
def test_failing_plugins_raise_backend_unavailable_only(
    plugins: dict[str, str], kind: str, reason: str
) -> None:
    reg = BackendRegistry()
    for _ in range(2):  # the second time from the remembered failure
        with pytest.raises(BackendUnavailable, match=reason) as caught:
            reg.create(kind)
        assert caught.value.kind == kind
    with reg.create("cpu-litert", {"energy_counter": None}) as builtin:  # the rest still works
        assert type(builtin) is CpuLitertBackend


def test_registering_a_kind_an_entry_point_provides_is_an_error(plugins: dict[str, str]) -> None:
    reg = BackendRegistry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("vendor-cpu", CpuLitertBackend)
    reg.register("explicit-cpu", CpuLitertBackend)
    assert reg.available()["explicit-cpu"] == "ok"


def test_without_discovery_only_builtins(plugins: dict[str, str]) -> None:
    assert BackendRegistry(discover=False).kinds() == sorted(registry.BUILTINS)

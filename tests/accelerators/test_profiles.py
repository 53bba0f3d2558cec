"""The hardware profile catalog: required board classes, a source for every figure, agent
configuration that the backends and the node agent accept, and errors for bad catalogs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from accelerators import registry
from accelerators.profiles import CatalogError, Figure, HardwareCatalog, HardwareProfile, load_catalog
from node_agent.config import AgentConfig

SOURCE_KINDS = ("datasheet:", "spec:", "measured:", "derived:", "estimate:")
BUILTIN_CATALOG = Path(__file__).resolve().parents[2] / "accelerators" / "profiles" / "hardware.yaml"


@pytest.fixture(scope="module")
def catalog() -> HardwareCatalog:
    return load_catalog()


def figures(value: Any, path: str = "") -> list[tuple[str, Figure[Any]]]:
    """Every Figure inside a model, with its dotted path."""
    found: list[tuple[str, Figure[Any]]] = []
    if isinstance(value, Figure):
        return [(path, value)]
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += figures(item, f"{path}[{i}]")
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found += figures(getattr(value, name), f"{path}.{name}" if path else name)
    return found


def test_catalog_has_the_required_board_classes(catalog: HardwareCatalog) -> None:
    profiles = list(catalog.profiles.values())

    def kinds(profile: HardwareProfile) -> set[str]:
        return {acc.kind for acc in profile.accelerators}

    assert any(p.labels.get("arch") == "x86_64" for p in profiles), "an x86 microserver"
    assert any(p.labels.get("class") == "sbc" and p.labels.get("arch") == "aarch64" for p in profiles), (
        "a Pi-class board"
    )
    assert any("fpga-pynq" in kinds(p) for p in profiles), "an FPGA board"
    assert any("asic-edgetpu" in kinds(p) for p in profiles), "an ASIC-accelerated board"
    assert {"x86-n100", "rpi4-4gb", "pynq-z2", "zcu104", "coral-devboard"} <= catalog.profiles.keys()


def test_every_figure_cites_its_source(catalog: HardwareCatalog) -> None:
    for name, profile in catalog.profiles.items():
        found = figures(profile)
        assert len(found) >= 9, name  # cpu (4), memory, power (2), per accelerator (3)
        for path, figure in found:
            assert figure.source.startswith(SOURCE_KINDS), f"{name}.{path}: {figure.source!r}"


def test_profiles_carry_cpu_memory_and_power(catalog: HardwareCatalog) -> None:
    for profile in catalog.profiles.values():
        assert profile.name in catalog.profiles
        assert profile.cpu.cores.value >= 1
        assert profile.memory_bytes.value >= 256 * 2**20
        assert 0 < profile.power.idle_w.value <= profile.power.active_w.value
        assert profile.accelerators


@pytest.mark.parametrize("name", ["x86-n100", "rpi4-4gb", "pynq-z2", "zcu104", "coral-devboard"])
def test_accelerator_configs_create_backends_reporting_the_figures(
    catalog: HardwareCatalog, name: str
) -> None:
    profile = catalog[name]
    configs = profile.accelerator_configs()
    assert [c["kind"] for c in configs] == [acc.kind for acc in profile.accelerators]
    for config, spec in zip(configs, profile.accelerators, strict=True):
        options = dict(config["options"])
        if config["kind"] == "cpu-litert":
            options["energy_counter"] = None
        with registry.create(config["kind"], options) as backend:
            caps = backend.capabilities
            assert caps.peak_gops == pytest.approx(spec.peak_gops.value), f"{name} {spec.kind} peak_gops"
            assert (caps.power.idle_w, caps.power.active_w) == (spec.idle_w.value, spec.active_w.value)


def test_agent_settings_are_a_valid_agent_config(catalog: HardwareCatalog) -> None:
    for name, profile in catalog.profiles.items():
        settings = profile.agent_settings()
        config = AgentConfig.model_validate({"node_id": f"node-{name}", **settings})
        assert config.hardware_profile == name
        assert [a.kind for a in config.accelerators] == [a.kind for a in profile.accelerators]
        assert config.power.idle_w == profile.power.idle_w.value
        # The agent adds its board power under "power"; the profile's own entry must win.
        for acc in config.accelerators:
            assert "power" in acc.options


def test_unknown_profile_names_the_known_ones(catalog: HardwareCatalog) -> None:
    with pytest.raises(KeyError, match="known: coral-devboard"):
        catalog["cray-1"]


# ---------------------------------------------------------------------------------- bad catalogs


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _minimal() -> dict[str, Any]:
    return yaml.safe_load(BUILTIN_CATALOG.read_text())


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda c: c["profiles"]["rpi4-4gb"]["cpu"]["cores"].pop("source"), "cpu.cores.source"),
        (lambda c: c["profiles"]["rpi4-4gb"]["power"]["idle_w"].update(value=9.0), "idle_w <= active_w"),
        (
            lambda c: c["profiles"]["pynq-z2"]["accelerators"].append(
                c["profiles"]["pynq-z2"]["accelerators"][0]
            ),
            "accelerator kinds repeat",
        ),
        (
            lambda c: c["profiles"]["rpi4-4gb"]["accelerators"][0]["options"].update(power={"idle_w": 1}),
            "not in options",
        ),
        (lambda c: c["profiles"]["x86-n100"].update(gpu="none"), "gpu"),
        (lambda c: c.update(version=2), "version"),
    ],
    ids=[
        "missing-source",
        "idle-above-active",
        "duplicate-kind",
        "power-in-options",
        "unknown-key",
        "version",
    ],
)
def test_invalid_catalogs_are_refused_with_reasons(tmp_path: Path, mutate: Any, problem: str) -> None:
    data = _minimal()
    mutate(data)
    with pytest.raises(CatalogError) as caught:
        load_catalog(_write(tmp_path, data))
    assert problem in " | ".join(caught.value.problems)


def test_unreadable_catalogs_are_catalog_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(_write(tmp_path, "profiles: [unclosed"))
    with pytest.raises(CatalogError, match="<catalog>"):
        load_catalog(_write(tmp_path, "just a string"))

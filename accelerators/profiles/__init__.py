"""The hardware profile catalog: classes of edge microservers, each figure with its source.

``load_catalog()`` reads and validates ``hardware.yaml`` (or another file); a
``HardwareProfile`` turns into the settings of a node agent running on such a board with
``agent_settings()``, or just its ``accelerators:`` list with ``accelerator_configs()``. Every
accelerator entry carries its power figures into the backend's options, so the backend reports the
accelerator's own power model rather than the agent's board-wide default.

Reading the catalog touches only the file: backends are not imported or created here.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "AcceleratorSpec",
    "CatalogError",
    "CpuSpec",
    "Figure",
    "HardwareCatalog",
    "HardwareProfile",
    "load_catalog",
]

T = TypeVar("T", int, float, str)

_BUILTIN = "hardware.yaml"


class CatalogError(Exception):
    """The catalog file cannot be read or does not validate; ``problems`` lists why."""

    event_id = "accelerator.catalog.invalid"

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"hardware catalog {source}: " + "; ".join(problems))
        self.source = source
        self.problems = tuple(problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Figure(_Strict, Generic[T]):
    """A number (or name) and where it comes from."""

    value: T = Field(title="Value")
    source: str = Field(
        min_length=3, title="Source", description="Datasheet, measurement, derivation or estimate."
    )


class CpuSpec(_Strict):
    """The board's application processor."""

    model: Figure[str]
    cores: Figure[int]
    max_clock_ghz: Figure[float]
    peak_gops: Figure[float] = Field(description="Nominal peak of all cores, GOPS.")


class PowerSpec(_Strict):
    """Board power at the supply, watts."""

    idle_w: Figure[float]
    active_w: Figure[float]

    @model_validator(mode="after")
    def _ordered(self) -> PowerSpec:
        if not 0 <= self.idle_w.value <= self.active_w.value:
            raise ValueError("need 0 <= idle_w <= active_w")
        return self


class AcceleratorSpec(_Strict):
    """One backend on the board: its kind, its options, and the figures it reports."""

    kind: str = Field(min_length=1, description="Registered backend kind.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend options (without power).")
    peak_gops: Figure[float]
    idle_w: Figure[float]
    active_w: Figure[float]

    @model_validator(mode="after")
    def _consistent(self) -> AcceleratorSpec:
        if "power" in self.options:
            raise ValueError("put power in idle_w/active_w, not in options")
        if not 0 <= self.idle_w.value <= self.active_w.value:
            raise ValueError("need 0 <= idle_w <= active_w")
        return self

    def config(self) -> dict[str, Any]:
        """This accelerator as an agent's ``accelerators:`` entry (``kind`` and ``options``)."""
        options = {**self.options, "power": {"idle_w": self.idle_w.value, "active_w": self.active_w.value}}
        if self.kind == "cpu-litert":  # the CPU backend takes its nominal throughput as an option
            options.setdefault("peak_gops", self.peak_gops.value)
        return {"kind": self.kind, "options": options}


class HardwareProfile(_Strict):
    """One class of edge microserver."""

    name: str = Field(default="", description="The profile's key in the catalog (filled in by the loader).")
    description: str = Field(min_length=1)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Scheduler labels for nodes of this class."
    )
    cpu: CpuSpec
    memory_bytes: Figure[int]
    power: PowerSpec
    accelerators: list[AcceleratorSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_kinds(self) -> HardwareProfile:
        kinds = [acc.kind for acc in self.accelerators]
        if len(kinds) != len(set(kinds)):
            raise ValueError(f"accelerator kinds repeat: {kinds}")
        return self

    def accelerator_configs(self) -> list[dict[str, Any]]:
        """The node agent's ``accelerators:`` list for this board (``AcceleratorConfig`` fields)."""
        configs = []
        for acc in self.accelerators:
            entry = acc.config()
            if acc.kind == "cpu-litert":
                entry["options"].setdefault("memory_bytes", self.memory_bytes.value)
            configs.append(entry)
        return configs

    def agent_settings(self) -> dict[str, Any]:
        """The hardware part of a node agent's config: profile name, labels, power, memory, accelerators."""
        return {
            "hardware_profile": self.name,
            "labels": dict(self.labels),
            "power": {"idle_w": self.power.idle_w.value, "active_w": self.power.active_w.value},
            "memory_bytes": self.memory_bytes.value,
            "accelerators": self.accelerator_configs(),
        }


class HardwareCatalog(_Strict):
    """All profiles by name."""

    version: Literal[1]
    profiles: dict[str, HardwareProfile] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _names(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("profiles"), dict):
            data = dict(data)
            data["profiles"] = {
                name: {**profile, "name": name} if isinstance(profile, dict) else profile
                for name, profile in data["profiles"].items()
            }
        return data

    def __getitem__(self, name: str) -> HardwareProfile:
        try:
            return self.profiles[name]
        except KeyError:
            raise KeyError(
                f"no hardware profile {name!r}; known: {', '.join(sorted(self.profiles))}"
            ) from None


def load_catalog(path: Path | None = None) -> HardwareCatalog:
    """The catalog in ``path``, or the one shipped with edgeward; ``CatalogError`` if it is invalid."""
    if path is None:
        resource = importlib.resources.files(__name__) / _BUILTIN
        source, read = f"{__name__}/{_BUILTIN}", resource.read_text
    else:
        source, read = str(path), Path(path).read_text
    try:
        data = yaml.safe_load(read(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CatalogError(source, [f"cannot read: {err}"]) from err
    try:
        return HardwareCatalog.model_validate(data)
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc'])) or '<catalog>'}: {e['msg']}" for e in err.errors()]
        raise CatalogError(source, problems) from err

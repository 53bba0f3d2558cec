"""The demo workloads `edgeward up` deploys: one per use case whose model is committed.

A workload ties a use case's model files, its deployment manifests and its input generator
together. A plain use case has one model and one manifest; a multi-exit use case (automotive)
has one model and one manifest per stage (``usecases/<case>/deployment.yaml`` holds them as
YAML documents, each with ``spec.multiExit``), and clients call the multi-exit model's name
(``target``). `make_inputs(n, seed)` returns model-ready float32 inputs (quantisation, where the
model wants int8, is the client's job and uses the model's published scale and zero point).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from usecases import CASES, model_card, model_path

_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Part:
    """One model of a workload with the manifest that deploys it."""

    model_name: str
    model_version: str
    model_file: Path
    manifest: str

    @property
    def deployment(self) -> str:
        return str(yaml.safe_load(self.manifest)["metadata"]["name"])

    @property
    def multi_exit(self) -> dict | None:
        return yaml.safe_load(self.manifest)["spec"].get("multiExit")


@dataclass(frozen=True)
class Workload:
    case: str
    parts: tuple[Part, ...]
    make_inputs: Callable[[int, int], np.ndarray]

    @property
    def multi_exit(self) -> bool:
        return self.parts[0].multi_exit is not None

    @property
    def target(self) -> str:
        """The model name clients call: the multi-exit model's, or the single model's."""
        mx = self.parts[0].multi_exit
        return str(mx["pipeline"]) if mx else self.parts[0].model_name

    @property
    def entry(self) -> Part:
        """The part that receives client requests (stage 1 of a multi-exit model)."""
        return min(self.parts, key=lambda p: (p.multi_exit or {}).get("stage", 0))

    @property
    def deployment(self) -> str:
        return self.entry.deployment

    @property
    def deployments(self) -> list[str]:
        return [p.deployment for p in self.parts]


def _dataset_inputs(case: str) -> Callable[[int, int], np.ndarray]:
    """Inputs from a use case's ``generator.make_dataset(n_per_class, seed)``."""

    def make(n: int, seed: int) -> np.ndarray:
        generator = importlib.import_module(f"usecases.{case}.generator")
        classes = len(model_card(case)["classes"])
        x, _ = generator.make_dataset(max(1, -(-n // classes)), seed)
        return x[:n]

    return make


def manifests(case: str) -> list[str]:
    """The YAML documents of ``usecases/<case>/deployment.yaml``, one per deployment, as text."""
    text = (_ROOT / case / "deployment.yaml").read_text()
    docs = [d for d in text.split("\n---\n") if yaml.safe_load(d)]
    return docs


def workload(case: str) -> Workload:
    parts = []
    for manifest in manifests(case):
        spec = yaml.safe_load(manifest)["spec"]
        stage = (spec.get("multiExit") or {}).get("stage")
        parts.append(
            Part(
                spec["model"]["name"],
                str(spec["model"]["version"]),
                model_path(case, "int8", stage=stage),
                manifest,
            )
        )
    return Workload(case, tuple(parts), _dataset_inputs(case))


def workloads() -> list[Workload]:
    """Every use case that has a manifest and a committed model."""
    return [workload(case) for case in CASES if (_ROOT / case / "deployment.yaml").exists()]

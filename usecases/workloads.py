"""The demo workloads `edgeward up` deploys: one per use case whose model is committed.

A workload ties a use case's model file, its deployment manifest and its input generator
together; `make_inputs(n, seed)` returns model-ready float32 inputs (quantisation, where the
model wants int8, is the client's job and uses the model's published scale and zero point).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    case: str
    model_name: str
    model_version: str
    model_file: Path
    manifest: str
    make_inputs: Callable[[int, int], np.ndarray]

    @property
    def deployment(self) -> str:
        return yaml.safe_load(self.manifest)["metadata"]["name"]


def _dataset_inputs(case: str) -> Callable[[int, int], np.ndarray]:
    """Inputs from a use case's ``generator.make_dataset(n_per_class, seed)``."""

    def make(n: int, seed: int) -> np.ndarray:
        generator = importlib.import_module(f"usecases.{case}.generator")
        x, labels = generator.make_dataset(1, seed)
        classes = len(set(labels.tolist()))
        x, _ = generator.make_dataset(max(1, -(-n // classes)), seed)
        return x[:n]

    return make


_INPUTS: dict[str, Callable[[int, int], np.ndarray]] = {
    "industrial": _dataset_inputs("industrial"),
    "smart_home": _dataset_inputs("smart_home"),
}


def workloads() -> list[Workload]:
    """Every use case that has a manifest and a committed model."""
    found = []
    for case, make_inputs in _INPUTS.items():
        manifest_path = _ROOT / case / "deployment.yaml"
        if not manifest_path.exists():
            continue
        manifest = manifest_path.read_text()
        spec = yaml.safe_load(manifest)["spec"]["model"]
        from usecases import model_path

        found.append(
            Workload(
                case, spec["name"], str(spec["version"]), model_path(case, "int8"), manifest, make_inputs
            )
        )
    return found

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


def _industrial_inputs(n: int, seed: int) -> np.ndarray:
    generator = importlib.import_module("usecases.industrial.generator")
    per_class = max(1, -(-n // len(generator.Condition)))
    x, _ = generator.make_dataset(per_class, seed)
    return x[:n]


_INPUTS: dict[str, Callable[[int, int], np.ndarray]] = {"industrial": _industrial_inputs}


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

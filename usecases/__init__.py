"""Reference workloads for edgeward: models, generators and cards for three edge use cases.

Each use case lives in its own package (``industrial``, ``smart_home``, ``automotive``) with a
numpy-only ``generator`` for its input data and a ``models/`` folder holding the committed .tflite
files and the ``model_card.json`` that describes them. Models are built offline by
``build_models.py``; nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CASES = ("industrial", "smart_home", "automotive")
VARIANTS = ("float32", "int8")

_ROOT = Path(__file__).resolve().parent


def model_card(case: str) -> dict[str, Any]:
    """The parsed ``model_card.json`` of a use case."""
    if case not in CASES:
        raise ValueError(f"unknown use case {case!r}; expected one of {CASES}")
    return json.loads((_ROOT / case / "models" / "model_card.json").read_text())


def model_path(case: str, variant: str = "int8", stage: int | None = None) -> Path:
    """Path of a committed model file; ``stage`` (1-based) picks a stage of a multi-exit model."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    card = model_card(case)
    if "stages" in card:
        if stage is None:
            raise ValueError(f"{case} is a multi-exit model: pass stage=1..{len(card['stages'])}")
        entry = card["stages"][stage - 1]["variants"][variant]
    elif stage is not None:
        raise ValueError(f"{case} is a single model; it has no stages")
    else:
        entry = card["variants"][variant]
    return _ROOT / case / "models" / entry["file"]

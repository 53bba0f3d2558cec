"""Run the multi-exit sign classifier stage by stage, stopping at the first confident exit.

Each stage is its own .tflite model, so a scheduler may place stages on different accelerators
or nodes; stage k takes the previous stage's feature map and returns its own features and the
class probabilities of exit k, the last stage returns only the final exit. numpy and the
interpreter only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usecases import model_card, model_path
from usecases.runtime import LiteModel

FEATURES = "features"
EXIT_PROBS = "exit_probs"
IMAGE = "image"


@dataclass(frozen=True)
class ExitDecision:
    """The class chosen by a multi-exit run, where it was taken, and what each stage cost."""

    class_index: int
    class_name: str
    exit_index: int  # 1-based
    confidence: float
    stage_seconds: tuple[float, ...]


class MultiExitClassifier:
    """Stages run in order; exit k is taken when its top probability reaches ``thresholds[k-1]``."""

    def __init__(
        self, stage_paths: Sequence[str | Path], thresholds: Sequence[float], class_names: Sequence[str]
    ) -> None:
        if len(thresholds) != len(stage_paths) - 1:
            raise ValueError("need one threshold per early exit (stages - 1)")
        self.stages = [LiteModel(p) for p in stage_paths]
        self.thresholds = tuple(float(t) for t in thresholds)
        self.class_names = tuple(class_names)

    @classmethod
    def from_card(cls, variant: str = "int8") -> MultiExitClassifier:
        """The committed automotive model, with the thresholds chosen at build time."""
        card = model_card("automotive")
        paths = [model_path("automotive", variant, stage=s["stage"]) for s in card["stages"]]
        thresholds = [e["threshold"] for e in card["exits"][:-1]]
        return cls(paths, thresholds, card["classes"])

    def classify(self, x: np.ndarray) -> ExitDecision:
        """Classify one preprocessed crop (``generator.preprocess``: float32 HxWx3 in [0, 1])."""
        value, seconds = x, []
        for k, stage in enumerate(self.stages):
            started = time.perf_counter()
            out = stage(**{stage.inputs[0].name: value})
            seconds.append(time.perf_counter() - started)
            probs = out[EXIT_PROBS]
            top = int(np.argmax(probs))
            last = k == len(self.stages) - 1
            if last or probs[top] >= self.thresholds[k]:
                return ExitDecision(top, self.class_names[top], k + 1, float(probs[top]), tuple(seconds))
            value = out[FEATURES]
        raise AssertionError("unreachable: the last stage always exits")

    def all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Probabilities of every exit for one crop, running all stages (for evaluation)."""
        value, exits = x, []
        for stage in self.stages:
            out = stage(**{stage.inputs[0].name: value})
            exits.append(out[EXIT_PROBS])
            if FEATURES in out:
                value = out[FEATURES]
        return exits

"""Detectors over node telemetry: slowdown attacks on early-exit models.

A DeepSloth-style attack (Hong et al., ICLR 2021) crafts inputs that no early exit is confident
about, so every request runs every stage: latency and energy go up while accuracy looks fine.
Its signature in telemetry is a collapse of the early-exit fraction. :class:`SlowdownDetector`
watches that fraction per (node, model, source) window with a one-sided CUSUM of the binomial
log-likelihood ratio between the clean rate ``p0`` (learned on clean traffic) and a collapsed
rate ``p1 = p0 * (1 - collapse)``. It alarms when the statistic crosses ``threshold``; the
threshold sets the false-alarm rate and is calibrated on clean traffic (see
``bench/slowdown_detection.py``). Windows are processed for many streams at once with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SlowdownAlert:
    """Machine-readable alert: ``id`` is ``detector.slowdown.early_exit_collapse``."""

    stream: Hashable  # (node_id, model, source)
    statistic: float
    early_fraction: float  # in the window that raised it
    baseline: float
    id: str = "detector.slowdown.early_exit_collapse"


@dataclass
class SlowdownDetector:
    """One-sided CUSUM over windows of (early exits, requests) for many streams.

    ``baseline`` is the clean early-exit fraction; ``collapse`` the relative drop to detect
    quickly (0.5: the early fraction halves); ``threshold`` the CUSUM alarm level.
    """

    baseline: float
    collapse: float = 0.5
    threshold: float = 12.0
    min_requests: int = 5
    _index: dict[Hashable, int] = field(default_factory=dict)
    _s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _alarmed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        if not 0.0 < self.baseline < 1.0:
            raise ValueError("baseline early-exit fraction must be in (0, 1)")
        if not 0.0 < self.collapse < 1.0:
            raise ValueError("collapse must be in (0, 1)")
        p0 = self.baseline
        p1 = p0 * (1.0 - self.collapse)
        # log-likelihood ratio of one request: exits early / runs to the end, H1 vs H0
        self._llr_early = math.log(p1 / p0)
        self._llr_late = math.log((1.0 - p1) / (1.0 - p0))

    @classmethod
    def learn(cls, early: Sequence[int], total: Sequence[int], **kw: float) -> SlowdownDetector:
        """A detector whose baseline is the early-exit fraction of clean windows."""
        early_sum, total_sum = float(np.sum(early)), float(np.sum(total))
        if total_sum <= 0:
            raise ValueError("no clean traffic to learn from")
        p0 = min(max(early_sum / total_sum, 1e-3), 1 - 1e-3)
        return cls(baseline=p0, **kw)

    def _rows(self, streams: Sequence[Hashable]) -> np.ndarray:
        rows = np.empty(len(streams), np.int64)
        for i, stream in enumerate(streams):
            row = self._index.get(stream)
            if row is None:
                row = self._index[stream] = len(self._index)
            rows[i] = row
        if len(self._index) > len(self._s):
            grow = max(16, 2 * len(self._index)) - len(self._s)
            self._s = np.r_[self._s, np.zeros(grow)]
            self._alarmed = np.r_[self._alarmed, np.zeros(grow, bool)]
        return rows

    def update(
        self, streams: Sequence[Hashable], early: Sequence[int], total: Sequence[int]
    ) -> list[SlowdownAlert]:
        """Feed one window per stream; returns the alerts raised by this batch (once per episode)."""
        rows = self._rows(streams)
        early_a = np.asarray(early, np.float64)
        total_a = np.asarray(total, np.float64)
        valid = total_a >= self.min_requests
        llr = early_a * self._llr_early + (total_a - early_a) * self._llr_late
        s = np.where(valid, np.maximum(0.0, self._s[rows] + llr), self._s[rows])
        self._s[rows] = s
        fire = (s > self.threshold) & ~self._alarmed[rows]
        # an episode ends when the statistic falls back to zero; then the stream may alarm again
        self._alarmed[rows] = (self._alarmed[rows] | fire) & (s > 0)
        out = []
        for i in np.flatnonzero(fire):
            out.append(
                SlowdownAlert(streams[i], float(s[i]), float(early_a[i] / max(total_a[i], 1)), self.baseline)
            )
        return out

    def statistic(self, stream: Hashable) -> float:
        row = self._index.get(stream)
        return 0.0 if row is None else float(self._s[row])

    def reset(self, stream: Hashable) -> None:
        row = self._index.get(stream)
        if row is not None:
            self._s[row] = 0.0
            self._alarmed[row] = False

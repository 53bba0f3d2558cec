"""Bounded latency statistics for telemetry: a ring of the most recent samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class LatencyWindow:
    """The last ``size`` latencies (ms); percentiles over them, computed with numpy on demand."""

    def __init__(self, size: int = 2048) -> None:
        self._ring = np.zeros(size, dtype=np.float64)
        self._count = 0

    def add(self, value_ms: float) -> None:
        self._ring[self._count % len(self._ring)] = value_ms
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, len(self._ring))

    def percentiles(self, qs: Sequence[float]) -> tuple[float, ...]:
        n = len(self)
        if n == 0:
            return tuple(0.0 for _ in qs)
        return tuple(float(v) for v in np.percentile(self._ring[:n], qs))

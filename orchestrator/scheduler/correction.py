"""Live correction of latency predictions: each node's ``latency_scale`` from its telemetry.

A node's scale is the ratio of the p95 latency it reports for a model (one telemetry window) to the
latency the scheduler predicted for that model there (the node's own profile, else its class's),
averaged geometrically over the models of one batch, smoothed over windows and clamped. The
scheduler multiplies its predictions by it, so a node that serves slower than profiled (throttled,
shared, faulty) scores accordingly for every model.

Latencies under :data:`~.snapshot.LATENCY_FLOOR_MS` count as the floor on both sides of the ratio:
the fixed cost of serving (an executor hop, a gRPC call) makes a sub-millisecond model look many
times slower than its profile, and that ratio must not be applied to a model that takes 30 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .placement import SchedulerError
from .snapshot import LATENCY_FLOOR_MS


@dataclass(frozen=True)
class CorrectionPolicy:
    smoothing: float = 0.5  # weight of a new batch of windows in the moving average
    min_scale: float = 0.5  # a node is never trusted to be more than 2x faster than predicted
    max_scale: float = 100.0

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise SchedulerError("smoothing must be in (0, 1]")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise SchedulerError("need 0 < min_scale <= 1 <= max_scale")


class LatencyCorrection:
    """Per-node latency scales, updated in batches of (node, observed, predicted) windows."""

    def __init__(self, policy: CorrectionPolicy | None = None) -> None:
        self.policy = policy or CorrectionPolicy()
        self._scale: dict[str, float] = {}

    def fold(self, node_ids: Sequence[str], observed_ms: ArrayLike, predicted_ms: ArrayLike) -> int:
        """Fold one batch of windows; returns how many were usable (both figures finite, >= 0)."""
        observed = np.asarray(observed_ms, np.float64)
        predicted = np.asarray(predicted_ms, np.float64)
        if observed.shape != predicted.shape or observed.shape != (len(node_ids),):
            raise SchedulerError("node_ids, observed_ms and predicted_ms must have one entry each")
        usable = np.isfinite(observed) & np.isfinite(predicted) & (observed >= 0) & (predicted >= 0)
        if not usable.any():
            return 0
        ids = np.asarray(node_ids, dtype=object)[usable]
        nodes, row = np.unique(ids, return_inverse=True)
        log_ratio = np.log(np.maximum(observed[usable], LATENCY_FLOOR_MS)) - np.log(
            np.maximum(predicted[usable], LATENCY_FLOOR_MS)
        )
        ratio = np.exp(np.bincount(row, weights=log_ratio) / np.bincount(row))
        # A node's first windows set its scale outright; later ones move it by ``smoothing``.
        previous = np.array([self._scale.get(n, np.nan) for n in nodes])
        a = self.policy.smoothing
        smoothed = np.where(np.isnan(previous), ratio, (1 - a) * previous + a * ratio)
        scale = np.clip(smoothed, self.policy.min_scale, self.policy.max_scale)
        self._scale.update(zip(nodes.tolist(), scale.tolist(), strict=True))
        return int(usable.sum())

    def scale(self, node_id: str) -> float:
        return self._scale.get(node_id, 1.0)

    def scales(self) -> dict[str, float]:
        return dict(self._scale)

    def retain(self, node_ids: Iterable[str]) -> None:
        """Forget the nodes not in ``node_ids`` (gone from the fleet)."""
        keep = set(node_ids)
        for node_id in [n for n in self._scale if n not in keep]:
            del self._scale[node_id]

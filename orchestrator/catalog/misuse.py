"""Invocation counts per model per node, and alerts on use outside the expected pattern.

Agents report a cumulative inference count per model version in their telemetry. Every
``window_s`` the monitor takes those counts for every (node, model, version) series at once and
works on arrays: the window's rate, an exponential moving baseline per series, and two alerts:

* ``alert.misuse.wiped_model`` (error): a series that was wiped from a node counts up again;
* ``alert.misuse.rate`` (warning): a window's rate above ``rate_factor`` x the series' baseline
  and above ``min_rate_per_s``, once the series has ``warmup_windows`` behind it. It alerts once,
  then again only after the rate came back under the threshold; an alerting window does not feed
  the baseline, so a sustained surge cannot teach itself to be normal.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np

from edgeward.v1 import node_pb2
from edgeward.wire import MAX_MODEL_STATS

from ..events import ERROR, WARNING
from .config import MisuseConfig

log = logging.getLogger(__name__)

Series = tuple[str, str, str]  # node, model, version
#: Series a node's reports may open (a wipe always opens its own). Series are never forgotten, so
#: without a bound a node naming new models in every report grew the monitor without end.
#: A node reports at most MAX_MODEL_STATS at once; four times that leaves room for versions coming
#: and going over a long uptime (series are not forgotten), none for names made up without end.
MAX_SERIES_PER_NODE = 4 * MAX_MODEL_STATS
Publish = Callable[..., object]


class InvocationMonitor:
    def __init__(self, config: MisuseConfig, publish: Publish) -> None:
        self.config = config
        self._publish = publish
        self._index: dict[Series, int] = {}
        self._series: list[Series] = []
        self._count = np.zeros(0, np.int64)  # last count seen
        self._baseline = np.zeros(0, np.float64)  # rate per second
        self._windows = np.zeros(0, np.int64)
        self._alerting = np.zeros(0, bool)
        # monotonic time from which a series counting up alerts; 0 = not wiped
        self._wiped_at = np.zeros(0, np.float64)
        self._wiped_ref = np.zeros(0, np.int64)
        self._wiped_alerted = np.zeros(0, bool)
        self._last: float | None = None
        self._of_node: Counter[str] = Counter()  # series per node, bounded by MAX_SERIES_PER_NODE
        self.alerts = 0
        self.untracked = 0  # reported series beyond a node's bound, not tracked

    _ARRAYS = ("_count", "_baseline", "_windows", "_alerting", "_wiped_at", "_wiped_ref", "_wiped_alerted")

    def _row(self, series: Series) -> int:
        row = self._index.get(series)
        if row is None:
            row = self._index[series] = len(self._series)
            self._of_node[series[0]] += 1
            self._series.append(series)
            if row >= len(self._count):  # grow every array by doubling: amortised O(1) per series
                size = max(64, 2 * len(self._count))
                for name in self._ARRAYS:
                    old = getattr(self, name)
                    new = np.zeros(size, old.dtype)
                    new[: len(old)] = old
                    setattr(self, name, new)
                self._count[row:] = -1
        return row

    def wiped(self, node_id: str, model: str, version: str, after: float) -> None:
        """From monotonic time ``after`` on, any new invocation of this series on this node alerts.
        Counts reported until then (telemetry already in flight) only move the reference."""
        row = self._row((node_id, model, version))
        self._wiped_at[row] = after
        self._wiped_ref[row] = max(int(self._count[row]), 0)
        self._wiped_alerted[row] = False

    def counts(self, node_id: str) -> dict[tuple[str, str], int]:
        return {
            (m, v): int(self._count[r])
            for (n, m, v), r in self._index.items()
            if n == node_id and self._count[r] >= 0
        }

    def tick(self, now: float, reports: dict[str, list[node_pb2.ModelStats]]) -> None:
        """Feed the latest per-node model stats; evaluates once per window."""
        if self._last is not None and now - self._last < self.config.window_s:
            return
        dt = None if self._last is None else now - self._last
        self._last = now
        rows = []
        counts = []
        for node_id, stats in reports.items():
            for s in stats:
                series = (node_id, s.model_name, s.model_version)
                if series not in self._index and self._of_node[node_id] >= MAX_SERIES_PER_NODE:
                    self.untracked += 1  # names a node made up, one report after the other
                    continue
                rows.append(self._row(series))
                counts.append(s.inferences)
        if not rows:
            return
        idx = np.asarray(rows, np.int64)
        cur = np.asarray(counts, np.int64)
        prev = self._count[idx]
        seen = prev >= 0
        # A count that went down is an agent restart: its new count is all new work.
        delta = np.where(cur >= prev, cur - prev, cur)
        self._count[idx] = cur
        if dt is not None and dt > 0:
            self._rates(idx[seen], delta[seen] / dt)
        self._wiped_check(idx, cur, now)

    def _rates(self, idx: np.ndarray, rate: np.ndarray) -> None:
        cfg = self.config
        base = self._baseline[idx]
        warm = self._windows[idx] >= cfg.warmup_windows
        over = warm & (rate > cfg.rate_factor * base) & (rate > cfg.min_rate_per_s)
        new = over & ~self._alerting[idx]
        self._alerting[idx] = over
        calm = ~over
        first = self._windows[idx] == 0
        updated = np.where(first, rate, (1 - cfg.baseline_alpha) * base + cfg.baseline_alpha * rate)
        self._baseline[idx] = np.where(calm, updated, base)
        self._windows[idx] += calm
        for k in np.flatnonzero(new):
            node, model, version = self._series[idx[k]]
            self.alerts += 1
            self._publish(
                "alert.misuse.rate",
                f"node/{node}",
                f"{model}:{version} invoked at {rate[k]:.1f}/s, {rate[k] / max(base[k], 1e-9):.1f}x its "
                f"baseline of {base[k]:.1f}/s",
                WARNING,
                model=f"{model}:{version}",
                rate_per_s=round(float(rate[k]), 2),
                baseline_per_s=round(float(base[k]), 2),
            )

    def _wiped_check(self, idx: np.ndarray, cur: np.ndarray, now: float) -> None:
        at = self._wiped_at[idx]
        wiped = at > 0
        settling = wiped & (now < at)
        self._wiped_ref[idx[settling]] = cur[settling]
        fire = wiped & ~settling & (cur > self._wiped_ref[idx]) & ~self._wiped_alerted[idx]
        for k in np.flatnonzero(fire):
            row = idx[k]
            node, model, version = self._series[row]
            self._wiped_alerted[row] = True
            self.alerts += 1
            self._publish(
                "alert.misuse.wiped_model",
                f"node/{node}",
                f"{model}:{version} was wiped from this node and is invoked again "
                f"({int(cur[k] - self._wiped_ref[row])} new invocations)",
                ERROR,
                model=f"{model}:{version}",
                invocations=int(cur[k] - self._wiped_ref[row]),
            )

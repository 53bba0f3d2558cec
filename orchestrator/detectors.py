"""Detectors over node telemetry: slowdown attacks on early-exit models.

A DeepSloth-style attack (Hong et al., ICLR 2021) crafts inputs that no early exit is confident
about, so every request runs every stage: latency and energy go up while accuracy looks fine.
Its signature in telemetry is a collapse of the early-exit fraction. :class:`SlowdownDetector`
watches that fraction per (node, model, source) window with a one-sided CUSUM of the binomial
log-likelihood ratio between the clean rate ``p0`` (learned on clean traffic) and a collapsed
rate ``p1 = p0 * (1 - collapse)``. It alarms when the statistic crosses ``threshold``; the
threshold sets the false-alarm rate and is calibrated on clean traffic (see
``bench/slowdown_detection.py``). Windows are processed for many streams at once with numpy.

:class:`SlowdownGuard` runs it on live telemetry: per multi-exit model it learns the clean
early-exit rate from the first ``learn_requests`` requests fleet-wide, then tests every (node,
model, source) stream of that model in one vectorised update per telemetry batch. An alarm becomes
the event ``alert.slowdown`` and, with mitigation on, a ``Mitigate`` command for that node (rate
limit and/or latency budget for that source), reported as ``mitigation.applied``; when the
statistic falls back to zero the alert clears (``alert.slowdown.cleared``) and the mitigation is
lifted (``mitigation.lifted``). Exits forced by the budget count as not early, so a mitigated
attack keeps its alarm until the source's traffic is clean again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from edgeward.v1 import node_pb2

from .config import SlowdownConfig
from .telemetry import ExitWindows

log = logging.getLogger(__name__)

#: The streams the guard watches: (node id, model name:version, request source).
Stream = tuple[str, str, str]


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
    _free: list[int] = field(default_factory=list)  # rows of forgotten streams, to reuse
    _s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _alarmed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    _cleared: list[Hashable] = field(default_factory=list)

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
    def learn(
        cls,
        early: Sequence[int],
        total: Sequence[int],
        *,
        collapse: float = 0.5,
        threshold: float = 12.0,
        min_requests: int = 5,
    ) -> SlowdownDetector:
        """A detector whose baseline is the early-exit fraction of clean windows."""
        early_sum, total_sum = float(np.sum(early)), float(np.sum(total))
        if total_sum <= 0:
            raise ValueError("no clean traffic to learn from")
        p0 = min(max(early_sum / total_sum, 1e-3), 1 - 1e-3)
        return cls(baseline=p0, collapse=collapse, threshold=threshold, min_requests=min_requests)

    def _rows(self, streams: Sequence[Hashable]) -> np.ndarray:
        rows = np.empty(len(streams), np.int64)
        for i, stream in enumerate(streams):
            row = self._index.get(stream)
            if row is None:
                # Without free rows, the rows in use are exactly 0 .. len(_index) - 1.
                row = self._index[stream] = self._free.pop() if self._free else len(self._index)
            rows[i] = row
        if len(self._index) > len(self._s):
            grow = max(16, 2 * len(self._index)) - len(self._s)
            self._s = np.r_[self._s, np.zeros(grow)]
            self._alarmed = np.r_[self._alarmed, np.zeros(grow, bool)]
        return rows

    def update(
        self,
        streams: Sequence[Hashable],
        early: Sequence[int] | np.ndarray,
        total: Sequence[int] | np.ndarray,
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
        was = self._alarmed[rows]
        self._alarmed[rows] = (was | fire) & (s > 0)
        self._cleared.extend(streams[int(i)] for i in np.flatnonzero(was & (s <= 0)))
        out = []
        for i in np.flatnonzero(fire):
            out.append(
                SlowdownAlert(
                    streams[int(i)], float(s[i]), float(early_a[i] / max(total_a[i], 1)), self.baseline
                )
            )
        return out

    def pop_cleared(self) -> list[Hashable]:
        """Streams whose alarm episode ended (statistic back to zero) since the last call."""
        cleared, self._cleared = self._cleared, []
        return cleared

    def statistic(self, stream: Hashable) -> float:
        row = self._index.get(stream)
        return 0.0 if row is None else float(self._s[row])

    def reset(self, stream: Hashable) -> None:
        row = self._index.get(stream)
        if row is not None:
            self._s[row] = 0.0
            self._alarmed[row] = False

    def forget(self, stream: Hashable) -> None:
        """Drop a stream's state (its node no longer reports it); its row is reused."""
        self.reset(stream)
        row = self._index.pop(stream, None)
        if row is not None:
            self._free.append(row)


# ------------------------------------------------------------------------------ live telemetry


@dataclass(frozen=True)
class Notice:
    """An event for the orchestrator's bus: ``bus.publish(kind, subject, message, severity, **attributes)``."""

    kind: str
    subject: str
    message: str
    severity: node_pb2.Severity
    attributes: dict[str, Any]


@dataclass
class GuardDecision:
    notices: list[Notice] = field(default_factory=list)
    #: node id -> that node's full set of mitigations, for nodes whose set changed
    mitigations: dict[str, list[node_pb2.Mitigation]] = field(default_factory=dict)


class SlowdownGuard:
    """Slowdown detection on live exit telemetry, with alerts and mitigations (see module doc)."""

    def __init__(self, config: SlowdownConfig) -> None:
        self.config = config
        self.detectors: dict[str, SlowdownDetector] = {}
        self._learning: dict[str, np.ndarray] = {}  # model -> [early, total] of clean traffic
        self._active: dict[str, dict[tuple[str, str], node_pb2.Mitigation]] = {}
        self.alerts = 0

    def observe(
        self, windows: ExitWindows, serving: Callable[[str, str], bool] = lambda node, model: True
    ) -> GuardDecision:
        """Update the detectors with one set of windows. A model's clean baseline is learned only
        from the streams of nodes that ``serving(node, model)`` says serve it: any node may report
        exit counts of any model name, and a node that serves none could otherwise teach the
        detector a baseline that flags honest traffic, or hides a real attack."""
        decision = GuardDecision()
        self._forget(windows)
        if not self.config.enabled or not len(windows):
            return decision
        models = np.array([s[1] for s in windows.streams])
        names, inverse = np.unique(models, return_inverse=True)
        for k, model in enumerate(names.tolist()):
            sel = np.flatnonzero(inverse == k)
            early, total = windows.early[sel], windows.total[sel]
            det = self.detectors.get(model)
            if det is None:
                real = np.fromiter((serving(windows.streams[i][0], model) for i in sel), bool, len(sel))
                self._learn(model, early[real], total[real])
                continue
            streams = [windows.streams[i] for i in sel]
            for alert in det.update(streams, early, total):
                self._raise(alert, decision)
            for stream in det.pop_cleared():
                self._clear(cast(Stream, stream), det, decision)
        return decision

    def _forget(self, windows: ExitWindows) -> None:
        """Drop the state of the streams (and models) the telemetry forgot: a node at its bound of
        streams stopped reporting them (telemetry.ExitCounters). A mitigation of such a stream is
        forgotten too; the node's set is sent again with its next change."""
        for node, model, source in windows.forgotten:
            det = self.detectors.get(model)
            if det is not None:
                det.forget((node, model, source))
            active = self._active.get(node)
            if active is not None:
                active.pop((model, source), None)
                if not active:
                    del self._active[node]
        for model in windows.forgotten_models:
            self.detectors.pop(model, None)
            self._learning.pop(model, None)

    def _learn(self, model: str, early: np.ndarray, total: np.ndarray) -> None:
        cfg = self.config
        pinned = cfg.baselines.get(model)
        if pinned is not None:  # the operator's figure: nothing to learn, nobody to teach it
            self.detectors[model] = SlowdownDetector(
                baseline=pinned, collapse=cfg.collapse, threshold=cfg.threshold, min_requests=cfg.min_requests
            )
            log.info("slowdown detector on %s armed: clean early-exit rate %.3f (pinned)", model, pinned)
            return
        seen = self._learning.setdefault(model, np.zeros(2, np.int64))
        seen += (int(early.sum()), int(total.sum()))
        if seen[1] < cfg.learn_requests:
            return
        self.detectors[model] = SlowdownDetector.learn(
            [int(seen[0])],
            [int(seen[1])],
            collapse=cfg.collapse,
            threshold=cfg.threshold,
            min_requests=cfg.min_requests,
        )
        del self._learning[model]
        log.info(
            "slowdown detector on %s armed: clean early-exit rate %.3f from %d requests",
            model,
            self.detectors[model].baseline,
            int(seen[1]),
        )

    def _raise(self, alert: SlowdownAlert, decision: GuardDecision) -> None:
        node, model, source = cast(Stream, alert.stream)
        self.alerts += 1
        decision.notices.append(
            Notice(
                "alert.slowdown",
                f"node/{node}",
                f"early exits of {model} from source {source} on {node} collapsed: "
                f"{alert.early_fraction:.0%} in the last window vs {alert.baseline:.0%} on clean traffic",
                node_pb2.SEVERITY_WARNING,
                {
                    "node": node,
                    "model": model,
                    "source": source,
                    "early_fraction": f"{alert.early_fraction:.4f}",
                    "baseline": f"{alert.baseline:.4f}",
                    "statistic": f"{alert.statistic:.2f}",
                    "detector": alert.id,
                },
            )
        )
        m = self.config.mitigation
        if not m.enabled or (m.rate_limit_rps <= 0 and m.latency_budget_ms <= 0):
            return
        mitigation = node_pb2.Mitigation(
            model_name=model,
            source=source,
            rate_limit_rps=m.rate_limit_rps,
            latency_budget_ms=m.latency_budget_ms,
            reason="alert.slowdown",
        )
        self._active.setdefault(node, {})[(model, source)] = mitigation
        decision.mitigations[node] = list(self._active[node].values())
        actions = []
        if m.rate_limit_rps > 0:
            actions.append(f"rate limit {m.rate_limit_rps:g} req/s")
        if m.latency_budget_ms > 0:
            actions.append(f"forced exit within {m.latency_budget_ms:g} ms")
        decision.notices.append(
            Notice(
                "mitigation.applied",
                f"node/{node}",
                f"{' and '.join(actions)} for source {source} of {model} on {node}",
                node_pb2.SEVERITY_WARNING,
                {
                    "node": node,
                    "model": model,
                    "source": source,
                    "rate_limit_rps": m.rate_limit_rps,
                    "latency_budget_ms": m.latency_budget_ms,
                    "reason": "alert.slowdown",
                },
            )
        )

    def _clear(self, stream: tuple[str, str, str], det: SlowdownDetector, decision: GuardDecision) -> None:
        node, model, source = stream
        decision.notices.append(
            Notice(
                "alert.slowdown.cleared",
                f"node/{node}",
                f"early exits of {model} from source {source} on {node} are back to the clean rate",
                node_pb2.SEVERITY_INFO,
                {"node": node, "model": model, "source": source, "baseline": f"{det.baseline:.4f}"},
            )
        )
        active = self._active.get(node, {})
        if active.pop((model, source), None) is not None:
            decision.mitigations[node] = list(active.values())
            decision.notices.append(
                Notice(
                    "mitigation.lifted",
                    f"node/{node}",
                    f"mitigation for source {source} of {model} on {node} lifted",
                    node_pb2.SEVERITY_INFO,
                    {"node": node, "model": model, "source": source},
                )
            )

    def mitigations(self, node: str) -> list[node_pb2.Mitigation]:
        """The node's current set (re-sent when it reconnects)."""
        return list(self._active.get(node, {}).values())

"""Bounded in-memory time series of node telemetry, ingested in batches.

Every node gets a row in fixed-size numpy rings (the last ``RAW_SLOTS`` raw samples and the last
``ROLLUP_SLOTS`` one-minute roll-ups). Samples decoded from MQTT are queued and written in one
vectorised step per flush, so ingest costs a few array operations per batch, not a Python loop
per node per metric. Memory is bounded: rows x slots x metrics, float32.

Multi-exit models add per-(node, model, source) exit counters (``ExitStats``, cumulative on the
node). :class:`ExitCounters` keeps the last value of every stream in one array and turns each
batch into per-window differences (requests, early exits, refusals) with a few array operations;
those windows feed the slowdown detector (``orchestrator.detectors``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from edgeward.v1 import api_pb2, node_pb2

RAW_SLOTS = 120  # at a 5 s heartbeat: the last 10 minutes
ROLLUP_SLOTS = 240  # the last 4 hours, one point per minute
METRICS = ("power_w", "energy_j", "cpu_utilisation", "queue_depth")
MAX_VALUE = 1e30  # the rings are float32 (max 3.4e38): anything larger is refused, not stored as inf
MAX_QUEUE_DEPTH = 1 << 24  # the largest depth float32 holds exactly; deeper is not a real queue
MINUTE_MS = 60_000
MAX_EXIT_STREAMS_PER_NODE = 256  # (model, source) pairs; nodes bound sources per model themselves
MAX_EXITS = 16
MAX_LABEL = 128


@dataclass(frozen=True)
class ExitWindows:
    """What each (node, model, source) stream served since the previous windows.

    ``early`` counts requests answered at a confident exit before the last; ``total`` every
    answered request (an exit forced by a latency budget counts as not early: the request would
    have gone on); ``refused`` requests refused by a rate limit.
    """

    streams: list[tuple[str, str, str]]
    early: np.ndarray
    total: np.ndarray
    refused: np.ndarray
    #: Streams forgotten since the previous windows (a node at its bound left them out of a report),
    #: and the models none of whose streams is left: their detector state goes with them.
    forgotten: list[tuple[str, str, str]] = field(default_factory=list)
    forgotten_models: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.streams)


class ExitCounters:
    """Cumulative exit counters of every stream -> per-window differences, batched.

    A node holds at most ``MAX_EXIT_STREAMS_PER_NODE`` streams here. Each report repeats every
    stream the node counts, so when a report brings new streams to a node at that bound, its
    streams that the report leaves out are forgotten (their rows reused, and the detectors told
    through :attr:`ExitWindows.forgotten`); new ones beyond the bound are dropped and counted. A
    node that invented new source or model names in every report had grown this table, and the
    detectors' state, without end (up to 256 streams a message, 50 messages a second). A node
    within the bound never has a stream forgotten."""

    _COLUMNS = 3  # total, early, refused

    def __init__(self) -> None:
        self._index: dict[tuple[str, str, str], int] = {}
        self._streams: list[tuple[str, str, str] | None] = []  # None: a free row
        self._free: list[int] = []
        self._of_node: dict[str, set[int]] = {}
        self._of_model: Counter[str] = Counter()  # streams per model
        self._forgotten: list[tuple[str, str, str]] = []
        self._last = np.zeros((0, self._COLUMNS), np.int64)
        self._pending: dict[int, tuple[int, int, int]] = {}
        self._latest: dict[str, list[node_pb2.ExitStats]] = {}
        self.dropped = 0

    def add(self, node_id: str, stats: Iterable[node_pb2.ExitStats]) -> None:
        """Queue one node's counters; malformed entries, and new streams beyond the node's bound,
        are dropped and counted in ``dropped``."""
        kept: list[node_pb2.ExitStats] = []
        for e in stats:
            exits = e.exits
            if (
                len(kept) >= MAX_EXIT_STREAMS_PER_NODE
                or not 1 <= len(exits) <= MAX_EXITS
                or not 0 < len(e.model_name) <= MAX_LABEL
                or not 0 < len(e.source) <= MAX_LABEL
                or e.requests != sum(exits) + e.forced
            ):
                self.dropped += 1
                continue
            kept.append(e)
        rows = self._of_node.setdefault(node_id, set())
        keys = [(node_id, e.model_name, e.source) for e in kept]
        if len(rows) + len({k for k in keys if k not in self._index}) > MAX_EXIT_STREAMS_PER_NODE:
            self._forget(rows, rows - {self._index[k] for k in keys if k in self._index})
        admitted = []
        for key, e in zip(keys, kept, strict=True):
            row = self._index.get(key)
            if row is None:
                if len(rows) >= MAX_EXIT_STREAMS_PER_NODE:
                    self.dropped += 1
                    continue
                row = self._new_row(key)
                rows.add(row)
            self._pending[row] = (e.requests, sum(e.exits[:-1]), e.refused)
            admitted.append(e)
        self._latest[node_id] = admitted

    def _new_row(self, key: tuple[str, str, str]) -> int:
        if self._free:
            row = self._free.pop()
            self._streams[row] = key
            if row < len(self._last):
                self._last[row] = 0
        else:
            row = len(self._streams)
            self._streams.append(key)
        self._index[key] = row
        self._of_model[key[1]] += 1
        return row

    def _forget(self, rows: set[int], gone: set[int]) -> None:
        for row in gone:
            key = self._streams[row]
            assert key is not None
            del self._index[key]
            self._streams[row] = None
            self._pending.pop(row, None)
            self._free.append(row)
            self._of_model[key[1]] -= 1
            self._forgotten.append(key)
        rows -= gone

    def _take_forgotten(self) -> tuple[list[tuple[str, str, str]], list[str]]:
        forgotten, self._forgotten = self._forgotten, []
        models = sorted({k[1] for k in forgotten if self._of_model[k[1]] <= 0})
        for model in models:
            del self._of_model[model]
        return forgotten, models

    def windows(self, min_total: int = 0) -> ExitWindows:
        """Differences since the previous call for every stream reported meanwhile.

        A stream that answered fewer than ``min_total`` requests is left out and keeps
        accumulating into a later window (a rate-limited source still gets tested).
        """
        if len(self._streams) > len(self._last):
            grow = max(16, 2 * len(self._streams)) - len(self._last)
            self._last = np.r_[self._last, np.zeros((grow, self._COLUMNS), np.int64)]
        forgotten, models = self._take_forgotten()
        if not self._pending:
            empty = np.zeros(0, np.int64)
            return ExitWindows([], empty, empty, empty, forgotten, models)
        pending, self._pending = self._pending, {}  # taken first: a bad value cannot stay to fail every call
        rows = np.fromiter(pending, np.int64, len(pending))
        current = np.array(list(pending.values()), np.int64).reshape(-1, self._COLUMNS)
        delta = current - self._last[rows]
        # A counter that went down is a restarted agent: its whole count is new.
        restarted = (delta < 0).any(axis=1)
        delta[restarted] = current[restarted]
        keep = (delta[:, 0] >= min_total) | restarted
        rows, current, delta = rows[keep], current[keep], delta[keep]
        self._last[rows] = current
        streams = [self._streams[r] for r in rows]
        assert None not in streams  # a forgotten row leaves the pending set with it
        return ExitWindows(
            cast(list[tuple[str, str, str]], streams),
            delta[:, 1],
            delta[:, 0],
            delta[:, 2],
            forgotten,
            models,
        )

    def latest(self, node_id: str) -> list[node_pb2.ExitStats]:
        return self._latest.get(node_id, [])

    def windowed(self, stream: tuple[str, str, str]) -> int:
        """Requests of ``stream`` (node, model, source) handed out in windows so far: what the
        detectors have seen of it."""
        row = self._index.get(stream)
        return int(self._last[row, 0]) if row is not None and row < len(self._last) else 0


@dataclass
class _Rings:
    t: np.ndarray  # int64 [rows, slots], unix ms; 0 = empty slot
    v: np.ndarray  # float32 [rows, slots, metrics]
    n: np.ndarray  # int32 [rows, slots]: samples folded into the point
    head: np.ndarray  # int64 [rows]: samples written so far

    @classmethod
    def empty(cls, rows: int, slots: int) -> _Rings:
        return cls(
            np.zeros((rows, slots), np.int64),
            np.zeros((rows, slots, len(METRICS)), np.float32),
            np.zeros((rows, slots), np.int32),
            np.zeros(rows, np.int64),
        )

    def grow(self, rows: int) -> None:
        extra = rows - len(self.head)
        self.t = np.concatenate([self.t, np.zeros((extra, self.t.shape[1]), np.int64)])
        self.v = np.concatenate([self.v, np.zeros((extra, *self.v.shape[1:]), np.float32)])
        self.n = np.concatenate([self.n, np.zeros((extra, self.n.shape[1]), np.int32)])
        self.head = np.concatenate([self.head, np.zeros(extra, np.int64)])

    def write(self, rows: np.ndarray, t: np.ndarray, v: np.ndarray, n: np.ndarray) -> None:
        slots = self.head[rows] % self.t.shape[1]
        self.t[rows, slots] = t
        self.v[rows, slots] = v
        self.n[rows, slots] = n
        self.head[rows] += 1

    def series(self, row: int) -> Iterator[tuple[int, np.ndarray, int]]:
        slots = self.t.shape[1]
        head = int(self.head[row])
        for k in range(max(0, head - slots), head):
            s = k % slots
            yield int(self.t[row, s]), self.v[row, s], int(self.n[row, s])


class TelemetryStore:
    def __init__(self, flush_every: int = 1024) -> None:
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self._raw = _Rings.empty(0, RAW_SLOTS)
        self._rollup = _Rings.empty(0, ROLLUP_SLOTS)
        # per-row accumulator of the minute being rolled up
        self._acc_minute = np.zeros(0, np.int64)
        self._acc_sum = np.zeros((0, len(METRICS)), np.float64)
        self._acc_last = np.zeros((0, len(METRICS)), np.float64)
        self._acc_n = np.zeros(0, np.int32)
        self._pending: list[tuple[int, int, tuple[float, ...]]] = []
        self._models: dict[str, list[node_pb2.ModelStats]] = {}
        self._source: dict[str, node_pb2.EnergySource] = {}
        self._watchers: set[asyncio.Queue[api_pb2.TelemetrySample]] = set()
        self.exits = ExitCounters()
        self.flush_every = flush_every
        self.ingested = 0

    # ------------------------------------------------------------ ingest

    def add(self, node_id: str, sent_unix_ms: int, t: node_pb2.Telemetry) -> bool:
        """Queue one sample (written at the next :meth:`flush`); False if it was refused."""
        power, energy, cpu, depth = t.power_w, t.energy_j, t.cpu_utilisation, t.queue_depth
        # NaN fails every comparison and inf the upper bound: one chain refuses NaN, inf, negative
        # and beyond float32, which would poison the roll-ups.
        if not (
            0.0 <= power <= MAX_VALUE
            and 0.0 <= energy <= MAX_VALUE
            and 0.0 <= cpu <= MAX_VALUE
            and depth <= MAX_QUEUE_DEPTH
        ):
            return False
        values = (power, energy, cpu, float(depth))
        row = self._rows.get(node_id)
        if row is None:
            row = self._new_row(node_id)
        self._pending.append((row, sent_unix_ms, values))
        self._models[node_id] = list(t.models)
        self._source[node_id] = t.energy_source
        if t.exits:
            self.exits.add(node_id, t.exits)
        if self._watchers:
            sample = self._sample(node_id, sent_unix_ms, np.asarray(values), 1)
            for queue in self._watchers:
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(sample)
        if len(self._pending) >= self.flush_every:
            self.flush()
        return True

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        rows = np.fromiter((b[0] for b in batch), np.int64, len(batch))
        t = np.fromiter((b[1] for b in batch), np.int64, len(batch))
        v = np.array([b[2] for b in batch], np.float64)
        # Samples of one node must be written in order: handle the k-th sample of each node in
        # the batch in round k (almost always a single round).
        order = np.lexsort((t, rows))
        rows, t, v = rows[order], t[order], v[order]
        first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
        for k in range(int(rank.max()) + 1):
            sel = rank == k
            self._write(rows[sel], t[sel], v[sel])
        self.ingested += len(batch)

    def _write(self, rows: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
        self._raw.write(rows, t, v.astype(np.float32), np.ones(len(rows), np.int32))
        minute = t // MINUTE_MS
        done = (self._acc_n[rows] > 0) & (minute != self._acc_minute[rows])
        if done.any():
            r = rows[done]
            mean = self._acc_sum[r] / self._acc_n[r][:, None]
            # power, utilisation and queue are averaged; the energy counter keeps its last value
            mean[:, 1] = self._acc_last[r, 1]
            self._rollup.write(r, self._acc_minute[r] * MINUTE_MS, mean.astype(np.float32), self._acc_n[r])
            self._acc_sum[r] = 0.0
            self._acc_n[r] = 0
        self._acc_minute[rows] = minute
        self._acc_sum[rows] += v
        self._acc_last[rows] = v
        self._acc_n[rows] += 1

    def _new_row(self, node_id: str) -> int:
        row = len(self._ids)
        self._rows[node_id] = row
        self._ids.append(node_id)
        if row >= len(self._raw.head):
            size = max(16, 2 * len(self._raw.head))
            self._raw.grow(size)
            self._rollup.grow(size)
            extra = size - len(self._acc_n)
            self._acc_minute = np.r_[self._acc_minute, np.zeros(extra, np.int64)]
            self._acc_sum = np.r_[self._acc_sum, np.zeros((extra, len(METRICS)))]
            self._acc_last = np.r_[self._acc_last, np.zeros((extra, len(METRICS)))]
            self._acc_n = np.r_[self._acc_n, np.zeros(extra, np.int32)]
        return row

    # ------------------------------------------------------------ queries

    def query(
        self, node_id: str = "", since_unix_ms: int = 0, rollup: bool = False
    ) -> list[api_pb2.TelemetrySample]:
        self.flush()
        ids = [node_id] if node_id else sorted(self._ids)
        rings = self._rollup if rollup else self._raw
        out = []
        for nid in ids:
            row = self._rows.get(nid)
            if row is None:
                continue
            points = [(t, v, n) for t, v, n in rings.series(row) if t >= since_unix_ms]
            for i, (t, v, n) in enumerate(points):
                sample = self._sample(nid, t, v, n)
                if i == len(points) - 1 and not rollup:
                    sample.models.extend(self._models.get(nid, []))
                out.append(sample)
        return out

    def latest_power(self) -> dict[str, float]:
        self.flush()
        out = {}
        for nid, row in self._rows.items():
            head = int(self._raw.head[row])
            if head:
                out[nid] = float(self._raw.v[row, (head - 1) % RAW_SLOTS, 0])
        return out

    def _sample(self, node_id: str, t: int, v: np.ndarray, n: int) -> api_pb2.TelemetrySample:
        return api_pb2.TelemetrySample(
            node_id=node_id,
            unix_ms=t,
            power_w=float(v[0]),
            energy_j=float(v[1]),
            energy_source=self._source.get(node_id, node_pb2.ENERGY_SOURCE_UNSPECIFIED),
            cpu_utilisation=float(v[2]),
            queue_depth=int(v[3]),
            samples=n,
        )

    # ------------------------------------------------------------ watch

    def subscribe(self, depth: int = 4096) -> asyncio.Queue[api_pb2.TelemetrySample]:
        queue: asyncio.Queue[api_pb2.TelemetrySample] = asyncio.Queue(depth)
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)

    @property
    def nodes(self) -> list[str]:
        return list(self._ids)

    def models(self, node_id: str) -> list[node_pb2.ModelStats]:
        return self._models.get(node_id, [])

    def energy_source(self, node_id: str) -> node_pb2.EnergySource:
        return self._source.get(node_id, node_pb2.ENERGY_SOURCE_UNSPECIFIED)

    def slo_attainment(self, deployments: Sequence[SloQuestion]) -> list[SloAttainment]:
        """Per deployment, how many of its running replicas meet its latency SLO, in one pass.

        A replica is measured when its node's latest telemetry has a p95 for the replica's model
        version (the node's recent inferences); it meets the SLO when that p95 is at most the
        deployment's ``slo_ms``. One lookup per node, one vectorised comparison."""
        latest: dict[str, dict[tuple[str, str], float]] = {}
        owner: list[int] = []
        p95: list[float] = []
        slo: list[float] = []
        for i, question in enumerate(deployments):
            if question.slo_ms <= 0:
                continue
            for node_id, name, version in question.replicas:
                stats = latest.get(node_id)
                if stats is None:
                    stats = latest[node_id] = {
                        (m.model_name, m.model_version): m.latency_p95_ms
                        for m in self.models(node_id)
                        if m.inferences
                    }
                value = stats.get((name, version))
                if value is not None:
                    owner.append(i)
                    p95.append(value)
                    slo.append(question.slo_ms)
        if not owner:
            return [SloAttainment(0, 0)] * len(deployments)
        rows = np.asarray(owner)
        measured = np.bincount(rows, minlength=len(deployments))
        met = np.bincount(rows, weights=np.asarray(p95) <= np.asarray(slo), minlength=len(deployments))
        return [SloAttainment(int(n), int(m)) for n, m in zip(measured, met, strict=True)]


@dataclass(frozen=True)
class SloQuestion:
    """A deployment's latency SLO and the (node, model, version) of each replica to measure."""

    slo_ms: float
    replicas: Sequence[tuple[str, str, str]]


@dataclass(frozen=True)
class SloAttainment:
    measured: int  # replicas with a p95 in their node's latest telemetry
    met: int  # of those, the ones at or under the SLO

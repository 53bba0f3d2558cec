"""Prometheus text exposition of the fleet on ``GET /metrics`` (a tiny asyncio HTTP server).

Units are Prometheus' base units (seconds, joules, watts); latencies are histograms over the
buckets every node reports (``edgeward.wire.LATENCY_BUCKETS_S``). Energy and power carry a
``source`` label, ``measured`` or ``modelled``, exactly as the nodes report them. Models are
labelled ``model`` (name) and ``version``. ``promtool check metrics`` passes on the output
(tests/orchestrator/test_metrics.py).

Over HTTPS (`MetricsServer.https`, any bind outside loopback in a TLS fleet) the scraper needs an
operator or orchestrator certificate of the fleet CA that the CRL, re-read as it changes, does not
revoke: the metrics name every node, model and version with its traffic, which is no business of a
team, a node or a broker.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgeward.security.authz import Authenticator, Denied
from edgeward.security.identity import Role
from edgeward.security.tls import RevocationList, TlsFiles

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
#: Who may scrape /metrics over HTTPS.
SCRAPERS = frozenset({Role.OPERATOR, Role.ORCHESTRATOR})

Labels = dict[str, str]


@dataclass
class Family:
    """One metric family: ``samples`` are (name suffix, labels, value), e.g. ("_bucket", {...}, 3)."""

    name: str
    kind: str  # gauge, counter or histogram
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float, suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))

    def histogram(
        self, labels: Labels, bounds: Sequence[float], cumulative: Sequence[int], count: int, total: float
    ) -> None:
        """One histogram series: ``cumulative`` counts at or under each bound, ``count`` in all."""
        for bound, n in zip(bounds, cumulative, strict=True):
            self.add({**labels, "le": repr(float(bound))}, float(n), "_bucket")
        self.add({**labels, "le": "+Inf"}, float(count), "_bucket")
        self.add(labels, float(total), "_sum")
        self.add(labels, float(count), "_count")


class Histogram:
    """Observations counted in buckets at ``bounds``: one series of a histogram family. ``record``
    is a bisection and two additions (it runs once per status a replica takes in)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.count = 0
        self.total = 0.0

    def record(self, value: float) -> None:
        value = max(0.0, value)
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    @property
    def cumulative(self) -> list[int]:
        """How many observations were at or under each bound."""
        return list(itertools.accumulate(self._counts[:-1]))

    def add_to(self, family: Family, labels: Labels) -> None:
        family.histogram(labels, self.bounds, self.cumulative, self.count, self.total)


class LoopLag:
    """How late the event loop runs what is due: ``run()`` sleeps ``period`` over and over and
    records how much later than asked it woke, in a histogram over ``BOUNDS``. A loop busy with a
    large fleet serves every timer, PUBACK and gRPC call that much later (at 10,000 hollow nodes
    commands went unacknowledged for 10 s in bursts; this says whether the orchestrator's own loop
    was the one behind)."""

    BOUNDS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.lags = Histogram(self.BOUNDS)
        self.worst = 0.0

    @property
    def cumulative(self) -> list[int]:
        return self.lags.cumulative

    @property
    def count(self) -> int:
        return self.lags.count

    def record(self, lag: float) -> None:
        self.lags.record(lag)
        self.worst = max(self.worst, lag)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.record(loop.time() - asked)

    def families(self) -> list[Family]:
        lag = Family(
            "edgeward_event_loop_lag_seconds",
            "histogram",
            f"How much later than due the orchestrator's event loop woke a probe that sleeps {self.period:g} s",
        )
        self.lags.add_to(lag, {})
        worst = Family(
            "edgeward_event_loop_lag_max_seconds", "gauge", "The largest event loop lag seen since the start"
        )
        worst.add({}, self.worst)
        return [lag, worst]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: list[Family]) -> bytes:
    lines = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for suffix, labels, value in fam.samples:
            label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
            name = fam.name + suffix
            number = _number(value)
            lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    return ("\n".join(lines) + "\n").encode()


class MetricsServer:
    """``GET /metrics`` on ``bind``; with ``tls`` (a server context that requires a client certificate
    of the fleet CA: the scraper's) HTTPS only. The config gives it TLS for any bind outside loopback."""

    def __init__(
        self,
        collect: Callable[[], bytes],
        bind: str,
        tls: ssl.SSLContext | None = None,
        scrapers: Authenticator | None = None,
    ) -> None:
        self._collect = collect
        self._bind = bind
        self._tls = tls
        self._scrapers = scrapers
        self._server: asyncio.Server | None = None
        self.port = 0
        self.refused = 0

    @classmethod
    def https(cls, collect: Callable[[], bytes], bind: str, tls: TlsFiles) -> MetricsServer:
        """Mutual TLS with the fleet's files; only `SCRAPERS` whose certificate is not revoked."""
        revocations = RevocationList(tls.crl_file, tls.ca_file) if tls.crl_file is not None else None
        return cls(collect, bind, tls.server_context(), Authenticator(revocations))

    def _refusal(self, writer: asyncio.StreamWriter) -> str:
        """Why this connection's client may not read the metrics ('' if it may)."""
        if self._scrapers is None:
            return ""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            identity = self._scrapers.identify(ssl.DER_cert_to_PEM_cert(der).encode() if der else None)
            self._scrapers.check_revoked(identity)
            if identity.role not in SCRAPERS:
                raise Denied("security.authz.role", f"{identity.role} may not read /metrics")
        except Denied as denial:
            self.refused += 1
            log.warning("refused /metrics to %s: %s", writer.get_extra_info("peername"), denial)
            return str(denial)
        return ""

    async def start(self) -> None:
        host, _, port = self._bind.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port), ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, path = head.split(b" ", 2)[:2]
            if method != b"GET":
                status, body, ctype = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
            elif path.split(b"?")[0] != b"/metrics":
                status, body, ctype = b"404 Not Found", b"see /metrics\n", b"text/plain"
            elif refusal := self._refusal(writer):
                status, body, ctype = b"403 Forbidden", refusal.encode() + b"\n", b"text/plain"
            else:
                status, body, ctype = b"200 OK", self._collect(), b"text/plain; version=0.0.4"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            pass  # a broken or hostile request: close the connection, nothing else
        finally:
            writer.close()


class StatusLag:
    """How long a node's statuses took to reach this replica's view: from the node's send time
    (its clock) to when this replica applied the status, by ``path``: ``received`` (from the broker,
    heartbeats included) and ``merged`` (read back from another replica's merge of the shared ingest:
    only statuses that changed what the node says). With several replicas the leader acts on the
    merged ones late by that much. A clock difference between node and orchestrator shows in it."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.paths = {"received": Histogram(self.BOUNDS), "merged": Histogram(self.BOUNDS)}

    def record(self, path: str, sent_unix_ms: int, now_unix_s: float) -> None:
        self.paths[path].record(now_unix_s - sent_unix_ms / 1000.0)

    def family(self) -> Family:
        family = Family(
            "edgeward_status_lag_seconds",
            "histogram",
            "From a node's send time to this replica applying its status: received from the broker, or "
            "merged (read back from another replica's share of the ingest)",
        )
        for path, histogram in self.paths.items():
            histogram.add_to(family, {"path": path})
        return family

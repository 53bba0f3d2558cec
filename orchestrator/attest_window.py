"""How many attestation exchanges the orchestrator has in flight at once: a congestion window.

An exchange is what it takes a node from "challenge it" to a result: one challenge and its evidence,
or, for a node that is not enrolled yet, the ask to enroll, the enrollment challenge and answer,
then the challenge. Each answer has a deadline (a nonce lives ``challenge_ttl_s``). When a whole
fleet connects at once, sending every node its challenge at once queues the answers behind each
other (in the broker, in the agents, in the orchestrator's ingest) until they arrive after their
nonce expired: the work is wasted, the nodes are challenged again, and the backlog grows. At 10,000
nodes on two cores that is what kept the fleet from ever being attested (docs/benchmarks.md).

So the verifier sends at most :attr:`ExchangeWindow.size` exchanges at a time, and the window
adapts to the round-trip time of the answers, in the manner of TCP's congestion control, with the
delay as the signal (an answer later than ``target_rtt_s``) as well as the loss (no answer by its
deadline):

* every answer on time widens the window: by one while it has never narrowed ("slow start"), then
  by ``increase/size`` (about ``increase`` per window of answers);
* an answer later than the target, or an exchange past its deadline, halves it, at most once per
  ``target_rtt_s`` (one congestion event, not one per late answer);
* it stays within ``[minimum, maximum]``.

Nodes wait in two queues: renewals first (a node holding a result that must not lapse), then the
nodes with none (new or expired). A node is queued once, and is never in flight twice.

Pure and synchronous: the caller passes the time (``time.monotonic()``) and does the sending.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Flight:
    sent: float  # when the current step was sent
    deadline: float  # its answer is useless after this


class ExchangeWindow:
    """Attestation exchanges in flight under an adaptive limit (see the module docstring)."""

    def __init__(
        self,
        *,
        target_rtt_s: float,
        initial: int = 32,
        minimum: int = 8,
        maximum: int = 4096,
        increase: float = 1.0,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        self.target_rtt_s = target_rtt_s
        self.minimum = minimum
        self.maximum = maximum
        self.increase = increase
        self.size = float(initial)
        self._slow_start = True
        self._narrowed_at = float("-inf")
        self._flights: dict[str, _Flight] = {}
        self._renewals: deque[str] = deque()
        self._new: deque[str] = deque()
        self._queued: set[str] = set()
        # Counters for /metrics.
        self.late = 0  # answers later than the target
        self.lost = 0  # exchanges past their deadline
        self.narrowed = 0  # times the window was halved

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    @property
    def queued(self) -> int:
        return len(self._queued)

    def busy(self, node_id: str) -> bool:
        """Whether the node has an exchange in flight or is waiting for one."""
        return node_id in self._flights or node_id in self._queued

    def want(self, node_id: str, *, renewal: bool) -> None:
        """Queue an exchange with the node, unless it has one in flight or queued."""
        if self.busy(node_id):
            return
        self._queued.add(node_id)
        (self._renewals if renewal else self._new).append(node_id)

    def restart(self, node_id: str, *, renewal: bool = False) -> None:
        """The node connected again: whatever was in flight will not be answered; queue it anew.
        Not a congestion signal."""
        self._flights.pop(node_id, None)
        self.want(node_id, renewal=renewal)

    def ready(self, now: float, ttl_s: float, eligible: Callable[[str], bool] = bool) -> list[str]:
        """Take the nodes to send a step to now (as many as the window has room for), each now in
        flight with an answer due within ``ttl_s``. Queued nodes no longer ``eligible`` (gone
        offline while they waited) leave the queue without taking a place."""
        room = int(self.size) - len(self._flights)
        out: list[str] = []
        while room > 0 and (self._renewals or self._new):
            node_id = (self._renewals or self._new).popleft()
            if node_id not in self._queued:
                continue  # forgotten while queued
            self._queued.discard(node_id)
            if not eligible(node_id):
                continue
            self._flights[node_id] = _Flight(now, now + ttl_s)
            out.append(node_id)
            room -= 1
        return out

    def answered(self, node_id: str, now: float) -> bool:
        """An answer of the node arrived: adapt the window to its round-trip time. False if the
        node had nothing in flight (an answer nobody asked for, or one past its deadline)."""
        flight = self._flights.get(node_id)
        if flight is None:
            return False
        rtt = now - flight.sent
        if rtt > self.target_rtt_s:
            self.late += 1
            self._narrow(now)
        elif self._slow_start:
            self.size = min(float(self.maximum), self.size + 1.0)
        else:
            self.size = min(float(self.maximum), self.size + self.increase / self.size)
        return True

    def next_step(self, node_id: str, now: float, ttl_s: float) -> None:
        """The exchange goes on (the node enrolled and is challenged now): a new step in flight."""
        if node_id in self._flights:
            self._flights[node_id] = _Flight(now, now + ttl_s)

    def finish(self, node_id: str) -> None:
        """The exchange ended (a result, or a refusal): its place goes to the next node."""
        self._flights.pop(node_id, None)

    def forget(self, node_id: str) -> None:
        """The node left the fleet or may not attest at all: neither in flight nor queued."""
        self._flights.pop(node_id, None)
        self._queued.discard(node_id)

    def expire(self, now: float) -> list[str]:
        """The exchanges past their deadline, ended (the window narrows once for them all)."""
        gone = [n for n, f in self._flights.items() if now > f.deadline]
        for node_id in gone:
            del self._flights[node_id]
        if gone:
            self.lost += len(gone)
            self._narrow(now)
        return gone

    def _narrow(self, now: float) -> None:
        self._slow_start = False
        if now - self._narrowed_at < self.target_rtt_s:
            return  # the same congestion event
        self._narrowed_at = now
        self.narrowed += 1
        self.size = max(float(self.minimum), self.size / 2)

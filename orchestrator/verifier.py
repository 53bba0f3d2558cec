"""The verifier as the orchestrator runs it: attestation of the fleet over MQTT, enrollments in the
store, gating and quarantine for the reconciler, key release for the dispatcher.

The attestation package does the appraisal (:class:`attestation.service.AttestationVerifierService`);
this module wires it in (docs/attestation.md, "How it is wired")::

    node hello ─────────────▶ queued for an exchange: a challenge if enrolled, else Attest{}
                              (= please enroll), sent when the window has room (attest_window:
                              at most so many exchanges in flight, adapted to the answers' delay)
    .../evidence ───────────▶ evidence(): service.receive -> reply as an ``attest`` command;
                              a new enrollment is stored and challenged at once; a first
                              enrollment needs the operator's approval (attestation.enrollment:
                              a one-time token or a trusted EK certificate), a refused one is an
                              event attestation.enrollment.refused;
                              a result that is not affirming -> quarantine
    every tick (1 s) ───────▶ service.expire() -> quarantine; nodes due (challenge_interval_s) queued,
                              most overdue first and paced (CHALLENGE_PACE), so a fleet that came
                              up at once is challenged spread over the interval; renewals (a
                              node holding a result) go before nodes with none
    quarantine(node) ───────▶ alert (log), ``wipe`` command, reconciler woken: it evicts the node's
                              replicas (reason attestation.*) and places them on trusted nodes
    agent.wipe.done event ──▶ wipe_confirmed()

The reconciler asks :meth:`tier` (NodeInfo.attestation_tier), :meth:`why_not_trusted` (why a
node may not hold models) and :meth:`release_key` (the data key wrapped to the node's binding
key; refused unless the node holds an unexpired affirming result).

All methods run on the event loop; ``service.receive`` is CPU-only and takes well under a
millisecond, so it runs inline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from attestation.artifacts import (
    AGENT_CODE,
    AGENT_CODE_PACKAGES,
    AGENT_CONFIG,
    AGENT_DEPS,
    code_digest,
    deps_digest,
    key_context,
    model_component,
)
from attestation.enrollment import EnrollmentApproval, load_ca_bundle
from attestation.errors import EnrollmentError, KeyReleaseError
from attestation.grpc_api import AttestationServicer, AttestationSource
from attestation.reference import ReferenceValues
from attestation.results import ResultSigner
from attestation.service import AttestationState, AttestationVerifierService
from attestation.tokens import TokenStore
from edgeward.v1 import attestation_pb2 as apb
from edgeward.v1 import node_pb2
from edgeward.wire import now_ms

from .attest_window import ExchangeWindow
from .config import AttestationConfig
from .events import WARNING, EventBus
from .fleet import Fleet
from .periodic import every
from .reconciler import DbCall, Publish, command
from .store import Store

log = logging.getLogger(__name__)

TICK_S = 1.0
# Re-attestation pace: at most this multiple of the fleet's average challenge rate (online nodes /
# challenge_interval_s) per tick, most overdue first, and never fewer than CHALLENGE_BURST. A fleet
# that came up at once is not challenged all at once again: its challenges spread over the interval.
CHALLENGE_PACE = 2.0
CHALLENGE_BURST = 32
#: The window's bounds (attest_window.ExchangeWindow). Its target round-trip time is this share of
#: the nonce's lifetime: an answer later than that nearly came too late. Not less: the whole
#: machine slows down in an apply at 10,000 nodes, and a window narrowed for that delay (a target of
#: 0.4) fell to its minimum, too few renewals to keep the fleet's results alive.
WINDOW_INITIAL = 64
WINDOW_MINIMUM = 64
WINDOW_MAXIMUM = 4096
WINDOW_TARGET = 0.6
WINDOW_INCREASE = 8.0
_HOLDS_RESULT = {AttestationState.AFFIRMING, AttestationState.WARNING}
_STATE_REASON = {
    None: "attestation.missing",
    AttestationState.ENROLLED: "attestation.missing",
    AttestationState.WARNING: "attestation.warning",
    AttestationState.CONTRAINDICATED: "attestation.contraindicated",
    AttestationState.EXPIRED: "attestation.expired",
    AttestationState.REVOKED: "attestation.revoked",
}


def builtin_reference() -> ReferenceValues:
    """Reference values for an orchestrator given none: trust exactly the agent code of this
    installation and the models of the catalog; require a measured config, pin neither it nor the
    accelerators. Not trust on first use: nothing a node sends widens it."""
    return ReferenceValues.model_validate(
        {
            "version": 1,
            "checks": ["digests_match", "required_components", "pcr_values"],
            "required": [AGENT_CODE, AGENT_DEPS, AGENT_CONFIG],
            "components": {
                AGENT_CODE: {
                    "digests": [code_digest().hex()],
                    "description": "packages " + ", ".join(AGENT_CODE_PACKAGES) + " of this release",
                },
                AGENT_DEPS: {
                    "digests": [deps_digest().hex()],
                    "description": "the installed dependencies the agent imports, as installed here",
                },
                "model.*": {"description": "models of the catalog, added as they are pushed"},
            },
        }
    )


@dataclass
class Quarantine:
    """A node that lost its trust: when, why, and when it confirmed the wipe."""

    node_id: str
    reason: str  # attestation.contraindicated | .expired | .warning | .revoked
    message: str
    at: float  # time.monotonic()
    wiped_at: float | None = None


class FleetVerifier:
    """Attests every node of the fleet and quarantines those that fail (see the module docstring)."""

    def __init__(
        self,
        config: AttestationConfig,
        service: AttestationVerifierService,
        *,
        fleet: Fleet,
        publish: Publish,
        db: DbCall,
        store: Store,
        node_timeout_s: float,
        on_change: Callable[[], None],
        events: EventBus | None = None,
        enroll: DbCall | None = None,
    ) -> None:
        """``enroll`` runs a first enrollment's blocking part (token files: read, redeemed and
        synced to disk); default ``db``. Given several threads, the redemptions of nodes that
        enroll together share their directory syncs."""
        self.config = config
        self.service = service
        self._fleet = fleet
        self._publish = publish
        self._db = db
        self._enroll = enroll or db
        self._store = store
        self._node_timeout_s = node_timeout_s
        self._on_change = on_change
        self._events = events
        self._refused: dict[str, str] = {}  # node -> reason id of its last refused enrollment
        self._last_attest: dict[str, float] = {}  # node -> monotonic time of the last challenge/ask
        self._first_seen: dict[str, float] = {}  # node -> first hello since this orchestrator started
        self.quarantined: dict[str, Quarantine] = {}
        # Told of every quarantine and release (orchestrator/trust_mirror.py; state changes come
        # from the service's listeners).
        self.on_trust_change: Callable[[str], None] = lambda _node_id: None
        self._revoked_keys: set[tuple[str, str]] = set()  # (model, version): never released again
        self._released: dict[tuple[str, str], set[str]] = {}  # (model, version) -> nodes given its key
        self._challenging: set[asyncio.Task[None]] = set()  # sent exchanges awaiting their PUBACK
        self.window = ExchangeWindow(
            target_rtt_s=config.verifier.challenge_ttl_s * WINDOW_TARGET,
            initial=WINDOW_INITIAL,
            minimum=WINDOW_MINIMUM,
            maximum=WINDOW_MAXIMUM,
            increase=WINDOW_INCREASE,
        )

    @staticmethod
    def load_service(config: AttestationConfig, state_dir: Path) -> AttestationVerifierService:
        """Blocking (reads files): the verifier service from the configuration."""
        reference = ReferenceValues.load(config.reference) if config.reference else builtin_reference()
        if config.reference is None:
            log.warning(
                "attestation: no reference values file; built-in policy (agent code of this release, "
                "catalog models; config and accelerators not pinned)"
            )
        signer = ResultSigner.from_file(config.signing_key or state_dir / "attestation" / "verifier.pem")
        ek_trust = load_ca_bundle(config.ek_ca_file) if config.ek_ca_file else []
        approval = EnrollmentApproval(config.enrollment, TokenStore.in_state_dir(state_dir))
        return AttestationVerifierService(
            config.verifier, reference, signer, ek_trust=ek_trust, approval=approval
        )

    def restore(
        self, enrollments: list[bytes], models: list[tuple[str, str]], revoked: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Trust the enrollments kept in the store and the digests of the catalog's models; refuse
        the keys of revoked model versions."""
        self._revoked_keys.update(revoked)
        known = {e.node_id for e in self.service.enrollments()}  # again, at a new leader term
        restored = 0
        for data in enrollments:
            record = apb.Enrollment.FromString(data)
            if record.node_id not in known:
                self.service.register(record)
                restored += 1
        digests: dict[str, set[str]] = {}
        for name, sha256 in models:
            digests.setdefault(name, set()).add(sha256)
        for name, found in digests.items():
            self.service.allow(model_component(name), *sorted(found))
        if restored:
            log.info("attestation: %d enrollments restored", restored)

    def servicer(
        self, leading: Callable[[], bool] = lambda: True, source: AttestationSource | None = None
    ) -> AttestationServicer:
        """The attestation API; ``source`` answers its reads (default: this verifier's service)."""
        return AttestationServicer(source or self.service, attest_now=self.attest, leading=leading)

    # ------------------------------------------------------------ relying party

    # A quarantined node is trusted with nothing, whatever its attestation says: a node quarantined
    # for not confirming a model wipe still attests affirming (it may well be ignoring the wipe).

    def tier(self, node_id: str) -> str:
        return "none" if node_id in self.quarantined else self.service.tier(node_id)

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        tiers = self.service.tiers(node_ids)
        for node_id in self.quarantined.keys() & tiers.keys():
            tiers[node_id] = "none"
        return tiers

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None:
        """(reason id, message) when the node may hold no model; None when it holds an affirming
        result, or has just connected and has not had the time to answer its first challenge."""
        state = self.service.state(node_id)
        if state == AttestationState.AFFIRMING:
            if (held := self.quarantined.get(node_id)) is not None:
                return held.reason, f"node {node_id} is quarantined: {held.message}"
            return None
        if state in (None, AttestationState.ENROLLED) and node_id not in self._refused:
            first = self._first_seen.get(node_id)
            if first is None or time.monotonic() - first < self.config.verifier.challenge_ttl_s:
                return None
        reason = _STATE_REASON[state]
        return reason, self._explain(node_id, state)

    def _explain(self, node_id: str, state: AttestationState | None) -> str:
        view = self.service.snapshot(node_id)
        if view is None or state in (None, AttestationState.ENROLLED):
            last = view.last_rejection if view is not None else self._refused.get(node_id, "")
            detail = f"; last refusal {last}" if last else ""
            return f"node {node_id} has no attestation result{detail}"
        bad = [f"{r.subject}: {r.id}" for r in view.result.reasons]
        return f"attestation {state.name.lower()}" + (f" ({', '.join(bad)})" if bad else "")

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
        """The data key of model ``name:version`` wrapped to the node (KeyReleaseError if refused)."""
        if (name, version) in self._revoked_keys:
            raise KeyReleaseError(
                "attestation.key.revoked", f"{name}:{version} is revoked; its key is never released"
            )
        if (held := self.quarantined.get(node_id)) is not None:
            raise KeyReleaseError(
                "attestation.key.quarantined", f"node {node_id!r} is quarantined ({held.reason})"
            )
        wrapped = self.service.release_key(node_id, data_key, key_context(node_id, name, version))
        self._released.setdefault((name, version), set()).add(node_id)
        return wrapped

    def released_to(self, name: str, versions: Iterable[str]) -> set[str]:
        """The nodes this orchestrator process released a key of these versions to (a wipe's holders)."""
        return set().union(*(self._released.get((name, v), set()) for v in versions))

    def revoke_model_keys(self, name: str, versions: list[str]) -> None:
        """Refuse these versions' keys from now on (the catalog destroys them in the store)."""
        self._revoked_keys.update((name, v) for v in versions)

    def allow_model(self, name: str, sha256: str) -> None:
        self.service.allow(model_component(name), sha256)

    # ------------------------------------------------------------ the wire

    async def _send(self, node_id: str, **body: object) -> None:
        await self._publish(node_id, command(node_id, **body))

    def hello(self, node_id: str) -> None:
        """The node (re)connected: queue its exchange (anything in flight with it before died with
        its connection). Called as ingest takes the hello, before anything it awaits: a tick that
        ran in between found the node online and due, and asked it to enroll a second time (two
        enrollment requests, the first answer refused as a bad proof)."""
        self._first_seen.setdefault(node_id, time.monotonic())
        state = self.service.state(node_id)
        if state == AttestationState.REVOKED:
            self.window.forget(node_id)
            return
        self.window.restart(node_id, renewal=state in _HOLDS_RESULT)

    async def node_connected(self, node_id: str) -> None:
        """Send the exchanges the window has room for (the node's among them, queued by hello)."""
        self._pump()

    def _pump(self) -> None:
        """Send the queued exchanges the window has room for; each waits for its PUBACK in a task
        of its own (awaited here, a 10,000-node fleet's ticks slowed until results expired)."""
        now = time.monotonic()
        online = self._online
        for node_id in self.window.ready(now, self.config.verifier.challenge_ttl_s, online):
            task = asyncio.get_running_loop().create_task(self.attest(node_id))
            self._challenging.add(task)
            task.add_done_callback(self._challenging.discard)

    def _online(self, node_id: str) -> bool:
        """Still worth an exchange: heard from within the node timeout and not gone offline. A node
        that has said hello and no status yet is (its first challenge answers that hello)."""
        node = self._fleet.nodes.get(node_id)
        return (
            node is not None
            and node.hello is not None
            and node.state != node_pb2.NODE_STATE_OFFLINE
            and time.monotonic() - node.last_seen <= self._node_timeout_s
        )

    async def attest(self, node_id: str) -> None:
        """Challenge the node now (or ask it to enroll if it is not enrolled)."""
        self._last_attest[node_id] = time.monotonic()
        state = self.service.state(node_id)
        if state == AttestationState.REVOKED:
            self.window.forget(node_id)  # never attested again: its place goes to the next node
            return
        message = b"" if state is None else self.service.challenge(node_id)
        await self._send(node_id, attest=node_pb2.Attest(message=message))

    async def evidence(self, node_id: str, payload: bytes) -> None:
        try:
            await self._evidence(node_id, payload)
        except asyncio.CancelledError:
            raise
        except Exception:  # bad input is refused inside receive(); this is a bug or the store failing
            log.exception("attestation message of %s not handled", node_id)

    async def _evidence(self, node_id: str, payload: bytes) -> None:
        self.window.answered(node_id, time.monotonic())
        tier_before = self.service.tier(node_id)
        if self.service.state(node_id) is None:
            # A first enrollment reads and redeems token files: off the loop.
            outcome = await self._enroll(self.service.receive, node_id, payload)
        else:
            outcome = self.service.receive(node_id, payload)
        if outcome.rejected is not None or outcome.result is not None:
            self.window.finish(node_id)  # a result or a refusal ends the exchange
            self._pump()
        if isinstance(outcome.rejected, EnrollmentError):
            self._enrollment_refused(node_id, outcome.rejected)
        if outcome.reply is not None:
            self.window.next_step(node_id, time.monotonic(), self.config.verifier.enrollment_ttl_s)
            await self._send(node_id, attest=node_pb2.Attest(message=outcome.reply))
        if outcome.enrolled is not None:
            self._refused.pop(node_id, None)
            await self._db(
                self._store.put_enrollment, node_id, outcome.enrolled.SerializeToString(), now_ms()
            )
            self.window.next_step(node_id, time.monotonic(), self.config.verifier.challenge_ttl_s)
            await self.attest(node_id)
        result = outcome.result
        if result is None:
            return
        released = False
        if result.status == apb.ATTESTATION_STATUS_AFFIRMING:
            held = self.quarantined.get(node_id)
            # A node quarantined for not confirming a model wipe leaves only once it has confirmed.
            if held is not None and not (held.reason.startswith("model.wipe") and held.wiped_at is None):
                del self.quarantined[node_id]
                self.on_trust_change(node_id)
                log.warning("node %s attested affirming again: out of quarantine", node_id)
                released = True
        else:
            state = self.service.state(node_id)
            await self.quarantine(node_id, _STATE_REASON[state], self._explain(node_id, state))
        # Only news wakes the reconciler: a renewal that leaves the node's tier as it was changes
        # nothing it decides, and at 10,000 nodes renewals arrive hundreds a second (each woke a
        # pass over every replica: the passes ran back to back, half of an idle orchestrator's CPU).
        if released or self.service.tier(node_id) != tier_before:
            self._on_change()

    def _enrollment_refused(self, node_id: str, err: EnrollmentError) -> None:
        """Record the refusal; tell the operator once per node and reason (the node asks again at
        every re-attestation interval: those repeats are only counted, in service.rejections)."""
        if self._refused.get(node_id) == err.reason:
            return
        self._refused[node_id] = err.reason
        if self._events is not None:
            self._events.publish(
                "attestation.enrollment.refused",
                f"node/{node_id}",
                f"{err.reason}: {err.detail}",
                WARNING,
                reason=err.reason,
            )

    def wipe_confirmed(self, node_id: str, event: node_pb2.Event) -> None:
        q = self.quarantined.get(node_id)
        # A model wipe's confirmation (it names its wipe) does not stand for a quarantine's full wipe.
        targeted = bool(event.attributes.get("wipe_id"))
        if q is not None and q.wiped_at is None and (not targeted or q.reason.startswith("model.wipe")):
            q.wiped_at = time.monotonic()
            log.warning(
                "node %s confirmed its wipe %.0f ms after quarantine: %s",
                node_id,
                (q.wiped_at - q.at) * 1000,
                event.message,
            )

    async def quarantine(self, node_id: str, reason: str, message: str) -> None:
        """Alert, wipe the node, and have the reconciler move its replicas (once per loss of trust)."""
        if node_id in self.quarantined:
            return
        self.quarantined[node_id] = Quarantine(node_id, reason, message, time.monotonic())
        self.on_trust_change(node_id)
        log.error(
            "ALERT node %s quarantined: %s (%s); wiping it and rescheduling its replicas",
            node_id,
            reason,
            message,
        )
        self._on_change()
        await self._send(node_id, wipe=node_pb2.Wipe(reason=reason))

    # ------------------------------------------------------------ periodic work

    async def run(self) -> None:
        tick = min(TICK_S, self.config.challenge_interval_s / 2)
        try:  # one bad pass must not stop re-attestation
            await every(tick, self.tick, "run the attestation pass", log, trace=True)
        finally:
            for task in self._challenging:
                task.cancel()
            await asyncio.gather(*self._challenging, return_exceptions=True)

    async def challenges_sent(self) -> None:
        """Wait until the challenges the ticks started have been acknowledged (or failed)."""
        await asyncio.gather(*self._challenging, return_exceptions=True)

    async def tick(self) -> None:
        for node_id in self.service.expire():
            state = self.service.state(node_id)
            reason = _STATE_REASON.get(state)
            if reason is None:  # affirmed again while the quarantines before it were sent
                continue
            await self.quarantine(node_id, reason, self._explain(node_id, state))
        now = time.monotonic()
        self.window.expire(now)  # unanswered by their deadline: ended, and the window narrows
        interval = self.config.challenge_interval_s
        online = [n.id for n in self._fleet.nodes.values() if n.online(now, self._node_timeout_s)]
        last = self._last_attest
        busy = self.window.busy
        due = [n for n in online if now - last.get(n, 0.0) >= interval and not busy(n)]
        tick = min(TICK_S, interval / 2)
        budget = max(CHALLENGE_BURST, math.ceil(CHALLENGE_PACE * len(online) * tick / interval))
        if len(due) > budget:
            due.sort(key=lambda n: last.get(n, 0.0))
            del due[budget:]
        state_of = self.service.state
        for node_id in due:
            self.window.want(node_id, renewal=state_of(node_id) in _HOLDS_RESULT)
        self._pump()

"""The verifier as the orchestrator holds it: enrollments, nonces, results, their lifecycle.

Seam for the orchestrator (all methods synchronous, CPU-only and fast; thread-safe)::

    service = AttestationVerifierService(VerifierConfig(...), ReferenceValues.load(path),
                                         ResultSigner.from_file(key_path), ek_trust=load_ca_bundle(ca))
    # node -> orchestrator, Evidence.payload on .../nodes/{id}/evidence:
    outcome = service.receive(node_id, payload)   # Outcome(reply, result, rejected)
    if outcome.reply: publish a command carrying outcome.reply (VerifierMessage bytes) to the node
    # periodically (default every 30 s) and on demand, per node:
    publish a command carrying service.challenge(node_id)
    # gating and quarantine:
    service.tier(node_id)          -> "none" | "software" | "tpm2"   (NodeInfo.attestation_tier)
    service.expire()               -> node ids whose result just expired, once each (quarantine them);
                                      call it about every second
    service.subscribe(callback)    -> callback(NodeAttestation) on every state change
    # key release, when dispatching model version V to node N:
    service.release_key(node_id, data_key, context=f"{node_id}/{name}/{version}") -> WrappedKey bytes
    # catalog and store:
    service.allow(f"model.{name}", sha256_hex)     # when a model version is pushed
    service.enrollments() / service.register(record)   # persist / restore pb.Enrollment records

Listeners are called synchronously and must not block (hand the view to a queue).
With ``approval`` (an :class:`attestation.enrollment.EnrollmentApproval`), the first enrollment of a
node id needs the operator's approval (a one-time token or a trusted EK certificate) and does file
IO (the token files): ``receive`` for a node that ``state()`` reports as None belongs off the loop.
``receive`` never raises for bad input: refused evidence comes back as ``Outcome.rejected`` (an
:class:`EvidenceRejected` with its reason id) and changes no state. A contraindicated result is
immediate (listeners hear it inside ``receive``); the orchestrator quarantines on a
CONTRAINDICATED state or on ``expire()``. Reads (``tier``, ``state``, ``result``) never change
state: a result past its expiry reads as EXPIRED, and ``expire()`` records it.

Lifecycle of a node's attestation (transition table :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition`)::

    ENROLLED ─▶ AFFIRMING | WARNING | CONTRAINDICATED ─▶ (each other) ─▶ EXPIRED ─▶ (a result)
    any ─▶ REVOKED (operator; terminal until forget())
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, cast

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeward.v1 import attestation_pb2 as pb

from . import enrollment as enroll
from .errors import (
    EnrollmentError,
    EvidenceMalformed,
    EvidenceRejected,
    IllegalTransition,
    KeyReleaseError,
    StaleNonce,
)
from .eventlog import PcrLayout
from .keyrelease import wrap_key
from .reference import ReferenceValues
from .results import ResultSigner
from .verifier import (
    MESSAGE_SCHEMA,
    PCR_BANK,
    Appraisal,
    Appraiser,
    EvidenceLimits,
    IssuedChallenge,
    KnownAttester,
    check_evidence_shape,
    parse_attester_message,
)

log = logging.getLogger(__name__)

MAX_SPENT_NONCES = 200_000
# Wrapped keys kept for sending again (one wrap per node, model version and binding key, however
# many replicas, resends and syncs carry it); the oldest goes first.
MAX_WRAPPED_KEYS = 32_768
_SPENT_DETAIL = {
    "attestation.nonce.reused": "this nonce was answered before",
    "attestation.nonce.expired": "the challenge expired before this answer",
    "attestation.nonce.superseded": "newer challenges replaced this one",
}


class VerifierConfig(BaseModel):
    """Settings of the verifier (validated without IO; files are loaded by the caller)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    challenge_ttl_s: Annotated[float, Field(gt=0, le=300)] = Field(
        10.0, description="How long a nonce can be answered."
    )
    result_ttl_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        90.0, description="How long an attestation result is valid; re-attest well within it."
    )
    enrollment_ttl_s: Annotated[float, Field(gt=0, le=600)] = Field(
        30.0, description="How long an enrollment challenge can be answered."
    )
    nonce_memory_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="How long used nonces are remembered, to report a replay as 'reused'."
    )
    max_outstanding_per_node: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="Unanswered challenges kept per node; the oldest is dropped beyond this."
    )
    platform_pcr: Annotated[int, Field(ge=0, le=23)] = Field(
        16, description="PCR of agent, config, accelerators."
    )
    models_pcr: Annotated[int, Field(ge=0, le=23)] = Field(23, description="PCR of loaded models.")
    require_ek_certificate: bool = Field(
        True, description="Refuse TPM nodes whose EK has no certificate (else: results carry a warning)."
    )
    max_evidence_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = Field(
        128 * 1024, description="Larger evidence is refused unread."
    )
    max_events: Annotated[int, Field(ge=1, le=100_000)] = Field(1024, description="Most events in one log.")

    @model_validator(mode="after")
    def _distinct_pcrs(self) -> VerifierConfig:
        if self.platform_pcr == self.models_pcr:
            raise ValueError("platform_pcr and models_pcr must differ")
        return self

    @property
    def layout(self) -> PcrLayout:
        return PcrLayout(platform=self.platform_pcr, models=self.models_pcr)


class AttestationState(enum.IntEnum):
    ENROLLED = pb.ATTESTATION_STATE_ENROLLED
    AFFIRMING = pb.ATTESTATION_STATE_AFFIRMING
    WARNING = pb.ATTESTATION_STATE_WARNING
    CONTRAINDICATED = pb.ATTESTATION_STATE_CONTRAINDICATED
    EXPIRED = pb.ATTESTATION_STATE_EXPIRED
    REVOKED = pb.ATTESTATION_STATE_REVOKED


_PB_STATE = {
    s: cast(pb.AttestationState, pb.AttestationState.Value(f"ATTESTATION_STATE_{s.name}"))
    for s in AttestationState
}
_NEVER_MS = 2**63 - 1
_RESULTS = frozenset({AttestationState.AFFIRMING, AttestationState.WARNING, AttestationState.CONTRAINDICATED})
TRANSITIONS: dict[AttestationState, frozenset[AttestationState]] = {
    AttestationState.ENROLLED: _RESULTS | {AttestationState.REVOKED},
    AttestationState.AFFIRMING: _RESULTS | {AttestationState.EXPIRED, AttestationState.REVOKED},
    AttestationState.WARNING: _RESULTS | {AttestationState.EXPIRED, AttestationState.REVOKED},
    AttestationState.CONTRAINDICATED: _RESULTS | {AttestationState.EXPIRED, AttestationState.REVOKED},
    AttestationState.EXPIRED: _RESULTS | {AttestationState.REVOKED},
    AttestationState.REVOKED: frozenset(),
}
_STATE_OF_STATUS = {
    pb.ATTESTATION_STATUS_AFFIRMING: AttestationState.AFFIRMING,
    pb.ATTESTATION_STATUS_WARNING: AttestationState.WARNING,
    pb.ATTESTATION_STATUS_CONTRAINDICATED: AttestationState.CONTRAINDICATED,
}


@dataclass
class _Node:
    known: KnownAttester
    state: AttestationState = AttestationState.ENROLLED
    appraisal: Appraisal | None = None
    last_rejection: str = ""
    updated_ms: int = 0


@dataclass(frozen=True)
class Outcome:
    """What ``receive`` did with one payload."""

    reply: bytes | None = None  # VerifierMessage for the node
    result: pb.AttestationResult | None = None  # a new result (already stored)
    enrolled: pb.Enrollment | None = None
    rejected: EvidenceRejected | EnrollmentError | None = None


@dataclass
class RejectionCounter:
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1


class AttestationVerifierService:
    """The verifier role (see the module docstring for the seam)."""

    def __init__(
        self,
        config: VerifierConfig,
        reference: ReferenceValues,
        signer: ResultSigner | None = None,
        *,
        ek_trust: list[x509.Certificate] | None = None,
        clock: Callable[[], float] = time.time,
        approval: enroll.EnrollmentApproval | None = None,
    ) -> None:
        self.config = config
        self.signer = signer or ResultSigner()
        self.ek_trust = list(ek_trust or [])
        self.approval = approval  # None: no approval step (a library use; the orchestrator passes one)
        self.rejections = RejectionCounter()
        self._clock = clock
        self._limits = EvidenceLimits(max_bytes=config.max_evidence_bytes, max_events=config.max_events)
        self._appraiser = Appraiser(
            reference, self.signer, config.layout, int(config.result_ttl_s * 1000), self._limits
        )
        self._pcrs = config.layout.pcrs
        self._nodes: dict[str, _Node] = {}
        # node -> its enrollment in progress, and the reply that challenged it
        self._pending_enrollments: dict[str, tuple[enroll.PendingEnrollment, bytes]] = {}
        self._outstanding: dict[bytes, IssuedChallenge] = {}
        self._per_node: dict[str, list[bytes]] = {}
        # Nonces that can no longer be answered -> (forget after ms, the reason to report).
        self._spent: OrderedDict[bytes, tuple[int, str]] = OrderedDict()
        self._listeners: list[Callable[[pb.NodeAttestation], None]] = []
        self._lock = threading.RLock()
        self._wrapped: OrderedDict[tuple[int, bytes, str, bytes], bytes] = OrderedDict()
        # No result expires before this (ms; a renewal only moves a node's expiry later): expire(),
        # called every second, walks the nodes only once it has passed, not 10,000 of them a second.
        self._next_expiry_ms = 0

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ------------------------------------------------------------ reference values

    @property
    def reference(self) -> ReferenceValues:
        return self._appraiser.reference

    @reference.setter
    def reference(self, value: ReferenceValues) -> None:
        with self._lock:
            self._appraiser.reference = value

    def allow(self, component: str, *digests: str) -> None:
        """Also accept ``digests`` (hex sha256) for ``component``, e.g. a model pushed to the catalog."""
        with self._lock:
            self._appraiser.reference = self._appraiser.reference.allow(component, *digests)

    # ------------------------------------------------------------ one entry point for the wire

    def receive(self, node_id: str, payload: bytes) -> Outcome:
        """Handle an AttesterMessage from ``node_id`` (Evidence.payload); never raises for bad input."""
        try:
            message = parse_attester_message(payload, self._limits)
            body = message.WhichOneof("body")
            if body == "enroll":
                return Outcome(reply=self.enroll_begin(node_id, message.enroll))
            if body == "enroll_answer":
                return Outcome(enrolled=self.enroll_finish(node_id, message.enroll_answer))
            result = self._verify(node_id, message.evidence, payload)
            return Outcome(result=result)
        except (EvidenceRejected, EnrollmentError) as err:
            self._rejected(node_id, err)
            return Outcome(rejected=err)

    def _rejected(self, node_id: str, err: EvidenceRejected | EnrollmentError) -> None:
        self.rejections.add(err.reason)
        with self._lock:
            node = self._nodes.get(node_id)
            repeated = node is not None and node.last_rejection == err.reason
            if node is not None:
                node.last_rejection = err.reason
        # A flood of the same refusal is counted, not logged line by line.
        log.log(
            logging.DEBUG if repeated else logging.WARNING,
            "attestation message from %s refused: %s",
            node_id,
            err,
        )

    # ------------------------------------------------------------ enrollment

    def enroll_begin(self, node_id: str, request: pb.EnrollmentRequest) -> bytes:
        """Check an enrollment request; the VerifierMessage (enroll_challenge) to send back."""
        if request.node_id != node_id:
            raise EnrollmentError("attestation.enroll.wrong_node", f"request names {request.node_id!r}")
        with self._lock:
            node = self._nodes.get(node_id)
            if node is not None:
                if node.state == AttestationState.REVOKED:
                    raise EnrollmentError("attestation.ak.revoked", f"node {node_id!r} was revoked")
                if node.known.ak_public != request.ak_public or node.known.enrollment.kind != request.kind:
                    raise EnrollmentError(
                        "attestation.enroll.conflict",
                        f"node {node_id!r} is enrolled with another AK; forget it first",
                    )
        now = self.now_ms()
        with self._lock:
            repeated, sent = self._pending_enrollments.get(node_id, (None, b""))
            if repeated is not None and repeated.request == request and now <= repeated.expires_ms:
                # The same request again (redelivered, or asked twice): the same challenge, so the
                # answer to either one completes the enrollment; no token is checked twice.
                return sent
        pending, challenge = enroll.begin(
            request,
            trusted=self.ek_trust,
            require_ek_certificate=self.config.require_ek_certificate,
            now_ms=now,
            ttl_ms=int(self.config.enrollment_ttl_s * 1000),
            approval=self.approval if node is None else None,
        )  # the known AK again: nothing new to approve
        reply = pb.VerifierMessage(schema=MESSAGE_SCHEMA, enroll_challenge=challenge).SerializeToString()
        with self._lock:
            self._pending_enrollments[node_id] = (pending, reply)
        return reply

    def enroll_finish(self, node_id: str, answer: pb.EnrollmentAnswer) -> pb.Enrollment:
        with self._lock:
            pending, _ = self._pending_enrollments.pop(node_id, (None, b""))
        if pending is None or answer.node_id != node_id:
            raise EnrollmentError(
                "attestation.enroll.unexpected", f"no enrollment of {node_id!r} in progress"
            )
        record = enroll.finish(pending, answer, self.now_ms())
        with self._lock:
            existing = self._nodes.get(node_id)
            if existing is not None and existing.known.ak_public == record.ak_public:
                return existing.known.enrollment  # a re-enrollment of the same AK: keep the state
            self.register(record)
        log.info(
            "node %s enrolled (%s, EK certified: %s)",
            node_id,
            pb.AttesterKind.Name(record.kind),
            record.ek_certified,
        )
        return record

    def register(self, record: pb.Enrollment) -> None:
        """Trust an enrollment record (one restored from the orchestrator's store, or provisioned)."""
        known = KnownAttester.from_enrollment(record)
        with self._lock:
            if record.node_id in self._nodes:
                raise EnrollmentError(
                    "attestation.enroll.conflict", f"node {record.node_id!r} is already enrolled"
                )
            self._nodes[record.node_id] = _Node(known, updated_ms=self.now_ms())
        self._notify(record.node_id)

    def enrollments(self) -> list[pb.Enrollment]:
        with self._lock:
            return [n.known.enrollment for n in self._nodes.values()]

    def revoke(self, node_id: str) -> None:
        """Distrust the node's AK for good (a stolen or decommissioned device)."""
        with self._lock:
            node = self._node(node_id)
            self._transition(node, AttestationState.REVOKED)
            node.known.revoked = True
        self._notify(node_id)

    def forget(self, node_id: str) -> None:
        """Drop everything about the node; it may enroll again, with any AK."""
        with self._lock:
            self._nodes.pop(node_id, None)
            self._pending_enrollments.pop(node_id, None)
            for nonce in self._per_node.pop(node_id, []):
                self._outstanding.pop(nonce, None)

    # ------------------------------------------------------------ challenges

    def challenge(self, node_id: str) -> bytes:
        """A fresh VerifierMessage (challenge) for ``node_id``; its nonce is single use."""
        nonce = os.urandom(32)
        now = self.now_ms()
        expires = now + int(self.config.challenge_ttl_s * 1000)
        with self._lock:
            self._outstanding[nonce] = IssuedChallenge(node_id, self._pcrs, expires)
            queue = self._per_node.setdefault(node_id, [])
            queue.append(nonce)
            while len(queue) > self.config.max_outstanding_per_node:
                oldest = queue.pop(0)
                self._outstanding.pop(oldest, None)
                self._spend(oldest, now, "attestation.nonce.superseded")
        challenge = pb.AttestationChallenge(
            node_id=node_id,
            nonce=nonce,
            pcr_bank=PCR_BANK,
            pcrs=self._pcrs,
            issued_unix_ms=now,
            expires_unix_ms=expires,
        )
        return pb.VerifierMessage(schema=MESSAGE_SCHEMA, challenge=challenge).SerializeToString()

    def _spend(self, nonce: bytes, now: int, reason: str) -> None:
        self._spent[nonce] = (now + int(self.config.nonce_memory_s * 1000), reason)
        if len(self._spent) > MAX_SPENT_NONCES:
            self._spent.popitem(last=False)

    def _take_nonce(self, nonce: bytes, node_id: str) -> IssuedChallenge:
        now = self.now_ms()
        with self._lock:
            issued = self._outstanding.pop(nonce, None)
            if issued is None:
                spent = self._spent.get(nonce)
                if spent is not None:
                    raise StaleNonce(spent[1], _SPENT_DETAIL[spent[1]])
                raise StaleNonce("attestation.nonce.unknown", "this verifier did not issue the nonce")
            queue = self._per_node.get(issued.node_id, [])
            if nonce in queue:
                queue.remove(nonce)
            self._spend(nonce, now, "attestation.nonce.reused")
        if issued.node_id != node_id:
            raise StaleNonce("attestation.nonce.wrong_node", f"nonce was issued to {issued.node_id!r}")
        if now > issued.expires_ms:
            raise StaleNonce("attestation.nonce.expired", f"expired {now - issued.expires_ms} ms ago")
        return issued

    # ------------------------------------------------------------ verification

    def verify(self, node_id: str, payload: bytes) -> pb.AttestationResult:
        """Appraise an AttesterMessage carrying evidence; raises EvidenceRejected when refused."""
        message = parse_attester_message(payload, self._limits)
        if message.WhichOneof("body") != "evidence":
            raise EvidenceMalformed(detail=f"expected evidence, got {message.WhichOneof('body')}")
        return self._verify(node_id, message.evidence, payload)

    def verify_many(
        self, items: Iterable[tuple[str, bytes]]
    ) -> list[pb.AttestationResult | EvidenceRejected]:
        """``verify`` for a batch; a refusal is returned in place of its result, not raised."""
        out: list[pb.AttestationResult | EvidenceRejected] = []
        for node_id, payload in items:
            try:
                out.append(self.verify(node_id, payload))
            except EvidenceRejected as err:
                self._rejected(node_id, err)
                out.append(err)
        return out

    def _verify(self, node_id: str, evidence: pb.AttestationEvidence, payload: bytes) -> pb.AttestationResult:
        if evidence.node_id != node_id:
            raise EvidenceMalformed("attestation.evidence.wrong_node", f"evidence names {evidence.node_id!r}")
        check_evidence_shape(evidence, self._limits)
        node = self._nodes.get(node_id)
        appraisal = self._appraiser.appraise(
            node_id,
            evidence,
            node.known if node else None,
            self._take_nonce,
            self.now_ms(),
            hashlib.sha256(payload).digest(),
        )
        assert node is not None
        with self._lock:
            self._transition(node, _STATE_OF_STATUS[appraisal.result.status])
            node.appraisal = appraisal
            node.updated_ms = appraisal.result.issued_unix_ms
            self._next_expiry_ms = min(self._next_expiry_ms, appraisal.result.expires_unix_ms)
        if appraisal.result.status != pb.ATTESTATION_STATUS_AFFIRMING:
            log.warning(
                "node %s attested %s: %s",
                node_id,
                pb.AttestationStatus.Name(appraisal.result.status),
                ", ".join(f"{r.id}({r.subject})" for r in appraisal.result.reasons),
            )
        self._notify(node_id)
        return appraisal.result

    # ------------------------------------------------------------ results and gating

    def _effective(self, node: _Node, now: int) -> AttestationState:
        """The node's state as of ``now``: a result past its expiry reads as EXPIRED even before
        ``expire()`` has recorded it (reads never change state; only ``expire()`` and new results do)."""
        if (
            node.state in _RESULTS
            and node.appraisal is not None
            and now >= node.appraisal.result.expires_unix_ms
        ):
            return AttestationState.EXPIRED
        return node.state

    def state(self, node_id: str) -> AttestationState | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return None if node is None else self._effective(node, self.now_ms())

    def result(self, node_id: str) -> pb.SignedAttestationResult | None:
        """The node's latest result if it has not expired."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.appraisal is None or self._effective(node, self.now_ms()) not in _RESULTS:
                return None
            return node.appraisal.signed

    def tier(self, node_id: str) -> str:
        """The tier a scheduler may rely on: that of an unexpired *affirming* result, else "none"."""
        with self._lock:
            return self._tier(self._nodes.get(node_id), self.now_ms())

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        """:meth:`tier` of each node, under one lock and one reading of the clock: a reconcile pass
        asks for every node of the fleet (10,000 calls of :meth:`tier` were a tenth of a busy
        orchestrator's samples)."""
        with self._lock:
            now, nodes = self.now_ms(), self._nodes
            return {node_id: self._tier(nodes.get(node_id), now) for node_id in node_ids}

    def _tier(self, node: _Node | None, now: int) -> str:
        if node is None or node.appraisal is None or self._effective(node, now) != AttestationState.AFFIRMING:
            return "none"
        return node.appraisal.result.tier

    def expire(self) -> list[str]:
        """Record every result that ran out (state EXPIRED, listeners told); returns those node ids,
        each exactly once per expiry: quarantine them. Call it periodically (e.g. every second).

        Also forgets nonces that can no longer be answered or reported.
        """
        now = self.now_ms()
        expired = []
        with self._lock:
            if now >= self._next_expiry_ms:
                next_expiry = _NEVER_MS
                for node_id, node in self._nodes.items():
                    if node.state not in _RESULTS or node.appraisal is None:
                        continue
                    expires = node.appraisal.result.expires_unix_ms
                    if now < expires:
                        next_expiry = min(next_expiry, expires)
                        continue
                    self._transition(node, AttestationState.EXPIRED)
                    node.updated_ms = now
                    expired.append(node_id)
                self._next_expiry_ms = next_expiry
            for nonce, issued in list(self._outstanding.items()):
                if now > issued.expires_ms:
                    del self._outstanding[nonce]
                    queue = self._per_node.get(issued.node_id)
                    if queue and nonce in queue:
                        queue.remove(nonce)
                    self._spend(nonce, now, "attestation.nonce.expired")
            while self._spent and next(iter(self._spent.values()))[0] < now:
                self._spent.popitem(last=False)
        for node_id in expired:
            log.warning("attestation of %s expired", node_id)
            self._notify(node_id)
        return expired

    # ------------------------------------------------------------ key release

    def release_key(self, node_id: str, data_key: bytes, context: str) -> bytes:
        """``data_key`` wrapped to the node's attested binding key (WrappedKey bytes).

        Refused unless the node holds an unexpired affirming result with a certified binding key.
        """
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.appraisal is None:
                raise KeyReleaseError("attestation.key.not_attested", f"node {node_id!r} has no result")
            state = self._effective(node, self.now_ms())
            if state != AttestationState.AFFIRMING:
                raise KeyReleaseError(
                    "attestation.key.not_attested", f"node {node_id!r} is {state.name.lower()}, not affirming"
                )
            binding = node.appraisal.result.binding_public
            kind = node.known.enrollment.kind
        if not binding:
            raise KeyReleaseError("attestation.key.no_binding", f"node {node_id!r} presented no binding key")
        # Authorised just now, as every release is; the wrap itself is reused while the node's binding
        # key is the same: sending the same envelope again is what a resent command does anyway.
        key = (kind, binding, context, hashlib.sha256(data_key).digest())  # not the key itself
        with self._lock:
            wrapped = self._wrapped.get(key)
            if wrapped is not None:
                self._wrapped.move_to_end(key)
                return wrapped
        wrapped = wrap_key(data_key, kind, binding, context).SerializeToString()
        with self._lock:
            self._wrapped[key] = wrapped
            while len(self._wrapped) > MAX_WRAPPED_KEYS:
                self._wrapped.popitem(last=False)
        return wrapped

    # ------------------------------------------------------------ views

    def snapshot(self, node_id: str) -> pb.NodeAttestation | None:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                return None
            return self._view(node_id, node, self.now_ms())

    def snapshots(self) -> list[pb.NodeAttestation]:
        with self._lock:
            now = self.now_ms()
            out = []
            for node_id, node in sorted(self._nodes.items()):
                out.append(self._view(node_id, node, now))
            return out

    def subscribe(self, callback: Callable[[pb.NodeAttestation], None]) -> Callable[[], None]:
        """Call ``callback`` (from the calling thread of the change) on every state change."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def _view(self, node_id: str, node: _Node, now: int) -> pb.NodeAttestation:
        view = pb.NodeAttestation(
            node_id=node_id,
            state=_PB_STATE[self._effective(node, now)],
            kind=node.known.enrollment.kind,
            last_rejection=node.last_rejection,
            updated_unix_ms=node.updated_ms,
        )
        if node.appraisal is not None:
            view.result.CopyFrom(node.appraisal.result)
            view.signed_result.CopyFrom(node.appraisal.signed)
        return view

    def _notify(self, node_id: str) -> None:
        if not self._listeners:
            return
        view = self.snapshot(node_id)
        if view is None:
            return
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(view)
            except Exception:  # one broken watcher must not break verification
                log.exception("attestation listener failed")

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise EnrollmentError("attestation.ak.unknown", f"node {node_id!r} is not enrolled")
        return node

    @staticmethod
    def _transition(node: _Node, new: AttestationState) -> None:
        if new not in TRANSITIONS[node.state]:
            raise IllegalTransition(detail=f"{node.state.name} -> {new.name}")
        node.state = new

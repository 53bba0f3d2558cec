"""The node side: measurements, answers to the verifier, and unwrapping released model keys.

The agent holds one :class:`AttestationResponder` for its lifetime::

    responder = AttestationResponder(node_id, attesters.create(config.attestation),
                                     enrollment_token=token)  # the operator's approval, if any
    responder.open()                                   # keys, PCRs reset (blocking: executor)
    responder.measure("agent.code", code_bytes)        # before anything runs
    responder.measure("agent.config", config_bytes)
    responder.measure("accelerator.fpga-pynq.bitstream", bitstream)
    publish(EVIDENCE, responder.enrollment_request())  # once per connection
    ...
    reply = responder.handle(verifier_message_bytes)   # a challenge from .../cmd
    publish(EVIDENCE, reply)                           # AttesterMessage bytes for Evidence.payload
    ...
    responder.measure(f"model.{name}", artifact_plaintext)   # every model, before it is loaded
    data_key = responder.unwrap(wrapped_key_bytes)     # then keyrelease.open_sealed(data_key, ...)
    responder.close()

Every method blocks (disk, TPM) and is thread-safe; call it through the agent's executor helper.
Measurement order matters: the verifier's reference values may pin the platform PCR, so measure
platform components in a fixed order at start-up, and models as they are loaded.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from google.protobuf.message import DecodeError

from edgeward.v1 import attestation_pb2 as pb

from .attesters.base import Attester
from .errors import ChallengeMalformed
from .eventlog import MeasurementEvent, MeasurementLog, PcrLayout
from .keyrelease import parse_wrapped, unwrap_with_shared_secret
from .verifier import MESSAGE_SCHEMA

log = logging.getLogger(__name__)

MAX_CHALLENGE_BYTES = 4096


class AttestationResponder:
    """The attester role of one node: measurement log + attester (TPM or software)."""

    def __init__(
        self,
        node_id: str,
        attester: Attester,
        layout: PcrLayout | None = None,
        max_events: int = 1024,
        enrollment_token: str = "",
    ) -> None:
        self.node_id = node_id
        self.attester = attester
        self._enrollment_token = enrollment_token  # a secret: never logged
        self.layout = layout or PcrLayout()
        self.max_events = max_events
        self._log = MeasurementLog(self.layout)
        self._lock = threading.Lock()
        self._open = False

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        with self._lock:
            self.attester.open(self.layout.pcrs)
            self._open = True

    def close(self) -> None:
        with self._lock:
            self._open = False
            self.attester.close()

    def __enter__(self) -> AttestationResponder:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def events(self) -> list[MeasurementEvent]:
        with self._lock:
            return list(self._log.events)

    # ------------------------------------------------------------ measurements

    def measure(self, component: str, data: bytes, description: str = "") -> MeasurementEvent:
        """Log and extend the sha256 of ``data``; a repeat of the same digest is a no-op."""
        return self.measure_digest(component, hashlib.sha256(data).digest(), description)

    def measure_file(self, component: str, path: Path, description: str | None = None) -> MeasurementEvent:
        h = hashlib.sha256()
        with Path(path).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return self.measure_digest(
            component, h.digest(), Path(path).name if description is None else description
        )

    def measure_digest(self, component: str, digest: bytes, description: str = "") -> MeasurementEvent:
        with self._lock:
            if len(self._log.events) >= self.max_events:
                raise ValueError(f"measurement log full ({self.max_events} events)")
            event, new = self._log.record(component, digest, description)
            if new:
                try:
                    self.attester.extend(event.pcr, event.hash)
                except BaseException:
                    self._log.events.pop()  # keep the log and the PCR in step
                    raise
                log.debug("measured %s = %s... into PCR %d", component, digest.hex()[:16], event.pcr)
            return event

    # ------------------------------------------------------------ protocol

    def enrollment_request(self) -> bytes:
        """An AttesterMessage (enroll) for Evidence.payload."""
        with self._lock:
            request = self.attester.enrollment_request(self.node_id)
        request.enrollment_token = self._enrollment_token
        return pb.AttesterMessage(schema=MESSAGE_SCHEMA, enroll=request).SerializeToString()

    def handle(self, payload: bytes) -> bytes:
        """Answer a VerifierMessage (enrollment challenge or attestation challenge)."""
        message = self._parse(payload)
        body = message.WhichOneof("body")
        if body == "enroll_challenge":
            challenge = message.enroll_challenge
            self._check_node(challenge.node_id)
            with self._lock:
                proof = self.attester.answer_enrollment(challenge)
            answer = pb.EnrollmentAnswer(node_id=self.node_id, proof=proof)
            return pb.AttesterMessage(schema=MESSAGE_SCHEMA, enroll_answer=answer).SerializeToString()
        if body == "challenge":
            evidence = self.evidence(message.challenge)
            return pb.AttesterMessage(schema=MESSAGE_SCHEMA, evidence=evidence).SerializeToString()
        raise ChallengeMalformed(detail=f"no body ({body!r})")

    respond = handle

    def evidence(self, challenge: pb.AttestationChallenge) -> pb.AttestationEvidence:
        self._check_node(challenge.node_id)
        if len(challenge.nonce) != 32:
            raise ChallengeMalformed(detail=f"nonce of {len(challenge.nonce)} bytes")
        if challenge.pcr_bank != "sha256":
            raise ChallengeMalformed(detail=f"PCR bank {challenge.pcr_bank!r}")
        pcrs = sorted(set(challenge.pcrs))
        if not pcrs or any(p >= 24 for p in pcrs) or self.layout.platform not in pcrs:
            raise ChallengeMalformed(detail=f"PCR selection {list(challenge.pcrs)}")
        with self._lock:
            binding = self.attester.binding(challenge.nonce, self.layout.platform)
            quote = self.attester.quote(challenge.nonce, pcrs)
            values = self.attester.read_pcrs(pcrs)
            events = [
                pb.MeasurementEvent(
                    pcr=e.pcr, component=e.component, digest=e.digest, description=e.description
                )
                for e in self._log.events
            ]
        return pb.AttestationEvidence(
            node_id=self.node_id,
            kind=self.attester.kind,
            ak_public=self.attester.ak_public,
            quote=quote,
            pcr_bank="sha256",
            pcrs=[pb.PcrValue(index=i, digest=values[i]) for i in pcrs],
            events=events,
            binding=binding,
        )

    def unwrap(self, wrapped_key: bytes) -> bytes:
        """The model data key inside a WrappedKey released to this node (KeyReleaseError if not)."""
        wrapped = parse_wrapped(wrapped_key)
        with self._lock:
            shared = self.attester.shared_secret(wrapped, self.layout.platform)
        return unwrap_with_shared_secret(wrapped, shared)

    # ------------------------------------------------------------ helpers

    def _parse(self, payload: bytes) -> pb.VerifierMessage:
        if len(payload) > MAX_CHALLENGE_BYTES:
            raise ChallengeMalformed(detail=f"{len(payload)} bytes")
        message = pb.VerifierMessage()
        try:
            message.ParseFromString(payload)
        except (DecodeError, RuntimeError, ValueError) as err:
            raise ChallengeMalformed(detail=str(err)[:200]) from err
        if message.schema != MESSAGE_SCHEMA:
            raise ChallengeMalformed(detail=f"schema {message.schema}")
        return message

    def _check_node(self, node_id: str) -> None:
        if node_id != self.node_id:
            raise ChallengeMalformed(detail=f"challenge for {node_id!r}, we are {self.node_id!r}")

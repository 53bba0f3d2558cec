"""The measurement event log: what a node measured, in order, and the PCRs it extended.

Every event names a ``component`` (dotted id, e.g. ``agent.code``, ``agent.config``,
``accelerator.fpga-pynq.bitstream``, ``model.vib-cnn``), the sha256 of the measured bytes and a
short description. What is extended into the PCR is the *event hash*

    sha256("edgeward/v1 event\\0" || component || "\\0" || digest || description)

so the component name and description are bound to the PCR as well as the digest: an event
cannot be relabelled after the fact. Replaying a log (extend from all-zero PCRs, in order)
reproduces the PCR values; a log that does not replay was edited.

PCR layout (:class:`PcrLayout`, configurable on both sides): by default platform components
(``agent.*``, ``accelerator.*``) go to PCR 16 and models (``model.*``) to PCR 23. Both are
resettable from locality 0 on PC-client TPMs, so the agent starts every run from a known state
without a reboot (see docs/attestation.md for what that does and does not protect). Models are
kept apart because loading one is routine: the key-release policy binds only the platform PCR.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

ZERO = bytes(32)
EVENT_DOMAIN = b"edgeward/v1 event\x00"
MAX_DESCRIPTION = 256
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_:+-]*)+")


def validate_component(component: str) -> str:
    if len(component) > 128 or not _COMPONENT.fullmatch(component):
        raise ValueError(
            f"component {component!r} must be a dotted id like 'agent.code' or 'model.vib-cnn' (<=128 chars)"
        )
    return component


def event_hash(component: str, digest: bytes, description: str) -> bytes:
    return hashlib.sha256(
        EVENT_DOMAIN + component.encode() + b"\x00" + digest + description.encode()
    ).digest()


def extend(pcr_value: bytes, value: bytes) -> bytes:
    return hashlib.sha256(pcr_value + value).digest()


class MeasurementEvent(NamedTuple):
    """One measurement (a named tuple: the verifier builds thousands of these per second)."""

    pcr: int
    component: str
    digest: bytes
    description: str = ""

    @property
    def hash(self) -> bytes:
        return event_hash(self.component, self.digest, self.description)


@dataclass(frozen=True)
class PcrLayout:
    """Which PCR each class of component is extended into."""

    platform: int = 16
    models: int = 23

    def __post_init__(self) -> None:
        if self.platform == self.models or not all(0 <= p < 24 for p in (self.platform, self.models)):
            raise ValueError("platform and model PCRs must be distinct indices below 24")

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted((self.platform, self.models)))

    def pcr_for(self, component: str) -> int:
        return self.models if component.startswith("model.") else self.platform


def replay(events: Iterable[MeasurementEvent], pcrs: Iterable[int]) -> dict[int, bytes]:
    """PCR values after extending ``events`` in order into all-zero ``pcrs``.

    An event for a PCR outside ``pcrs`` raises KeyError (the caller reports it).
    """
    values = dict.fromkeys(pcrs, ZERO)
    for event in events:
        values[event.pcr] = hashlib.sha256(values[event.pcr] + event.hash).digest()
    return values


@dataclass
class MeasurementLog:
    """An append-only log; ``measure`` is idempotent for a (component, digest) already logged."""

    layout: PcrLayout = field(default_factory=PcrLayout)
    events: list[MeasurementEvent] = field(default_factory=list)

    def record(self, component: str, digest: bytes, description: str = "") -> tuple[MeasurementEvent, bool]:
        """The event for this measurement and whether it is new (and must be extended)."""
        validate_component(component)
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes of sha256")
        description = description[:MAX_DESCRIPTION]
        for event in self.events:
            if event.component == component and event.digest == digest:
                return event, False
        event = MeasurementEvent(self.layout.pcr_for(component), component, digest, description)
        self.events.append(event)
        return event, True

    def replay(self) -> dict[int, bytes]:
        return replay(self.events, self.layout.pcrs)

    def components(self) -> Mapping[str, Sequence[bytes]]:
        out: dict[str, list[bytes]] = {}
        for event in self.events:
            out.setdefault(event.component, []).append(event.digest)
        return out

"""Reference values and the policy checks applied to a replayed event log.

Reference values are data: a versioned YAML document (``kind: ReferenceValues``) listing, per
component, the sha256 digests that are good, optionally golden values of whole PCRs, the
components every node must have measured, and which named checks to run::

    apiVersion: edgeward/v1
    kind: ReferenceValues
    version: 3                      # bump on every change; results record it
    checks: [known_components, digests_match, required_components, pcr_values]
    required: [agent.code, agent.config]
    components:
      agent.code:    {digests: [3f1c...]}
      agent.config:  {digests: [9a0b..., 77e2...]}
      accelerator.*: {digests: [...], on_mismatch: warning}
      model.*:       {digests: []}  # the orchestrator adds catalog digests at run time
    pcrs:
      16: [5d2e...]                 # optional: the platform PCR must be exactly one of these

A component key is an exact name or a prefix ending in ``*``; the exact name wins, then the
longest prefix. Each check is a small named object whose ``why_not`` returns the reasons it
fails (empty when it passes); checks compose with :class:`AllOf` and are registered by name in
:data:`CHECKS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeward.v1 import attestation_pb2 as pb
from edgeward.validation import problems

from .errors import ReferenceValuesError
from .eventlog import MeasurementEvent, validate_component

CONTRAINDICATED = pb.REASON_SEVERITY_CONTRAINDICATED
WARNING = pb.REASON_SEVERITY_WARNING
_SEVERITY = {"contraindicated": CONTRAINDICATED, "warning": WARNING}

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lowercase hex sha256.")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ComponentReference(_Strict):
    """The good digests of one component (or of every component under a ``prefix.*``)."""

    digests: list[Sha256Hex] = Field(default_factory=list, description="sha256 digests that are good.")
    on_mismatch: Literal["contraindicated", "warning"] = Field(
        "contraindicated", description="Severity of a digest that is not listed."
    )
    description: str = Field("", description="What this component is, for people.")


class ReferenceValues(_Strict):
    """A versioned set of reference values and the checks to apply (see the module docstring)."""

    api_version: Literal["edgeward/v1"] = Field("edgeward/v1", alias="apiVersion", description="Schema.")
    kind: Literal["ReferenceValues"] = Field("ReferenceValues", description="Document kind.")
    version: Annotated[int, Field(ge=1)] = Field(description="Increases with every change.")
    checks: list[str] = Field(
        default_factory=lambda: list(_default_checks()), description="Named checks, applied in order."
    )
    required: list[str] = Field(default_factory=list, description="Components every node must measure.")
    components: dict[str, ComponentReference] = Field(
        default_factory=dict, description="Component name or 'prefix.*' -> good digests."
    )
    pcrs: dict[Annotated[int, Field(ge=0, le=23)], list[Sha256Hex]] = Field(
        default_factory=dict, description="Optional golden values of whole PCRs."
    )

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in CHECKS]
        if unknown:
            raise ValueError(f"unknown checks {unknown}; known: {sorted(CHECKS)}")
        return value

    @field_validator("components")
    @classmethod
    def _component_keys(cls, value: dict[str, ComponentReference]) -> dict[str, ComponentReference]:
        for key in value:
            if key.endswith(".*"):
                validate_component(key[:-2] + ".x")
            else:
                validate_component(key)
        return value

    @cached_property
    def compiled(self) -> CompiledReference:
        """The lookup structures the checks use (plain objects: pydantic attribute access is slow)."""
        return CompiledReference(self)

    def lookup(self, component: str) -> tuple[frozenset[bytes], pb.ReasonSeverity] | None:
        return self.compiled.lookup(component)

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        return self.compiled.check.why_not(ctx)

    # -------------------------------------------------------------- changes (return new values)

    def allow(self, component: str, *digests: str) -> ReferenceValues:
        """A copy in which ``component`` also accepts ``digests`` (hex); it only ever widens.

        The copy has an exact entry for ``component``, starting from what it accepted before
        (through a ``prefix.*`` entry, if that is what matched it).
        """
        validate_component(component)
        current = self.components.get(component) or self._prefix_entry(component) or ComponentReference()
        merged = sorted(set(current.digests) | set(digests))
        components = {**self.components, component: current.model_copy(update={"digests": merged})}
        return ReferenceValues.model_validate(
            {
                **self.model_dump(by_alias=True),
                "components": {k: v.model_dump() for k, v in components.items()},
            }
        )

    def _prefix_entry(self, component: str) -> ComponentReference | None:
        matches = [
            (k, v) for k, v in self.components.items() if k.endswith("*") and component.startswith(k[:-1])
        ]
        return max(matches, key=lambda kv: len(kv[0]))[1] if matches else None

    @classmethod
    def from_events(
        cls, events: Iterable[MeasurementEvent], version: int, *, pin_pcrs: Mapping[int, bytes] | None = None
    ) -> ReferenceValues:
        """Reference values that accept exactly what a known-good node measured.

        Every measured component becomes required with its digests; ``pin_pcrs`` (e.g. the
        node's platform PCR) also fixes whole PCR values, and with them the order of events.
        Review the result before using it: it trusts whatever that node ran.
        """
        components: dict[str, set[str]] = {}
        for event in events:
            components.setdefault(event.component, set()).add(event.digest.hex())
        return cls(
            version=version,
            required=sorted(c for c in components if not c.startswith("model.")),
            components={c: ComponentReference(digests=sorted(d)) for c, d in components.items()},
            pcrs={i: [v.hex()] for i, v in (pin_pcrs or {}).items()},
        )

    # -------------------------------------------------------------- IO

    @classmethod
    def from_yaml(cls, text: str, source: str = "<reference values>") -> ReferenceValues:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ReferenceValuesError(detail=f"{source}: {err}") from err
        if not isinstance(data, dict):
            raise ReferenceValuesError(detail=f"{source}: top level must be a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ReferenceValuesError(detail=f"{source}: " + problems(err)) from err

    @classmethod
    def load(cls, path: Path) -> ReferenceValues:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ReferenceValuesError(detail=f"cannot read {path}: {err}") from err
        return cls.from_yaml(text, str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(by_alias=True), sort_keys=False)


class CompiledReference:
    """Reference values as dicts and frozensets, with a memo of component lookups."""

    __slots__ = ("_exact", "_memo", "_prefixes", "check", "pcrs", "required", "version")
    _MEMO_MAX = 4096

    def __init__(self, ref: ReferenceValues) -> None:
        self.version = ref.version
        self.required = tuple(ref.required)
        self._exact: dict[str, tuple[frozenset[bytes], pb.ReasonSeverity]] = {}
        prefixes: list[tuple[str, frozenset[bytes], pb.ReasonSeverity]] = []
        for key, entry in ref.components.items():
            value = (frozenset(bytes.fromhex(d) for d in entry.digests), _SEVERITY[entry.on_mismatch])
            if key.endswith("*"):
                prefixes.append((key[:-1], *value))
            else:
                self._exact[key] = value
        self._prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
        self.pcrs = {i: frozenset(bytes.fromhex(v) for v in values) for i, values in ref.pcrs.items()}
        self.check: Check = AllOf([CHECKS[name] for name in ref.checks])
        self._memo: dict[str, tuple[frozenset[bytes], pb.ReasonSeverity] | None] = {}

    def lookup(self, component: str) -> tuple[frozenset[bytes], pb.ReasonSeverity] | None:
        """(good digests, severity of a mismatch) for ``component``, or None if not referenced."""
        try:
            return self._memo[component]
        except KeyError:
            pass
        entry = self._exact.get(component)
        if entry is None:
            for prefix, digests, severity in self._prefixes:
                if component.startswith(prefix):
                    entry = (digests, severity)
                    break
        if len(self._memo) >= self._MEMO_MAX:  # component names come from nodes: bound the memo
            self._memo.clear()
        self._memo[component] = entry
        return entry


# ------------------------------------------------------------------------------ checks


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What the checks see: a log that already replayed to the quoted PCR values."""

    events: Sequence[MeasurementEvent]
    pcrs: Mapping[int, bytes]
    reference: CompiledReference


class Check(Protocol):
    name: str

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        """Why ``ctx`` fails this check; empty when it passes."""
        ...


def reason(
    reason_id: str, subject: str, message: str, severity: pb.ReasonSeverity = CONTRAINDICATED
) -> pb.Reason:
    return pb.Reason(id=reason_id, severity=severity, subject=subject, message=message)


class KnownComponents:
    """Every measured component has reference values."""

    name = "known_components"

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        return [
            reason(
                "reference.component.unknown",
                e.component,
                f"{e.component} is not in reference values v{ctx.reference.version}",
            )
            for e in ctx.events
            if ctx.reference.lookup(e.component) is None
        ]


class DigestsMatch:
    """Every measured digest is one of its component's good digests."""

    name = "digests_match"

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        out = []
        for e in ctx.events:
            entry = ctx.reference.lookup(e.component)
            if entry is not None and e.digest not in entry[0]:
                out.append(
                    reason(
                        "reference.digest.mismatch",
                        e.component,
                        f"sha256 {e.digest.hex()[:16]}... of {e.component} is not in reference values "
                        f"v{ctx.reference.version}",
                        entry[1],
                    )
                )
        return out


class RequiredComponents:
    """Every required component was measured."""

    name = "required_components"

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        seen = {e.component for e in ctx.events}
        return [
            reason("reference.component.missing", c, f"{c} was never measured")
            for c in ctx.reference.required
            if c not in seen
        ]


class PcrValues:
    """Every PCR with golden values holds one of them (this also fixes the order of events)."""

    name = "pcr_values"

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        out = []
        for index, good in ctx.reference.pcrs.items():
            value = ctx.pcrs.get(index)
            if value is None or value not in good:
                shown = value.hex()[:16] + "..." if value is not None else "not quoted"
                out.append(
                    reason(
                        "reference.pcr.unexpected",
                        f"pcr{index}",
                        f"PCR {index} is {shown}, not a golden value",
                    )
                )
        return out


class AllOf:
    """All of ``checks``, in order; the reasons of every failing one."""

    def __init__(self, checks: Iterable[Check]) -> None:
        self.checks = tuple(checks)
        self.name = "all_of(" + ",".join(c.name for c in self.checks) + ")"

    def why_not(self, ctx: CheckContext) -> list[pb.Reason]:
        out: list[pb.Reason] = []
        for check in self.checks:
            out.extend(check.why_not(ctx))
        return out


CHECKS: dict[str, Check] = {}


def register_check(check: Check) -> None:
    if check.name in CHECKS:
        raise ValueError(f"check {check.name!r} is already registered")
    CHECKS[check.name] = check


for _check in (KnownComponents(), DigestsMatch(), RequiredComponents(), PcrValues()):
    register_check(_check)

DEFAULT_CHECKS: tuple[str, ...] = ("known_components", "digests_match", "required_components", "pcr_values")


def _default_checks() -> tuple[str, ...]:
    return DEFAULT_CHECKS

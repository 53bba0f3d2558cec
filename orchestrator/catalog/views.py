"""Where models run and whether that is allowed: placements and the compliance report.

Both are pure functions of one consistent read of the store (the replicas and the catalog) plus
what the verifier and the telemetry say now; the caller gathers those once per request.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edgeward.v1 import api_pb2
from edgeward.v1 import attestation_pb2 as apb

from ..phases import ACTIVE, Phase
from ..store import ModelRecord, ReplicaRecord
from .lifecycle import ModelState


@dataclass(frozen=True)
class NodeTrust:
    tier: str  # none | software | tpm2
    status: str  # affirming, warning, ..., unknown
    expires_ms: int = 0


def node_trust(view: apb.NodeAttestation | None, tier: str) -> NodeTrust:
    if view is None:
        return NodeTrust(tier, "unknown")
    status = apb.AttestationState.Name(view.state).removeprefix("ATTESTATION_STATE_").lower()
    return NodeTrust(tier, status, view.result.expires_unix_ms if view.HasField("result") else 0)


def placements(
    catalog: Iterable[ModelRecord],
    replicas: Iterable[ReplicaRecord],
    trust: Callable[[str], NodeTrust],
    inferences: Callable[[str], dict[tuple[str, str], int]],
    *,
    name: str = "",
    version: str = "",
    node_id: str = "",
) -> list[api_pb2.Placement]:
    """One entry per (node, model version) with live replicas, filtered by name/version/node."""
    models = {(m.name, m.version): m for m in catalog}
    groups: dict[tuple[str, str, str], list[ReplicaRecord]] = defaultdict(list)
    for rep in replicas:
        if rep.node_id is None or rep.phase not in ACTIVE:
            continue
        if (name and rep.model_name != name) or (version and rep.model_version != version):
            continue
        if node_id and rep.node_id != node_id:
            continue
        groups[(rep.node_id, rep.model_name, rep.model_version)].append(rep)
    out = []
    counts: dict[str, dict[tuple[str, str], int]] = {}
    for (node, model, ver), reps in sorted(groups.items()):
        record = models.get((model, ver))
        running = [r for r in reps if r.phase == Phase.RUNNING]
        t = trust(node)
        if node not in counts:
            counts[node] = inferences(node)
        out.append(
            api_pb2.Placement(
                node_id=node,
                model=model,
                version=ver,
                model_state=ModelState(record.state).to_pb() if record else api_pb2.MODEL_STATE_UNSPECIFIED,
                replicas=len(reps),
                running=len(running),
                since_unix_ms=min(r.updated_ms for r in running or reps),
                deployments=sorted({r.deployment for r in reps}),
                attestation_tier=t.tier,
                attestation_status=t.status,
                attestation_expires_unix_ms=t.expires_ms,
                inferences=counts[node].get((model, ver), 0),
                signed=bool(record and _signed(record)),
            )
        )
    return out


def _signed(record: ModelRecord) -> bool:
    model = api_pb2.Model.FromString(record.info)
    return bool(model.signature.key_id)


def compliance(
    catalog: Iterable[ModelRecord], placed: list[api_pb2.Placement], nodes_checked: int, now_ms: int
) -> api_pb2.ComplianceReport:
    """Every placement of a deprecated, revoked or unsigned version (docs/lifecycle.md)."""
    models = {(m.name, m.version): m for m in catalog}
    findings: list[api_pb2.ComplianceFinding] = []
    for p in placed:
        record = models.get((p.model, p.version))
        issues: list[tuple[str, str]] = []
        if record is None:
            issues.append(("model.unknown", "not in the catalog"))
        else:
            if record.state == ModelState.DEPRECATED:
                issues.append(("model.deprecated", record.state_reason or "deprecated"))
            elif record.state == ModelState.REVOKED:
                issues.append(("model.revoked", record.state_reason or "revoked"))
            if not p.signed:
                issues.append(("model.unsigned", "published without a publisher signature"))
        findings.extend(
            api_pb2.ComplianceFinding(
                node_id=p.node_id,
                model=p.model,
                version=p.version,
                issue=issue,
                detail=detail,
                replicas=p.replicas,
                since_unix_ms=p.since_unix_ms,
                attestation_tier=p.attestation_tier,
            )
            for issue, detail in issues
        )
    return api_pb2.ComplianceReport(
        generated_unix_ms=now_ms,
        nodes_checked=nodes_checked,
        placements_checked=len(placed),
        compliant=not findings,
        findings=findings,
    )

"""Rich tables and display names of API objects, shared by the CLI, ``edgeward up`` and the console."""

from __future__ import annotations

import time

from rich.table import Table

from edgeward.v1 import api_pb2, node_pb2


def phase_name(value: int) -> str:
    return node_pb2.ReplicaPhase.Name(value).removeprefix("REPLICA_PHASE_").capitalize()


def state_name(value: int) -> str:
    return node_pb2.NodeState.Name(value).removeprefix("NODE_STATE_").lower()


def deployments_table(items: list[api_pb2.Deployment], detail: bool = False) -> Table:
    table = Table(title="deployments", title_justify="left")
    for col in ("NAME", "MODEL", "READY", "PHASES", "REASON"):
        table.add_column(col)
    for dep in items:
        phases: dict[str, int] = {}
        reasons = set()
        for rep in dep.status.replica_list:
            phases[phase_name(rep.phase)] = phases.get(phase_name(rep.phase), 0) + 1
            if rep.phase == node_pb2.REPLICA_PHASE_PENDING or rep.phase == node_pb2.REPLICA_PHASE_FAILED:
                reasons.add(f"{rep.reason}: {rep.message}" if rep.message else rep.reason)
        table.add_row(
            dep.name,
            f"{dep.spec.model.name}:{dep.spec.model.version}",
            f"{dep.status.running}/{dep.spec.replicas}",
            " ".join(f"{k}={v}" for k, v in sorted(phases.items())),
            "; ".join(sorted(reasons)),
        )
    if detail and items:
        for rep in items[0].status.replica_list:
            table.add_row(
                f"  {rep.id}", rep.node_id or "-", phase_name(rep.phase), rep.accelerator, rep.reason
            )
    return table


def nodes_table(items: list[api_pb2.Node]) -> Table:
    table = Table(title="nodes", title_justify="left")
    for col in ("NODE", "STATUS", "TRUST", "PROFILE", "ACCELERATORS", "REPLICAS", "POWER W", "ENDPOINT"):
        table.add_column(col)
    for node in items:
        status = state_name(node.state) + (" (cordoned)" if node.cordoned else "")
        accs = ", ".join(
            a.kind + (" (simulated)" if a.simulated else "") + ("" if a.availability in ("", "ok") else " !")
            for a in node.inventory.accelerators
        )
        power = f"{node.telemetry.power_w:.2f}" if node.HasField("telemetry") else "-"
        trust = node.attestation_tier or "none"
        if node.quarantine_reason:
            trust += f" (quarantined: {node.quarantine_reason})"
        table.add_row(
            node.id,
            status,
            trust,
            node.inventory.hardware_profile,
            accs,
            str(len(node.replicas)),
            power,
            node.inventory.inference_endpoint,
        )
    return table


def model_state_name(value: int) -> str:
    return api_pb2.ModelState.Name(value).removeprefix("MODEL_STATE_").lower()


def models_table(items: list[api_pb2.Model]) -> Table:
    table = Table(title="models", title_justify="left")
    for col in ("NAME", "VERSION", "STATE", "PARENT", "SIZE", "DTYPES", "USE CASE", "PUBLISHER", "SHA256"):
        table.add_column(col)
    for m in items:
        table.add_row(
            m.name,
            m.version,
            model_state_name(m.state),
            m.parent_version or "-",
            f"{m.size / 1024:.1f} KiB",
            ",".join(m.dtypes),
            m.use_case,
            m.signature.key_id or "unsigned",
            m.sha256[:12],
        )
    return table


def placements_table(items: list[api_pb2.Placement], title: str = "placements") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("NODE", "MODEL", "STATE", "REPLICAS", "SINCE", "ATTESTATION", "INFERENCES", "DEPLOYMENTS"):
        table.add_column(col)
    for p in items:
        table.add_row(
            p.node_id,
            f"{p.model}:{p.version}",
            model_state_name(p.model_state) + ("" if p.signed else " (unsigned)"),
            f"{p.running}/{p.replicas} running",
            clock(p.since_unix_ms),
            f"{p.attestation_tier} ({p.attestation_status})",
            str(p.inferences),
            ",".join(p.deployments),
        )
    return table


def clock(unix_ms: int) -> str:
    """A wall-clock time for a table, local time; '-' for none."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000)) if unix_ms else "-"


def wipe_table(status: api_pb2.WipeStatus) -> Table:
    table = Table(
        title=f"wipe {status.id} of {status.name} {', '.join(status.versions)}", title_justify="left"
    )
    for col in ("NODE", "STATE", "UPDATED", "MESSAGE"):
        table.add_column(col)
    for n in status.nodes:
        state = api_pb2.WipeNodeState.Name(n.state).removeprefix("WIPE_NODE_STATE_").lower()
        table.add_row(n.node_id, state, clock(n.updated_unix_ms), n.message)
    return table

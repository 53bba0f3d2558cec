"""Orchestrator-side commands: ``orchestrator``, ``up``, ``apply``, ``get``, ``delete``, ``models ...``,
``compliance``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from edgeward.security.files import private_umask
from edgeward.v1 import api_pb2, node_pb2

from .client import ClientError, EdgewardClient
from .config import ConfigError, load_config
from .tables import (
    clock,
    deployments_table,
    model_state_name,
    models_table,
    nodes_table,
    phase_name,
    placements_table,
    wipe_table,
)

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(err: Exception) -> int:
    err_console.print(f"[red]error:[/red] {err}")
    return 1


# ------------------------------------------------------------ orchestrator


def cmd_orchestrator(args: argparse.Namespace) -> int:
    setup_logging(max(args.verbose, 1))
    private_umask()  # the store, the ownership registry, the audit log: 0600 whatever creates them
    try:
        config = load_config(
            Path(args.config) if args.config else None,
            broker={"url": args.broker_url or None, "embedded_port": args.broker_port},
            state_dir=args.state_dir,
            grpc_bind=args.grpc_bind,
        )
    except (ConfigError, ValueError) as err:
        return _fail(err)
    return asyncio.run(_serve(config))


async def _serve(config: Any) -> int:
    from .server import Orchestrator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Orchestrator(config) as orch:
        print(f"orchestrator ready grpc={orch.address} broker={orch.broker_url}", flush=True)
        await stop.wait()
    return 0


# ------------------------------------------------------------ apply / get / delete


def cmd_apply(args: argparse.Namespace) -> int:
    results = []
    with EdgewardClient(args.server) as client:
        for filename in args.filename:
            try:
                text = Path(filename).read_text()
            except OSError as err:
                return _fail(err)
            try:
                resp = client.apply(text, dry_run=args.dry_run)
            except ClientError as err:
                err_console.print(f"[red]{filename}: {err.code}[/red]")
                for part in err.detail.split("; "):
                    err_console.print(f"  {part}")
                return 1
            verb = (
                "validated"
                if args.dry_run
                else "created"
                if resp.created
                else "configured"
                if resp.changed
                else "unchanged"
            )
            results.append({"name": resp.deployment.name, "result": verb})
            if not args.json:
                console.print(f"deployment/{resp.deployment.name} {verb}")
        if args.wait and not args.dry_run:
            names = [r["name"] for r in results]
            if not _wait_running(client, names, args.wait, quiet=args.json):
                return 1
    if args.json:
        print(json.dumps(results))
    return 0


def _wait_running(client: EdgewardClient, names: list[str], timeout: float, quiet: bool) -> bool:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} running"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    ) as progress:
        tasks = {n: progress.add_task(f"deployment/{n}", total=None) for n in names}
        while True:
            done = True
            for name in names:
                dep = client.get_deployment(name)
                progress.update(tasks[name], total=dep.spec.replicas, completed=dep.status.running)
                done &= dep.status.running >= dep.spec.replicas
            if done:
                return True
            if time.monotonic() > deadline:
                err_console.print(
                    "[yellow]timed out waiting; see `edgeward get deployment NAME` for reasons[/yellow]"
                )
                return False
            time.sleep(0.3)


def cmd_get(args: argparse.Namespace) -> int:
    kind = args.kind.rstrip("s")
    table: Table
    items: list[Any]
    try:
        with EdgewardClient(args.server) as client:
            if kind == "deployment":
                deps = [client.get_deployment(args.name)] if args.name else client.list_deployments()
                items, table = deps, deployments_table(deps, detail=bool(args.name))
            elif kind == "node":
                nodes = [client.get_node(args.name)] if args.name else client.list_nodes()
                items, table = nodes, nodes_table(nodes)
            else:
                models = [client.get_model(args.name)] if args.name else client.list_models()
                items, table = models, models_table(models)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps([MessageToDict(i, preserving_proto_field_name=True) for i in items], indent=2))
    else:
        console.print(table)
    return 0


def _split_model(text: str) -> tuple[str, str]:
    name, _, version = text.partition(":")
    return name, version


def _dump(message: Any) -> Any:
    return MessageToDict(message, preserving_proto_field_name=True)


def cmd_explain(args: argparse.Namespace) -> int:
    """Each replica's phase and the machine-readable reason behind it, as the scheduler gave it."""
    name = args.target.rpartition("/")[2]
    try:
        with EdgewardClient(args.server) as client:
            dep = client.get_deployment(name)
    except ClientError as err:
        return _fail(err)
    replicas = [
        {
            "replica": r.id,
            "phase": phase_name(r.phase),
            "node": r.node_id,
            "reason": r.reason,
            "message": r.message,
        }
        for r in dep.status.replica_list
    ]
    if args.json:
        print(json.dumps({"deployment": name, "running": dep.status.running, "replicas": replicas}, indent=2))
        return 0
    console.print(f"deployment/{name}: {dep.status.running}/{dep.spec.replicas} running")
    table = Table(show_header=True)
    for col in ("REPLICA", "PHASE", "NODE", "REASON", "DETAIL"):
        table.add_column(col)
    for r in replicas:
        table.add_row(r["replica"], r["phase"], r["node"] or "-", r["reason"], r["message"])
    console.print(table)
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from .scheduler import sim

    policies = tuple(args.policy) if args.policy else sim.POLICIES
    report = sim.run(nodes=args.nodes, replicas=args.replicas, policy=policies, seed=args.seed)
    print(report.table())
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    kind, _, name = args.target.rpartition("/")
    if kind not in ("", "deployment", "deployments"):
        return _fail(ValueError(f"can only delete deployments, not {kind!r}"))
    try:
        with EdgewardClient(args.server) as client:
            resp = client.delete_deployment(name)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps({"name": name, "replicas_evicted": resp.replicas_evicted}))
    else:
        console.print(f"deployment/{name} deleted ({resp.replicas_evicted} replicas evicted)")
    return 0


_SEVERITY = {
    "info": node_pb2.SEVERITY_INFO,
    "warning": node_pb2.SEVERITY_WARNING,
    "error": node_pb2.SEVERITY_ERROR,
}
_SEVERITY_STYLE = {node_pb2.SEVERITY_WARNING: "yellow", node_pb2.SEVERITY_ERROR: "red"}


def _print_event(event: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time_unix_ms / 1000))
    level = node_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower()
    style = _SEVERITY_STYLE.get(event.severity, "")
    line = f"{stamp} {level:<7} {event.kind:<24} {event.subject:<28} {event.message}"
    console.print(f"[{style}]{line}[/{style}]" if style else line, markup=bool(style), highlight=False)


def cmd_events(args: argparse.Namespace) -> int:
    from edgeward.v1 import events_pb2

    flt = events_pb2.EventFilter(
        kind_prefix=args.kind, subject_prefix=args.subject, min_severity=_SEVERITY[args.severity]
    )
    try:
        with EdgewardClient(args.server) as client:
            last = 0
            for event in client.list_events(flt, max(args.limit, 1)):
                _print_event(event, args.json)
                last = event.seq
            if args.follow:
                # Replay from the last printed event so nothing published in between is missed.
                after = last or max((e.seq for e in client.list_events(None, 1)), default=0)
                for event in client.watch_events(flt, after_seq=after):
                    _print_event(event, args.json)
    except ClientError as err:
        return _fail(err)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_models_push(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .catalog import CatalogError, PublisherKey

    try:
        data = Path(args.file).read_bytes()
        key = PublisherKey.load(Path(args.key)) if args.key else None
        labels = dict(_label(item) for item in args.label)
    except (OSError, CatalogError, ValueError) as err:
        return _fail(err)
    try:
        with (
            EdgewardClient(args.server) as client,
            Progress(console=err_console, disable=args.json) as progress,
        ):
            task = progress.add_task(f"push {args.name}:{args.version}", total=len(data))
            model = client.push_model(
                data,
                args.name,
                args.version,
                use_case=args.use_case,
                description=args.description,
                labels=labels,
                parent_version=args.parent,
                owner_team=args.owner_team,
                key=key,
                progress=lambda done, total: progress.update(task, completed=done),
            )
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(_dump(model)))
    else:
        console.print(
            f"model/{model.name}:{model.version} pushed ({model.size} bytes, sha256 {model.sha256[:12]}, "
            f"publisher {model.signature.key_id or 'unsigned'})"
        )
    return 0


def _label(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--label {item!r}: expected KEY=VALUE")
    return key, value


def cmd_models_list(args: argparse.Namespace) -> int:
    try:
        with EdgewardClient(args.server) as client:
            items: list = client.placements(node_id=args.node) if args.node else client.list_models()
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps([_dump(i) for i in items], indent=2))
    elif args.node:
        console.print(placements_table(items, f"models on node {args.node}"))
    else:
        console.print(models_table(items))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    name, version = _split_model(args.model)
    try:
        with EdgewardClient(args.server) as client:
            model = client.get_model(name, version)
            placed = client.placements(model.name, model.version)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps({"model": _dump(model), "placements": [_dump(p) for p in placed]}, indent=2))
        return 0
    console.print(models_table([model]))
    console.print(
        f"created {clock(model.created_unix_ms)}, updated {clock(model.updated_unix_ms)}", highlight=False
    )
    if model.state_reason:
        console.print(f"state reason: {model.state_reason}", highlight=False)
    if model.owner_team:
        console.print(f"owner team: {model.owner_team}", highlight=False)
    for direction, tensors in (("input", model.inputs), ("output", model.outputs)):
        for t in tensors:
            console.print(f"{direction} {t.name}: {t.datatype}{list(t.shape)}", highlight=False)
    console.print(f"ops: {', '.join(model.ops)}", highlight=False)
    console.print(placements_table(placed, f"where {model.name}:{model.version} runs"))
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    try:
        with EdgewardClient(args.server) as client:
            history = client.model_history(args.name)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(_dump(history), indent=2))
        return 0
    console.print(models_table(list(history.versions)))
    table = Table(title=f"history of {args.name}", title_justify="left")
    for col in ("TIME", "VERSION", "ACTION", "REASON"):
        table.add_column(col)
    for e in history.entries:
        table.add_row(clock(e.at_unix_ms), e.version, e.action, e.reason)
    console.print(table)
    return 0


def cmd_models_state(args: argparse.Namespace) -> int:
    name, version = _split_model(args.model)
    if not version:
        return _fail(ValueError(f"{args.action} needs NAME:VERSION"))
    try:
        with EdgewardClient(args.server) as client:
            call = client.deprecate_model if args.action == "deprecate" else client.revoke_model
            model = call(name, version, args.reason)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(_dump(model)))
    else:
        console.print(f"model/{model.name}:{model.version} {model_state_name(model.state)}")
    return 0


def cmd_models_keygen(args: argparse.Namespace) -> int:
    from .catalog import CatalogError, PublisherKey

    key = PublisherKey.generate()
    try:
        private, public = key.write(Path(args.out), args.name)
    except (OSError, CatalogError) as err:
        return _fail(err)
    print(
        f"publisher key {key.key_id}: private {private} (keep it secret), public {public} (give it to the operators)"
    )
    return 0


def cmd_models_wipe(args: argparse.Namespace) -> int:
    name, version = _split_model(args.model)
    nodes = [n for n in args.nodes.split(",") if n]
    try:
        with EdgewardClient(args.server) as client:
            status = client.wipe_model(
                name, version, node_ids=nodes, deadline_s=args.deadline, reason=args.reason
            )
            if not args.json:
                console.print(
                    f"wipe {status.id}: {name} {', '.join(status.versions)} revoked, {status.replicas_evicted} "
                    f"replica(s) evicted, {len(status.nodes)} node(s) ordered"
                )
            if not args.no_wait:
                status = _follow_wipe(client, status, quiet=args.json)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(_dump(status), indent=2))
    else:
        console.print(wipe_table(status))
    return 0 if status.done and not status.quarantined else 1


def _follow_wipe(client: EdgewardClient, status: api_pb2.WipeStatus, quiet: bool) -> api_pb2.WipeStatus:
    """Until no node is pending (each either confirmed or, past the deadline, quarantined)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} confirmed"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    ) as progress:
        task = progress.add_task(f"wipe {status.id}", total=len(status.nodes))
        while not status.done:
            time.sleep(0.3)
            status = client.get_wipe(status.id)
            progress.update(task, completed=status.confirmed)
    return status


def cmd_compliance(args: argparse.Namespace) -> int:
    try:
        with EdgewardClient(args.server) as client:
            report = client.compliance()
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(_dump(report), indent=2))
        return 0 if report.compliant else 1
    console.print(
        f"{report.nodes_checked} node(s), {report.placements_checked} placement(s) checked: "
        + (
            "[green]compliant[/green]"
            if report.compliant
            else f"[red]{len(report.findings)} finding(s)[/red]"
        )
    )
    if report.findings:
        table = Table(title="compliance", title_justify="left")
        for col in ("NODE", "MODEL", "ISSUE", "REPLICAS", "SINCE", "ATTESTATION", "DETAIL"):
            table.add_column(col)
        for f in report.findings:
            table.add_row(
                f.node_id,
                f"{f.model}:{f.version}",
                f.issue,
                str(f.replicas),
                clock(f.since_unix_ms),
                f.attestation_tier,
                f.detail,
            )
        console.print(table)
    return 0 if report.compliant else 1


def cmd_up(args: argparse.Namespace) -> int:
    from edgeward.mqtt.broker import EMBEDDED_MAX_NODES

    from .up import run_up

    setup_logging(args.verbose)
    private_umask()
    if args.nodes < 1:
        return _fail(ValueError("--nodes must be at least 1"))
    if args.nodes > EMBEDDED_MAX_NODES:
        return _fail(
            ValueError(
                f"--nodes {args.nodes}: the embedded MQTT broker is measured to serve {EMBEDDED_MAX_NODES} nodes "
                "(docs/benchmarks.md). For a larger fleet use an external broker: run Mosquitto, then "
                "'edgeward orchestrator --broker-url mqtt://HOST:PORT' and agents (or 'edgeward sim-fleet "
                "--nodes N --broker-url ...' for hollow nodes) against it"
            )
        )
    return run_up(args)


# ------------------------------------------------------------ keys


def cmd_keys(args: argparse.Namespace) -> int:
    """``edgeward keys status|rotate``: works on the store directly (SQLite: stop nothing; a running
    orchestrator picks up the new active KEK at its next push)."""
    from edgeward.security.keywrap import KeyWrapError, key_id_of, rotate

    from .errors import StoreError
    from .store import open_store

    setup_logging(args.verbose)
    private_umask()
    try:
        config = load_config(Path(args.config) if args.config else None, state_dir=args.state_dir)
        keys = config.key_encryption.open(config.state_dir)
        store = open_store(config, keys)
    except (ConfigError, StoreError, ValueError, OSError, KeyWrapError) as err:
        return _fail(err)
    try:
        if args.action == "rotate":
            done = rotate(store, keys, retire=args.retire)
            print(
                f"active KEK {done.new_key_id}; {done.rewrapped} data key(s) re-wrapped"
                + (f"; retired {', '.join(done.retired)}" if done.retired else "")
            )
        active = keys.provider.active().key_id
        counts: dict[str, int] = {}
        for _name, _version, stored in store.data_keys():
            if stored:
                key_id = key_id_of(stored) or "(raw)"
                counts[key_id] = counts.get(key_id, 0) + 1
        for key_id in sorted(set(keys.provider.ids()) | set(counts)):
            mark = " (active)" if key_id == active else ""
            print(f"{key_id}{mark}: wraps {counts.get(key_id, 0)} data key(s)")
    except KeyWrapError as err:
        return _fail(err)
    finally:
        store.close()
    return 0


# ------------------------------------------------------------ rollouts


def cmd_rollout(args: argparse.Namespace) -> int:
    name = args.deployment.removeprefix("deployment/")
    try:
        with EdgewardClient(args.server, timeout=30) as client:
            status = client.rollout(args.action, name, args.reason)
    except ClientError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True)))
        return 0
    state = api_pb2.RolloutState.Name(status.state).removeprefix("ROLLOUT_STATE_").lower()
    console.print(
        f"deployment/{status.deployment}: {status.strategy} {status.from_model} -> {status.to_model} "
        f"[bold]{state}[/bold]"
    )
    console.print(
        f"  step {status.step}/{status.steps}: {status.step_replicas}/{status.replicas} replicas on the new "
        f"version ({status.new_running} running, {status.old_live} old live)"
    )
    if status.reason:
        console.print(f"  {status.reason}: {status.message}", markup=False, highlight=False)
    if status.figures:
        console.print("  gates now: " + ", ".join(f"{k} {v:g}" for k, v in sorted(status.figures.items())))
    for step in status.history:
        figures = ", ".join(f"{k} {v:g}" for k, v in sorted(step.figures.items()))
        console.print(
            f"  step {step.step} ({step.replicas} replicas) {step.verdict} {step.reason} {figures}".rstrip(),
            markup=False,
            highlight=False,
        )
    return 0

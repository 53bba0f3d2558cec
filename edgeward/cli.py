"""``edgeward``: the one command-line entry point.

This module only parses arguments; each command lives with its role (``orchestrator.cli`` or
``node_agent.cli``) and is imported when it runs, so the agent never loads orchestrator code and
the other way round.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import os
import signal
import sys

DEFAULT_SERVER = os.environ.get("EDGEWARD_SERVER", "127.0.0.1:50051")
# The commands that run as services: they hold large heaps of long-lived objects (the fleet's views,
# thousands of MQTT sessions) and make short-lived ones for every message. At Python's default
# collection thresholds (700, 10, 10) the cyclic collector took a fifth of a hollow fleet process's
# CPU (2,500 nodes, heartbeat 5 s, steady state: a young collection every 0.2 s, and full ones of
# the whole heap); at these it runs rarely (docs/benchmarks.md, "Garbage collection"). Cycles are
# still collected, after 10,000 net allocations rather than 700.
SERVICES = frozenset({"up", "orchestrator", "agent", "sim-fleet"})
SERVICE_GC_THRESHOLDS = (10_000, 20, 20)


def _server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, help="orchestrator gRPC address (env EDGEWARD_SERVER)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _client_tls(p)


def _client_tls(p: argparse.ArgumentParser) -> None:
    """Mutual TLS towards the orchestrator (docs/security.md); without them: plaintext."""
    # --tls-*: `models push --key` is the publisher's signing key.
    for flag, what, env in (
        ("--tls-ca", "the fleet CA", "EDGEWARD_CA"),
        ("--tls-cert", "your certificate", "EDGEWARD_CERT"),
        ("--tls-key", "your private key", "EDGEWARD_KEY"),
    ):
        p.add_argument(flag, metavar="PEM", help=f"mutual TLS: {what} (env {env})")


def _export_client_tls(args: argparse.Namespace) -> None:
    """The clients read $EDGEWARD_CA/CERT/KEY (`TlsFiles.from_env`); flags override them."""
    for attr, env in (("tls_ca", "EDGEWARD_CA"), ("tls_cert", "EDGEWARD_CERT"), ("tls_key", "EDGEWARD_KEY")):
        value = getattr(args, attr, None)
        if value:
            os.environ[env] = value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeward", description="Orchestrate deep-learning models on attested edge nodes."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "up", help="run a whole demo fleet on this machine (broker, orchestrator, agents, traffic)"
    )
    p.add_argument("--nodes", type=int, default=3, help="number of node agents to start (default 3)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of inference traffic (default 30)")
    p.add_argument("--report", help="write the summary as JSON to this file")
    p.add_argument("--state-dir", help="state directory (default: a fresh temporary one)")
    p.add_argument("--grpc-port", type=int, default=0, help="orchestrator gRPC port (default: a free one)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent inference clients (default 4)")
    p.add_argument(
        "--board-cpus",
        choices=("modelled", "host"),
        default="modelled",
        help="CPUs of boards of another architecture than this machine: timed by their cost model "
        "(simulated, default) or by this machine's wall time at the board's power (optimistic)",
    )
    p.add_argument(
        "--tui",
        action="store_true",
        help="once the deployments run, open the operator console; traffic flows until you quit it",
    )
    p.set_defaults(handler="orchestrator.cli:cmd_up")

    p = sub.add_parser("tui", help="operator console: watch and steer the fleet in the terminal")
    p.add_argument("--server", default=DEFAULT_SERVER, help="orchestrator gRPC address (env EDGEWARD_SERVER)")
    _client_tls(p)
    p.set_defaults(handler="orchestrator.tui:cmd_tui")

    p = sub.add_parser("orchestrator", help="run the orchestrator")
    p.add_argument("-c", "--config", help="orchestrator config YAML")
    p.add_argument("--state-dir", help="state directory (overrides the config)")
    p.add_argument("--grpc-bind", help="host:port of the gRPC API (overrides the config)")
    p.add_argument("--broker-url", help="external MQTT broker URL; default: the embedded broker")
    p.add_argument("--broker-port", type=int, help="port of the embedded broker (default: a free one)")
    p.set_defaults(handler="orchestrator.cli:cmd_orchestrator")

    p = sub.add_parser("agent", help="run a node agent")
    p.add_argument("-c", "--config", required=True, help="node config YAML")
    p.add_argument("--broker-url", help="MQTT broker URL (overrides the config)")
    p.set_defaults(handler="node_agent.cli:cmd_agent")

    p = sub.add_parser(
        "sim-fleet",
        help="hollow nodes for scale tests: many real agents on one event loop, simulated backend",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of hollow nodes in this process")
    p.add_argument("--broker-url", required=True, help="MQTT broker URL")
    p.add_argument(
        "--first", type=int, default=0, help="index of the first node (split a fleet over processes)"
    )
    p.add_argument("--id-prefix", default="hollow-", help="node ids are PREFIX00000, PREFIX00001, ...")
    p.add_argument("--topic-prefix", default="edgeward/v1", help="prefix of every edgeward topic")
    p.add_argument(
        "--heartbeat", type=float, default=5.0, help="status/telemetry interval, seconds (default 5)"
    )
    p.add_argument("--concurrency", type=int, default=100, help="nodes starting at once (default 100)")
    p.add_argument("--state-dir", help="the nodes' keys and caches (default: a fresh temporary directory)")
    p.add_argument(
        "--enroll-from",
        help="the orchestrator's state directory: mint each node's one-time enrollment token there",
    )
    p.set_defaults(handler="node_agent.cli:cmd_sim_fleet")

    p = sub.add_parser("apply", help="create or update deployments from manifest files")
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="manifest file (YAML/JSON); repeatable"
    )
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.add_argument(
        "--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds until every replica runs"
    )
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_apply")

    p = sub.add_parser("get", help="list deployments, nodes or models")
    p.add_argument("kind", choices=["deployments", "deployment", "nodes", "node", "models", "model"])
    p.add_argument("name", nargs="?", help="show one object")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_get")

    p = sub.add_parser("explain", help="why replicas of a deployment are pending or failed")
    p.add_argument("target", help="deployment/NAME or NAME")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_explain")

    p = sub.add_parser("sim", help="replay a synthetic fleet and workload through the scheduler (no MQTT)")
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--replicas", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", action="append", help="scheduler profile(s) to compare (default: all)")
    p.set_defaults(handler="orchestrator.cli:cmd_sim")

    p = sub.add_parser("delete", help="delete a deployment")
    p.add_argument("target", help="deployment/NAME or NAME")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_delete")

    p = sub.add_parser("events", help="list notifications; -f follows them live")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("--kind", default="", help="kind prefix, e.g. 'rollout.' or 'alert.'")
    p.add_argument("--subject", default="", help="subject prefix, e.g. 'node/' or 'model/resnet'")
    p.add_argument(
        "--severity", choices=["info", "warning", "error"], default="info", help="minimum severity"
    )
    p.add_argument("--limit", type=int, default=50, help="how many past events to show first")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_events")

    p = sub.add_parser("rollout", help="a deployment's rollout: status, pause, resume, undo (roll back)")
    p.add_argument("action", choices=["status", "pause", "resume", "undo"])
    p.add_argument("deployment", help="deployment/NAME or NAME")
    p.add_argument("--reason", default="", help="why (recorded with pause, resume and undo)")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_rollout")

    p = sub.add_parser("models", help="model catalog")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mp = msub.add_parser("push", help="publish a .tflite model, signed with a publisher key")
    mp.add_argument("file")
    mp.add_argument("--name", required=True)
    mp.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    mp.add_argument("--key", help="publisher private key (PEM) that signs the push (see `models keygen`)")
    mp.add_argument("--parent", default="", help="version this one derives from (lineage), e.g. 1.0.0")
    mp.add_argument("--owner-team", default="")
    mp.add_argument("--use-case", default="")
    mp.add_argument("--description", default="")
    mp.add_argument("--label", action="append", default=[], metavar="K=V", help="repeatable")
    _server(mp)
    mp.set_defaults(handler="orchestrator.cli:cmd_models_push")
    mp = msub.add_parser("list", help="every model version, or the models of one node (--node)")
    mp.add_argument("--node", default="", help="show what this node runs")
    _server(mp)
    mp.set_defaults(handler="orchestrator.cli:cmd_models_list")
    mp = msub.add_parser("show", help="one model version and where it runs")
    mp.add_argument("model", help="NAME or NAME:VERSION (default: the latest)")
    _server(mp)
    mp.set_defaults(handler="orchestrator.cli:cmd_models_show")
    mp = msub.add_parser("history", help="every version of a model: lineage and lifecycle")
    mp.add_argument("name")
    _server(mp)
    mp.set_defaults(handler="orchestrator.cli:cmd_models_history")
    for action, text in (
        ("deprecate", "mark a version deprecated (still served; flagged by `edgeward compliance`)"),
        ("revoke", "revoke a version for good: its key is destroyed and never released again"),
    ):
        mp = msub.add_parser(action, help=text)
        mp.add_argument("model", help="NAME:VERSION")
        mp.add_argument("--reason", default="")
        _server(mp)
        mp.set_defaults(handler="orchestrator.cli:cmd_models_state", action=action)
    mp = msub.add_parser("keygen", help="write an Ed25519 publisher key pair (NAME.key 0600, NAME.pub)")
    mp.add_argument("--out", default=".", help="directory (default: the current one)")
    mp.add_argument("--name", default="publisher", help="file name stem (default: publisher)")
    mp.set_defaults(handler="orchestrator.cli:cmd_models_keygen")
    mp = msub.add_parser("wipe", help="revoke a model and delete it from every node that holds it")
    mp.add_argument("model", help="NAME (every version) or NAME:VERSION")
    mp.add_argument("--nodes", default="", help="comma-separated node ids (default: every holding node)")
    mp.add_argument(
        "--deadline", type=float, default=0.0, metavar="S", help="seconds to confirm (default: config)"
    )
    mp.add_argument("--reason", default="")
    mp.add_argument("--no-wait", action="store_true", help="do not follow the confirmations")
    _server(mp)
    mp.set_defaults(handler="orchestrator.cli:cmd_models_wipe")

    p = sub.add_parser("compliance", help="nodes running deprecated, revoked or unsigned model versions")
    _server(p)
    p.set_defaults(handler="orchestrator.cli:cmd_compliance")

    p = sub.add_parser("keys", help="the key-encryption key of the model data keys: status, rotate")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for action, text in (
        ("status", "which KEKs exist, which is active, how many data keys each wraps"),
        ("rotate", "make a new KEK active and re-wrap every data key under it"),
    ):
        kp = ksub.add_parser(action, help=text)
        kp.add_argument("-c", "--config", help="orchestrator config YAML (its state_dir and key_encryption)")
        kp.add_argument("--state-dir", help="state directory (overrides the config)")
        if action == "rotate":
            kp.add_argument(
                "--retire",
                action="store_true",
                help="then delete the KEKs no data key uses any more (after every orchestrator has restarted "
                "or re-wrapped: they keep using a KEK they already read)",
            )
        kp.set_defaults(handler="orchestrator.cli:cmd_keys", action=action)

    from edgeward.security.cli import add_parser as add_pki_parser

    add_pki_parser(sub)
    return parser


def _die_with_parent() -> None:
    """When a supervisor (``edgeward up``, the test suite) sets EDGEWARD_DIE_WITH_PARENT to its
    pid, end with it even if it is killed with SIGKILL, so no process is left behind (Linux)."""
    parent = os.environ.get("EDGEWARD_DIE_WITH_PARENT")
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _die_with_parent()
    _export_client_tls(args)
    if args.command in SERVICES:
        gc.set_threshold(*SERVICE_GC_THRESHOLDS)
    if args.command == "agent":
        # Before the agent imports itself: no bytecode but what it compiles from its measured sources.
        from edgeward.bytecode import isolate

        isolate(whole_process=True)
    module, _, func = args.handler.partition(":")
    handler = getattr(importlib.import_module(module), func)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

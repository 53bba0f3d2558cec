"""``edgeward pki``: the fleet CA from the command line. Never prints a private key.

``edgeward pki token NODE`` and ``pki tokens`` (enrollment tokens) are parsed here and run by
:mod:`attestation.cli`: the shared core imports no role.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from edgeward.security.errors import SecurityError
from edgeward.security.mqtt_acl import mosquitto_config
from edgeward.security.pki import FleetCA, PkiError, parse_subject


def cmd_pki(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except SecurityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


_TTL_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_TTL_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` -> seconds."""
    match = _TTL_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration like 90s, 15m, 1h or 2d")
    return float(match[1]) * _TTL_UNIT[match[2]]


def _run(args: argparse.Namespace) -> int:
    action = args.pki_command
    if action == "init":
        ca = FleetCA.init(args.dir, name=args.name, days=args.days)
        print(f"fleet CA in {ca.dir}: {ca.ca_file} (key {ca.dir / 'ca.key'}, mode 0600), CRL {ca.crl_file}")
        return 0
    ca = FleetCA(args.dir)
    if action == "issue":
        if (args.role == "team") != bool(args.team):
            raise PkiError("security.pki.bad_team", "--team is required for, and only for, role team")
        identity = parse_subject(args.role, args.name, args.team)
        files = ca.issue(identity, hosts=args.host or (), days=args.days, replace=args.replace)
        print(f"issued {identity.common_name} ({identity.uri}), serial {files.serial:x}")
        print(f"  certificate {files.cert_file}\n  key         {files.key_file} (mode 0600)")
        if identity.role in ("node", "orchestrator", "operator"):
            print("with Mosquitto: regenerate its ACL (edgeward pki mosquitto-conf) and send it a SIGHUP")
        return 0
    if action == "revoke":
        for row in ca.revoke(args.who):
            print(f"revoked {row.subject} (serial {row.serial}); CRL {ca.crl_file} re-signed")
        print(
            "Mosquitto: regenerate its configuration (edgeward pki mosquitto-conf) and send it a SIGHUP, "
            "so the ACL stops the open connection and TLS handshakes see the new CRL; the orchestrator, "
            "the embedded broker and the nodes follow the CRL file by themselves"
        )
        return 0
    if action == "crl":
        print(f"CRL re-signed: {ca.write_crl(days=args.days)}")
        return 0
    if action == "list":
        rows = ca.list()
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=1))
            return 0
        print(f"{'SUBJECT':36} {'ROLE':13} {'SERIAL':12} {'NOT AFTER':20} STATUS")
        for r in rows:
            status = f"revoked {r.revoked_at[:19]}" if r.revoked_at else "valid"
            print(f"{r.subject:36} {r.role:13} {r.serial[:12]:12} {r.not_after[:19]:20} {status}")
        return 0
    if action == "mosquitto-conf":
        try:
            broker = ca.files(f"broker:{args.broker}")
        except PkiError:
            broker = ca.issue(parse_subject("broker", args.broker), hosts=args.host or ())
        conf = mosquitto_config(
            ca, Path(args.out), broker=broker, port=args.port, bind=args.bind, prefix=args.prefix
        )
        print(f"wrote {conf} and {conf.parent / 'acl'}; start with: mosquitto -c {conf}")
        return 0
    raise AssertionError(action)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``pki`` command and its actions (called by the ``edgeward`` dispatcher)."""
    p = sub.add_parser(
        "pki", help="fleet CA: certificates for orchestrators, brokers, nodes, operators, teams"
    )
    p.add_argument("--dir", default="pki", help="CA directory (default ./pki)")
    p.set_defaults(handler="edgeward.security.cli:cmd_pki")
    actions = p.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    a = actions.add_parser("init", help="create the fleet CA")
    a.add_argument("--name", default="edgeward fleet CA", help="CA subject CN")
    a.add_argument("--days", type=int, default=3650)
    a = actions.add_parser("issue", help="issue a key and certificate")
    a.add_argument("role", choices=["orchestrator", "broker", "node", "operator", "team"])
    a.add_argument("name", help="node id for nodes; a person's or bot's name otherwise")
    a.add_argument("--team", help="team name (role team)")
    a.add_argument(
        "--host",
        action="append",
        help="DNS name or IP of a server: orchestrator, broker, or a node's inference API (repeatable; "
        "orchestrator/broker default 127.0.0.1, localhost; a node's id is always one)",
    )
    a.add_argument("--days", type=int, default=365)
    a.add_argument("--replace", action="store_true", help="rotate: re-issue an existing name with a new key")
    a = actions.add_parser("revoke", help="revoke by serial (hex) or subject, and re-sign the CRL")
    a.add_argument("who", help="serial or subject: node-1, team:smart-home:ci, operator:alice")
    a = actions.add_parser("crl", help="re-sign the CRL (before its next update passes)")
    a.add_argument("--days", type=int, default=90)
    a = actions.add_parser("list", help="every certificate issued and its status")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("mosquitto-conf", help="write a Mosquitto config: mutual TLS, CRL, per-node ACL")
    a.add_argument("--out", default="mosquitto", help="output directory (default ./mosquitto)")
    a.add_argument("--port", type=int, default=8883)
    a.add_argument("--bind", default="127.0.0.1")
    a.add_argument("--prefix", default="edgeward/v1", help="topic prefix")
    a.add_argument("--broker", default="mosquitto", help="broker certificate name (issued if missing)")
    a.add_argument("--host", action="append", help="broker DNS name or IP when issuing (repeatable)")
    state = "the orchestrator's state_dir (default state/orchestrator)"
    # Enrollment tokens belong to the attestation role (its verifier redeems them): the dispatcher
    # imports their handlers by name when they run, as it does every role's commands.
    a = actions.add_parser("token", help="approve a node's enrollment: print a one-time token bound to it")
    a.add_argument("node", help="node id the token is for")
    a.add_argument("--ttl", type=parse_ttl, default=3600.0, help="validity, e.g. 15m, 1h, 2d (default 1h)")
    a.add_argument("--state-dir", default="state/orchestrator", help=state)
    a.set_defaults(handler="attestation.cli:cmd_token")
    a = actions.add_parser("tokens", help="list enrollment tokens (node, hash prefix, expiry, used)")
    a.add_argument("--state-dir", default="state/orchestrator", help=state)
    a.add_argument("--json", action="store_true")
    a.set_defaults(handler="attestation.cli:cmd_tokens")

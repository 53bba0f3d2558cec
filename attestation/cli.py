"""``edgeward pki token NODE`` and ``edgeward pki tokens``: the operator approves a node's
enrollment with a one-time token, printed once (only its hash is kept, in the orchestrator's
state directory; :mod:`attestation.tokens`). The shared ``edgeward pki`` parser names these
handlers; the dispatcher imports this module when one of them runs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from .errors import EnrollmentError
from .tokens import TokenStore


def _iso(unix_ms: float) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, UTC).isoformat(timespec="seconds")


def cmd_token(args: argparse.Namespace) -> int:
    store = TokenStore.in_state_dir(Path(args.state_dir))
    try:
        issued = store.mint(args.node, args.ttl)
    except EnrollmentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(issued.token)
    print(
        f"enrollment token for node {issued.node_id}: single use, expires {_iso(issued.expires_unix_ms)}; "
        f"shown only now. On the node: enrollment_token in node.yaml.",
        file=sys.stderr,
    )
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    rows = TokenStore.in_state_dir(Path(args.state_dir)).list()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    print(f"{'NODE':24} {'TOKEN SHA256':16} {'EXPIRES':20} STATUS")
    now_ms = datetime.now(UTC).timestamp() * 1000
    for r in rows:
        if r.used_unix_ms is not None:
            status = "used " + _iso(r.used_unix_ms)[:19]
        else:
            status = "expired" if r.expires_unix_ms < now_ms else "pending"
        print(f"{r.node_id:24} {r.digest[:16]:16} {_iso(r.expires_unix_ms)[:19]:20} {status}")
    return 0

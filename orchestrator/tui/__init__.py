"""The operator console (``edgeward tui``): a Textual app on the orchestrator's public gRPC API."""

from __future__ import annotations

import argparse

from .app import ConsoleApp

__all__ = ["ConsoleApp", "cmd_tui"]


def cmd_tui(args: argparse.Namespace) -> int:
    ConsoleApp(args.server).run()
    return 0

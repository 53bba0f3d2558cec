"""``edgeward agent -c node.yaml``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from edgeward.security.files import private_umask

from .agent import NodeAgent
from .config import AgentConfig, AgentConfigError, load_agent_config


def cmd_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    private_umask()  # the model cache and the attestation keys: 0600 whatever creates them
    try:
        config = load_agent_config(Path(args.config))
    except AgentConfigError as err:
        print(f"edgeward agent: {err}", file=sys.stderr)
        return 2
    if args.broker_url:
        config = config.model_copy(
            update={"broker": config.broker.model_copy(update={"url": args.broker_url})}
        )
    return asyncio.run(_run(config))


async def _run(config: AgentConfig) -> int:
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)  # also interrupts the first broker connection
    try:
        async with NodeAgent(config) as agent:
            print(f"node {agent.node_id} ready inference={agent.inference_endpoint}", flush=True)
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        return 0
    except Exception as err:
        print(f"edgeward agent: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0

"""``edgeward agent -c node.yaml``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
import tempfile
from pathlib import Path

from edgeward.security.files import private_umask

from .agent import NodeAgent
from .config import AgentConfig, AgentConfigError, load_agent_config
from .hollow import HollowFleetSpec, Progress, hollow_fleet


def _logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_agent(args: argparse.Namespace) -> int:
    _logging(args.verbose)
    private_umask()  # the model cache and the attestation keys: 0600 whatever creates them
    try:
        config = load_agent_config(Path(args.config), broker_url=args.broker_url)
    except AgentConfigError as err:
        print(f"edgeward agent: {err}", file=sys.stderr)
        return 2
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


def cmd_sim_fleet(args: argparse.Namespace) -> int:
    """``edgeward sim-fleet``: hollow nodes (real agents, simulated backend) in this process."""
    _logging(args.verbose)
    private_umask()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * args.nodes + 256  # a socket per node, plus files and the loop's own
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
        if hard < needed:
            print(
                f"edgeward sim-fleet: the open-file limit ({hard}) is low for {args.nodes} nodes; "
                "split them over several processes (--first)",
                file=sys.stderr,
            )
    try:
        spec = HollowFleetSpec(
            nodes=args.nodes,
            broker_url=args.broker_url,
            state_dir=Path(args.state_dir or tempfile.mkdtemp(prefix="edgeward-hollow-")),
            id_prefix=args.id_prefix,
            first=args.first,
            topic_prefix=args.topic_prefix,
            heartbeat_s=args.heartbeat,
            concurrency=args.concurrency,
            token_state_dir=Path(args.enroll_from) if args.enroll_from else None,
        )
    except ValueError as err:
        print(f"edgeward sim-fleet: {err}", file=sys.stderr)
        return 2
    return asyncio.run(_run_fleet(spec))


async def _run_fleet(spec: HollowFleetSpec) -> int:
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    print(
        f"sim-fleet: starting {spec.nodes} hollow nodes (simulated backend sim-hollow) on {spec.broker_url}",
        flush=True,
    )
    sessions = []
    try:
        async with hollow_fleet(spec, Progress(out=lambda line: print(line, flush=True))) as agents:
            sessions = [a._mqtt for a in agents if a._mqtt is not None]
            print(f"sim-fleet: ready {len(agents)} hollow nodes", flush=True)
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        # What the nodes published (QoS 1 once acknowledged), goodbyes included: bench/fleet_scale.py
        # compares it with what the orchestrator took in.
        stats = [s.stats for s in sessions]
        print(
            f"sim-fleet: published {sum(s.published for s in stats)} messages, "
            f"{sum(s.published_qos1 for s in stats)} of them at QoS 1 (acknowledged)",
            flush=True,
        )
        return 0
    except Exception as err:
        print(f"edgeward sim-fleet: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0

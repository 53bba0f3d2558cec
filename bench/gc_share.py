"""Bench: the cyclic garbage collector's share of a service process's CPU, at Python's default
collection thresholds and at the ones the service commands set (``edgeward/cli.py``,
``SERVICE_GC_THRESHOLDS``).

One ``edgeward sim-fleet`` process (``--nodes`` hollow nodes: real agents with their MQTT sessions,
heartbeats and telemetry) against a private Mosquitto, no orchestrator: the steady state of a fleet
process, the workload whose profile showed the collector. After ``--warmup`` seconds (every node up)
the process sets the thresholds under test, then counts for ``--window`` seconds its CPU time and the
time spent in collections (``gc.callbacks``). The two settings alternate, ``--rounds`` times each,
each in a fresh process; the table quotes medians.

    python bench/gc_share.py --nodes 2500 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import command, machine, write_section
from fleet_scale import raise_fd_limit, start_mosquitto

from edgeward.cli import SERVICE_GC_THRESHOLDS

DEFAULT_THRESHOLDS = (700, 10, 10)  # CPython's

# Runs `edgeward sim-fleet` in this interpreter with the collector timed; prints one JSON line.
HARNESS = """
import gc, json, os, resource, signal, sys, threading, time
spent = [0.0]
started = [0.0]
collections = [0]
def timed(phase, info):
    if phase == "start":
        started[0] = time.thread_time()
    else:
        spent[0] += time.thread_time() - started[0]
        collections[0] += 1
gc.callbacks.append(timed)
warmup, window, thresholds = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
def measure():
    time.sleep(warmup)
    gc.set_threshold(*thresholds)
    cpu0, gc0, n0 = cpu(), spent[0], collections[0]
    time.sleep(window)
    print(json.dumps({"cpu_s": cpu() - cpu0, "gc_s": spent[0] - gc0, "collections": collections[0] - n0}),
          flush=True)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=measure, daemon=True).start()
from edgeward.cli import main
sys.exit(main(["sim-fleet"] + sys.argv[4:]))
"""


def one_run(args: argparse.Namespace, port: int, thresholds: tuple[int, int, int], work: Path) -> dict:
    fleet_args = [
        "--nodes",
        str(args.nodes),
        "--broker-url",
        f"mqtt://127.0.0.1:{port}",
        "--heartbeat",
        str(args.heartbeat),
        "--state-dir",
        str(work),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            HARNESS,
            str(args.warmup),
            str(args.window),
            json.dumps(thresholds),
            *fleet_args,
        ],
        capture_output=True,
        text=True,
        timeout=args.warmup + args.window + 120,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"the fleet process reported nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2500)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds before the window (every node up)"
    )
    parser.add_argument("--window", type=float, default=50.0, help="seconds measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    settings = {"default": DEFAULT_THRESHOLDS, "service": SERVICE_GC_THRESHOLDS}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="edgeward-gc-") as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            for round_ in range(args.rounds):
                for name, thresholds in settings.items():
                    work = Path(tmp) / f"{name}-{round_}"
                    r = one_run(args, port, thresholds, work)
                    r["share"] = r["gc_s"] / r["cpu_s"] if r["cpu_s"] else float("nan")
                    results[name].append(r)
                    print(
                        f"round {round_ + 1} {name} {thresholds}: CPU {r['cpu_s']:.1f} s, collector "
                        f"{r['gc_s']:.2f} s ({100 * r['share']:.0f} %), {r['collections']} collections",
                        flush=True,
                    )
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait()
    rows = []
    med = {}
    for name, thresholds in settings.items():
        rs = results[name]
        med[name] = {
            k: statistics.median(r[k] for r in rs) for k in ("cpu_s", "gc_s", "collections", "share")
        }
        m = med[name]
        rounds = " / ".join(f"{100 * r['share']:.0f} %" for r in rs)
        rows.append(
            f"| {name} {thresholds} | {m['cpu_s']:.1f} | {m['gc_s']:.2f} | **{100 * m['share']:.0f} %** ({rounds}) "
            f"| {m['collections']:.0f} |"
        )
    ratio = med["service"]["cpu_s"] / med["default"]["cpu_s"]
    body = f"""## Garbage collection: the collector's share of a fleet process's CPU

`{command()}` ({machine()}; shared 2-core machine)

One `edgeward sim-fleet` process of {args.nodes:,} hollow nodes (heartbeat {args.heartbeat:g} s) against a
private Mosquitto, no orchestrator; after {args.warmup:g} s (all nodes up) the thresholds under test are set
and the next {args.window:g} s measured: the process's CPU time, and the thread time spent in
collections (`gc.callbacks`). The settings alternate, {args.rounds} rounds each, each in a fresh
process; medians.

| thresholds | CPU s | collector s | collector share of CPU (rounds) | collections |
|---|---|---|---|---|
{chr(10).join(rows)}

CPU of the whole process, service / default thresholds: **x{ratio:.2f}** (below 1 is cheaper). That
ratio is the figure to quote: at the service thresholds a young collection comes after 10,000 net
allocations rather than 700, and when none falls in the window the work it defers lies outside it
(the collector's 0 s is not a cost of nothing). The service commands (`up`, `orchestrator`, `agent`, `sim-fleet`) run with {SERVICE_GC_THRESHOLDS}
(`edgeward/cli.py`).
"""
    print(body)
    if not args.no_write:
        write_section("gc-share", body)


if __name__ == "__main__":
    main()

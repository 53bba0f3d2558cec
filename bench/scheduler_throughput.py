"""Placement throughput of the energy-aware scheduler on synthetic fleets of 1k, 10k and 50k nodes
(twice as many replicas as nodes), on one core. Target at 10k nodes / 20k replicas: >= 5,000
placements/s and p99 per placement < 5 ms.

    python bench/scheduler_throughput.py [--sizes 1000,10000,50000] [--runs 5] [--no-write]

Writes its section of docs/benchmarks.md unless --no-write.
"""

from __future__ import annotations

import argparse
import sys

from _report import command, machine, write_section
from scheduler_report import machine_note, median, pin_one_core

from orchestrator.scheduler.sim import run

TARGET_NODES, TARGET_RATE, TARGET_P99_US = 10_000, 5_000, 5_000
ABOUT = """\
Energy-aware profile (all filters; latency, energy, spread, zone-spread and load scores) on the
synthetic heterogeneous fleet of `orchestrator/scheduler/synthetic.py`, twice as many replicas as
nodes, placed one at a time through `PlacementPlan.place` (each placement sees the capacity the
previous ones took). Wall figures include preemption by other jobs on the shared machine; the CPU
figures are the same loop measured in the thread's CPU time (per placement, and placements per
CPU-second), which is what the scheduler itself costs. Both clocks are read around every placement
(about 2 us of the CPU figures are the clock reads). The snapshot (columnising the fleet, once per
reconcile pass) is reported apart."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,50000", help="fleet sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="runs per size (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    pin_one_core()
    note = machine_note(args.runs)

    rows = []
    verdict = ""
    for nodes in (int(s) for s in args.sizes.split(",")):
        replicas = 2 * nodes
        results = []
        for _ in range(args.runs):
            report = run(nodes=nodes, replicas=replicas, policy="energy-aware", seed=args.seed)
            result = report.result("energy-aware")
            results.append((report.snapshot_s, result))
            print(
                f"{nodes} nodes: {result.placements_per_s:,.0f}/s, p99 {result.p99_us:.0f} us",
                file=sys.stderr,
            )
        rate = median([r.placements_per_s for _, r in results])
        cpu_rate = median([r.placements_per_cpu_s for _, r in results])
        p50 = median([r.p50_us for _, r in results])
        p99 = median([r.p99_us for _, r in results])
        cpu_p50 = median([r.cpu_p50_us for _, r in results])
        cpu_p99 = median([r.cpu_p99_us for _, r in results])
        snapshot_ms = median([s for s, _ in results]) * 1000
        rows.append(
            f"| {nodes:,} | {replicas:,} | {results[0][1].placed:,} | {rate:,.0f} | {p50:,.0f} "
            f"| {p99:,.0f} | {cpu_rate:,.0f} | {cpu_p50:,.0f} | {cpu_p99:,.0f} | {snapshot_ms:,.0f} |"
        )
        if nodes == TARGET_NODES:
            wall_met = rate >= TARGET_RATE and p99 < TARGET_P99_US
            cpu_met = cpu_rate >= TARGET_RATE and cpu_p99 < TARGET_P99_US
            verdict = (
                f"Target at {TARGET_NODES:,} nodes (>= {TARGET_RATE:,}/s, p99 < "
                f"{TARGET_P99_US // 1000} ms): wall clock **{'met' if wall_met else 'missed'}** "
                f"({rate:,.0f}/s, p99 {p99 / 1000:.2f} ms); CPU time **{'met' if cpu_met else 'missed'}** "
                f"({cpu_rate:,.0f}/s, p99 {cpu_p99 / 1000:.2f} ms)."
            )

    body = "\n".join(
        [
            "## Scheduler: placement throughput",
            "",
            f"Command: `{command()}`",
            "",
            f"Machine: {machine()}; {note}",
            "",
            ABOUT,
            "",
            "| nodes | replicas | placed | placements/s | p50 us | p99 us "
            "| placements/CPU-s | CPU p50 us | CPU p99 us | snapshot ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            verdict,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("scheduler-throughput", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

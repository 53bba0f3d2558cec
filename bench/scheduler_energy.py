"""Energy-aware versus round-robin placement of the same workload on the same synthetic reference
fleet, in the same run: joules per inference and SLO attainment. Target: energy-aware uses
<= 0.70x the joules per inference of round-robin, at equal or better SLO attainment.

    python bench/scheduler_energy.py [--nodes 10000] [--replicas 20000] [--seeds 5]
                                     [--hardware builtin,catalog] [--no-write]

Each seed is one fleet and one workload, which both policies place. The fleet's node classes are
the scheduler's built-in synthetic classes, or derived from the hardware-profile catalog
(accelerators/profiles/hardware.yaml). Writes its section of docs/benchmarks.md unless --no-write.
"""

from __future__ import annotations

import argparse
import sys

from _report import command, machine, write_section
from scheduler_report import machine_note, median, pin_one_core

from orchestrator.scheduler.sim import PolicyResult, run
from orchestrator.scheduler.synthetic import HARDWARE_CLASSES, HardwareClass, classes_from_catalog

TARGET_RATIO = 0.70
ABOUT = """\
Two fleets: *builtin*, the four synthetic node classes of `orchestrator/scheduler/synthetic.py`
(x86 microserver, Raspberry-Pi-class ARM board, FPGA board, Edge-TPU-class ASIC board), and
*catalog*, one class per profile of `accelerators/profiles/hardware.yaml` with the sustained-rate,
overhead, share and slot assumptions of `synthetic.CATALOG_ASSUMPTIONS`. Seven industrial, smart-home
and automotive models (INT8 and FP32, each with a latency SLO and a request rate). Both policies run
the same filters on the same snapshot; round-robin takes the next feasible node in id order.
Joules per inference and SLO attainment are weighted by each replica's request rate and use each
node's hidden slowdown (5% of nodes are throttled 1.5x), which the scheduler does not see; an
unplaced replica counts as missing its SLO. These figures are outcomes of the placements and do not
depend on the machine."""


def _classes(name: str) -> tuple[HardwareClass, ...]:
    if name == "builtin":
        return HARDWARE_CLASSES
    if name == "catalog":
        from accelerators.profiles import load_catalog

        return classes_from_catalog(load_catalog())
    raise SystemExit(f"unknown --hardware {name!r}: builtin or catalog")


def _row(fleet: str, seed: object, ea: PolicyResult, rr: PolicyResult) -> str:
    ratio = ea.joules_per_inference / rr.joules_per_inference
    return (
        f"| {fleet} | {seed} | {ea.joules_per_inference * 1000:.1f} "
        f"| {rr.joules_per_inference * 1000:.1f} | {ratio:.2f} "
        f"| {ea.slo_attainment:.1%} | {rr.slo_attainment:.1%} "
        f"| {ea.placed} | {rr.placed} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=5, help="runs, with seeds 0..N-1 (medians reported)")
    parser.add_argument("--hardware", default="builtin,catalog", help="fleets: builtin, catalog or both")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    pin_one_core()
    note = machine_note(args.seeds)

    rows, summary, met = [], [], True
    for hardware in args.hardware.split(","):
        classes = _classes(hardware)
        pairs = []
        for seed in range(args.seeds):
            report = run(
                nodes=args.nodes,
                replicas=args.replicas,
                policy=("energy-aware", "round-robin"),
                seed=seed,
                classes=classes,
            )
            ea, rr = report.result("energy-aware"), report.result("round-robin")
            pairs.append((ea, rr))
            rows.append(_row(hardware, seed, ea, rr))
            print(hardware, report.table(), sep="\n", file=sys.stderr)
        ratios = [ea.joules_per_inference / rr.joules_per_inference for ea, rr in pairs]
        slo_ok = all(ea.slo_attainment >= rr.slo_attainment for ea, rr in pairs)
        met = met and max(ratios) <= TARGET_RATIO and slo_ok
        summary.append(
            f"- {hardware}: median ratio {median(ratios):.2f} (worst {max(ratios):.2f}); energy-aware SLO "
            f"attainment {'equal or better on every seed' if slo_ok else 'worse on some seed'}."
        )

    body = "\n".join(
        [
            "## Scheduler: energy-aware versus round-robin placement",
            "",
            f"Command: `{command()}`",
            "",
            f"Machine: {machine()}; {note}",
            "",
            f"{args.nodes:,} nodes, {args.replicas:,} replicas per seed. {ABOUT}",
            "",
            "| fleet | seed | energy-aware mJ/inference | round-robin mJ/inference | ratio "
            "| energy-aware SLO met | round-robin SLO met | energy-aware placed | round-robin placed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *summary,
            "",
            f"Target (ratio <= {TARGET_RATIO:.2f} at equal or better SLO attainment, on every seed of every "
            f"fleet): **{'met' if met else 'missed'}**.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("scheduler-energy", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replay a synthetic workload on a synthetic fleet, without MQTT, to measure the scheduler alone
and compare policies on the same fleet and workload.

``run(nodes=10_000, replicas=20_000, policy=("energy-aware", "round-robin"), seed=0)`` returns a
:class:`SimReport`; ``print(report.table())`` shows it. Per policy it reports placement throughput
and per-placement latency (the scheduler's own time, the snapshot excluded), and the joules per
inference and SLO attainment the placements actually give (with each node's hidden slowdown).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .framework import PROFILES, Scheduler
from .placement import Placement
from .snapshot import FleetSnapshot
from .synthetic import HARDWARE_CLASSES, MODELS, HardwareClass, fleet, performance_table, predict, workload

POLICIES = tuple(PROFILES)


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requested: int
    placed: int
    seconds: float  # wall time spent placing (all requests)
    cpu_seconds: float  # CPU time of the same (what a busy shared machine does not inflate)
    p50_us: float  # per-placement wall time
    p99_us: float
    cpu_p50_us: float  # per-placement CPU time (the thread's; preemption excluded)
    cpu_p99_us: float
    joules_per_inference: float  # rate-weighted over placed replicas
    slo_attainment: float  # rate-weighted share of requested inferences within their SLO

    @property
    def placements_per_s(self) -> float:
        return self.requested / self.seconds if self.seconds else float("inf")

    @property
    def placements_per_cpu_s(self) -> float:
        return self.requested / self.cpu_seconds if self.cpu_seconds else float("inf")


@dataclass(frozen=True)
class SimReport:
    nodes: int
    replicas: int
    seed: int
    snapshot_s: float  # time to columnise the fleet (once, shared by the policies)
    results: tuple[PolicyResult, ...]

    def result(self, policy: str) -> PolicyResult:
        return next(r for r in self.results if r.policy == policy)

    def table(self) -> str:
        head = (
            f"{self.nodes} nodes, {self.replicas} replicas, seed {self.seed}, "
            f"snapshot {self.snapshot_s * 1000:.0f} ms"
        )
        rows = [("policy", "placed", "placements/s", "p50 us", "p99 us", "mJ/inference", "SLO met")]
        rows += [
            (
                r.policy,
                f"{r.placed}/{r.requested}",
                f"{r.placements_per_s:,.0f}",
                f"{r.p50_us:.0f}",
                f"{r.p99_us:.0f}",
                f"{r.joules_per_inference * 1000:.2f}",
                f"{r.slo_attainment:.1%}",
            )
            for r in self.results
        ]
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.ljust(w) if c == 0 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        return "\n".join([head, *lines])


def run(
    nodes: int = 1000,
    replicas: int = 2000,
    policy: str | Sequence[str] = POLICIES,
    seed: int = 0,
    classes: Sequence[HardwareClass] = HARDWARE_CLASSES,
) -> SimReport:
    """Build the fleet of ``classes`` and the workload for ``seed``; place it once per policy.

    ``classes`` defaults to the built-in node classes; ``classes_from_catalog(load_catalog())``
    uses the hardware-profile catalog instead.
    """
    policies = (policy,) if isinstance(policy, str) else tuple(policy)
    synthetic = fleet(nodes, seed, classes)
    requests = workload(replicas, seed, synthetic.zones)
    started = time.perf_counter()
    snapshot = FleetSnapshot.from_node_infos(synthetic.nodes, performance=performance_table(classes))
    snapshot_s = time.perf_counter() - started

    # The ground truth the scheduler does not see: what each placement actually costs.
    hardware = {hw.name: hw for hw in classes}
    models = {m.name: m for m in MODELS}
    profile_of = [hardware[n.hardware_profile] for n in synthetic.nodes]  # snapshot order = id order
    rates = np.array([models[r.model].rate_hz for r in requests])

    results = []
    for name in policies:
        plan = Scheduler(name).plan(snapshot)
        elapsed = np.empty(len(requests))
        cpu = np.empty(len(requests))
        outcomes = []
        clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
        cpu_started, total_started = time.process_time(), clock()
        for i, req in enumerate(requests):
            t0, c0 = clock(), cpu_clock()
            outcomes.append(plan.place(req))
            cpu[i] = cpu_clock() - c0
            elapsed[i] = clock() - t0
        seconds = (clock() - total_started) / 1e9
        cpu_seconds = time.process_time() - cpu_started
        joules = np.zeros(len(requests))
        met = np.zeros(len(requests), np.bool_)
        placed = np.zeros(len(requests), np.bool_)
        for i, (req, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            if not isinstance(outcome, Placement):
                continue
            node = snapshot.index(outcome.node_id)
            acc = next(a for a in profile_of[node].accelerators if a.kind == outcome.accelerator)
            pred = predict(acc, models[req.model])
            assert pred is not None, "the scheduler placed a model on an accelerator that cannot run it"
            slow = synthetic.slowdown[node]
            placed[i] = True
            joules[i] = pred.energy_j * slow
            met[i] = pred.latency_ms * slow <= req.max_latency_ms
        served = rates[placed].sum()
        results.append(
            PolicyResult(
                policy=name,
                requested=len(requests),
                placed=int(placed.sum()),
                seconds=seconds,
                cpu_seconds=cpu_seconds,
                p50_us=float(np.percentile(elapsed, 50)) / 1000,
                p99_us=float(np.percentile(elapsed, 99)) / 1000,
                cpu_p50_us=float(np.percentile(cpu, 50)) / 1000,
                cpu_p99_us=float(np.percentile(cpu, 99)) / 1000,
                joules_per_inference=float((joules * rates).sum() / served) if served else float("nan"),
                slo_attainment=float((met * rates).sum() / rates.sum()) if rates.size else float("nan"),
            )
        )
    return SimReport(nodes, replicas, seed, snapshot_s, tuple(results))


if __name__ == "__main__":
    print(run().table())

"""A synthetic heterogeneous fleet and workload mix for the simulator and the benchmarks.

It stands alone: the built-in node classes (:data:`HARDWARE_CLASSES`) and model figures are
defined here, so the scheduler can be measured at any fleet size without devices or files. Their
figures are round numbers of the right order for each class of board (sustained, not peak,
throughput; whole-board power while computing), not measurements of any one product.
:func:`classes_from_catalog` derives classes from the hardware-profile catalog instead
(``accelerators.profiles``), adding what a catalog does not say (see :data:`CATALOG_ASSUMPTIONS`).

The fleet also carries a per-node *slowdown* the scheduler never sees (thermal throttling, a noisy
neighbour): the simulator uses it for the latency and energy a replica actually gets, so SLO
attainment measures how well predictions and headroom hold up, not an echo of the predictions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .placement import NodeInfo, PlacementRequest
from .snapshot import PerformanceTable, Prediction

if TYPE_CHECKING:
    from accelerators.profiles import HardwareCatalog

GIB = 1 << 30
MIB = 1 << 20
#: Nodes per zone of the synthetic fleet.
ZONE_SIZE = 250


@dataclass(frozen=True)
class AcceleratorSpec:
    kind: str
    gops: Mapping[str, float]  # sustained giga-ops per second per dtype it runs
    overhead_ms: float  # per inference: dispatch, DMA, pre/post-processing
    active_w: float  # whole-board power while this accelerator computes


@dataclass(frozen=True)
class HardwareClass:
    name: str
    accelerators: tuple[AcceleratorSpec, ...]
    slots: int
    memory_bytes: int
    share: float  # fraction of the reference fleet
    tiers: Mapping[str, float]  # attestation tier -> fraction of the class's nodes


@dataclass(frozen=True)
class WorkloadModel:
    name: str
    use_case: str
    dtype: str
    gop: float  # giga-ops per inference
    slo_ms: float
    memory_bytes: int
    rate_hz: float  # inferences per second per replica
    attestation: str
    share: float  # fraction of deployments


def _cpu(fp32: float, int8: float, overhead_ms: float, active_w: float) -> AcceleratorSpec:
    return AcceleratorSpec("cpu-litert", {"FP32": fp32, "INT8": int8, "UINT8": int8}, overhead_ms, active_w)


HARDWARE_CLASSES: tuple[HardwareClass, ...] = (
    HardwareClass(
        "x86-microserver", (_cpu(120, 200, 0.2, 35.0),), 16, 32 * GIB, 0.20, {"tpm2": 0.9, "software": 0.1}
    ),
    HardwareClass(
        "arm-sbc", (_cpu(12, 20, 0.5, 7.0),), 4, 8 * GIB, 0.40, {"tpm2": 0.3, "software": 0.65, "none": 0.05}
    ),
    HardwareClass(
        "fpga-board",
        (_cpu(4, 8, 0.5, 7.0), AcceleratorSpec("fpga-pynq", {"INT8": 400, "UINT8": 400}, 1.0, 12.0)),
        4,
        4 * GIB,
        0.15,
        {"tpm2": 0.6, "software": 0.4},
    ),
    HardwareClass(
        "asic-board",
        (_cpu(3, 6, 0.5, 4.0), AcceleratorSpec("asic-edgetpu", {"INT8": 300, "UINT8": 300}, 0.5, 4.5)),
        4,
        4 * GIB,
        0.25,
        {"tpm2": 0.5, "software": 0.5},
    ),
)

MODELS: tuple[WorkloadModel, ...] = (
    WorkloadModel("vibration-anomaly", "industrial", "FP32", 0.01, 10, 16 * MIB, 50, "tpm2", 0.15),
    WorkloadModel("visual-defect", "industrial", "INT8", 0.6, 40, 48 * MIB, 10, "tpm2", 0.15),
    WorkloadModel("keyword-spotting", "smart-home", "INT8", 0.02, 20, 8 * MIB, 20, "software", 0.15),
    WorkloadModel("person-detect", "smart-home", "INT8", 1.2, 100, 64 * MIB, 5, "software", 0.15),
    WorkloadModel("pedestrian-detect", "automotive", "FP32", 2.5, 50, 192 * MIB, 15, "tpm2", 0.10),
    WorkloadModel("lane-segment", "automotive", "INT8", 4.0, 40, 96 * MIB, 20, "tpm2", 0.15),
    WorkloadModel("driver-monitor", "automotive", "FP32", 0.6, 33, 64 * MIB, 30, "tpm2", 0.15),
)


@dataclass(frozen=True)
class CatalogAssumptions:
    """What turns a catalog profile into a synthetic class: figures the catalog does not carry."""

    #: kind -> dtype -> sustained share of the catalog's nominal peak (also: the dtypes it runs).
    #: CPU: TFLite/XNNPACK reaches roughly 40 % of the FP32 peak on MobileNet-class models, integer
    #: kernels about twice the FP32 rate; Edge TPU: 13 %, as in accelerators/asic_edgetpu.py; FPGA
    #: engine: 60 % (estimate: a systolic int8 engine on convolution-heavy models).
    sustained: Mapping[str, Mapping[str, float]]
    overhead_ms: Mapping[str, float]  # kind -> fixed cost per inference (estimate)
    shares: Mapping[str, float]  # the profile's ``class`` label -> fraction of the fleet
    tiers: Mapping[str, Mapping[str, float]]  # ``class`` label -> attestation tier -> fraction
    slot_bytes: int  # one replica slot per this much memory (1..16 slots)


CATALOG_ASSUMPTIONS = CatalogAssumptions(
    sustained={
        "cpu-litert": {"FP32": 0.4, "INT8": 0.8, "UINT8": 0.8},
        "fpga-pynq": {"INT8": 0.6},
        "asic-edgetpu": {"INT8": 0.13, "UINT8": 0.13},
    },
    overhead_ms={"cpu-litert": 0.2, "fpga-pynq": 0.05, "asic-edgetpu": 0.3},
    shares={"microserver": 0.20, "sbc": 0.40, "fpga": 0.15, "asic": 0.25},
    tiers={
        "microserver": {"tpm2": 0.9, "software": 0.1},
        "sbc": {"tpm2": 0.3, "software": 0.65, "none": 0.05},
        "fpga": {"tpm2": 0.6, "software": 0.4},
        "asic": {"tpm2": 0.5, "software": 0.5},
    },
    slot_bytes=512 * MIB,
)


def classes_from_catalog(
    catalog: HardwareCatalog, assumptions: CatalogAssumptions = CATALOG_ASSUMPTIONS
) -> tuple[HardwareClass, ...]:
    """One class per catalog profile; a ``class`` label's share is split among its profiles.

    Accelerator kinds without assumptions are left out; a profile left with none is skipped.
    """
    profiles = [p for _, p in sorted(catalog.profiles.items())]
    per_label = Counter(p.labels.get("class", "") for p in profiles)
    classes = []
    for profile in profiles:
        label = profile.labels.get("class", "")
        accelerators = tuple(
            AcceleratorSpec(
                kind=acc.kind,
                gops={d: acc.peak_gops.value * share for d, share in assumptions.sustained[acc.kind].items()},
                overhead_ms=assumptions.overhead_ms[acc.kind],
                active_w=acc.active_w.value,
            )
            for acc in profile.accelerators
            if acc.kind in assumptions.sustained
        )
        if not accelerators:
            continue
        classes.append(
            HardwareClass(
                name=profile.name,
                accelerators=accelerators,
                slots=int(min(16, max(1, profile.memory_bytes.value // assumptions.slot_bytes))),
                memory_bytes=profile.memory_bytes.value,
                share=assumptions.shares.get(label, 0.1) / per_label[label],
                tiers=assumptions.tiers.get(label, {"software": 1.0}),
            )
        )
    return tuple(classes)


def predict(acc: AcceleratorSpec, model: WorkloadModel) -> Prediction | None:
    """Latency and energy of one inference, or None if the accelerator cannot run the dtype."""
    gops = acc.gops.get(model.dtype)
    if gops is None:
        return None
    latency_ms = acc.overhead_ms + model.gop / gops * 1000.0
    return Prediction(latency_ms, acc.active_w * latency_ms / 1000.0)


def performance_table(
    classes: Sequence[HardwareClass] = HARDWARE_CLASSES, models: Sequence[WorkloadModel] = MODELS
) -> PerformanceTable:
    """(class name, accelerator kind, model name) -> prediction, for the scheduler's snapshot."""
    table = {}
    for hw in classes:
        for acc in hw.accelerators:
            for model in models:
                pred = predict(acc, model)
                if pred is not None:
                    table[hw.name, acc.kind, model.name] = pred
    return table


@dataclass(frozen=True, eq=False)
class SyntheticFleet:
    nodes: tuple[NodeInfo, ...]
    slowdown: NDArray[np.float64]  # true / predicted latency, per node (aligned with ``nodes``)
    zones: tuple[str, ...]


def fleet(size: int, seed: int, classes: Sequence[HardwareClass] = HARDWARE_CLASSES) -> SyntheticFleet:
    """``size`` nodes drawn from ``classes`` by share; ~1% offline, ~0.5% cordoned, ~5% throttled."""
    rng = np.random.default_rng(seed)
    shares = np.array([hw.share for hw in classes])
    kind_of = rng.choice(len(classes), size=size, p=shares / shares.sum())
    zones = tuple(f"zone-{z:03d}" for z in range(max(1, -(-size // ZONE_SIZE))))
    zone_of = rng.integers(len(zones), size=size)
    online = rng.random(size) >= 0.01
    cordoned = rng.random(size) < 0.005
    tier_draw = rng.random(size)
    slowdown = rng.lognormal(0.0, 0.08, size) * np.where(rng.random(size) < 0.05, 1.5, 1.0)
    nodes = []
    for i in range(size):
        hw = classes[kind_of[i]]
        tiers, weights = zip(*hw.tiers.items(), strict=True)
        tier = tiers[int(np.searchsorted(np.cumsum(weights), tier_draw[i] * sum(weights), side="right"))]
        nodes.append(
            NodeInfo(
                id=f"node-{i:06d}",
                online=bool(online[i]),
                cordoned=bool(cordoned[i]),
                labels={"zone": zones[zone_of[i]], "hardware": hw.name},
                accelerators={acc.kind: frozenset(acc.gops) for acc in hw.accelerators},
                max_replicas=hw.slots,
                memory_bytes=hw.memory_bytes,
                active_w=max(acc.active_w for acc in hw.accelerators),
                attestation_tier=tier,
                hardware_profile=hw.name,
            )
        )
    return SyntheticFleet(tuple(nodes), slowdown, zones)


def workload(
    replicas: int, seed: int, zones: Sequence[str], models: Sequence[WorkloadModel] = MODELS
) -> list[PlacementRequest]:
    """Deployments of 1-32 replicas (mean ~7) until ``replicas``; a quarter pinned to one zone."""
    rng = np.random.default_rng(seed + 1)
    shares = np.array([m.share for m in models])
    requests: list[PlacementRequest] = []
    serial = 0
    while len(requests) < replicas:
        model = models[rng.choice(len(models), p=shares / shares.sum())]
        count = min(int(rng.geometric(0.15)), 32, replicas - len(requests))
        selector = {"zone": zones[int(rng.integers(len(zones)))]} if rng.random() < 0.25 else {}
        name = f"{model.use_case}-{model.name}-{serial:05d}"
        serial += 1
        requests.extend(
            PlacementRequest(
                deployment=name,
                accelerators=frozenset(),
                dtypes=frozenset({model.dtype}),
                memory_bytes=model.memory_bytes,
                selector=selector,
                attestation_tier=model.attestation,
                model=model.name,
                max_latency_ms=model.slo_ms,
                replica_id=f"{name}-{j}",
            )
            for j in range(count)
        )
    return requests

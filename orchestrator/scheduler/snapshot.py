"""An immutable, columnar picture of the fleet: one numpy array per node attribute.

The scheduler's hot path works on these arrays, never on per-node Python objects. Nodes are held
in ascending id order, so a placement never depends on the order the caller listed them in.

Nodes with the same hardware profile and the same accelerators form a *node class*: whether an
accelerator can run a request, which one is picked and what latency and energy it is predicted to
give are computed once per class and gathered to the nodes (as Nomad's computed node classes).

A node's own profile of a model (measured by the node) overrides its class's prediction for that
node only. The overrides are kept as flat arrays sorted by (model, node, kind), so a request
patches the few nodes that have one instead of giving up the per-class computation.

A class's prediction comes from the performance table (in the orchestrator: the median of the
profiles of the nodes of that hardware profile), else from the accelerator's cost model and the
model's work (:mod:`.costs`: the cold start, before anything has profiled the model). ``basis``
says which, so a placement can say what it rests on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from .costs import AcceleratorCost, ModelWork, predict
from .placement import TIERS, NodeInfo, Prediction, SchedulerError

#: Bit 0 of a dtype mask: the accelerator kind is present (a kind may list no dtypes at all).
PRESENT = np.uint64(1)
#: Free memory of a node that does not declare its memory.
UNLIMITED = np.int64(1 << 62)
#: Code of a missing label value.
MISSING = -1
#: Latencies below this count as this much wherever predictions are compared with each other, the
#: SLO or observations: below a millisecond, the fixed cost of serving is all that shows.
LATENCY_FLOOR_MS = 1.0
#: What a prediction rests on, by code: nothing, the performance table (profiles of nodes of the
#: same hardware profile), the accelerator's cost model, the node's own profile.
BASIS = ("", "profiles", "cost model", "own profile")
NO_BASIS, TABLE, COST_MODEL, OWN_PROFILE = range(len(BASIS))


#: (hardware profile, accelerator kind, model) -> prediction, e.g. from the backends' profiles.
PerformanceTable = Mapping[tuple[str, str, str], Prediction]


@dataclass(frozen=True, slots=True)
class NodeClass:
    """Nodes that are interchangeable for feasibility and prediction."""

    profile: str
    accelerators: tuple[tuple[str, frozenset[str]], ...]  # (kind, dtypes), sorted by kind
    nj_per_op: tuple[tuple[str, float], ...] = ()  # (kind, nJ per operation at peak), sorted by kind
    costs: tuple[tuple[str, AcceleratorCost], ...] = ()  # (kind, its cost model), sorted by kind


def class_estimates(nodes: Iterable[NodeInfo]) -> dict[tuple[str, str, str], Prediction]:
    """A class-wide prediction per (hardware profile, kind, model): the median of the own profiles
    of the nodes of that hardware profile. A node without a profile of its own gets its peers'.
    The reconciler passes the online, attested nodes only: a node names its hardware profile
    itself, and an offline or untrusted one must not set its supposed peers' figures."""
    figures: dict[tuple[str, str, str], list[Prediction]] = {}
    for info in nodes:
        for (kind, model), pred in info.profiles.items():
            figures.setdefault((info.hardware_profile, kind, model), []).append(pred)
    return {
        key: Prediction(
            float(np.median([p.latency_ms for p in preds])), float(np.median([p.energy_j for p in preds]))
        )
        for key, preds in figures.items()
    }


def _frozen(array: NDArray) -> NDArray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class FleetSnapshot:
    """The fleet as arrays indexed by node position; build it with :meth:`from_node_infos`.

    Per node (length N): ``online``, ``cordoned``, ``tier``, ``slots_total``/``slots_used``
    (replica slots), ``memory_free`` (bytes, :data:`UNLIMITED` when undeclared), ``active_w``,
    ``latency_scale``, ``node_class``, ``zone`` (code into ``zones``) and ``labels`` (N x L codes
    into ``label_values``, :data:`MISSING` when absent).

    Per class (length C): ``class_dtypes`` (C x K dtype bitmasks per accelerator kind, bit 0 =
    :data:`PRESENT`, others from ``dtype_bits``), ``class_nj_per_op`` (C x K, the accelerators'
    energy prior, NaN where unknown), and C x K x M ``latency_ms``/``energy_j`` predictions per
    model (NaN where unknown) with their ``basis`` (a code into :data:`BASIS`).

    Per own profile (length P, sorted by model, node, kind): ``own_model``, ``own_node``,
    ``own_kind``, ``own_latency_ms``, ``own_energy_j``.
    """

    node_ids: tuple[str, ...]
    positions: Mapping[str, int]
    online: NDArray[np.bool_]
    cordoned: NDArray[np.bool_]
    tier: NDArray[np.int8]
    slots_total: NDArray[np.int32]
    slots_used: NDArray[np.int32]
    memory_free: NDArray[np.int64]
    active_w: NDArray[np.float64]
    latency_scale: NDArray[np.float64]
    node_class: NDArray[np.int32]
    zone: NDArray[np.int32]
    zones: tuple[str, ...]
    label_keys: tuple[str, ...]
    label_values: tuple[tuple[str, ...], ...]
    labels: NDArray[np.int32]
    classes: tuple[NodeClass, ...]
    kinds: tuple[str, ...]
    dtype_bits: Mapping[str, int]
    class_dtypes: NDArray[np.uint64]
    class_nj_per_op: NDArray[np.float64]
    models: tuple[str, ...]
    latency_ms: NDArray[np.float64]
    energy_j: NDArray[np.float64]
    basis: NDArray[np.int8]
    #: deployment -> (node positions, replica counts) of its replicas already bound
    per_deployment: Mapping[str, tuple[NDArray[np.intp], NDArray[np.int32]]]
    own_model: NDArray[np.intp]
    own_node: NDArray[np.intp]
    own_kind: NDArray[np.intp]
    own_latency_ms: NDArray[np.float64]
    own_energy_j: NDArray[np.float64]

    @property
    def size(self) -> int:
        return len(self.node_ids)

    def index(self, node_id: str) -> int:
        """Position of a node; ``SchedulerError`` if the snapshot has no such node."""
        try:
            return self.positions[node_id]
        except KeyError:
            raise SchedulerError(f"node {node_id!r} is not in the snapshot") from None

    def dtype_mask(self, dtypes: Iterable[str]) -> int | None:
        """The bitmask of ``dtypes``, or None if a dtype is unknown to every node."""
        mask = int(PRESENT)
        for dtype in dtypes:
            bit = self.dtype_bits.get(dtype)
            if bit is None:
                return None
            mask |= 1 << bit
        return mask

    def own_profiles(self, model: str) -> slice:
        """The range of the ``own_*`` arrays that holds ``model``'s profiles (empty if none)."""
        if model not in self.models:
            return slice(0, 0)
        m = self.models.index(model)
        lo, hi = np.searchsorted(self.own_model, (m, m + 1))
        return slice(int(lo), int(hi))

    def predicted_latency(
        self, nodes: NDArray[np.intp], models: NDArray[np.intp], kinds: NDArray[np.intp]
    ) -> NDArray[np.float64]:
        """Predicted latency of each (node, model, kind) triple (positions into ``node_ids``,
        ``models`` and ``kinds``): the node's own profile if it has one, else its class's; NaN if
        neither."""
        out = (
            self.latency_ms[self.node_class[nodes], kinds, models]
            if self.models
            else np.full(len(nodes), np.nan)
        )
        if self.own_node.size and len(nodes):
            own = self._own_key(self.own_model, self.own_node, self.own_kind)
            want = self._own_key(models, nodes, kinds)
            pos = np.minimum(np.searchsorted(own, want), own.size - 1)
            hit = own[pos] == want
            out = np.where(hit, self.own_latency_ms[pos], out)
        return out

    def _own_key(self, models: NDArray, nodes: NDArray, kinds: NDArray) -> NDArray[np.int64]:
        return (models.astype(np.int64) * self.size + nodes) * max(len(self.kinds), 1) + kinds

    def label_code(self, key: str, value: str) -> tuple[int, int] | None:
        """(column, code) of a label value, or None if no node carries it."""
        if key not in self.label_keys:
            return None
        col = self.label_keys.index(key)
        values = self.label_values[col]
        return (col, values.index(value)) if value in values else None

    @classmethod
    def from_node_infos(
        cls,
        nodes: Mapping[str, NodeInfo] | Iterable[NodeInfo],
        *,
        performance: PerformanceTable | None = None,
        works: Mapping[str, ModelWork] | None = None,
        zone_label: str = "zone",
    ) -> FleetSnapshot:
        """Columnise ``nodes``; ``performance`` gives the predictions, ``works`` (model -> its work)
        the cost-model predictions where ``performance`` has none, ``zone_label`` the zone."""
        infos = _checked(nodes)
        ids = tuple(n.id for n in infos)
        dtype_names = sorted({d for n in infos for dtypes in n.accelerators.values() for d in dtypes})
        if len(dtype_names) > 63:
            raise SchedulerError(f"{len(dtype_names)} distinct dtypes do not fit a 64-bit mask")
        dtype_bits = {name: bit for bit, name in enumerate(dtype_names, start=1)}
        kinds = tuple(sorted({k for n in infos for k in n.accelerators}))
        kind_pos = {k: i for i, k in enumerate(kinds)}
        node_class, classes, class_dtypes = _node_classes(infos, dtype_bits, kind_pos)
        models, latency, energy, own = _predictions(infos, classes, kind_pos, performance or {}, works or {})
        basis = np.where(np.isnan(energy), NO_BASIS, TABLE).astype(np.int8)
        _cold_start(classes, kind_pos, models, works or {}, latency, energy, basis)
        label_keys, vocab, labels = _labels(infos)
        zone_codes: dict[str, int] = {}
        zone = np.array(
            [zone_codes.setdefault(n.labels.get(zone_label, ""), len(zone_codes)) for n in infos], np.int32
        )
        memory_total = np.array([n.memory_bytes for n in infos], np.int64)
        memory_used = np.array([n.memory_used for n in infos], np.int64)
        return cls(
            node_ids=ids,
            positions=MappingProxyType({node_id: i for i, node_id in enumerate(ids)}),
            online=_frozen(np.array([n.online for n in infos], np.bool_)),
            cordoned=_frozen(np.array([n.cordoned for n in infos], np.bool_)),
            tier=_frozen(np.array([TIERS[n.attestation_tier] for n in infos], np.int8)),
            slots_total=_frozen(np.array([n.max_replicas for n in infos], np.int32)),
            slots_used=_frozen(np.array([n.replicas for n in infos], np.int32)),
            memory_free=_frozen(np.where(memory_total > 0, memory_total - memory_used, UNLIMITED)),
            active_w=_frozen(np.array([n.active_w for n in infos], np.float64)),
            latency_scale=_frozen(np.array([n.latency_scale for n in infos], np.float64)),
            node_class=_frozen(node_class),
            zone=_frozen(zone),
            zones=tuple(zone_codes),
            label_keys=label_keys,
            label_values=tuple(tuple(codes) for codes in vocab),
            labels=_frozen(labels),
            classes=classes,
            kinds=kinds,
            dtype_bits=MappingProxyType(dtype_bits),
            class_dtypes=_frozen(class_dtypes),
            class_nj_per_op=_frozen(_class_nj_per_op(classes, kind_pos)),
            models=models,
            latency_ms=_frozen(latency),
            energy_j=_frozen(energy),
            basis=_frozen(basis),
            per_deployment=MappingProxyType(_per_deployment(infos)),
            own_model=_frozen(np.array(own[0], np.intp)),
            own_node=_frozen(np.array(own[1], np.intp)),
            own_kind=_frozen(np.array(own[2], np.intp)),
            own_latency_ms=_frozen(np.array(own[3], np.float64)),
            own_energy_j=_frozen(np.array(own[4], np.float64)),
        )


def _checked(nodes: Mapping[str, NodeInfo] | Iterable[NodeInfo]) -> list[NodeInfo]:
    """The nodes sorted by id; a node listed twice or with an unknown tier is refused."""
    infos = sorted(nodes.values() if isinstance(nodes, Mapping) else nodes, key=lambda n: n.id)
    for a, b in itertools.pairwise(infos):
        if a.id == b.id:
            raise SchedulerError(f"node {a.id!r} is listed twice")
    for info in infos:
        if info.attestation_tier not in TIERS:
            raise SchedulerError(f"node {info.id!r}: unknown attestation tier {info.attestation_tier!r}")
    return infos


def _node_classes(
    infos: list[NodeInfo], dtype_bits: Mapping[str, int], kind_pos: Mapping[str, int]
) -> tuple[NDArray[np.int32], tuple[NodeClass, ...], NDArray[np.uint64]]:
    """(each node's class, the classes, each class's dtype mask per accelerator kind)."""
    class_pos: dict[NodeClass, int] = {}
    node_class = np.empty(len(infos), np.int32)
    for i, info in enumerate(infos):
        key = NodeClass(
            info.hardware_profile,
            tuple(sorted(info.accelerators.items())),
            tuple(sorted(info.nj_per_op.items())),
            tuple(sorted(info.costs.items())),
        )
        node_class[i] = class_pos.setdefault(key, len(class_pos))
    classes = tuple(class_pos)
    class_dtypes = np.zeros((len(classes), len(kind_pos)), np.uint64)
    for c, klass in enumerate(classes):
        for kind, dtypes in klass.accelerators:
            mask = int(PRESENT)
            for d in dtypes:
                mask |= 1 << dtype_bits[d]
            class_dtypes[c, kind_pos[kind]] = mask
    return node_class, classes, class_dtypes


def _class_nj_per_op(classes: tuple[NodeClass, ...], kind_pos: Mapping[str, int]) -> NDArray[np.float64]:
    """Each class's energy prior per accelerator kind (NaN where unknown)."""
    prior = np.full((len(classes), len(kind_pos)), np.nan)
    for c, klass in enumerate(classes):
        for kind, nj in klass.nj_per_op:
            if kind in kind_pos:
                prior[c, kind_pos[kind]] = nj
    return prior


def _predictions(
    infos: list[NodeInfo],
    classes: tuple[NodeClass, ...],
    kind_pos: Mapping[str, int],
    table: PerformanceTable,
    works: Mapping[str, ModelWork],
) -> tuple[tuple[str, ...], NDArray[np.float64], NDArray[np.float64], list[tuple]]:
    """(models, latency and energy per class/kind/model from ``table``, the nodes' own profiles
    as columns (model, node, kind, latency, energy) sorted by model then node)."""
    own_models = {model for n in infos for (_, model) in n.profiles}
    models = tuple(sorted({model for (_, _, model) in table} | own_models | set(works)))
    model_pos = {m: i for i, m in enumerate(models)}
    latency = np.full((len(classes), len(kind_pos), len(models)), np.nan)
    energy = np.full_like(latency, np.nan)
    for c, klass in enumerate(classes):
        for kind, _ in klass.accelerators:
            for model in models:
                pred = table.get((klass.profile, kind, model))
                if pred is not None:
                    latency[c, kind_pos[kind], model_pos[model]] = pred.latency_ms
                    energy[c, kind_pos[kind], model_pos[model]] = pred.energy_j
    own_rows = sorted(
        (model_pos[model], i, kind_pos[kind], pred.latency_ms, pred.energy_j)
        for i, info in enumerate(infos)
        for (kind, model), pred in info.profiles.items()
        if kind in kind_pos  # a profile of an accelerator the node no longer offers is moot
    )
    own = list(zip(*own_rows, strict=True)) if own_rows else [(), (), (), (), ()]
    return models, latency, energy, own


def _cold_start(
    classes: tuple[NodeClass, ...],
    kind_pos: Mapping[str, int],
    models: tuple[str, ...],
    works: Mapping[str, ModelWork],
    latency: NDArray[np.float64],
    energy: NDArray[np.float64],
    basis: NDArray[np.int8],
) -> None:
    """Fill the predictions the table leaves unknown from the cost models (in place)."""
    costs = np.full((len(classes), len(kind_pos), len(AcceleratorCost._fields)), np.nan)
    for c, klass in enumerate(classes):
        for kind, cost in klass.costs:
            if kind in kind_pos:
                costs[c, kind_pos[kind]] = cost
    work = np.array([works.get(m, (np.nan,) * len(ModelWork._fields)) for m in models], np.float64)
    if not (np.isfinite(costs).any() and np.isfinite(work).any()):
        return
    predicted_ms, predicted_j = predict(costs, work.reshape(len(models), len(ModelWork._fields)))
    fill = np.isnan(energy) & np.isfinite(predicted_j)
    latency[fill] = predicted_ms[fill]
    energy[fill] = predicted_j[fill]
    basis[fill] = COST_MODEL


def _labels(infos: list[NodeInfo]) -> tuple[tuple[str, ...], list[dict[str, int]], NDArray[np.int32]]:
    """(label keys, each key's value codes, each node's code per key or MISSING)."""
    label_keys = tuple(sorted({k for n in infos for k in n.labels}))
    vocab: list[dict[str, int]] = [{} for _ in label_keys]
    labels = np.full((len(infos), len(label_keys)), MISSING, np.int32)
    for col, key in enumerate(label_keys):
        codes = vocab[col]
        for i, info in enumerate(infos):
            value = info.labels.get(key)
            if value is not None:
                labels[i, col] = codes.setdefault(value, len(codes))
    return label_keys, vocab, labels


def _per_deployment(infos: list[NodeInfo]) -> dict[str, tuple[NDArray[np.intp], NDArray[np.int32]]]:
    """Per deployment, (positions of the nodes that run its replicas, how many each)."""
    per_dep: dict[str, dict[int, int]] = {}
    for i, info in enumerate(infos):
        for dep, count in info.per_deployment.items():
            if count:
                per_dep.setdefault(dep, {})[i] = count
    return {
        dep: (
            _frozen(np.fromiter(c.keys(), np.intp, len(c))),
            _frozen(np.fromiter(c.values(), np.int32, len(c))),
        )
        for dep, c in per_dep.items()
    }

"""What a kind of request resolves to on a fleet snapshot (:class:`RequestShape`), and the node
selection (:data:`Nodes`) that plugins and the plan index arrays with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .placement import PlacementRequest
from .snapshot import OWN_PROFILE, FleetSnapshot

#: ``slice(None)`` (the whole fleet) or an array of node positions: ``array[nodes]`` selects them.
Nodes = slice | NDArray[np.intp]


def at(values: NDArray, nodes: Nodes) -> NDArray:
    """``values[nodes]``; ``np.take`` gathers faster than fancy indexing."""
    return values[nodes] if isinstance(nodes, slice) else np.take(values, nodes)


def _pick(
    fits: NDArray[np.bool_],
    latency: NDArray[np.float64],
    energy: NDArray[np.float64],
    slo: float,
    prior: NDArray[np.float64],
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.float64]]:
    """Per row (rows x kinds): the kind picked (-1 if none fits) and its latency and energy.

    Fitting first, then meeting the SLO, then the least predicted energy, then (nothing profiled
    yet) the least energy per operation at peak (``prior``), then the first by name."""
    rows, kinds = fits.shape
    if kinds == 0:
        return np.full(rows, -1, np.intp), np.full(rows, np.nan), np.full(rows, np.nan)
    misses = latency > slo if slo > 0 else np.zeros((rows, kinds), np.bool_)
    position = np.broadcast_to(np.arange(kinds), (rows, kinds))
    unknown = np.where(np.isnan(prior), np.inf, prior)
    order = np.lexsort(
        (position, unknown, np.where(np.isnan(energy), np.inf, energy), misses, ~fits), axis=-1
    )
    best = order[:, 0]
    picked = fits.any(axis=1)
    at_best = np.arange(rows), best
    return (
        np.where(picked, best, -1),
        np.where(picked, latency[at_best], np.nan),
        np.where(picked, energy[at_best], np.nan),
    )


def _at_kind(values: NDArray[np.int8], kind: NDArray[np.intp]) -> NDArray[np.int8]:
    """Per row of ``values`` (rows x kinds), the value at ``kind`` (0 where it is -1)."""
    if not values.size:
        return np.zeros(len(kind), np.int8)
    picked = values[np.arange(len(kind)), np.maximum(kind, 0)]
    return np.where(kind >= 0, picked, 0).astype(np.int8)


@dataclass(frozen=True, eq=False)
class RequestShape:
    """What a kind of request resolves to per node class: the accelerator picked and its predictions.

    Among a class's accelerators that can run the request, the pick is the one predicted to meet
    the SLO, then the one with the least energy per inference, then (no prediction) the one with
    the least energy per operation at peak, then the first by kind name. Nodes
    with their own profile of the model are resolved the same way, one by one, with their own
    figures in place of their class's (``own_*``, by ascending node); read per node through
    :meth:`kind_at`, :meth:`latency_at` and :meth:`energy_at`.
    """

    kind: NDArray[np.intp]  # per class: position in snapshot.kinds, -1 if none fits
    latency_ms: NDArray[np.float64]  # per class, of the picked accelerator; NaN if unknown
    energy_j: NDArray[np.float64]
    basis: NDArray[np.int8]  # per class, what the picked accelerator's predictions rest on
    has_latency: bool  # some node has a latency prediction for the model
    has_energy: bool
    own_nodes: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    own_kind: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    own_latency_ms: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    own_energy_j: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    own_basis: NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))

    @classmethod
    def resolve(cls, snap: FleetSnapshot, req: PlacementRequest) -> RequestShape:
        classes, kinds = snap.class_dtypes.shape
        mask = snap.dtype_mask(req.dtypes)
        if mask is None:
            fits = np.zeros((classes, kinds), np.bool_)
        else:
            fits = (snap.class_dtypes & np.uint64(mask)) == np.uint64(mask)
        if req.accelerators:
            fits &= np.array([k in req.accelerators for k in snap.kinds], np.bool_)
        if req.model in snap.models:
            m = snap.models.index(req.model)
            latency, energy, basis = snap.latency_ms[:, :, m], snap.energy_j[:, :, m], snap.basis[:, :, m]
        else:
            latency = energy = np.full((classes, kinds), np.nan)
            basis = np.zeros((classes, kinds), np.int8)
        kind, latency_ms, energy_j = _pick(fits, latency, energy, req.max_latency_ms, snap.class_nj_per_op)
        has_latency = bool(np.any(~np.isnan(latency) & fits))
        has_energy = bool(np.any(~np.isnan(energy) & fits))
        class_basis = _at_kind(basis, kind)
        own = snap.own_profiles(req.model)
        if own.stop == own.start:
            return cls(kind, latency_ms, energy_j, class_basis, has_latency, has_energy)
        nodes, row = np.unique(snap.own_node[own], return_inverse=True)
        klass = snap.node_class[nodes]
        own_latency, own_energy, own_basis = latency[klass], energy[klass], basis[klass]  # copies
        own_latency[row, snap.own_kind[own]] = snap.own_latency_ms[own]
        own_energy[row, snap.own_kind[own]] = snap.own_energy_j[own]
        own_basis[row, snap.own_kind[own]] = OWN_PROFILE
        own_fits = fits[klass]
        picked = _pick(own_fits, own_latency, own_energy, req.max_latency_ms, snap.class_nj_per_op[klass])
        return cls(
            kind,
            latency_ms,
            energy_j,
            class_basis,
            has_latency=has_latency or bool(np.any(~np.isnan(own_latency) & own_fits)),
            has_energy=has_energy or bool(np.any(~np.isnan(own_energy) & own_fits)),
            own_nodes=nodes,
            own_kind=picked[0],
            own_latency_ms=picked[1],
            own_energy_j=picked[2],
            own_basis=_at_kind(own_basis, picked[0]),
        )

    def kind_of(self, snap: FleetSnapshot, node: int) -> int:
        """The kind picked on one node (-1 if none fits)."""
        i = self._own_index(node)
        return int(self.kind[snap.node_class[node]] if i < 0 else self.own_kind[i])

    def basis_of(self, snap: FleetSnapshot, node: int) -> int:
        """What the predictions on one node rest on (a code into ``snapshot.BASIS``)."""
        i = self._own_index(node)
        return int(self.basis[snap.node_class[node]] if i < 0 else self.own_basis[i])

    def _own_index(self, node: int) -> int:
        """The node's row among those with an own profile of the model, or -1."""
        if self.own_nodes.size:
            i = int(np.searchsorted(self.own_nodes, node))
            if i < self.own_nodes.size and self.own_nodes[i] == node:
                return i
        return -1

    def kind_at(self, snap: FleetSnapshot, nodes: Nodes) -> NDArray[np.intp]:
        return self._patch(self.kind[at(snap.node_class, nodes)], self.own_kind, nodes)

    def latency_at(self, snap: FleetSnapshot, nodes: Nodes) -> NDArray[np.float64]:
        return self._patch(self.latency_ms[at(snap.node_class, nodes)], self.own_latency_ms, nodes)

    def energy_at(self, snap: FleetSnapshot, nodes: Nodes) -> NDArray[np.float64]:
        return self._patch(self.energy_j[at(snap.node_class, nodes)], self.own_energy_j, nodes)

    def _patch(self, values: NDArray, own: NDArray, nodes: Nodes) -> NDArray:
        """Per-class ``values`` gathered to ``nodes`` (a fresh array), with own figures put in."""
        if not self.own_nodes.size:
            return values
        if isinstance(nodes, slice):
            values[self.own_nodes[nodes]] = own[nodes]  # only slice(None) is ever passed
            return values
        pos = np.minimum(np.searchsorted(nodes, self.own_nodes), max(len(nodes) - 1, 0))
        hit = (nodes[pos] == self.own_nodes) if len(nodes) else np.zeros(self.own_nodes.size, np.bool_)
        values[pos[hit]] = own[hit]
        return values

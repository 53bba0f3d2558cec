"""Filter and score plugins, vectorised over the nodes of a :class:`FleetSnapshot`.

A filter returns, for the nodes it is given, one boolean mask per reason id it can give (in the
order it checks them); a score returns a 0-100 array, higher is better. ``nodes`` is either
``slice(None)`` (the whole fleet) or an array of node positions, so ``array[nodes]`` selects them.

A *static* plugin depends only on the snapshot and the request: the scheduler evaluates it once
per kind of request and caches the result. A *dynamic* one also depends on what the plan has bound
so far (capacity, load, spread) and runs on every placement, so it must stay cheap.

Plugins are registered by name in :data:`FILTERS` and :data:`SCORERS`; third parties publish
them in the ``edgeward.scheduler_plugins`` entry-point group (:func:`load_entry_points`), and a
profile enables them by name, with weights. A third-party plugin that fails to load is left out
and reported; one that raises while placing rules every node out (a filter, with the reason
``scheduler.plugin.failed``) or scores 0 (a score) and is reported once, so it cannot stop the
orchestrator.
"""

from __future__ import annotations

import abc
import importlib.metadata
import logging
from collections.abc import Sequence
from typing import ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

from .placement import TIERS, PlacementRequest, SchedulerError
from .shape import Nodes, RequestShape, at
from .snapshot import LATENCY_FLOOR_MS, FleetSnapshot

log = logging.getLogger(__name__)

__all__ = ["Nodes", "PlanView", "RequestShape", "at"]  # re-exported for plugin authors

Mask = NDArray[np.bool_]
Scores = NDArray[np.float64]

OFFLINE = "scheduler.filter.offline"
CORDONED = "scheduler.filter.cordoned"
SELECTOR = "scheduler.filter.selector"
ATTESTATION = "scheduler.filter.attestation"
ACCELERATOR = "scheduler.filter.accelerator"
CAPACITY = "scheduler.filter.capacity"
MEMORY = "scheduler.filter.memory"
PLUGIN_FAILED = "scheduler.plugin.failed"
ENTRY_POINT_GROUP = "edgeward.scheduler_plugins"

# Avoids a division by zero for free inferences (a node that reports no power).
_EPS_J = 1e-12


class PlanView(Protocol):
    """What a plugin reads of the plan in progress (:class:`~orchestrator.scheduler.PlacementPlan`):
    the snapshot, and the per-node state that binding changes. Read only."""

    snapshot: FleetSnapshot
    has_slot: NDArray[np.bool_]
    memory_free: NDArray[np.int64]
    free_share: NDArray[np.float64]
    last_bound: int

    def deployment_counts(self, deployment: str) -> NDArray[np.int32] | None: ...

    def zone_counts(self, deployment: str) -> NDArray[np.int32] | None: ...


class FilterPlugin(abc.ABC):
    """Rules nodes out, each with a reason id."""

    name: ClassVar[str]
    dynamic: ClassVar[bool] = False

    @abc.abstractmethod
    def filter(
        self, req: PlacementRequest, shape: RequestShape, plan: PlanView, nodes: Nodes
    ) -> Sequence[tuple[str, Mask]]:
        """(reason id, nodes that pass) for each check, in the order the checks apply."""


class ScorePlugin(abc.ABC):
    """Ranks the nodes that passed every filter, 0-100."""

    name: ClassVar[str]
    dynamic: ClassVar[bool] = False

    @abc.abstractmethod
    def score(
        self, req: PlacementRequest, shape: RequestShape, plan: PlanView, nodes: Nodes, fit: Mask | None
    ) -> Scores:
        """Scores of ``nodes``; ``fit`` (None: all of them) marks those still feasible."""


# ---------------------------------------------------------------------------------------- filters


class Ready(FilterPlugin):
    name = "ready"

    def filter(self, req, shape, plan, nodes):
        snap = plan.snapshot
        return [(OFFLINE, snap.online[nodes]), (CORDONED, ~snap.cordoned[nodes])]


class Selector(FilterPlugin):
    name = "selector"

    def filter(self, req, shape, plan, nodes):
        snap = plan.snapshot
        passes = np.ones(len(snap.node_class[nodes]), np.bool_)
        for key, value in sorted(req.selector.items()):
            where = snap.label_code(key, value)
            if where is None:
                passes[:] = False
                break
            col, code = where
            passes &= snap.labels[nodes, col] == code
        return [(SELECTOR, passes)]


class Attestation(FilterPlugin):
    name = "attestation"

    def filter(self, req, shape, plan, nodes):
        try:
            need = TIERS[req.attestation_tier]
        except KeyError:
            raise SchedulerError(f"unknown attestation tier {req.attestation_tier!r}") from None
        return [(ATTESTATION, plan.snapshot.tier[nodes] >= need)]


class Accelerator(FilterPlugin):
    """An accelerator of an acceptable kind that supports every dtype of the model."""

    name = "accelerator"

    def filter(self, req, shape, plan, nodes):
        return [(ACCELERATOR, shape.kind_at(plan.snapshot, nodes) >= 0)]


class Capacity(FilterPlugin):
    """A free replica slot, then enough free memory."""

    name = "capacity"
    dynamic = True

    def filter(self, req, shape, plan, nodes):
        return [
            (CAPACITY, at(plan.has_slot, nodes)),
            (MEMORY, at(plan.memory_free, nodes) >= req.memory_bytes),
        ]


# ----------------------------------------------------------------------------------------- scores


class Latency(ScorePlugin):
    """Predicted latency against the request's SLO: 100 up to half the SLO, 50 at it, 0 from 1.5x.

    The prediction is the node's own profile of the model, else its class's, times the node's
    ``latency_scale`` (observed / predicted latency from its telemetry); predictions under
    :data:`~.snapshot.LATENCY_FLOOR_MS` count as the floor. Nodes without a prediction
    score 50 (as good as "just meets"); without an SLO, or without any prediction, every node
    scores 100.
    """

    name = "latency"

    def score(self, req, shape, plan, nodes, fit):
        snap = plan.snapshot
        count = len(snap.node_class[nodes])
        if req.max_latency_ms <= 0 or not shape.has_latency:
            return np.full(count, 100.0)
        latency = np.maximum(shape.latency_at(snap, nodes), LATENCY_FLOOR_MS) * at(snap.latency_scale, nodes)
        ratio = latency / req.max_latency_ms
        return np.where(np.isnan(ratio), 50.0, 100.0 * np.clip(1.5 - ratio, 0.0, 1.0))


class Energy(ScorePlugin):
    """Predicted joules per inference relative to the best node: 100 x best / own (the node's own
    profile of the model where it has one, else its class's prediction).

    Nodes without a prediction count as the worst predicted one; without any prediction for the
    model, the node's active power stands in for its energy.
    """

    name = "energy"

    def score(self, req, shape, plan, nodes, fit):
        snap = plan.snapshot
        joules = shape.energy_at(snap, nodes)
        known = ~np.isnan(joules)
        joules = np.where(known, joules, joules[known].max()) if known.any() else snap.active_w[nodes]
        if joules.size == 0:
            return np.zeros(0)
        return 100.0 * np.minimum((joules.min() + _EPS_J) / (joules + _EPS_J), 1.0)


class LeastLoaded(ScorePlugin):
    """Share of the node's replica slots still free."""

    name = "least-loaded"
    dynamic = True

    def score(self, req, shape, plan, nodes, fit):
        return at(plan.free_share, nodes)


class Spread(ScorePlugin):
    """Fewer replicas of the same deployment on the node: 100 x (1 - own / (most + 1))."""

    name = "spread"
    dynamic = True

    def score(self, req, shape, plan, nodes, fit):
        counts = plan.deployment_counts(req.deployment)
        size = len(plan.snapshot.node_class[nodes])
        return _spread(None if counts is None else at(counts, nodes), fit, size)


class ZoneSpread(ScorePlugin):
    """Fewer replicas of the same deployment in the node's zone (the ``zone`` label)."""

    name = "zone-spread"
    dynamic = True

    def score(self, req, shape, plan, nodes, fit):
        counts = plan.zone_counts(req.deployment)
        snap = plan.snapshot
        return _spread(
            None if counts is None else np.take(counts, at(snap.zone, nodes)),
            fit,
            len(snap.node_class[nodes]),
        )


def _spread(counts: NDArray[np.int32] | None, fit: Mask | None, size: int) -> Scores:
    if counts is None:
        return np.full(size, 100.0)
    most = int((counts if fit is None else np.where(fit, counts, 0)).max(initial=0))
    return np.subtract(100.0, counts * (100.0 / (most + 1)), dtype=np.float64)


class RoundRobin(ScorePlugin):
    """The first feasible node after the last one bound, in node id order (for comparisons)."""

    name = "round-robin"
    dynamic = True

    def score(self, req, shape, plan, nodes, fit):
        size = plan.snapshot.size
        positions = np.arange(size)[nodes] if isinstance(nodes, slice) else nodes
        return 100.0 * (1.0 - ((positions - (plan.last_bound + 1)) % size) / size)


# --------------------------------------------------------------------------------------- registry

FILTERS: dict[str, FilterPlugin] = {}
SCORERS: dict[str, ScorePlugin] = {}


def register(plugin: FilterPlugin | ScorePlugin) -> None:
    """Make a plugin available to profiles under its name; names are unique across both stages."""
    if plugin.name in FILTERS or plugin.name in SCORERS:
        raise SchedulerError(f"scheduler plugin {plugin.name!r} is already registered")
    if isinstance(plugin, FilterPlugin):
        FILTERS[plugin.name] = plugin
    else:
        SCORERS[plugin.name] = plugin


for _plugin in (
    Ready(),
    Selector(),
    Attestation(),
    Accelerator(),
    Capacity(),
    Latency(),
    Energy(),
    LeastLoaded(),
    Spread(),
    ZoneSpread(),
    RoundRobin(),
):
    register(_plugin)


# ----------------------------------------------------------------------------------- third parties

_loaded: dict[str, str] = {}  # entry-point name -> its value, once registered
_failed: dict[str, str] = {}  # entry-point name -> why it was not


class _GuardedFilter(FilterPlugin):
    """A third-party filter that cannot break a placement: if it raises, it rules every node out."""

    def __init__(self, inner: FilterPlugin) -> None:
        self.inner, self.name, self.dynamic = inner, inner.name, inner.dynamic  # type: ignore[misc]
        self.reported = False

    def filter(self, req, shape, plan, nodes):
        try:
            return list(self.inner.filter(req, shape, plan, nodes))
        except Exception as err:
            if not self.reported:
                self.reported = True
                log.error("scheduler plugin %r failed; it rules out every node: %r", self.name, err)
            return [(PLUGIN_FAILED, np.zeros(len(plan.snapshot.node_class[nodes]), np.bool_))]


class _GuardedScore(ScorePlugin):
    """A third-party score that cannot break a placement: if it raises, every node scores 0."""

    def __init__(self, inner: ScorePlugin) -> None:
        self.inner, self.name, self.dynamic = inner, inner.name, inner.dynamic  # type: ignore[misc]
        self.reported = False

    def score(self, req, shape, plan, nodes, fit):
        try:
            return np.asarray(self.inner.score(req, shape, plan, nodes, fit), np.float64)
        except Exception as err:
            if not self.reported:
                self.reported = True
                log.error("scheduler plugin %r failed; it scores 0 everywhere: %r", self.name, err)
            return np.zeros(len(plan.snapshot.node_class[nodes]))


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
    """Register the plugins of every entry point in ``group``; name -> why one could not be.

    An entry point names a :class:`FilterPlugin` or :class:`ScorePlugin` subclass (built with no
    arguments) or instance, whose ``name`` is the entry point's name. Loading is done once per
    entry point; failures are logged and returned again on later calls, never raised.
    """
    for ep in importlib.metadata.entry_points(group=group):
        if _loaded.get(ep.name) == ep.value or ep.name in _failed:
            continue
        try:
            if ep.name in FILTERS or ep.name in SCORERS:
                raise SchedulerError("the name is taken by a plugin already registered")
            obj = ep.load()
            plugin = obj() if isinstance(obj, type) else obj
            if not isinstance(plugin, FilterPlugin | ScorePlugin):
                raise SchedulerError(f"{type(plugin).__name__} is neither a FilterPlugin nor a ScorePlugin")
            if plugin.name != ep.name:
                raise SchedulerError(f"the plugin calls itself {plugin.name!r}")
        except (Exception, SystemExit) as err:
            _failed[ep.name] = f"entry point {ep.name} = {ep.value}: {type(err).__name__}: {err}"
            log.error("scheduler plugin not loaded: %s", _failed[ep.name])
            continue
        register(_GuardedFilter(plugin) if isinstance(plugin, FilterPlugin) else _GuardedScore(plugin))
        _loaded[ep.name] = ep.value
        log.info("scheduler plugin %r loaded from %s", ep.name, ep.value)
    return dict(_failed)

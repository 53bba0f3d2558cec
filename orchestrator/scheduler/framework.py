"""The scheduling framework: filter plugins rule nodes out with a reason, score plugins rank the
rest on a 0-100 scale, and the best node is bound.

Plugins are registered by name (:mod:`.plugins`); a :class:`SchedulerProfile` enables a list of
filters and weighted scores. The scheduler works on an immutable :class:`FleetSnapshot` taken once
per reconcile pass, through a :class:`PlacementPlan` that reserves as it places; the reconciler is
the single committer of the resulting bindings.

Every filter says *why* a node is unfit, with a machine-readable id such as
``scheduler.filter.accelerator``, so a pending replica carries an exact explanation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

from .placement import NodeInfo, Placement, PlacementRequest, Unschedulable
from .plan import PlacementPlan
from .plugins import FILTERS, SCORERS, load_entry_points
from .profiles import DEFAULT_FILTERS, DEFAULT_PROFILE, DEFAULT_WEIGHTS, PROFILES, SchedulerProfile
from .settings import SchedulerConfig
from .snapshot import FleetSnapshot

__all__ = [  # the profiles live in .profiles (the config validates names against them)
    "DEFAULT_FILTERS",
    "DEFAULT_PROFILE",
    "DEFAULT_WEIGHTS",
    "PROFILES",
    "Scheduler",
    "SchedulerProfile",
]

log = logging.getLogger(__name__)
UNKNOWN_PLUGIN = "scheduler.plugin.unknown"
WRONG_STAGE = "scheduler.plugin.wrong_stage"


class Scheduler:
    """Places replicas with the plugins of one profile."""

    def __init__(self, profile: SchedulerProfile | str = DEFAULT_PROFILE) -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self._filters = [FILTERS[name] for name in self.profile.filters]
        self._scorers = [(SCORERS[name], w) for name, w in self.profile.weights.items() if w > 0]
        #: plugins the configured profile names but that could not be enabled: name -> why
        self.disabled: Mapping[str, str] = {}

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Scheduler:
        """Load third-party plugins, then build the configured profile.

        A plugin the profile names but that failed to load, does not exist, or sits in the other
        stage is left out of the profile and reported (log and :attr:`disabled`); the orchestrator
        runs on with the rest.
        """
        failed = load_entry_points()
        spec = config.profiles.get(config.profile)
        if spec is None:
            return cls(PROFILES[config.profile])
        filters = DEFAULT_FILTERS if spec.filters is None else spec.filters
        weights = dict(DEFAULT_WEIGHTS) if spec.weights is None else dict(spec.weights)
        disabled: dict[str, str] = {}
        for name in [*filters, *weights]:
            if (name in filters and name in FILTERS) or (name in weights and name in SCORERS):
                continue
            if name in FILTERS or name in SCORERS:
                disabled[name] = f"{WRONG_STAGE}: {name!r} is a {'filter' if name in FILTERS else 'score'}"
            else:
                disabled[name] = failed.get(name, f"{UNKNOWN_PLUGIN}: no built-in plugin or entry point")
            log.error("scheduler profile %r: plugin %r disabled: %s", config.profile, name, disabled[name])
        scheduler = cls(
            SchedulerProfile(
                name=config.profile,
                filters=tuple(n for n in filters if n in FILTERS),
                weights={n: w for n, w in weights.items() if n in SCORERS},
            )
        )
        scheduler.disabled = disabled
        return scheduler

    def plan(self, snapshot: FleetSnapshot) -> PlacementPlan:
        """Start placing on ``snapshot``; the plan reserves capacity as it places."""
        return PlacementPlan(snapshot, self._filters, self._scorers)

    def place_many(
        self, requests: Iterable[PlacementRequest], snapshot: FleetSnapshot
    ) -> list[Placement | Unschedulable]:
        return self.plan(snapshot).place_many(requests)

    def place(self, req: PlacementRequest, nodes: dict[str, NodeInfo]) -> Placement | Unschedulable:
        """Place one replica on ``nodes`` and record the binding in ``nodes`` (the pre-snapshot API).

        Columnises the whole fleet on every call: fine for a handful of replicas, but a pass that
        places many should take one snapshot and use :meth:`plan`.
        """
        result = self.plan(FleetSnapshot.from_node_infos(nodes)).place(req)
        if isinstance(result, Placement):
            best = nodes[result.node_id]
            per_dep = dict(best.per_deployment)
            per_dep[req.deployment] = per_dep.get(req.deployment, 0) + 1
            nodes[best.id] = replace(
                best,
                replicas=best.replicas + 1,
                memory_used=best.memory_used + req.memory_bytes,
                per_deployment=per_dep,
            )
        return result

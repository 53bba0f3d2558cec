"""Accelerator backends by kind: the built-ins, explicit registrations, and third-party plugins.

A backend factory is a ``Backend`` subclass (or anything with the same ``probe``/``from_config``
classmethods). Built-ins are named here and imported only when first used, so a backend whose
library is missing reports ``unavailable: <reason>`` instead of breaking the import of this
module. Third parties publish factories as entry points in the group ``edgeward.accelerators``,
named by kind; they cannot replace a built-in or an explicit registration.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol

from accelerators.base import Backend, BackendUnavailable

__all__ = ["ENTRY_POINT_GROUP", "BackendFactory", "BackendRegistry", "available", "create", "register"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgeward.accelerators"

#: kind -> "module:attribute" of the factory, imported on first use.
BUILTINS: Mapping[str, str] = {
    "cpu-litert": "accelerators.cpu_litert:CpuLitertBackend",
    "fpga-pynq": "accelerators.fpga_pynq:FpgaPynqBackend",
    "asic-edgetpu": "accelerators.asic_edgetpu:AsicEdgeTpuBackend",
}


class BackendFactory(Protocol):
    """Creates backends of one kind; a ``Backend`` subclass is one."""

    def probe(self) -> str | None:
        """Why the kind cannot be created here, or None."""
        ...

    def from_config(self, config: Mapping[str, Any]) -> Backend: ...


class BackendRegistry:
    """Factories by kind. Built-ins and entry points are resolved lazily; failures are remembered."""

    def __init__(self, builtins: Mapping[str, str] = BUILTINS, *, discover: bool = True) -> None:
        self._targets: dict[str, str] = dict(builtins)
        self._factories: dict[str, BackendFactory] = {}
        self._broken: dict[str, str] = {}
        if discover:
            self._discover()

    def _discover(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._targets:
                log.warning("ignoring entry point %s = %s: kind already provided", ep.name, ep.value)
                continue
            self._targets[ep.name] = ep.value

    def register(self, kind: str, factory: BackendFactory) -> None:
        """Register ``factory`` for ``kind``; replacing a kind already registered is an error."""
        if kind in self._factories or kind in self._targets:
            raise ValueError(f"accelerator kind {kind!r} is already registered")
        self._factories[kind] = factory

    def kinds(self) -> list[str]:
        return sorted(self._factories.keys() | self._targets.keys())

    def factory(self, kind: str) -> BackendFactory:
        """The factory for ``kind``, importing it if needed; ``BackendUnavailable`` if it cannot be."""
        factory = self._factories.get(kind)
        if factory is not None:
            return factory
        if kind in self._broken:
            raise BackendUnavailable(kind, self._broken[kind])
        target = self._targets.get(kind)
        if target is None:
            raise BackendUnavailable(kind, f"unknown kind; known: {', '.join(self.kinds())}")
        module_name, _, attribute = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        # A plugin's import can fail in any way; it must only disable that one kind.
        except Exception as err:
            self._broken[kind] = f"cannot import {target}: {err}"
            log.warning("accelerator kind %s unavailable: %s", kind, self._broken[kind])
            raise BackendUnavailable(kind, self._broken[kind]) from err
        self._factories[kind] = factory
        return factory

    def create(self, kind: str, config: Mapping[str, Any] | None = None) -> Backend:
        """A new backend of ``kind`` from its config (``InvalidConfig``, ``BackendUnavailable``)."""
        factory = self.factory(kind)
        reason = factory.probe()
        if reason is not None:
            raise BackendUnavailable(kind, reason)
        return factory.from_config(config or {})

    def available(self) -> dict[str, str]:
        """Every known kind -> ``"ok"`` or ``"unavailable: <reason>"``."""
        report = {}
        for kind in self.kinds():
            try:
                reason = self.factory(kind).probe()
            except BackendUnavailable as err:
                reason = err.reason
            report[kind] = "ok" if reason is None else f"unavailable: {reason}"
        return report


@functools.cache
def default_registry() -> BackendRegistry:
    """The process-wide registry (entry points are discovered on first use)."""
    return BackendRegistry()


def register(kind: str, factory: BackendFactory) -> None:
    default_registry().register(kind, factory)


def create(kind: str, config: Mapping[str, Any] | None = None) -> Backend:
    return default_registry().create(kind, config)


def available() -> dict[str, str]:
    return default_registry().available()

"""Accelerator backends by kind: the built-ins, explicit registrations, and third-party plugins.

A backend factory is a ``Backend`` subclass (or anything with the same ``probe``/``from_config``
classmethods). Built-ins are named here and imported only when first used, so a backend whose
library is missing reports ``unavailable: <reason>`` instead of breaking the import of this
module. Third parties publish factories as entry points in the group ``edgeward.accelerators``,
named by kind (``my-npu = my_package.backend:MyNpuBackend``); an entry point cannot replace a
built-in (it is ignored, with a warning), and registering a kind an entry point provides is an
error. Whatever a plugin does wrong, at import, in ``probe`` or in ``from_config``, disables that
kind only: it reports ``unavailable: <reason>``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn, Protocol

from accelerators.base import AcceleratorError, Backend, BackendUnavailable

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
        self._targets: dict[str, EntryPoint] = {
            kind: EntryPoint(kind, target, ENTRY_POINT_GROUP) for kind, target in builtins.items()
        }
        self._factories: dict[str, BackendFactory] = {}
        self._broken: dict[str, str] = {}
        if discover:
            self._discover()

    def _discover(self) -> None:
        try:
            found = entry_points(group=ENTRY_POINT_GROUP)
        # Installed metadata is outside our control; a bad file must not stop the built-ins.
        except Exception as err:
            log.warning("cannot list %s entry points: %s", ENTRY_POINT_GROUP, err)
            return
        for ep in found:
            if ep.name in self._targets:
                log.warning("ignoring entry point %s = %s: kind already provided", ep.name, ep.value)
                continue
            self._targets[ep.name] = ep

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
        try:
            factory = target.load()
        # A plugin's import can fail in any way; it must only disable that one kind.
        except Exception as err:
            return self._fail(kind, f"cannot import {target.value}: {err}", err)
        if not (
            callable(getattr(factory, "probe", None)) and callable(getattr(factory, "from_config", None))
        ):
            return self._fail(kind, f"{target.value} is not a backend factory (no probe/from_config)")
        self._factories[kind] = factory
        return factory

    def _fail(self, kind: str, reason: str, cause: Exception | None = None) -> NoReturn:
        self._broken[kind] = reason
        log.warning("accelerator kind %s unavailable: %s", kind, reason)
        raise BackendUnavailable(kind, reason) from cause

    def probe(self, kind: str) -> str | None:
        """Why ``kind`` cannot be created here, or None if it can."""
        try:
            return self.factory(kind).probe()
        except BackendUnavailable as err:
            return err.reason
        except Exception as err:  # a plugin's probe, failing instead of answering
            return f"probe failed: {type(err).__name__}: {err}"

    def create(self, kind: str, config: Mapping[str, Any] | None = None) -> Backend:
        """A new backend of ``kind`` from its config (``InvalidConfig``, ``BackendUnavailable``)."""
        factory = self.factory(kind)
        reason = self.probe(kind)
        if reason is not None:
            raise BackendUnavailable(kind, reason)
        try:
            return factory.from_config(config or {})
        except AcceleratorError:
            raise
        except Exception as err:  # a plugin failing in its own way while creating its backend
            raise BackendUnavailable(kind, f"cannot create: {type(err).__name__}: {err}") from err

    def available(self) -> dict[str, str]:
        """Every known kind -> ``"ok"`` or ``"unavailable: <reason>"``."""
        report = {}
        for kind in self.kinds():
            reason = self.probe(kind)
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

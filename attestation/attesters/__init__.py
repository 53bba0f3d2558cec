"""Attesters by name: ``software`` and ``tpm2`` built in, third parties through the entry point
group ``edgeward.attesters`` (a factory taking the validated config). One contract test suite
(tests/attestation/test_attester_contract.py) runs against every implementation.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Annotated, Any

from pydantic import Field

from ..errors import AttestationError
from .base import Attester
from .software import SoftwareAttester, SoftwareAttesterConfig
from .tpm2 import Tpm2Attester, Tpm2AttesterConfig

__all__ = [
    "ATTESTERS",
    "Attester",
    "AttesterConfig",
    "SoftwareAttester",
    "SoftwareAttesterConfig",
    "Tpm2Attester",
    "Tpm2AttesterConfig",
    "create",
]

ENTRY_POINT_GROUP = "edgeward.attesters"

#: Attester config, told apart by its ``kind``.
AttesterConfig = Annotated[SoftwareAttesterConfig | Tpm2AttesterConfig, Field(discriminator="kind")]

ATTESTERS: dict[str, Any] = {"software": SoftwareAttester, "tpm2": Tpm2Attester}


def create(config: Any) -> Attester:
    """The attester for ``config`` (validated; nothing is opened yet)."""
    factory = ATTESTERS.get(config.kind)
    if factory is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == config.kind:
                module, _, attr = ep.value.partition(":")
                factory = getattr(importlib.import_module(module), attr)
                break
    if factory is None:
        raise AttestationError("attestation.attester.unknown", f"no attester named {config.kind!r}")
    return factory(config)

"""Security configured without a CRL works (mutual TLS, roles), but says loudly that revocation is
off: a revoked certificate would otherwise keep working without anyone being told."""

from __future__ import annotations

import logging

from edgeward.security.config import SecurityConfig
from edgeward.security.guard import ApiGuard
from edgeward.security.pki import FleetCA
from orchestrator.api import APPLY


async def unused_check(request: object) -> object:
    raise AssertionError("no call is made here")


class NoOwners:
    async def owner(self, kind: str, name: str) -> str | None:
        return None


async def open_guard(config: SecurityConfig, tmp_path, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeward.security.guard"):
        guard = await ApiGuard.open(config, tmp_path / "state", NoOwners(), checks={APPLY: unused_check})  # type: ignore[dict-item]
    guard.audit.close()
    return [r.getMessage() for r in caplog.records if "revocation is off" in r.getMessage()]


async def test_no_crl_file_warns_that_revocation_is_off(fleet_ca: FleetCA, tmp_path, caplog) -> None:
    files = SecurityConfig(pki_dir=fleet_ca.dir)
    without = SecurityConfig(ca_file=files.ca_file, cert_file=files.cert_file, key_file=files.key_file)
    assert len(await open_guard(without, tmp_path, caplog)) == 1
    assert await open_guard(files, tmp_path, caplog) == []  # pki_dir brings its CRL

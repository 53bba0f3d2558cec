"""Who owns each deployment and model (docs/security.md, "Roles on the gRPC API"), kept in the store
that every replica shares, so that every replica decides on the same record."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgeward.security.authz import legacy_owners

from .store import Store

log = logging.getLogger(__name__)

LEGACY_FILE = Path("security") / "owners.sqlite"


class StoreOwners:
    """`edgeward.security.authz.Owners` on the orchestrator's store, through its thread (``db``)."""

    def __init__(self, store: Store, db: Callable[..., Awaitable[Any]]) -> None:
        self._store = store
        self._db = db

    async def owner(self, kind: str, name: str) -> str | None:
        owner: str | None = await self._db(self._store.owner_of, kind, name)
        return owner

    async def owned(self, kind: str, owner: str) -> set[str]:
        names: set[str] = await self._db(self._store.owned_by, kind, owner)
        return names

    async def owned_deployments(self, owner: str) -> dict[str, int]:
        created: dict[str, int] = await self._db(self._store.owned_deployments, owner)
        return created

    async def claim(self, kind: str, name: str, owner: str) -> str:
        held: str = await self._db(self._store.claim_owner, kind, name, owner)
        return held

    async def forget(self, kind: str, name: str, owner: str | None = None) -> None:
        await self._db(self._store.forget_owner, kind, name, owner)

    async def import_legacy(self, state_dir: Path) -> int:
        """Move the ownership file of earlier releases (``<state_dir>/security/owners.sqlite``) into the
        store, once: its rows are claimed (an owner the store already has stays), then the file is
        renamed ``owners.sqlite.imported``. Returns how many rows it held."""
        path = Path(state_dir) / LEGACY_FILE

        def move() -> int:
            rows = legacy_owners(path)
            for kind, name, owner in rows:
                self._store.claim_owner(kind, name, owner)
            with contextlib.suppress(FileNotFoundError):  # another replica moved it first
                path.rename(path.with_name(path.name + ".imported"))
            return len(rows)

        count: int = await self._db(move)
        if count:
            log.info("ownership of %d deployments and models moved from %s into the store", count, path)
        return count

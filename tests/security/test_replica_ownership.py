"""Ownership across orchestrator replicas (docs/scale-out.md): two replicas on one PostgreSQL store,
one TLS Mosquitto, a shared state directory, each with its own certificate, and teams calling
whichever replica they reach. Every replica must decide on the same ownership record."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest
from security_support import Client, manifest, secure_config

from edgeward.security.errors import PkiError
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from orchestrator.config import OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker]

DENIED = grpc.StatusCode.PERMISSION_DENIED


def replica_config(ca: FleetCA, state_dir: Path, prefix: str, identity: str, store: str, broker: str):
    base = secure_config(ca, state_dir, prefix).model_dump()
    base["security"] = {"pki_dir": ca.dir, "identity": identity}  # one certificate per replica
    base["broker"]["url"] = broker
    base["state"] = {"url": store, "lease_ttl_s": 3.0}
    return OrchestratorConfig.model_validate(base)


class Clients:
    def __init__(self, ca: FleetCA) -> None:
        self.ca = ca
        self.channels: list[grpc.aio.Channel] = []

    def __call__(self, orch: Orchestrator, team: str) -> Client:
        identity = parse_subject("team", "ci", team)
        try:
            files = self.ca.files(identity.common_name)
        except PkiError:
            files = self.ca.issue(identity)
        tls = TlsFiles(self.ca.ca_file, files.cert_file, files.key_file)
        self.channels.append(grpc_aio_channel(orch.address, tls))
        return Client(self.channels[-1])

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_every_replica_decides_on_the_same_owners(
    tmp_path: Path, fleet_ca: FleetCA, postgres_url: str, mosquitto_tls, topic_prefix: str
):
    """Each replica kept its own ownership registry, loaded at start: a replica that had seen team
    A own a name went on believing it after A deleted it and team B created a deployment under it
    elsewhere, so A read, rewrote and deleted B's deployment through that replica; and a replica
    took what other replicas created after its start for the operator's (teams refused their own)."""
    fleet_ca.issue(parse_subject("orchestrator", "replica-2"))
    broker = f"mqtts://127.0.0.1:{mosquitto_tls().port}"
    shared = tmp_path / "shared-state"
    # An ownership file of an earlier release, in the shared state dir: moved into the store.
    (shared / "security").mkdir(parents=True)
    legacy = sqlite3.connect(shared / "security" / "owners.sqlite")
    legacy.execute("CREATE TABLE owners (kind TEXT, name TEXT, owner TEXT, PRIMARY KEY (kind, name))")
    legacy.execute("INSERT INTO owners VALUES ('deployment', 'old-dep', 'team/smart-home')")
    legacy.commit()
    legacy.close()

    def config(identity: str) -> OrchestratorConfig:
        return replica_config(fleet_ca, shared, topic_prefix, identity, postgres_url, broker)

    clients = Clients(fleet_ca)
    try:
        async with Orchestrator(config("main")) as one:
            home1, auto1 = clients(one, "smart-home"), clients(one, "automotive")
            await home1.push("home-model")
            await auto1.push("auto-model")
            await home1.apply(manifest("shared-name", "home-model"))
            async with Orchestrator(config("replica-2")) as two:
                home2, auto2 = clients(two, "smart-home"), clients(two, "automotive")
                await home2.get("shared-name")  # replica 2 started knowing it as the home team's
                await home1.delete("shared-name")
                await auto1.apply(manifest("shared-name", "auto-model", replicas=1))
                for call in (
                    lambda: home2.get("shared-name"),
                    lambda: home2.apply(manifest("shared-name", "home-model", replicas=3)),
                    lambda: home2.delete("shared-name"),
                ):
                    err = await refused(call())
                    assert err.code() == DENIED and "security.authz.not_owner" in err.details()
                dep = await auto2.get("shared-name")
                assert (dep.spec.model.name, dep.spec.replicas) == ("auto-model", 1)
                assert await home2.list() == []
                # What one replica creates is its creator's on the other at once.
                await auto1.apply(manifest("auto-new", "auto-model"))
                await auto2.apply(manifest("auto-new", "auto-model", replicas=2))
                assert await auto2.list() == ["auto-new", "shared-name"]
                await auto2.push("auto-model", "2.0.0")
                assert (await refused(home1.push("auto-model", "3.0.0"))).code() == DENIED
                # Ownership recorded by an earlier release holds on both.
                assert (await refused(auto2.apply(manifest("old-dep", "auto-model")))).code() == DENIED
    finally:
        await clients.close()
    assert not (shared / "security" / "owners.sqlite").exists()
    assert (shared / "security" / "owners.sqlite.imported").exists()

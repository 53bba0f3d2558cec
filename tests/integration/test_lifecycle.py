"""Model lifecycle end to end: signed pushes, history and lineage, placements and compliance, remote
wipe with confirmations and quarantine. Real broker, real gRPC, real agents running real models."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from conftest import MODEL_F32, MODEL_INT8, PUBLISHER, eventually, manifest, trust_publisher
from test_cli import run_cli
from test_fleet import _infer

from attestation.artifacts import key_context
from attestation.errors import KeyReleaseError
from attestation.keyrelease import open_sealed
from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.catalog import PublisherKey, sign_metadata

pytestmark = [pytest.mark.broker]


async def _refused(push) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await push
    return info.value.code(), info.value.details()


async def _running(api, name: str = "vib") -> dict[str, int]:
    """node -> running replicas of deployment ``name``."""
    dep = await api.deployment(name)
    out: dict[str, int] = {}
    for r in dep.status.replica_list:
        if r.phase == node_pb2.REPLICA_PHASE_RUNNING:
            out[r.node_id] = out.get(r.node_id, 0) + 1
    return out


async def test_refused_pushes_say_why(fleet):
    orch, _, api = await fleet(nodes=1)
    data = MODEL_INT8.read_bytes()

    # Unsigned, while signatures are required (the default).
    code, detail = await _refused(api.push(key=None))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert detail.startswith("model.push.unsigned:")

    # Signed by a key the orchestrator does not trust.
    code, detail = await _refused(api.push(key=PublisherKey.generate()))
    assert (code, detail.split(":")[0]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "model.push.publisher_untrusted",
    )

    # Signed by the trusted key, then the metadata changed: the signature no longer verifies.
    meta = api_pb2.ModelMetadata(
        name="vib-cnn", version="1.0.0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    sign_metadata(meta, PUBLISHER)
    meta.description = "changed after signing"

    async def parts():
        yield api_pb2.PushModelRequest(metadata=meta)
        yield api_pb2.PushModelRequest(chunk=data)

    code, detail = await _refused(api.models.Push(parts()))
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "model.push.signature_invalid")

    # Validly signed metadata announcing a digest the artifact does not have.
    code, detail = await _refused(api.push(sha256="0" * 64))
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "model.push.sha256_mismatch")

    # A signed artifact that is not a .tflite model.
    code, detail = await _refused(api.push(data=b"TFL3 but not really a flatbuffer" * 8))
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "model.push.not_tflite")

    # A signed artifact crafted to crash the TFLite runtime (one byte of the real model changed; found
    # by the fuzz suite): refused, and this orchestrator, the test's own process, goes on.
    crasher = bytearray(data)
    crasher[8] = 0x08
    code, detail = await _refused(api.push(data=bytes(crasher)))
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "model.push.not_tflite")
    assert "the TFLite runtime crashed reading the model (signal SIGSEGV)" in detail

    # A lineage parent that does not exist.
    code, detail = await _refused(api.push(parent_version="0.9.0"))
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "model.push.parent_not_found")

    assert not await orch.db(orch.store.list_models), "no refused push left anything in the catalog"
    first = await api.push()
    assert first.signature.key_id == PUBLISHER.key_id
    assert first.state == api_pb2.MODEL_STATE_PUBLISHED

    # The same version again, even signed and identical.
    code, detail = await _refused(api.push())
    assert (code, detail.split(":")[0]) == (grpc.StatusCode.ALREADY_EXISTS, "model.push.version_exists")
    events = [e.kind for e in orch.events.recent()]
    assert events.count("model.published") == 1


async def test_history_lineage_and_lifecycle(fleet, tmp_path):
    orch, _, api = await fleet(nodes=1)
    await api.push(MODEL_F32, version="1.0.0")
    derived = await api.push(MODEL_INT8, version="1.1.0", parent_version="1.0.0")
    assert derived.parent_version == "1.0.0"
    assert "INT8" in derived.dtypes

    await api.models.Deprecate(
        api_pb2.SetModelStateRequest(name="vib-cnn", version="1.0.0", reason="int8 is out")
    )
    await api.models.Revoke(api_pb2.SetModelStateRequest(name="vib-cnn", version="1.0.0"))
    with pytest.raises(grpc.aio.AioRpcError) as info:  # revoked is final
        await api.models.Deprecate(api_pb2.SetModelStateRequest(name="vib-cnn", version="1.0.0"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("model.state.revoked:")

    history = await api.models.History(api_pb2.GetModelRequest(name="vib-cnn"))
    assert [(v.version, v.parent_version, v.state) for v in history.versions] == [
        ("1.0.0", "", api_pb2.MODEL_STATE_REVOKED),
        ("1.1.0", "1.0.0", api_pb2.MODEL_STATE_PUBLISHED),
    ]
    assert [(e.version, e.action) for e in history.entries] == [
        ("1.0.0", "published"),
        ("1.1.0", "published"),
        ("1.0.0", "deprecated"),
        ("1.0.0", "revoked"),
    ]
    assert history.entries[2].reason == "int8 is out"
    # A revoked version cannot be deployed any more; its artifact is no longer served.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.apply(manifest(version="1.0.0"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "deployment.model_revoked" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in api.models.Download(api_pb2.DownloadModelRequest(name="vib-cnn", version="1.0.0")):
            pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    code, out = await run_cli("models", "history", "vib-cnn", "--server", orch.address, "--json")
    assert code == 0
    assert [v["version"] for v in json.loads(out)["versions"]] == ["1.0.0", "1.1.0"]
    # keygen + a signed push through the CLI, trusted only once its key is configured
    code, out = await run_cli("models", "keygen", "--out", str(tmp_path / "keys"), "--name", "team")
    assert code == 0
    assert (tmp_path / "keys" / "team.key").stat().st_mode & 0o777 == 0o600
    code, _ = await run_cli(
        "models", "push", str(MODEL_INT8), "--name", "vib-cnn", "--version", "2.0.0",
        "--key", str(tmp_path / "keys" / "team.key"), "--server", orch.address,
    )  # fmt: skip
    assert code == 1  # an untrusted publisher


async def test_compliance_lists_nodes_running_a_deprecated_version(fleet):
    orch, agents, api = await fleet(nodes=2, max_replicas=1)
    await api.push()
    await api.apply(manifest(replicas=2))

    async def both() -> bool:
        return sorted((await _running(api)).items()) == [("n1", 1), ("n2", 1)]

    await eventually(both, what="one replica running on each node")
    report = await api.models.Compliance(api_pb2.ComplianceRequest())
    assert report.compliant and report.placements_checked == 2 and report.nodes_checked == 2

    placed = (await api.models.Placements(api_pb2.PlacementsRequest(name="vib-cnn"))).placements
    assert [(p.node_id, p.version, p.running, p.attestation_status) for p in placed] == [
        ("n1", "1.0.0", 1, "affirming"),
        ("n2", "1.0.0", 1, "affirming"),
    ]
    assert all(p.since_unix_ms > 0 and p.attestation_expires_unix_ms > p.since_unix_ms for p in placed)
    of_node = (await api.models.Placements(api_pb2.PlacementsRequest(node_id="n2"))).placements
    assert [(p.node_id, p.model) for p in of_node] == [("n2", "vib-cnn")]

    await api.models.Deprecate(api_pb2.SetModelStateRequest(name="vib-cnn", version="1.0.0", reason="cve-1"))
    code, out = await run_cli("compliance", "--json", "--server", orch.address)
    assert code == 1
    report = json.loads(out)
    assert not report.get("compliant", False)
    assert sorted((f["node_id"], f["issue"], f["detail"]) for f in report["findings"]) == [
        ("n1", "model.deprecated", "cve-1"),
        ("n2", "model.deprecated", "cve-1"),
    ]
    assert "model.deprecated" in [e.kind for e in orch.events.recent()]


def _cache_files(agent: NodeAgent) -> list:
    return sorted(p for p in agent.runtime.cache_dir.iterdir() if p.is_file())


async def test_wipe_every_holding_node_confirms_and_nothing_can_be_decrypted(fleet, monkeypatch):
    orch, agents, api = await fleet(nodes=2, max_replicas=1)
    model = await api.push()
    await api.apply(manifest(replicas=2))

    async def both() -> bool:
        return sorted(await _running(api)) == ["n1", "n2"]

    await eventually(both, what="one replica running on each node")
    sealed = await orch.db(orch.store.get_sealed, "vib-cnn", "1.0.0")
    data_key = sealed.data_key
    node_copies = {a.node_id: _cache_files(a) for a in agents}
    assert all(len(files) == 1 for files in node_copies.values()), node_copies
    stolen = node_copies["n1"][0].read_bytes()  # what an attacker copied off a node before the wipe
    # The store holds the key wrapped under its KEK (never raw); that value is what must go.
    wrapped = next(v for n, ver, v in orch.store.data_keys() if (n, ver) == ("vib-cnn", "1.0.0"))
    state_files = [p for p in orch.config.state_dir.rglob("*") if p.is_file()]
    assert any(wrapped in p.read_bytes() for p in state_files), "the key is in the store before the wipe"
    assert not any(data_key in p.read_bytes() for p in state_files), "a raw data key in the state dir"

    status = await api.models.Wipe(api_pb2.WipeRequest(name="vib-cnn", version="1.0.0", reason="leaked"))
    assert sorted(n.node_id for n in status.nodes) == ["n1", "n2"]
    assert status.replicas_evicted == 2

    async def confirmed() -> bool:
        s = await api.models.GetWipe(api_pb2.GetWipeRequest(id=status.id))
        return s.done and s.confirmed == 2

    await eventually(confirmed, timeout=15, what="both nodes confirmed the wipe")
    for agent in agents:
        assert not _cache_files(agent), f"{agent.node_id} still holds a cached artifact"
        assert not [s for s in agent.runtime.replicas.values() if s.spec.model_name == "vib-cnn"]
        assert not list((agent.config.state_dir / agent.node_id / "wipes").iterdir()), "journal left"
    kinds = [e.kind for e in orch.events.recent()]
    assert kinds.count("model.wipe.confirmed") == 2 and "model.wipe.completed" in kinds

    # The key is destroyed: not in the store's view, nor anywhere in the orchestrator's state dir.
    after = await orch.db(orch.store.get_sealed, "vib-cnn", "1.0.0")
    assert after.data_key == b"" and after.revoked_ms > 0
    for path in orch.config.state_dir.rglob("*"):
        if path.is_file():
            assert wrapped not in path.read_bytes(), f"the revoked key survives in {path}"
    # The sealed copies left on disk (the orchestrator's, and the one copied off a node) are ciphertext
    # that only the destroyed key opens; the key release refuses every node from now on.
    orch_copy = await orch.db(orch.store.read_artifact, after.sha256)
    assert open_sealed(data_key, stolen, _aad(model))  # only that key opens them
    for blob in (orch_copy, stolen):
        with pytest.raises(KeyReleaseError) as info:
            open_sealed(after.data_key or bytes(32), blob, _aad(model))
        assert info.value.reason == "attestation.key.decrypt_failed"
    with pytest.raises(KeyReleaseError) as info:
        orch.verifier.release_key("n1", "vib-cnn", "1.0.0", data_key)
    assert info.value.reason == "attestation.key.revoked"

    # The deployment stays, its replicas pending with the reason in plain words.
    async def explained() -> bool:
        dep = await api.deployment("vib")
        return any("attestation.key.revoked" in r.message for r in dep.status.replica_list)

    await eventually(explained, what="pending replicas explain the revoked key")
    report = await api.models.Compliance(api_pb2.ComplianceRequest())
    assert report.compliant, report

    # A deploy of the wiped version that was on its way (from a replica that led before it heard of
    # the wipe, with the key it had released) is refused by the node itself, before any download.
    agent = agents[0]
    late = orch.verifier.service.release_key(
        agent.node_id, data_key, key_context(agent.node_id, "vib-cnn", "1.0.0")
    )
    spec = node_pb2.DeployReplica(
        replica_id="late-1",
        deployment="vib",
        model_name="vib-cnn",
        model_version="1.0.0",
        sha256=model.sha256,
        size=model.size,
        artifact_endpoint=orch.advertise,
        wrapped_key=late,
    )
    fetched = agent.runtime.fetched
    failures: list[tuple[str, str]] = []  # the orchestrator unloads the orphan soon after it fails
    fail = agent.runtime._fail
    monkeypatch.setattr(
        agent.runtime,
        "_fail",
        lambda state, *why: failures.append((state.spec.replica_id, why[0])) or fail(state, *why),
    )
    assert agent.runtime.deploy(spec, agent._fetch)

    async def refused() -> bool:
        return ("late-1", "agent.model.wiped") in failures

    await eventually(refused, what="the late deploy refused by the node")
    assert agent.runtime.fetched == fetched and not _cache_files(agent)
    assert agent._read_wiped() == {(model.sha256, "vib-cnn", "1.0.0")}  # and so after a restart
    assert not spec.wrapped_key  # the failed replica (its spec is this one) keeps no key
    republished = node_pb2.DeployReplica(model_name="vib-cnn", model_version="1.0.1", sha256=model.sha256)
    agent.runtime._refuse_wiped(republished)  # the same bytes as another version (a new key) may load


def _aad(model: api_pb2.Model) -> bytes:
    from attestation.artifacts import model_aad

    return model_aad(model.name, model.version, model.sha256)


async def test_a_silent_node_is_quarantined_after_the_wipe_deadline(fleet, mqtt_url, topic_prefix, tmp_path):
    orch, agents, api = await fleet(nodes=1, max_replicas=1)
    silent = _second_node(orch, mqtt_url, topic_prefix, tmp_path / "silent")
    await silent.__aenter__()
    try:
        await _one_replica_on_each_node(orch, api)
    finally:
        await silent.__aexit__(None, None, None)  # the agent stops: it will never confirm

    # Every version, every holding node (none named): the CLI follows until no node is pending.
    code, out = await run_cli(
        "models", "wipe", "vib-cnn", "--deadline", "2", "--server", orch.address, "--json"
    )
    assert code == 1, "a quarantined node makes the wipe command fail"
    final = await api.models.GetWipe(api_pb2.GetWipeRequest(id=json.loads(out)["id"]))
    assert final.done and list(final.versions) == ["1.0.0"]
    states = {n.node_id: n.state for n in final.nodes}
    assert states == {"n1": api_pb2.WIPE_NODE_STATE_CONFIRMED, "n9": api_pb2.WIPE_NODE_STATE_QUARANTINED}
    assert final.deadline_unix_ms - final.created_unix_ms == 2000
    assert orch.verifier.quarantined["n9"].reason == "model.wipe.unconfirmed"
    code, out = await run_cli("get", "nodes", "--server", orch.address, "--json")
    reasons = {n["id"]: n.get("quarantine_reason", "") for n in json.loads(out)}
    assert reasons == {"n1": "", "n9": "model.wipe.unconfirmed"}
    timeout = [e for e in orch.events.recent() if e.kind == "model.wipe.timeout"]
    assert [e.subject for e in timeout] == ["node/n9"]


async def test_a_node_that_ignores_a_wipe_is_trusted_with_nothing_while_it_attests_affirming(
    fleet, mqtt_url, topic_prefix, tmp_path
):
    """A hostile agent answers its challenges (its attestation stays affirming) but ignores the wipe:
    quarantined at the deadline, it is trusted with no replica (the scheduler reads tier "none" and
    the reason) and gets no model key, whatever its attestation says."""
    orch, agents, api = await fleet(nodes=1, max_replicas=1)
    hostile = _second_node(orch, mqtt_url, topic_prefix, tmp_path / "hostile")

    async def ignore(wipe: node_pb2.Wipe) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    hostile._wipe = ignore  # type: ignore[method-assign]
    await hostile.__aenter__()
    try:
        await _one_replica_on_each_node(orch, api)
        await api.models.Wipe(api_pb2.WipeRequest(name="vib-cnn", version="1.0.0", deadline_s=1))

        async def quarantined() -> bool:
            await asyncio.sleep(0)
            return "n9" in orch.verifier.quarantined

        await eventually(quarantined, what="n9 quarantined at the wipe's deadline")
        assert orch.verifier.service.tier("n9") != "none", "its attestation is still affirming"
        assert orch.verifier.tier("n9") == "none"
        assert orch.verifier.why_not_trusted("n9")[0] == "model.wipe.unconfirmed"
        with pytest.raises(KeyReleaseError) as refused:
            orch.verifier.release_key("n9", "other-cnn", "1.0.0", b"k" * 32)
        assert refused.value.reason == "attestation.key.quarantined"
    finally:
        await hostile.__aexit__(None, None, None)


def _second_node(orch, mqtt_url, topic_prefix: str, state_dir) -> NodeAgent:
    """Node n9 beside the fleet's n1, enrolled with a token of the orchestrator's (not started)."""
    return NodeAgent(
        AgentConfig(
            node_id="n9",
            heartbeat_s=0.5,
            max_replicas=1,
            broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
            state_dir=state_dir,
            enrollment_token=TokenStore.in_state_dir(orch.config.state_dir).mint("n9").token,
        )
    )


async def _one_replica_on_each_node(orch, api) -> None:
    """n9 attested, vib-cnn pushed and a deployment of 2 replicas running, one on n1 and one on n9."""
    await eventually(lambda: _tier(orch, "n9"), what="n9 attested")
    await api.push()
    await api.apply(manifest(replicas=2))

    async def both() -> bool:
        return sorted(await _running(api)) == ["n1", "n9"]

    await eventually(both, what="one replica on each node")


async def _tier(orch, node_id: str) -> bool:
    await asyncio.sleep(0)
    return orch.verifier.tier(node_id) != "none"


async def test_a_wiped_model_served_again_raises_a_misuse_alert(fleet, tmp_path):
    """A compromised agent confirms the wipe but keeps the model and serves it: its own telemetry
    gives it away."""
    catalog = {**trust_publisher(tmp_path / "publishers"), "misuse": {"window_s": 0.5}}
    orch, agents, api = await fleet(nodes=1, catalog=catalog)
    model = await api.push()
    await api.apply(manifest(replicas=1))
    await eventually(lambda: _running_count(api, 1), what="replica running")
    liar = agents[0]
    await _infer(liar.inference_endpoint, model)

    async def lie(wipe: node_pb2.Wipe) -> tuple[int, int]:
        return 0, 0

    async def keep(replica_id: str) -> bool:
        return False

    liar._wipe_model = lie  # type: ignore[method-assign]
    liar.runtime.undeploy = keep  # type: ignore[method-assign]
    status = await api.models.Wipe(api_pb2.WipeRequest(name="vib-cnn", version="1.0.0"))

    async def confirmed() -> bool:
        return (await api.models.GetWipe(api_pb2.GetWipeRequest(id=status.id))).confirmed == 1

    await eventually(confirmed, what="the (false) confirmation")
    assert not [e for e in orch.events.recent() if e.kind.startswith("alert.misuse")]
    await asyncio.sleep(1.0)  # past the settling window: counts in flight at the wipe do not alert
    for _ in range(3):
        await _infer(liar.inference_endpoint, model)

    async def alerted() -> bool:
        return any(e.kind == "alert.misuse.wiped_model" for e in orch.events.recent())

    await eventually(alerted, timeout=10, what="misuse alert")
    alert = next(e for e in orch.events.recent() if e.kind == "alert.misuse.wiped_model")
    assert alert.subject == "node/n1"
    assert alert.attributes["model"] == "vib-cnn:1.0.0"
    assert int(alert.attributes["invocations"]) >= 1


async def _running_count(api, count: int) -> bool:
    return sum((await _running(api)).values()) == count


async def test_a_wipe_cut_short_by_a_crash_is_finished_before_the_agent_loads_anything(
    fleet, mqtt_url, topic_prefix, tmp_path
):
    """The journal of a wipe the agent had started (then crashed) is replayed at its next start."""
    await fleet(nodes=0)
    state = tmp_path / "crashed"
    wiped, kept = "ab" * 32, "cd" * 32
    models = state / "n5" / "models"
    models.mkdir(parents=True)
    for digest in (wiped, kept):
        (models / f"{digest}.sealed").write_bytes(b"sealed")
    (state / "n5" / "wipes").mkdir()
    (state / "n5" / "wipes" / "wipe-1").write_text(wiped)
    config = AgentConfig(
        node_id="n5", broker={"url": str(mqtt_url), "topic_prefix": topic_prefix}, state_dir=state
    )
    async with NodeAgent(config):
        assert sorted(p.name for p in models.iterdir()) == [f"{kept}.sealed"]
        assert not list((state / "n5" / "wipes").iterdir())

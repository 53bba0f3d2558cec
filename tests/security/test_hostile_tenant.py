"""A hostile team against the real orchestrator (mutual TLS, authorization, audit): the attacks of
issue #15 that used to work, each refused now with INVALID_ARGUMENT or PERMISSION_DENIED, audited,
while the orchestrator keeps answering."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security_support import Client, client_tls, manifest, secure_config

from edgeward.security.audit import read_audit
from edgeward.security.tls import grpc_aio_channel
from edgeward.v1 import api_pb2
from orchestrator.server import Orchestrator

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def audit(orch: Orchestrator) -> list[dict]:
    assert orch.guard is not None
    return read_audit(orch.guard.audit.path)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def binary(text: str) -> str:
    return "!!binary " + base64.b64encode(text.encode()).decode()


async def test_yaml_tags_cannot_smuggle_another_teams_names(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Issue #15, 1: a ``!!binary`` (or any tagged) name used to skip the ownership check and then
    became the other team's name in validation."""
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    await home.apply(manifest("home-dep", "home-model"))
    await auto.push("auto-model")

    attacks = {
        "binary deployment name": manifest(binary("home-dep"), "auto-model", replicas=2),
        "binary model name": manifest("auto-dep", binary("home-model")),
        "str tag on the name": manifest("!!str home-dep", "auto-model", replicas=2),
        "python tag": manifest("!!python/str home-dep", "auto-model", replicas=2),
        "local tag": manifest("!x home-dep", "auto-model", replicas=2),
        "anchor and alias": manifest("&n home-dep", "*n"),
    }
    for what, text in attacks.items():
        err = await refused(auto.apply(text))
        assert err.code() == INVALID, (what, err.details())
        assert "yaml.tag" in err.details() or "yaml.alias" in err.details(), (what, err.details())
    # Nothing changed: the deployment is still the home team's, with its model and replica count.
    dep = await home.get("home-dep")
    assert (dep.spec.model.name, dep.spec.replicas) == ("home-model", 0)
    assert await auto.list() == []

    # Plain names still go through authorization, and the audit names the real target.
    err = await refused(auto.apply(manifest("home-dep", "auto-model")))
    assert err.code() == DENIED
    lines = [x for x in audit(secure_orchestrator) if x["who"] == "team:automotive:ci"]
    assert [x["result"] for x in lines if x["method"].endswith("/Apply")] == ["INVALID_ARGUMENT"] * len(
        attacks
    ) + ["PERMISSION_DENIED"]
    assert lines[-1]["target"] == "deployment/home-dep"
    assert all(x["reason"] for x in lines if x["result"] != "OK")


async def test_oversized_and_deep_manifests_are_refused_before_parsing(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Issue #15, 2: the size cap comes before any parsing, nesting is bounded (no RecursionError
    turning into UNKNOWN), each refusal is INVALID_ARGUMENT and audited, and health keeps answering."""
    team = connect("team", "ci", team="smart-home")
    health = health_pb2_grpc.HealthStub(team.channel)
    head = "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: big}\nspec:\n  replicas: 1\n  model: "
    cases = {
        "oversized": head + "{name: m, version: 1.0.0}\n" + "#" * 80 + ("\nx: " + "[1, 2, 3]" * 40) * 3000,
        "oversized and deep": head + "[" * 70_000,
        "deep": head + "[" * 30_000 + "]" * 30_000,
        "deep mappings": head + "{a: " * 9_000 + "1" + "}" * 9_000,
        "UTF-16 text": (head + "{name: m, version: 1.0.0}\n").encode("utf-16").decode("latin-1"),
    }

    async def probe() -> int:
        answered = 0
        while True:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            answered += 1
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    try:
        for what, text in cases.items():
            err = await refused(team.apply(text))
            assert err.code() == INVALID, (what, err.code(), err.details())
            assert len(err.details()) < 500, what  # a reason, not a traceback
        assert not prober.done(), prober.exception()
    finally:
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
    details = [x["reason"] for x in audit(secure_orchestrator) if x["method"].endswith("/Apply")]
    assert len(details) == len(cases)
    assert "larger than 65536 bytes" in details[0] and "larger than" in details[1]
    assert "nesting deeper than" in details[2] and "nesting deeper than" in details[3]
    assert all(x["result"] == "INVALID_ARGUMENT" for x in audit(secure_orchestrator))


async def test_undecodable_protobufs_are_invalid_argument_and_audited(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Issue #15, 2: a request that is not the method's protobuf is INVALID_ARGUMENT (was UNKNOWN)."""
    team = connect("team", "ci", team="smart-home")
    garbage = b"\xff\xff\xff\xff\x0f\x0a\x80"
    for method in ("/edgeward.v1.DeploymentService/Apply", "/edgeward.v1.DeploymentService/List"):
        call = team.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        err = await refused(call(garbage, timeout=5))
        assert err.code() == INVALID, (method, err.code(), err.details())
        assert "request.undecodable" in err.details()
    # A string field that is not UTF-8 does not decode either.
    bad_utf8 = b"\x0a\x02\xc3\x28"  # ApplyRequest.manifest = b"\xc3\x28"
    call = team.channel.unary_unary(
        "/edgeward.v1.DeploymentService/Apply", request_serializer=None, response_deserializer=None
    )
    assert (await refused(call(bad_utf8, timeout=5))).code() == INVALID
    lines = audit(secure_orchestrator)
    assert [(x["method"].rsplit("/", 1)[-1], x["result"]) for x in lines] == [
        ("Apply", "INVALID_ARGUMENT"),
        ("List", "INVALID_ARGUMENT"),
        ("Apply", "INVALID_ARGUMENT"),
    ]
    assert all(x["who"] == "team:smart-home:ci" for x in lines)
    # The channel is fine afterwards.
    assert await team.list() == []


async def test_names_with_a_trailing_newline_are_refused(connect: Callable[..., Client]):
    """Issue #15, 7: ``^...$`` accepted ``"home-dep\\n"``, a second object that prints as the first."""
    team = connect("team", "ci", team="smart-home")
    operator = connect("operator", "alice")
    await team.push("home-model")
    for name, version in (("home-model\n", "2.0.0"), ("other", "1.0.0\n")):
        err = await refused(team.push(name, version))
        assert err.code() == INVALID, (name, version, err.details())
    for text in (
        manifest('"home-dep\\n"', "home-model"),
        manifest("home-dep", "home-model").replace("version: 1.0.0", 'version: "1.0.0\\n"'),
    ):
        err = await refused(team.apply(text))
        assert err.code() == INVALID, (text, err.details())
    wipe = operator.models.Wipe(api_pb2.WipeRequest(name="home-model\n", reason="test"), timeout=5)
    assert (await refused(wipe)).code() == INVALID
    assert [m.name for m in (await operator.models.List(api_pb2.ListModelsRequest(), timeout=5)).models] == [
        "home-model"
    ]


async def test_owner_team_comes_from_the_certificate(connect: Callable[..., Client]):
    """Issue #15, 7: a team's push is recorded under the team of its certificate, whatever its
    metadata says; no caller can name a team its certificate does not carry."""
    team = connect("team", "ci", team="smart-home")
    operator = connect("operator", "alice")
    pushed = await team.push("home-model")
    assert pushed.owner_team == "smart-home"
    got = await operator.models.Get(api_pb2.GetModelRequest(name="home-model"), timeout=5)
    assert got.owner_team == "smart-home"
    err = await refused(operator.push("ops-model", owner_team="smart-home"))
    assert err.code() == DENIED and "security.authz.owner_team" in err.details()
    assert (await operator.push("ops-model")).owner_team == ""


async def test_a_push_that_leads_with_anything_but_its_metadata_is_refused(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Ownership was checked on the first message's name: an empty first message (or a chunk) was
    checked on no name at all, and the metadata after it published a version into another team's
    model."""
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    for lead in (api_pb2.PushModelRequest(), api_pb2.PushModelRequest(chunk=b"x")):
        err = await refused(auto.push("home-model", version="1.0.1", lead=(lead,)))
        assert err.code() == INVALID and "model.push.no_metadata" in err.details(), err.details()
    assert (await refused(auto.push("home-model", version="1.0.1"))).code() == DENIED
    history = await home.models.History(api_pb2.GetModelRequest(name="home-model"), timeout=5)
    assert [v.version for v in history.versions] == ["1.0.0"]
    # The handler refuses a message with neither part wherever it comes (the operator has no owner check).
    operator = connect("operator", "alice")
    err = await refused(operator.push("ops-model", lead=(api_pb2.PushModelRequest(),)))
    assert err.code() == INVALID


async def test_numbers_beyond_what_the_store_and_the_wire_hold_are_refused_at_apply_and_push(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """A memory of 5,000 digits passed the manifest's pattern and broke every reconcile pass, the
    change feed and List for every tenant; a version of 4,401 digits broke its model's Get and
    History. Both are refused with the field and the reason; the others' calls go on."""
    auto = connect("team", "ci", team="automotive")
    await auto.push("auto-model")
    for memory in ("9" * 5000, "99999999999999999999999Gi", "1048577Gi"):
        text = manifest("bomb", "auto-model").rstrip("\n") + f"\n  requirements: {{memory: '{memory}'}}\n"
        err = await refused(auto.apply(text))
        assert err.code() == INVALID and "memory" in err.details(), err.details()
    ok = manifest("fine", "auto-model").rstrip("\n") + "\n  requirements: {memory: '1024Gi'}\n"
    assert (await auto.apply(ok)).deployment.spec.requirements.memory_bytes == 1024**4
    for version in ("1.0." + "9" * 4401, "1.0.1234567890", "1.0.0-" + "a" * 33, "1.0.\u0663"):
        err = await refused(auto.push("auto-model", version=version))
        assert err.code() == INVALID, (version[:20], err.code())
    assert await auto.list() == ["fine"]


async def test_a_model_state_reason_is_bounded(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Deprecate and Revoke stored their reason whole, and kept it in the event history: 4 MB reasons
    filled it and made the operator's model List too large to send."""
    auto = connect("team", "ci", team="automotive")
    await auto.push("auto-model")
    err = await refused(
        auto.models.Deprecate(
            api_pb2.SetModelStateRequest(name="auto-model", version="1.0.0", reason="x" * 501)
        )
    )
    assert err.code() == INVALID and "model.state.reason_too_long" in err.details()
    done = await auto.models.Deprecate(
        api_pb2.SetModelStateRequest(name="auto-model", version="1.0.0", reason="x" * 500), timeout=5
    )
    assert done.state_reason == "x" * 500


async def test_a_team_holds_at_most_its_quota_of_deployments_and_replicas(fleet_ca, tmp_path, topic_prefix):
    """Three 200-byte Applies made 30,000 replicas, and every reconcile pass of the fleet slower: a
    team's Applies stop at its quota (RESOURCE_EXHAUSTED, with the field and the setting), one that
    keeps or lowers what it holds still passes, and operators are not limited."""
    config = secure_config(
        fleet_ca, tmp_path / "orch", topic_prefix, team_quota={"deployments": 2, "replicas": 5}
    )
    async with Orchestrator(config) as orch:
        channels = []

        def connect(role: str, name: str, team: str | None = None) -> Client:
            channels.append(grpc_aio_channel(orch.address, client_tls(fleet_ca, role, name, team)))
            return Client(channels[-1])

        try:
            auto, home = connect("team", "ci", "automotive"), connect("team", "ci", "smart-home")
            operator = connect("operator", "alice")
            await auto.push("auto-model")
            await home.push("home-model")
            await auto.apply(manifest("a", "auto-model", replicas=2))
            await auto.apply(manifest("b", "auto-model", replicas=3))
            err = await refused(auto.apply(manifest("c", "auto-model")))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota.deployments" in err.details()
            err = await refused(auto.apply(manifest("b", "auto-model", replicas=4)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota.replicas" in err.details()
            assert "spec.replicas" in err.details() and "team_quota.replicas" in err.details()
            await auto.apply(manifest("b", "auto-model", replicas=1))  # lower: passes
            await auto.apply(manifest("b", "auto-model", replicas=3))  # back to 5 in all: within
            await home.apply(manifest("h", "home-model", replicas=5))  # another team's own quota
            await operator.apply(manifest("ops", "auto-model", replicas=50))
            # Applies at once through one replica take turns: exactly one new deployment fits.
            await home.delete("h")
            burst = await asyncio.gather(
                *(home.apply(manifest(f"burst-{i}", "home-model", replicas=5)) for i in range(10)),
                return_exceptions=True,
            )
            assert sum(not isinstance(b, BaseException) for b in burst) == 1
            assert all(
                b.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for b in burst if isinstance(b, BaseException)
            )
            listed = await operator.deployments.List(api_pb2.ListDeploymentsRequest())
            names = sorted(d.name for d in listed.deployments)
            assert names[:2] == ["a", "b"] and names[2].startswith("burst-") and names[3:] == ["ops"]
        finally:
            for channel in channels:
                await channel.close()


async def test_a_push_is_authorized_before_its_first_message_and_waits_for_it_a_bounded_time(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator, monkeypatch
):
    """A push stream used to be identified only once its first message came: a certificate that may
    not push (or a revoked one) held streams open for as long as it liked."""
    from edgeward.security import authz

    monkeypatch.setattr(authz, "FIRST_MESSAGE_S", 0.5)
    never: asyncio.Event = asyncio.Event()

    async def silent():
        await never.wait()
        yield api_pb2.PushModelRequest()  # never reached

    node = connect("node", "node-1")
    err = await refused(node.models.Push(silent(), timeout=5))
    assert err.code() == DENIED  # before any message: the role may not push
    team = connect("team", "ci", team="automotive")
    err = await refused(team.models.Push(silent(), timeout=5))
    assert err.code() == INVALID and "request.first_message_late" in err.details()
    lines = [x for x in audit(secure_orchestrator) if x["method"].endswith("/Push")]
    assert [x["result"] for x in lines] == ["PERMISSION_DENIED", "INVALID_ARGUMENT"]
    never.set()  # the clients' request iterators end
    await asyncio.sleep(0.1)


async def test_a_team_cannot_take_an_operators_pipeline_by_pushing_a_model_of_its_name(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """A pipeline's name is a model name; an operator's Apply records no owner for it, so a team's push
    of a model of that name used to claim it: the nodes were told the pipeline was the team's, and
    the team could then Apply its own stages into it."""

    def stage(name: str, model: str, pipeline: str, k: int) -> str:
        return manifest(name, model) + f"  multiExit: {{pipeline: {pipeline}, stage: {k}, threshold: 0.9}}\n"

    operator = connect("operator", "alice")
    auto = connect("team", "ci", team="automotive")
    await operator.push("ops-s1")
    await operator.apply(stage("ops-st1", "ops-s1", "ops-pipe", 1))
    err = await refused(auto.push("ops-pipe"))
    assert err.code() == DENIED and "security.authz.not_owner" in err.details(), err.details()
    await auto.push("auto-model")
    err = await refused(auto.apply(stage("auto-x", "auto-model", "ops-pipe", 2)))
    assert err.code() == DENIED and "pipeline_not_owned" in err.details(), err.details()


async def test_a_team_adds_stages_to_its_pipeline_whose_name_has_no_owner_row(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """A pipeline made before pipeline names were recorded has no owner row: the team whose stages
    are all of it still adds one (the check for a name that deployments serve is for pushes)."""
    auto = connect("team", "ci", team="automotive")
    for model in ("auto-s1", "auto-s2"):
        await auto.push(model)
    first = manifest("st1", "auto-s1") + "  multiExit: {pipeline: auto-pipe, stage: 1, threshold: 0.9}\n"
    await auto.apply(first)
    secure_orchestrator.store.forget_owner("model", "auto-pipe")  # as a release before recorded it
    second = manifest("st2", "auto-s2") + "  multiExit: {pipeline: auto-pipe, stage: 2}\n"
    assert (await auto.apply(second)).created

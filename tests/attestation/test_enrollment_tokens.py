"""Enrollment approval: one-time tokens (single use, bound to a node id, expiring, hash-only at rest,
crash-consistent) and the enrollment policy (token | ek | token-or-ek) in the verifier."""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Clock, reference_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from attestation import attesters
from attestation.enrollment import EnrollmentApproval, EnrollmentPolicy
from attestation.errors import EnrollmentError
from attestation.responder import AttestationResponder
from attestation.service import AttestationVerifierService, VerifierConfig
from attestation.tokens import KEEP_S, TOKEN_RE, TokenStore, digest_of
from edgeward.v1 import attestation_pb2 as pb
from node_agent.config import AgentConfig
from orchestrator.config import OrchestratorConfig

TOKEN_REASONS = {f"enrollment.token.{r}" for r in ("missing", "unknown", "expired", "used", "wrong_node")}


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(EnrollmentError) as excinfo:
        call()
    return excinfo.value.reason


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> TokenStore:
    return TokenStore.in_state_dir(tmp_path / "orch", clock)


# ------------------------------------------------------------------------------ the token store


def test_a_token_is_good_for_one_enrollment_of_its_node(store: TokenStore):
    issued = store.mint("node-a", ttl_s=60)
    assert TOKEN_RE.fullmatch(issued.token)
    assert issued.token not in repr(issued)
    claim = store.check("node-a", issued.token)
    claim.redeem()
    assert refusal(lambda: store.check("node-a", issued.token)) == "enrollment.token.used"
    assert refusal(claim.redeem) == "enrollment.token.used"
    [record] = store.list()
    assert record.node_id == "node-a" and record.used_unix_ms is not None


def test_a_batch_mints_one_token_per_node_and_refuses_a_bad_id_whole(store: TokenStore):
    issued = store.mint_many([f"node-{i}" for i in range(50)], ttl_s=60)
    assert [t.node_id for t in issued] == [f"node-{i}" for i in range(50)]
    assert len({t.token for t in issued}) == 50
    assert not list((store.directory / "pending").glob(".*.tmp"))
    store.check("node-7", issued[7].token).redeem()
    assert refusal(lambda: store.check("node-8", issued[7].token)) == "enrollment.token.used"
    assert refusal(lambda: store.mint_many(["node-x", "bad id"])) == "enrollment.token.bad_request"
    assert len(store.list()) == 50


def test_tokens_are_distinct_and_bound_to_their_node(store: TokenStore):
    a, b = store.mint("node-a"), store.mint("node-b")
    assert a.token != b.token and a.digest != b.digest
    assert refusal(lambda: store.check("node-b", a.token)) == "enrollment.token.wrong_node"
    # A wrong node's attempt does not spend the token.
    store.check("node-a", a.token).redeem()
    store.check("node-b", b.token).redeem()


def test_a_token_expires(store: TokenStore, clock: Clock):
    issued = store.mint("node-a", ttl_s=60)
    clock.advance(59)
    claim = store.check("node-a", issued.token)
    clock.advance(2)
    assert refusal(lambda: store.check("node-a", issued.token)) == "enrollment.token.expired"
    # Checked in time, redeemed too late (the proof took longer than the token lived): refused.
    assert refusal(claim.redeem) == "enrollment.token.expired"


def test_missing_and_foreign_tokens_are_refused(store: TokenStore):
    issued = store.mint("node-a")
    assert refusal(lambda: store.check("node-a", "")) == "enrollment.token.missing"
    forged = issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")
    assert refusal(lambda: store.check("node-a", forged)) == "enrollment.token.unknown"
    other = TokenStore(store.directory.parent / "elsewhere").mint("node-a")
    assert refusal(lambda: store.check("node-a", other.token)) == "enrollment.token.unknown"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(max_size=300) | st.from_regex(TOKEN_RE, fullmatch=True))
def test_any_presented_string_is_refused_with_a_reason_never_a_crash(store: TokenStore, token: str):
    if not store.list():
        store.mint("node-a")
    assert refusal(lambda: store.check("node-a", token)) in TOKEN_REASONS


def test_only_the_hash_is_at_rest_with_private_modes(store: TokenStore):
    tokens = [store.mint(f"node-{i}") for i in range(3)]
    store.check("node-0", tokens[0].token).redeem()
    files = [p for p in store.directory.rglob("*") if p.is_file()]
    assert {p.stem for p in files} == {digest_of(t.token) for t in tokens}
    for path in files:
        body = path.read_bytes()
        for t in tokens:
            secret = t.token.removeprefix("ewt1_")
            assert t.token.encode() not in body and secret.encode() not in body
            assert secret not in path.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (store.directory / "pending", store.directory / "used"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_state_survives_a_restart(tmp_path: Path, clock: Clock):
    first = TokenStore.in_state_dir(tmp_path / "orch", clock)
    used, pending, expiring = first.mint("node-a"), first.mint("node-b"), first.mint("node-c", ttl_s=10)
    first.check("node-a", used.token).redeem()
    again = TokenStore.in_state_dir(tmp_path / "orch", clock)  # a new process
    assert refusal(lambda: again.check("node-a", used.token)) == "enrollment.token.used"
    again.check("node-b", pending.token).redeem()
    clock.advance(11)
    assert refusal(lambda: again.check("node-c", expiring.token)) == "enrollment.token.expired"


def test_torn_and_corrupt_files_are_ignored(store: TokenStore, caplog: pytest.LogCaptureFixture):
    good = store.mint("node-a")
    pending = store.directory / "pending"
    # A mint cut short before its rename leaves only a temporary file: no token.
    (pending / f".{'0' * 64}.json.tmp").write_bytes(b'{"node_id": "node-x", "created_unix_ms"')
    # A record someone damaged: refused as unknown, with a warning naming the file, not the token.
    bad = store.mint("node-b")
    (pending / f"{bad.digest}.json").write_bytes(b"\x00garbage")
    assert [r.node_id for r in store.list()] == ["node-a"]
    assert refusal(lambda: store.check("node-b", bad.token)) == "enrollment.token.unknown"
    assert bad.digest in caplog.text and bad.token not in caplog.text
    store.check("node-a", good.token).redeem()


def test_concurrent_redeemers_spend_a_token_once(store: TokenStore):
    issued = store.mint("node-a")
    claims = [store.check("node-a", issued.token) for _ in range(8)]
    outcomes: list[str] = []
    start = threading.Barrier(len(claims))

    def redeem(claim) -> None:
        start.wait()
        try:
            claim.redeem()
            outcomes.append("ok")
        except EnrollmentError as err:
            outcomes.append(err.reason)

    threads = [threading.Thread(target=redeem, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["enrollment.token.used"] * 7 + ["ok"]


def test_prune_forgets_old_records_and_revoke_deletes_pending(store: TokenStore, clock: Clock):
    old = store.mint("node-a", ttl_s=60)
    store.check("node-a", old.token).redeem()
    keep = store.mint("node-b", ttl_s=KEEP_S * 3)
    doomed = store.mint("node-c")
    assert store.revoke("node-c") == 1
    assert refusal(lambda: store.check("node-c", doomed.token)) == "enrollment.token.unknown"
    clock.advance(KEEP_S + 120)
    assert store.prune() == 1
    assert [r.node_id for r in store.list()] == ["node-b"]
    store.check("node-b", keep.token)


@pytest.mark.parametrize(("node_id", "ttl"), [("Node A", 60), ("node-a", 0), ("node-a", 365 * 86400)])
def test_mint_refuses_bad_requests(store: TokenStore, node_id: str, ttl: float):
    assert refusal(lambda: store.mint(node_id, ttl)) == "enrollment.token.bad_request"
    assert not store.list()


# ------------------------------------------------------------------------------ the verifier's policy


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., AttestationResponder]]:
    """Software-attester responders presenting ``token`` (closed at teardown)."""
    opened: list[AttestationResponder] = []

    def make(node_id: str = "node-a", token: str = "", keys: str | None = None) -> AttestationResponder:
        config = attesters.SoftwareAttesterConfig(
            key_dir=tmp_path / (keys or f"keys-{node_id}-{len(opened)}")
        )
        responder = AttestationResponder(node_id, attesters.create(config), enrollment_token=token)
        responder.open()
        opened.append(responder)
        return responder

    yield make
    for responder in opened:
        responder.close()


def gated(store: TokenStore, clock: Clock, policy: EnrollmentPolicy, **kw) -> AttestationVerifierService:
    return AttestationVerifierService(
        VerifierConfig(), reference_values(), clock=clock, approval=EnrollmentApproval(policy, store), **kw
    )


def enroll(verifier: AttestationVerifierService, responder: AttestationResponder) -> str | None:
    """The reason the enrollment was refused, or None when the node enrolled."""
    outcome = verifier.receive(responder.node_id, responder.enrollment_request())
    if outcome.rejected is not None:
        return outcome.rejected.reason
    outcome = verifier.receive(responder.node_id, responder.handle(outcome.reply))
    if outcome.rejected is not None:
        return outcome.rejected.reason
    assert outcome.enrolled is not None
    return None


@pytest.mark.parametrize("policy", [EnrollmentPolicy.TOKEN, EnrollmentPolicy.TOKEN_OR_EK])
def test_a_software_node_needs_a_token_and_the_token_is_spent(store, clock, node, policy):
    verifier = gated(store, clock, policy)
    assert enroll(verifier, node("node-a")) == "enrollment.token.missing"
    assert verifier.state("node-a") is None
    assert verifier.rejections.counts["enrollment.token.missing"] == 1
    token = store.mint("node-a").token
    assert enroll(verifier, node("node-b", token)) == "enrollment.token.wrong_node"
    assert enroll(verifier, node("node-a", token)) is None
    assert verifier.state("node-a") is not None
    assert enroll(verifier, node("node-c", token)) == "enrollment.token.used"
    verifier.forget("node-a")
    assert enroll(verifier, node("node-a", token)) == "enrollment.token.used"


def test_re_enrolling_the_known_key_needs_no_token(store, clock, node):
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    token = store.mint("node-a").token
    assert enroll(verifier, node("node-a", token, keys="a")) is None
    [record] = verifier.enrollments()
    # The agent restarts with the same key; its token is spent, or removed from its config.
    assert enroll(verifier, node("node-a", token, keys="a")) is None
    assert enroll(verifier, node("node-a", "", keys="a")) is None
    assert verifier.enrollments() == [record]
    # Another key for the same id is still a conflict, token or not.
    fresh = store.mint("node-a").token
    assert enroll(verifier, node("node-a", fresh, keys="b")) == "attestation.enroll.conflict"


def test_a_failed_proof_does_not_spend_the_token(store, clock, node):
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    token = store.mint("node-a").token
    responder = node("node-a", token)
    reply = verifier.receive("node-a", responder.enrollment_request()).reply
    forged = pb.AttesterMessage(
        schema=1, enroll_answer=pb.EnrollmentAnswer(node_id="node-a", proof=b"\x00" * 64)
    )
    assert (
        verifier.receive("node-a", forged.SerializeToString()).rejected.reason
        == "attestation.enroll.bad_proof"
    )
    assert reply is not None
    assert enroll(verifier, responder) is None


def test_policy_ek_refuses_software_nodes_even_with_a_token(store, clock, node):
    verifier = gated(store, clock, EnrollmentPolicy.EK)
    token = store.mint("node-a").token
    assert enroll(verifier, node("node-a", token)) == "enrollment.ek.required"
    store.check("node-a", token)  # not spent


def test_tokens_never_reach_the_logs(store, clock, node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    token = store.mint("node-a").token
    assert enroll(verifier, node("node-b", token)) == "enrollment.token.wrong_node"
    assert enroll(verifier, node("node-a", token)) is None
    assert enroll(verifier, node("node-c", token)) == "enrollment.token.used"
    assert "refused" in caplog.text
    assert token not in caplog.text and token.removeprefix("ewt1_") not in caplog.text


@pytest.mark.tpm
def test_a_trusted_ek_certificate_approves_a_tpm_node_unless_the_policy_is_token(
    store, clock, tpm_node, manufactured
):
    from attestation.enrollment import load_ca_bundle

    trust = load_ca_bundle(manufactured.ca_bundle)
    either = gated(store, clock, EnrollmentPolicy.TOKEN_OR_EK, ek_trust=trust)
    assert enroll(either, tpm_node("node-a", chip=0)) is None
    assert either.enrollments()[0].ek_certified
    strict = gated(store, clock, EnrollmentPolicy.TOKEN, ek_trust=trust)
    assert enroll(strict, tpm_node("node-b", chip=1)) == "enrollment.token.missing"
    ek_only = gated(store, clock, EnrollmentPolicy.EK, ek_trust=trust)
    assert enroll(ek_only, tpm_node("node-c", chip=1)) is None


# ------------------------------------------------------------------------------ configuration


def test_the_orchestrator_demands_approval_by_default():
    assert OrchestratorConfig().attestation.enrollment == EnrollmentPolicy.TOKEN_OR_EK
    with pytest.raises(ValidationError) as excinfo:
        OrchestratorConfig(attestation={"enrollment": "anyone"})
    assert excinfo.value.errors()[0]["loc"] == ("attestation", "enrollment")


def test_the_agent_keeps_its_token_out_of_dumps_and_measurements():
    token = "ewt1_" + "x" * 43
    config = AgentConfig(node_id="node-a", enrollment_token=token)
    assert config.enrollment_token is not None and config.enrollment_token.get_secret_value() == token
    assert token not in config.model_dump_json() and token not in repr(config)


def test_concurrent_redemptions_share_their_directory_syncs(store: TokenStore, monkeypatch):
    import attestation.tokens as tokens

    issued = store.mint_many([f"node-{i}" for i in range(16)])
    claims = [store.check(t.node_id, t.token) for t in issued]
    synced: list[Path] = []
    real = tokens._fsync_dir
    inside = threading.Event()
    release = threading.Event()

    def slow_sync(path: Path) -> None:
        synced.append(path)
        inside.set()
        release.wait(30)  # the first sync holds: every later redeemer queues behind it
        real(path)

    monkeypatch.setattr(tokens, "_fsync_dir", slow_sync)
    first = threading.Thread(target=claims[0].redeem)
    first.start()
    assert inside.wait(30)
    rest = [threading.Thread(target=c.redeem) for c in claims[1:]]
    for t in rest:
        t.start()
    deadline = time.monotonic() + 30
    while store._synced._asked < len(claims) and time.monotonic() < deadline:  # all waiting on the sync
        time.sleep(0.01)
    release.set()
    for t in (first, *rest):
        t.join(30)
    assert all(r.used_unix_ms is not None for r in store.list())
    # One sync of both directories for the first, and one shared by the 15 that asked during it.
    assert len(synced) == 4


def test_the_same_request_twice_gets_the_same_challenge(store, clock, node):
    """A request redelivered, or sent for two asks, while its enrollment is pending: one enrollment,
    either answer completes it. A new challenge for the second (the verifier did so before) refused
    the first answer as a bad proof and the second as unexpected: 2 % of a 10,000-node onboarding."""
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    responder = node("node-a", store.mint("node-a").token)
    request = responder.enrollment_request()
    first = verifier.receive("node-a", request).reply
    assert first is not None
    assert verifier.receive("node-a", request).reply == first
    outcome = verifier.receive("node-a", responder.handle(first))
    assert outcome.rejected is None and outcome.enrolled is not None
    assert not verifier.rejections.counts


def test_a_repeated_request_after_its_challenge_expired_is_challenged_anew(store, clock, node):
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    responder = node("node-a", store.mint("node-a").token)
    request = responder.enrollment_request()
    first = verifier.receive("node-a", request).reply
    clock.now += VerifierConfig().enrollment_ttl_s + 1
    second = verifier.receive("node-a", request).reply
    assert second is not None and second != first
    assert verifier.receive("node-a", responder.handle(second)).enrolled is not None


def test_another_request_while_one_is_pending_replaces_it(store, clock, node):
    verifier = gated(store, clock, EnrollmentPolicy.TOKEN)
    token = store.mint("node-a").token
    old, new = node("node-a", token, keys="old"), node("node-a", token, keys="new")
    stale = verifier.receive("node-a", old.enrollment_request()).reply
    fresh = verifier.receive("node-a", new.enrollment_request()).reply
    assert stale != fresh
    assert verifier.receive("node-a", old.handle(stale)).rejected.reason == "attestation.enroll.bad_proof"
    assert enroll(verifier, new) is None

"""A replica that does not lead answers attestation reads with the leader's results
(orchestrator/trust_mirror.py): a real verifier attests an in-test node (a real software attester),
the leader's mirror writes what changed to PostgreSQL, a follower's mirror (its own verifier knows
no node) reads it back. Two stores on one database, as two replicas have."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_attestation_property import Clock, Courier, Node, inline_verifier

from edgeward.v1 import attestation_pb2 as apb
from orchestrator.config import AttestationConfig
from orchestrator.fleet import Fleet
from orchestrator.store import AttestationRow, SqlStore
from orchestrator.trust_mirror import TrustMirror, effective


async def inline(fn, *args):
    return fn(*args)


def test_a_follower_answers_with_the_leaders_results_and_quarantines(
    tmp_path: Path, postgres_url: str
) -> None:
    loop = asyncio.new_event_loop()
    clock = Clock()
    a, b = SqlStore(tmp_path / "a", postgres_url), SqlStore(tmp_path / "b", postgres_url)
    node = Node("n1", tmp_path / "n1")
    courier = Courier(node)
    deliver = courier.deliver
    att = AttestationConfig()
    fleet = Fleet()
    leader = courier.verifier = inline_verifier(att, clock, fleet, a, courier.publish)
    other = inline_verifier(att, clock, Fleet(), b, courier.publish)  # the follower's own: attests no node
    leads = [True]
    on_leader = TrustMirror(leader, a, inline, leading=lambda: leads[0], shared=True)
    follower_clock = lambda: int(clock() * 1000)  # noqa: E731
    on_follower = TrustMirror(other, b, inline, leading=lambda: False, shared=True, clock=follower_clock)
    seen: list[apb.NodeAttestation] = []
    unsubscribe = on_follower.subscribe(seen.append)
    try:
        fleet.apply(node.hello())
        fleet.apply(node.status())
        leader.hello(node.id)
        loop.run_until_complete(leader.node_connected(node.id))
        loop.run_until_complete(deliver())
        loop.run_until_complete(leader.attest(node.id))
        loop.run_until_complete(deliver())
        assert leader.tier("n1") == "software"
        assert on_follower.snapshot("n1") is None  # nothing written yet
        assert on_follower.tier("n1") == "none"

        loop.run_until_complete(on_leader.publish_once())
        assert loop.run_until_complete(on_follower.follow_once()) == 1
        assert on_follower.snapshot("n1") == leader.service.snapshot("n1")  # the signed result too
        assert on_follower.snapshots() == leader.service.snapshots()
        assert on_follower.tier("n1") == "software"
        assert on_follower.quarantine_reason("n1") == ""
        assert [v.state for v in seen] == [apb.ATTESTATION_STATE_AFFIRMING]  # its Watch streams
        assert loop.run_until_complete(on_follower.follow_once()) == 0  # read once

        # The result runs out: every replica reads it as expired at once, before any write...
        clock.now += att.verifier.result_ttl_s + 1
        assert on_follower.tier("n1") == "none"
        got = on_follower.snapshot("n1")
        assert got is not None
        assert got.state == apb.ATTESTATION_STATE_EXPIRED
        # ...and the leader's quarantine reaches the follower with its next write.
        loop.run_until_complete(leader.tick())
        assert "n1" in leader.quarantined
        loop.run_until_complete(on_leader.publish_once())
        loop.run_until_complete(on_follower.follow_once())
        assert on_follower.quarantine_reason("n1") == leader.quarantined["n1"].reason == "attestation.expired"
        assert on_follower.snapshot("n1") == leader.service.snapshot("n1")

        # The leader steps down: it has read its own rows all along, and its Watch streams are
        # told every node as the rows have it (the next leader's source), once.
        told: list[apb.NodeAttestation] = []
        on_leader.subscribe(told.append)
        loop.run_until_complete(on_leader.load())
        on_leader.switched()
        assert told == []  # still leading: nothing switched
        leads[0] = False
        on_leader.switched()
        assert told == [on_follower.snapshot("n1")]
        on_leader.switched()
        assert len(told) == 1
    finally:
        unsubscribe()
        node.responder.close()
        a.close()
        b.close()
        loop.close()


def test_one_orchestrator_answers_from_its_verifier_and_writes_nothing(tmp_path: Path) -> None:
    """On SQLite (one orchestrator, ``shared=False``) the mirror is the verifier, whatever
    ``leading`` says: its answers are the verifier's, nothing is written, rows in the store are not
    what it answers from."""
    loop = asyncio.new_event_loop()
    store = SqlStore(tmp_path / "orch")
    node = Node("n1", tmp_path / "n1")
    courier = Courier(node)
    fleet = Fleet()
    verifier = courier.verifier = inline_verifier(AttestationConfig(), Clock(), fleet, store, courier.publish)
    mirror = TrustMirror(verifier, store, inline, leading=lambda: False, shared=False)
    try:
        store.put_attestations(
            [AttestationRow("other", apb.NodeAttestation(node_id="other").SerializeToString())]
        )
        loop.run_until_complete(mirror.load())
        assert mirror.snapshot("other") is None  # not the rows
        fleet.apply(node.hello())
        fleet.apply(node.status())
        verifier.hello(node.id)
        loop.run_until_complete(verifier.node_connected(node.id))
        loop.run_until_complete(courier.deliver())
        loop.run_until_complete(verifier.attest(node.id))
        loop.run_until_complete(courier.deliver())
        assert mirror.tier("n1") == verifier.tier("n1") == "software"
        assert mirror.snapshot("n1") == verifier.service.snapshot("n1")
        loop.run_until_complete(mirror.publish_once())
        assert [row.node_id for _, row in store.attestations_since((0, ""))] == ["other"]  # nothing new
    finally:
        node.responder.close()
        store.close()
        loop.close()


@pytest.mark.parametrize(
    ("state", "expired"),
    [
        (apb.ATTESTATION_STATE_AFFIRMING, True),
        (apb.ATTESTATION_STATE_WARNING, True),
        (apb.ATTESTATION_STATE_CONTRAINDICATED, True),
        (apb.ATTESTATION_STATE_ENROLLED, False),
        (apb.ATTESTATION_STATE_REVOKED, False),
    ],
)
def test_a_stored_result_reads_as_expired_past_its_expiry(state, expired) -> None:
    view = apb.NodeAttestation(node_id="n1", state=state)
    view.result.expires_unix_ms = 1000
    assert effective(view, 999).state == state
    assert effective(view, 1000).state == (apb.ATTESTATION_STATE_EXPIRED if expired else state)
    assert view.state == state  # the stored view is left as it was

"""Three orchestrator replicas on one PostgreSQL, a three-server NATS cluster (MQTT gateway), two
real node agents: kill -9 of the leader in the middle of an apply burst (while the nodes still
download what it dispatched), then of the next leader in
the middle of a canary rollout (paused and resumed through a follower first). Another replica takes
over each time (the takeover time is measured), no deployment is lost, no replica placed twice, the
rollout resumes at its step, and a Watch held on the replica that survives both sees every change
exactly once, in order."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import yaml
from conftest import MODEL_INT8, PUBLISHER, manifest, trust_publisher
from processes import Proc, listen_port
from test_rollout import GOOD_SLO_MS, rebuilt, strategy
from test_rollout_restart import all_running, attested, live, status, traffic, wait_for

from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, api_pb2_grpc, attestation_pb2, attestation_pb2_grpc, node_pb2
from orchestrator.client import EdgewardClient
from orchestrator.store import SqlStore

pytestmark = [pytest.mark.slow, pytest.mark.broker]

TTL_S = 3.0
RUNNING = node_pb2.REPLICA_PHASE_RUNNING
BURST = [f"burst-{i}" for i in range(5)]
DOWNLOAD_DELAY_MS = 5000


class Replica:
    def __init__(self, index: int, tmp_path, postgres_url: str, broker_url: str, publishers: dict) -> None:
        self.index = index
        self.grpc_port, self.metrics_port = listen_port(), listen_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.config = tmp_path / f"orchestrator-{index}.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(tmp_path / "state"),  # shared: KEKs, verifier key, tokens
                    "grpc_bind": self.address,
                    "metrics_bind": f"127.0.0.1:{self.metrics_port}",
                    "broker": {"url": broker_url, "event_topic_levels": True},  # NATS: no dots
                    "state": {"url": postgres_url, "lease_ttl_s": TTL_S},
                    "node_timeout_s": 4.0,
                    "reconcile_interval_s": 0.2,
                    "resend_interval_s": 1.0,
                    "catalog": {"trusted_publishers": [str(p) for p in publishers["trusted_publishers"]]},
                }
            )
        )
        self.proc = Proc(f"orchestrator-{index}", ["orchestrator", "-c", str(self.config)], tmp_path)

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def leading(self) -> bool:
        return "\nedgeward_leader 1" in (self.metrics() or "")


class Watcher:
    """A Watch stream of every deployment, read on a thread."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.events: list[api_pb2.DeploymentEvent] = []
        self.error: grpc.RpcError | None = None
        self._channel = grpc.insecure_channel(replica.address)
        self._call = api_pb2_grpc.DeploymentServiceStub(self._channel).Watch(
            api_pb2.WatchDeploymentsRequest()
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
        except grpc.RpcError as err:
            self.error = err

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


def leader_of(replicas: list[Replica]) -> Replica:
    return wait_for(
        lambda: next((r for r in replicas if r.proc.alive and r.leading()), None), what="a leader"
    )


def kill_leader(replicas: list[Replica]) -> tuple[Replica, Replica, float]:
    """kill -9 the leader; the replica that took over and how long that took."""
    old = leader_of(replicas)
    old.proc.kill9()
    killed = time.monotonic()
    new = wait_for(
        lambda: next((r for r in replicas if r.proc.alive and r.leading()), None),
        timeout=10 * TTL_S,
        what="another replica taking over",
    )
    return old, new, time.monotonic() - killed


def placed_once(client: EdgewardClient, names: list[str]) -> bool:
    """Every deployment has exactly its replicas, each Running on one node."""
    for name in names:
        dep = client.get_deployment(name)
        reps = [r for r in dep.status.replica_list if r.phase != node_pb2.REPLICA_PHASE_EVICTED]
        if len(reps) != dep.spec.replicas or not all(r.phase == RUNNING for r in reps):
            return False
    return True


def loading(client: EdgewardClient, name: str) -> int:
    return sum(
        r.phase == node_pb2.REPLICA_PHASE_LOADING for r in client.get_deployment(name).status.replica_list
    )


def placement_report(client: EdgewardClient, names: list[str], leader: Replica) -> str:
    """What a failed wait for placements saw: each deployment's replicas, the nodes, and the warnings
    in the leader's log (a flake met in CI must say where it stopped)."""
    lines = []
    for name in names:
        dep = client.get_deployment(name)
        reps = [
            f"{r.id}@{r.node_id or '-'}:{node_pb2.ReplicaPhase.Name(r.phase)}({r.reason})"
            for r in dep.status.replica_list
        ]
        lines.append(f"  {name} wants {dep.spec.replicas}: {', '.join(reps) or 'none'}")
    for node in client.list_nodes():
        state = node_pb2.NodeState.Name(node.state)
        lines.append(f"  node {node.id}: {state}, tier {node.attestation_tier!r}, {node.quarantine_reason}")
    warnings = [ln for ln in leader.proc.tail(200_000).splitlines() if "WARNING" in ln or "ERROR" in ln]
    return "\n".join([*lines, f"  leader {leader.index} log, last warnings:", *warnings[-15:]])


def test_the_leaders_kill9_mid_apply_and_mid_rollout(tmp_path, postgres_url, nats_cluster):
    publishers = trust_publisher(tmp_path / "publishers")
    urls = nats_cluster.mqtt_urls
    procs: list[Proc] = []
    watchers: list[Watcher] = []
    try:
        replicas = [Replica(0, tmp_path, postgres_url, urls[0], publishers)]
        wait_for(lambda: replicas[0].leading(), timeout=60, what="the first replica leading")
        replicas += [Replica(i, tmp_path, postgres_url, urls[i], publishers) for i in (1, 2)]
        for i in (1, 2):
            node = tmp_path / f"node-{i}.yaml"
            token = TokenStore.in_state_dir(tmp_path / "state").mint(f"node-{i}").token
            node.write_text(
                yaml.safe_dump(
                    {
                        "node_id": f"node-{i}",
                        "enrollment_token": token,
                        "heartbeat_s": 0.5,
                        "broker": {"url": urls[i]},
                        "state_dir": str(tmp_path / "agents"),
                        # The leader is killed while the nodes load what it dispatched (below).
                        "fault_injection": {"download_delay_ms": DOWNLOAD_DELAY_MS},
                    }
                )
            )
            procs.append(Proc(f"node-{i}", ["agent", "-c", str(node)], tmp_path))
        for r in replicas:
            wait_for(lambda r=r: r.metrics() is not None, timeout=60, what=f"replica {r.index} serving")
        # Attestation results live in the leader's verifier (docs/scale-out.md).
        wait_for(lambda: attested(replicas[0].address) == 2, timeout=60, what="2 nodes attested")
        leader = leader_of(replicas)
        followers = [r for r in replicas if r is not leader]
        watchers = [Watcher(r) for r in followers]
        api = followers[0]
        # A generous SLO: the gates judge the version, not how busy this machine is.
        rollout = strategy(steps="[25, 50, 100]", pause="3s", min_inferences=5, slo_ms=GOOD_SLO_MS)
        with EdgewardClient(api.address) as client:
            base = MODEL_INT8.read_bytes()
            client.push_model(base, "vib-cnn", "1.0.0", key=PUBLISHER)
            client.push_model(
                rebuilt(base, "vibration cnn, republished 1.1.0"), "vib-cnn", "1.1.0", key=PUBLISHER
            )
            # The apply burst, through a follower; the leader dies after the second apply, while the
            # nodes still load the first one's replicas from its artifact server (their downloads
            # wait DOWNLOAD_DELAY_MS): they must load them from the next leader's.
            client.apply(manifest(replicas=4, extra=rollout))
            client.apply(manifest(BURST[0], replicas=1))
            wait_for(lambda: loading(client, "vib") == 4, timeout=30, what="the nodes loading vib")
            killed, leader, took_1 = None, None, 0.0
            killer = threading.Thread(target=lambda: None)
            holder: dict = {}

            def kill() -> None:
                holder["result"] = kill_leader(replicas)

            killer = threading.Thread(target=kill)
            killer.start()
            for name in BURST[1:]:
                client.apply(manifest(name, replicas=1))
            killer.join(60)
            killed, leader, took_1 = holder["result"]
            assert killed is not api
            names = ["vib", *BURST]
            assert {d.name for d in client.list_deployments()} == set(names), "no deployment lost"
            try:
                wait_for(lambda: placed_once(client, names), timeout=60, what="every replica running, once")
            except AssertionError as err:
                raise AssertionError(f"{err}\n{placement_report(client, names, leader)}") from None
            endpoints = [n.inventory.inference_endpoint for n in client.list_nodes()]
        # The rollout, with traffic; the new leader dies at its second step.
        stop = threading.Event()
        driver = threading.Thread(target=traffic, args=(endpoints, stop), daemon=True)
        driver.start()
        try:
            survivor = next(r for r in replicas if r.proc.alive and r is not leader)
            with EdgewardClient(survivor.address) as client:
                client.apply(manifest(replicas=4, version="1.1.0", extra=rollout))

                def at_step_2() -> bool:
                    s = status(survivor.address)
                    versions = sorted(v for _, _, v in live(client))
                    return (
                        s.step == 2
                        and s.observing_since_unix_ms > 0
                        and versions == ["1.0.0"] * 2 + ["1.1.0"] * 2
                    )

                wait_for(at_step_2, timeout=60, what="step 2 of 3 observed")
                # An operator's pause and resume through a replica that does not lead: the leader
                # takes them from the store, and the follower answers with the outcome.
                paused = client.rollout("pause", "vib", "a look from a follower")
                assert (paused.state, paused.step) == (api_pb2.ROLLOUT_STATE_PAUSED, 2)
                assert status(leader.address).state == api_pb2.ROLLOUT_STATE_PAUSED, "the leader holds it"
                # The follower counts the live replicas from the store, as the leader does from its
                # passes (it used to say 0 and 0).
                wait_for(
                    lambda: counts(survivor) == counts(leader) == basic_counts(survivor) == (2, 2),
                    timeout=10,
                    what="the follower's rollout counts",
                )
                assert client.rollout("resume", "vib").state == api_pb2.ROLLOUT_STATE_PROGRESSING
                before = live(client)
                recorded = status(survivor.address)
                _, leader_3, took_2 = kill_leader(replicas)
                assert leader_3 is survivor
                resumed = status(survivor.address)
                assert (resumed.step, resumed.from_generation, resumed.to_generation) == (
                    2,
                    recorded.from_generation,
                    recorded.to_generation,
                ), "resumes at the recorded step"
                assert live(client) == before, "the same replicas on the same nodes"
                wait_for(
                    lambda: status(survivor.address).state == api_pb2.ROLLOUT_STATE_COMPLETED,
                    timeout=40,
                    what="rollout completed under the third leader",
                )
                wait_for(lambda: all_running(client, "1.1.0"), what="4 replicas of 1.1.0")
                assert {r for r in before if r[2] == "1.1.0"} <= live(client), "step 2's replicas kept"
                assert placed_once(client, ["vib", *BURST])
        finally:
            stop.set()
            driver.join(10)
        print(f"takeover after kill -9: {took_1:.2f} s (apply burst), {took_2:.2f} s (rollout)")
        assert took_1 < 5 * TTL_S and took_2 < 5 * TTL_S
        # The Watch on the survivor: every revision of the store's change feed after its snapshot,
        # once, in order, to the last one.
        watcher = next(w for w in watchers if w.replica is survivor)
        store = SqlStore(tmp_path / "reader", postgres_url)
        try:
            final = store.revision()
        finally:
            store.close()
        wait_for(lambda: watcher.events and watcher.events[-1].revision >= final, what="the watch caught up")
        assert watcher.error is None
        snapshot = [
            e
            for e in watcher.events
            if e.type == api_pb2.WATCH_EVENT_TYPE_ADDED and e.revision == watcher.events[0].revision
        ]
        changes = [e.revision for e in watcher.events[len(snapshot) :]]
        start = watcher.events[0].revision
        assert changes == list(range(start + 1, final + 1)), "every change once, in order"
    finally:
        for w in watchers:
            w.close()
        for proc in reversed(procs):
            proc.stop()
        for r in locals().get("replicas", []):
            r.proc.stop()


def replicas_of(tmp_path, postgres_url: str, deployment: str) -> list:
    store = SqlStore(tmp_path / "reader", postgres_url)
    try:
        return store.list_replicas(deployment)
    finally:
        store.close()


def counts(replica: Replica) -> tuple[int, int]:
    got = status(replica.address)
    return got.new_running, got.old_live


def basic_counts(replica: Replica) -> tuple[int, int]:
    """The same counts in the basic list view (the store's counts; it used to be 0 and 0 on a
    follower)."""
    with grpc.insecure_channel(replica.address) as channel:
        deployments = (
            api_pb2_grpc.DeploymentServiceStub(channel)
            .List(api_pb2.ListDeploymentsRequest(view=api_pb2.DEPLOYMENT_VIEW_BASIC), timeout=5)
            .deployments
        )
    rollout = next(d.status.rollout for d in deployments if d.name == "vib")
    return rollout.new_running, rollout.old_live


def follower_reads_the_leaders_results(leader: Replica, follower: Replica, node_id: str) -> None:
    """The follower's AttestationService and node list answer with the leader's result (within the
    mirror's lag), not with its own verifier's (it challenges no node)."""

    def views(replica: Replica) -> tuple:
        with grpc.insecure_channel(replica.address) as channel:
            got = attestation_pb2_grpc.AttestationServiceStub(channel).Get(
                attestation_pb2.GetAttestationRequest(node_id=node_id), timeout=5
            )
            listed = attestation_pb2_grpc.AttestationServiceStub(channel).List(
                attestation_pb2.ListAttestationsRequest(), timeout=5
            )
            nodes = api_pb2_grpc.NodeServiceStub(channel).List(api_pb2.ListNodesRequest(), timeout=5).nodes
        tier = next((n.attestation_tier for n in nodes if n.id == node_id), None)  # None: not listed yet
        return (
            got.state,
            got.result.tier,
            got.signed_result.signature,
            [n.node_id for n in listed.nodes],
            tier,
        )

    def same() -> bool:
        try:
            return views(follower) == views(leader)
        except grpc.RpcError:  # NOT_FOUND until the first rows are read
            return False

    wait_for(same, timeout=30, what="the follower answering with the leader's result")
    state, tier, signature, listed, node_tier = views(follower)
    assert state == attestation_pb2.ATTESTATION_STATE_AFFIRMING
    assert tier == node_tier == "software"
    assert signature  # the leader's signed result itself
    assert listed == [node_id]


def test_a_wipe_asked_of_a_follower_is_confirmed_through_the_leader(tmp_path, postgres_url, nats_cluster):
    """A follower starts the wipe (it revokes, evicts, orders the node, known to hold the model only by
    the leader's key release); the node's confirmation is handled by the leader, which takes the wipe
    on from the store (it used to drop the confirmation of a wipe it did not know, and the wipe stayed
    pending for good). AttestNow, which only the leader
    can do, is refused by the follower at once (it used to hang 10 s and answer an old view); the
    follower's other attestation answers are the leader's results (it used to know no node)."""
    publishers = trust_publisher(tmp_path / "publishers")
    urls = nats_cluster.mqtt_urls
    procs: list[Proc] = []
    replicas: list[Replica] = []
    try:
        replicas.append(Replica(0, tmp_path, postgres_url, urls[0], publishers))
        wait_for(lambda: replicas[0].leading(), timeout=60, what="the first replica leading")
        replicas.append(Replica(1, tmp_path, postgres_url, urls[1], publishers))
        node = tmp_path / "node-1.yaml"
        token = TokenStore.in_state_dir(tmp_path / "state").mint("node-1").token
        node.write_text(
            yaml.safe_dump(
                {
                    "node_id": "node-1",
                    "enrollment_token": token,
                    "heartbeat_s": 0.5,
                    "broker": {"url": urls[1]},
                    "state_dir": str(tmp_path / "agents"),
                }
            )
        )
        procs.append(Proc("node-1", ["agent", "-c", str(node)], tmp_path))
        wait_for(lambda: replicas[1].metrics() is not None, timeout=60, what="the follower serving")
        wait_for(lambda: attested(replicas[0].address) == 1, timeout=60, what="the node attested")
        assert not replicas[1].leading()
        # AttestNow asked of the follower: refused at once (only the leader challenges the nodes).
        with grpc.insecure_channel(replicas[1].address) as channel, pytest.raises(grpc.RpcError) as refused:
            attestation_pb2_grpc.AttestationServiceStub(channel).AttestNow(
                attestation_pb2.AttestNowRequest(node_id="node-1"), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "attestation.not_leader" in (refused.value.details() or "")
        follower_reads_the_leaders_results(replicas[0], replicas[1], "node-1")
        with EdgewardClient(replicas[1].address) as client:  # everything else through the follower
            client.push_model(MODEL_INT8.read_bytes(), "vib-cnn", "1.0.0", key=PUBLISHER)
            client.apply(manifest(replicas=1))
            wait_for(lambda: placed_once(client, ["vib"]), timeout=60, what="the replica running")
            # Deleted before the wipe: the node unloads it and the store forgets the replica; only
            # the node's cached artifact is left, and only the leader released its key. The wipe
            # asked of the follower orders the node from the store's record of the key releases (it
            # used to order no node and be done at once, the artifact left on the node).
            client.delete_deployment("vib")
            wait_for(
                lambda: (
                    not replicas_of(tmp_path, postgres_url, "vib")
                    and not any(n.replicas for n in client.list_nodes())
                ),
                timeout=60,
                what="the replica unloaded and forgotten",
            )
            cache = tmp_path / "agents" / "node-1" / "models"
            assert list(cache.iterdir()), "the node keeps the sealed artifact"
            started = client.wipe_model("vib-cnn", "1.0.0", reason="leaked")
            assert [n.node_id for n in started.nodes] == ["node-1"]
            wipe = wait_for(
                lambda: (w := client.get_wipe(started.id)).done and w,
                timeout=60,
                what="the node's confirmation recorded",
            )
            assert (wipe.confirmed, wipe.pending, wipe.quarantined) == (1, 0, 0)
            assert not list(cache.iterdir()), "the artifact wiped from the node"
    finally:
        for proc in reversed(procs):
            proc.stop()
        for r in replicas:
            r.proc.stop()

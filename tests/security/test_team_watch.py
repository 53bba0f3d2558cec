"""A team's Watch stream after a name changed hands, and the Watch hub's memory: unit tests of
TeamWatch (with the owners in a dict) and WatchHub."""

from __future__ import annotations

from edgeward.security.authz import TeamWatch
from edgeward.security.identity import Identity, Role
from edgeward.v1 import api_pb2
from orchestrator.api import WatchHub

ADDED, MODIFIED, DELETED = (
    api_pb2.WATCH_EVENT_TYPE_ADDED,
    api_pb2.WATCH_EVENT_TYPE_MODIFIED,
    api_pb2.WATCH_EVENT_TYPE_DELETED,
)


class Owners:
    """The store as TeamWatch reads it: each name's deployment now, (owner, created)."""

    def __init__(self) -> None:
        self.of: dict[str, tuple[str, int]] = {}
        self.reads = 0

    async def owned_deployments(self, owner: str) -> dict[str, int]:
        self.reads += 1
        return {name: created for name, (who, created) in self.of.items() if who == owner}


class Authz:
    def __init__(self, owners: Owners) -> None:
        self.owners = owners


AUTO, HOME = Identity(Role.TEAM, "ci", "automotive"), Identity(Role.TEAM, "ci", "smart-home")


def event(
    revision: int, name: str, created_ms: int, kind: int = MODIFIED, secret: str = ""
) -> api_pb2.DeploymentEvent:
    dep = api_pb2.Deployment(
        name=name, created_unix_ms=created_ms, labels={"secret": secret} if secret else {}
    )
    return api_pb2.DeploymentEvent(type=kind, deployment=dep, revision=revision)


async def sent(watch: TeamWatch, ev: api_pb2.DeploymentEvent) -> tuple[int, str] | None:
    out = await watch.shows(ev)
    return None if out is None else (out.type, out.deployment.labels.get("secret", ""))


async def test_a_name_deleted_and_created_by_another_team_is_not_shown_to_the_first():
    """Automotive's ``x`` was deleted and smart-home created ``x`` while the stream lagged: both
    changes arrive as MODIFIED with smart-home's ``x``. Automotive hears that its ``x`` is gone, and
    nothing of smart-home's; no clock is compared."""
    owners = Owners()
    watch = TeamWatch(Authz(owners), AUTO)  # type: ignore[arg-type]
    owners.of["x"] = (AUTO.owner, 1000)
    assert await sent(watch, event(1, "x", 1000, kind=ADDED)) == (ADDED, "")
    assert await sent(watch, event(2, "x", 1000)) == (MODIFIED, "")
    assert owners.reads == 1  # a deployment classified is not read again
    owners.of["x"] = (HOME.owner, 900)  # deleted and created again, by smart-home (an earlier clock)
    assert await sent(watch, event(3, "x", 900, secret="home")) == (DELETED, "")
    assert await sent(watch, event(4, "x", 900, secret="home")) is None
    assert await sent(watch, event(5, "x", 900, kind=DELETED)) is None
    owners.of["x"] = (AUTO.owner, 2000)  # automotive's again, a third deployment: new to the stream
    assert await sent(watch, event(6, "x", 2000)) == (ADDED, "")


async def test_an_event_built_before_a_name_changed_hands_shows_nothing_of_the_other_team():
    """Smart-home's ``x`` was queued for a slow stream; smart-home deleted ``x`` and automotive
    created ``x`` before the stream reached it: the owners read then say ``x`` is automotive's, but
    not that deployment (the review's case). Nor when the name went back to the team twice over."""
    owners = Owners()
    watch = TeamWatch(Authz(owners), AUTO)  # type: ignore[arg-type]
    owners.of["x"] = (AUTO.owner, 3000)  # now; the queued event carries smart-home's, created 2000
    assert await sent(watch, event(1, "x", 2000, kind=ADDED, secret="home")) is None
    assert await sent(watch, event(2, "x", 0, kind=DELETED)) is None
    assert await sent(watch, event(3, "x", 3000, kind=ADDED)) == (ADDED, "")


async def test_a_name_seen_as_another_teams_then_the_teams_own_is_shown_as_added():
    """Smart-home's ``x`` was in the snapshot; it deleted ``x`` and automotive created ``x`` while the
    stream lagged: both changes arrive as MODIFIED with automotive's ``x``: shown, the first as ADDED."""
    owners = Owners()
    watch = TeamWatch(Authz(owners), AUTO)  # type: ignore[arg-type]
    owners.of["x"] = (HOME.owner, 1000)
    assert await sent(watch, event(1, "x", 1000, kind=ADDED)) is None
    owners.of["x"] = (AUTO.owner, 2000)
    assert await sent(watch, event(2, "x", 2000)) == (ADDED, "")
    assert await sent(watch, event(3, "x", 2000)) == (MODIFIED, "")


async def test_a_read_for_another_name_does_not_hide_the_teams_own_deletion():
    """The owners were read again (for a new deployment of another team) after the team deleted
    ``x``, before the stream reached the deletion: the deletion must still be sent."""
    owners = Owners()
    watch = TeamWatch(Authz(owners), AUTO)  # type: ignore[arg-type]
    owners.of["x"] = (AUTO.owner, 1000)
    assert await sent(watch, event(1, "x", 1000)) == (ADDED, "")
    del owners.of["x"]
    owners.of["z"] = (HOME.owner, 3000)
    assert await sent(watch, event(2, "z", 3000)) is None  # a read
    assert await sent(watch, event(3, "x", 0, kind=DELETED)) == (DELETED, "")


async def test_a_stalled_watcher_holds_a_bounded_number_of_bytes_and_one_copy_of_each_change():
    hub = WatchHub(depth=1024, max_bytes=1_000_000)
    stalled, reading = hub.subscribe(), hub.subscribe()
    big = api_pb2.Deployment(name="big", labels={"pad": "x" * 100_000})
    for revision in range(1, 51):
        hub.publish_change(revision, "big", big)
        if revision % 5 == 0:
            for _ in range(reading.queue.qsize()):
                await hub.next(reading)
    assert stalled.queued_bytes <= 1_000_000
    assert stalled.queue.qsize() == stalled.queued_bytes // big.ByteSize() == 9
    assert reading.queued_bytes == 0
    assert hub.dropped == 50 - 9
    first = await hub.next(stalled)
    assert first.revision == 42 and first.deployment == big  # the newest kept; the stream replays the gap
    assert stalled.queue.get_nowait()[2] is big  # every queue refers to the one message

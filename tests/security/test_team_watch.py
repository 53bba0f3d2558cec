"""A team's Watch stream after a name changed hands, and the Watch hub's memory: unit tests of
TeamWatch (with the owners in a dict) and WatchHub."""

from __future__ import annotations

from edgeward.security.authz import DEPLOYMENT, TeamWatch
from edgeward.security.identity import Identity, Role
from edgeward.v1 import api_pb2
from orchestrator.api import WatchHub

MODIFIED, DELETED = api_pb2.WATCH_EVENT_TYPE_MODIFIED, api_pb2.WATCH_EVENT_TYPE_DELETED


class Owners:
    def __init__(self) -> None:
        self.of: dict[str, str] = {}
        self.reads = 0

    async def owned(self, kind: str, owner: str) -> set[str]:
        assert kind == DEPLOYMENT
        self.reads += 1
        return {name for name, who in self.of.items() if who == owner}


class Authz:
    def __init__(self, owners: Owners) -> None:
        self.owners = owners


def event(
    revision: int, name: str, created_ms: int, kind: int = MODIFIED, secret: str = ""
) -> api_pb2.DeploymentEvent:
    dep = api_pb2.Deployment(
        name=name, created_unix_ms=created_ms, labels={"secret": secret} if secret else {}
    )
    return api_pb2.DeploymentEvent(type=kind, deployment=dep, revision=revision)


async def test_a_name_deleted_and_created_by_another_team_is_not_shown_to_the_first():
    """The stream fell behind while automotive's ``x`` was deleted and smart-home created ``x``: the
    events of both changes are built from what is stored by then, smart-home's ``x``, as MODIFIED.
    Automotive hears that its ``x`` is gone, and nothing of smart-home's; no clock is compared."""
    owners = Owners()
    auto = Identity(Role.TEAM, "ci", "automotive")
    home = Identity(Role.TEAM, "ci", "smart-home")
    watch = TeamWatch(Authz(owners), auto)  # type: ignore[arg-type]
    owners.of["x"] = auto.owner
    assert await watch.shows(event(1, "x", 1000)) is not None
    assert await watch.shows(event(2, "x", 1000)) is not None
    assert owners.reads == 1  # a name shown as the team's is not read again while it is the same
    owners.of["x"] = home.owner  # deleted and created again, by smart-home
    gone = await watch.shows(event(3, "x", 900, secret="smart-home's"))  # an earlier clock: no matter
    assert gone is not None and gone.type == DELETED and gone.deployment == api_pb2.Deployment(name="x")
    assert await watch.shows(event(4, "x", 900, secret="smart-home's")) is None
    assert await watch.shows(event(5, "x", 900, kind=DELETED)) is None
    owners.of["x"] = auto.owner  # automotive's again, a third deployment
    shown = await watch.shows(event(6, "x", 2000))
    assert shown is not None and shown.type == MODIFIED


async def test_a_stream_that_starts_behind_a_change_of_hands_shows_nothing_of_the_other_team():
    owners = Owners()
    auto = Identity(Role.TEAM, "ci", "automotive")
    watch = TeamWatch(Authz(owners), auto)  # type: ignore[arg-type]
    owners.of |= {"x": auto.owner, "y": auto.owner}
    assert await watch.shows(event(1, "y", 1000)) is not None  # the owners are read: x and y are its
    owners.of["x"] = "team/smart-home"  # x deleted and created by smart-home before its first event
    assert await watch.shows(event(2, "x", 3000, secret="smart-home's")) is None
    assert await watch.shows(event(3, "y", 1000)) is not None
    # The team deleting and creating its own name again: the new deployment is shown.
    assert await watch.shows(event(4, "y", 5000)) is not None


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


async def test_a_name_seen_as_another_teams_then_the_teams_own_is_shown():
    """Smart-home's ``x`` was in the snapshot; it deleted ``x`` and automotive created ``x`` while the
    stream lagged: both changes arrive as MODIFIED with automotive's ``x``, and must be shown."""
    owners = Owners()
    auto = Identity(Role.TEAM, "ci", "automotive")
    watch = TeamWatch(Authz(owners), auto)  # type: ignore[arg-type]
    owners.of["x"] = "team/smart-home"
    assert await watch.shows(event(1, "x", 1000)) is None
    owners.of["x"] = auto.owner
    assert await watch.shows(event(2, "x", 2000)) is not None
    assert await watch.shows(event(3, "x", 2000)) is not None


async def test_a_read_for_another_name_does_not_hide_the_teams_own_deletion():
    """The owners were read again (for a new name of another team) after the team deleted ``x``,
    before the stream reached the deletion: the deletion must still be sent."""
    owners = Owners()
    auto = Identity(Role.TEAM, "ci", "automotive")
    watch = TeamWatch(Authz(owners), auto)  # type: ignore[arg-type]
    owners.of["x"] = auto.owner
    assert await watch.shows(event(1, "x", 1000)) is not None
    del owners.of["x"]  # deleted: its owner forgotten
    owners.of["z"] = "team/smart-home"
    assert await watch.shows(event(2, "z", 3000)) is None  # a read
    deleted = await watch.shows(event(3, "x", 0, kind=DELETED))
    assert deleted is not None and deleted.type == DELETED

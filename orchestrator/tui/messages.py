"""What the console's views and screens tell the app: Textual messages that bubble up to it.

The views render the shared :class:`~orchestrator.tui.model.ConsoleState` and never call the
app; the app owns the confirmations, the gRPC calls and the connection."""

from __future__ import annotations

from enum import StrEnum

from textual.message import Message

from .widgets import ConnectionBanner


class Action(StrEnum):
    """An operator action on one object; the app asks first, then runs it."""

    CORDON = "cordon"  # toggles: cordon an uncordoned node, uncordon a cordoned one
    DRAIN = "drain"
    ATTEST = "attest"
    DELETE = "delete"
    ROLLOUT_PAUSE = "pause"
    ROLLOUT_RESUME = "resume"
    ROLLOUT_UNDO = "undo"
    WIPE = "wipe"


class ActionRequested(Message):
    """The operator asked for ``action`` on ``target`` (a node id, a deployment or model name;
    ``version`` for a model version)."""

    def __init__(self, action: Action, target: str, version: str = "") -> None:
        super().__init__()
        self.action = action
        self.target = target
        self.version = version


class OpenNode(Message):
    """Show the detail screen of one node."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id


class StateChanged(Message):
    """A screen changed the shared state (a wipe's progress): every view renders it again."""


class BannerMounted(Message):
    """A newly composed screen's connection banner, to be brought up to the connection's state."""

    def __init__(self, banner: ConnectionBanner) -> None:
        super().__init__()
        self.banner = banner

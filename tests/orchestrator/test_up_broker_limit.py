"""`edgeward up` above the embedded broker's measured limit says to use an external broker."""

from __future__ import annotations

import pytest

from edgeward.cli import main
from edgeward.mqtt.broker import EMBEDDED_MAX_NODES


def test_up_beyond_the_embedded_broker_limit_points_to_an_external_broker(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["up", "--nodes", str(EMBEDDED_MAX_NODES + 1), "--state-dir", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc != 0
    assert f"measured to serve {EMBEDDED_MAX_NODES} nodes" in err and "--broker-url" in err
    assert not any(tmp_path.iterdir()), "nothing started"

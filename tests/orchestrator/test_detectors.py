"""The slowdown detector: quiet on clean traffic, fast on an early-exit collapse."""

import numpy as np
import pytest

from orchestrator.detectors import SlowdownDetector


def windows(rng, p, n, size=50):
    total = np.full(n, size)
    return rng.binomial(size, p, n), total


def test_learns_the_clean_rate():
    rng = np.random.default_rng(0)
    early, total = windows(rng, 0.7, 200)
    det = SlowdownDetector.learn(early, total)
    assert det.baseline == pytest.approx(0.7, abs=0.02)


def test_no_alert_on_clean_traffic_and_fast_alert_on_collapse():
    rng = np.random.default_rng(1)
    det = SlowdownDetector(baseline=0.7)
    streams = [("n1", "sign", "cam-1"), ("n2", "sign", "cam-2")]
    for _ in range(5000):
        e, t = windows(rng, 0.7, 2)
        assert det.update(streams, e, t) == []
    delay = None
    for k in range(1, 20):
        e = np.array([rng.binomial(50, 0.7), rng.binomial(50, 0.1)])  # cam-2 is attacked
        alerts = det.update(streams, e, [50, 50])
        if alerts:
            assert [a.stream for a in alerts] == [streams[1]]
            assert alerts[0].id == "detector.slowdown.early_exit_collapse"
            delay = k
            break
    assert delay is not None and delay <= 2


def test_alerts_once_per_episode_and_rearms_after_recovery():
    det = SlowdownDetector(baseline=0.6, threshold=5.0)
    s = ["x"]
    raised = sum(len(det.update(s, [0], [50])) for _ in range(10))
    assert raised == 1
    for _ in range(50):
        det.update(s, [45], [50])
    assert det.statistic("x") == 0.0
    assert len(det.update(s, [0], [50])) == 1


def test_small_windows_are_ignored_and_bad_config_refused():
    det = SlowdownDetector(baseline=0.6, threshold=1.0)
    assert det.update(["x"], [0], [2]) == []
    with pytest.raises(ValueError, match="baseline"):
        SlowdownDetector(baseline=1.0)
    with pytest.raises(ValueError, match="clean traffic"):
        SlowdownDetector.learn([0], [0])

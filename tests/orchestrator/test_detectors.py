"""The slowdown detector: quiet on clean traffic, fast on an early-exit collapse."""

import numpy as np
import pytest

from edgeward.v1 import node_pb2
from orchestrator.config import SlowdownConfig
from orchestrator.detectors import SlowdownDetector, SlowdownGuard
from orchestrator.telemetry import ExitCounters


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


def test_the_end_of_an_episode_is_reported_once():
    det = SlowdownDetector(baseline=0.6, threshold=5.0)
    s = ["x"]
    assert len(det.update(s, [0], [50])) == 1
    assert det.pop_cleared() == []
    while det.statistic("x") > 0:
        det.update(s, [45], [50])
    assert det.pop_cleared() == ["x"]
    assert det.pop_cleared() == []


# ------------------------------------------------------------ live telemetry: counters and the guard


def exit_stats(model, source, exits, forced=0, refused=0):
    return node_pb2.ExitStats(
        model_name=model,
        model_version="1.0.0",
        source=source,
        requests=sum(exits) + forced,
        exits=exits,
        forced=forced,
        refused=refused,
    )


def test_exit_counters_turn_cumulative_counts_into_windows():
    c = ExitCounters()
    c.add("n1", [exit_stats("m", "cam-1", [40, 8, 2]), exit_stats("m", "cam-2", [1, 0, 1])])
    w = c.windows()
    assert w.streams == [("n1", "m", "cam-1"), ("n1", "m", "cam-2")]
    assert (w.early.tolist(), w.total.tolist()) == ([48, 1], [50, 2])
    c.add(
        "n1",
        [exit_stats("m", "cam-1", [50, 10, 20], forced=5, refused=3), exit_stats("m", "cam-2", [2, 0, 1])],
    )
    w = c.windows(min_total=5)  # cam-2 answered 1 request: it accumulates into a later window
    assert w.streams == [("n1", "m", "cam-1")]
    assert (w.early.tolist(), w.total.tolist(), w.refused.tolist()) == ([12], [35], [3])
    # What the detectors have seen of each stream (cam-2's second report is still held back).
    assert (c.windowed(("n1", "m", "cam-1")), c.windowed(("n1", "m", "cam-2"))) == (85, 2)
    assert c.windowed(("n2", "m", "cam-1")) == 0
    c.add("n1", [exit_stats("m", "cam-2", [6, 0, 1])])
    assert c.windows(min_total=5).total.tolist() == [5]
    c.add("n1", [exit_stats("m", "cam-1", [3, 0, 0])])  # the agent restarted: counting from zero
    assert c.windows().total.tolist() == [3]
    assert c.windows().streams == []


def test_exit_counters_drop_and_count_malformed_entries():
    c = ExitCounters()
    bad = exit_stats("m", "cam-1", [4, 1])
    bad.requests += 1  # does not add up
    c.add(
        "n1",
        [
            bad,
            exit_stats("m", "", [1]),
            exit_stats("", "s", [1]),
            exit_stats("m", "s", []),
            exit_stats("m", "ok", [5]),
        ],
    )
    assert c.dropped == 4
    assert c.windows().streams == [("n1", "m", "ok")]


def test_a_node_that_invents_streams_holds_at_most_its_bound():
    """A node that reports new source and model names in every report (each at most 256 streams,
    50 reports a second) grew the counters and the detectors' state (and the mitigations of its
    alerts) without end. Now a node at its bound loses the streams it left out of its latest report
    (their rows reused, the detectors told); an honest node within the bound never loses one."""
    guard = SlowdownGuard(SlowdownConfig(learn_requests=20, min_requests=1))
    counters = ExitCounters()

    def honest(k):
        counters.add("honest", [exit_stats("sign", "cam-1", [90 * k, 10 * k])])

    alerts = 0
    for rnd in range(20):  # fresh names every round: learnt, then half of them collapse (alerts)
        names = [(f"m{rnd}-{i % 2}", f"s{rnd}-{i}") for i in range(256)]
        counters.add("hostile", [exit_stats(m, src, [50, 50]) for m, src in names])
        honest(2 * rnd + 1)
        guard.observe(counters.windows())
        collapsed = [[50, 150] if i % 2 else [100, 50] for i in range(256)]
        counters.add("hostile", [exit_stats(m, src, e) for (m, src), e in zip(names, collapsed, strict=True)])
        honest(2 * rnd + 2)
        decision = guard.observe(counters.windows())
        alerts += sum(n.kind == "alert.slowdown" for n in decision.notices)
    assert alerts == 20 * 128  # the detectors work on the invented streams: they alert
    assert len(counters._index) == 256 + 1
    assert len(counters._streams) == 256 + 1  # rows are reused, not added
    assert set(guard.detectors) == {"sign", "m19-0", "m19-1"}  # older invented models are gone
    assert sum(len(d._index) for d in guard.detectors.values()) == 256 + 1
    assert len(guard._active["hostile"]) == 128  # the last round's mitigations, no older ones
    # The honest node never lost its stream: its detector learnt once and saw every window.
    assert guard.detectors["sign"].statistic(("honest", "sign", "cam-1")) == 0.0
    assert counters.windowed(("honest", "sign", "cam-1")) == 100 * 40


def test_new_streams_beyond_the_bound_in_one_report_are_dropped_and_counted():
    counters = ExitCounters()
    counters.add("n1", [exit_stats("m", f"s{i}", [1]) for i in range(300)])  # 256 a report at most
    assert counters.dropped == 44
    assert len(counters.windows().streams) == 256
    assert counters.windows().forgotten == []


def feed(guard, counters, node, model, streams):
    counters.add(node, [exit_stats(model, src, exits) for src, exits in streams.items()])
    return guard.observe(counters.windows(min_total=guard.config.min_requests))


def test_guard_learns_alerts_mitigates_and_clears():
    rng = np.random.default_rng(5)
    guard = SlowdownGuard(
        SlowdownConfig(learn_requests=400, mitigation={"rate_limit_rps": 3, "latency_budget_ms": 2})
    )
    counters = ExitCounters()
    totals = {"cam-1": np.zeros(3, np.int64), "cam-2": np.zeros(3, np.int64)}

    def window(clean_probs, attack_probs=None):
        for src, probs in (("cam-1", clean_probs), ("cam-2", attack_probs or clean_probs)):
            totals[src] += rng.multinomial(40, probs)
        return feed(guard, counters, "n1", "sign", {s: t.tolist() for s, t in totals.items()})

    clean, attack = [0.7, 0.27, 0.03], [0.3, 0.1, 0.6]
    decisions = [window(clean) for _ in range(6)]
    assert "sign" in guard.detectors and abs(guard.detectors["sign"].baseline - 0.97) < 0.03
    decisions += [window(clean) for _ in range(200)]
    assert all(not d.notices and not d.mitigations for d in decisions), "clean traffic raised an alert"

    d = window(clean, attack)
    kinds = [n.kind for n in d.notices]
    assert kinds == ["alert.slowdown", "mitigation.applied"]
    alert = d.notices[0]
    assert (
        alert.subject,
        alert.attributes["node"],
        alert.attributes["model"],
        alert.attributes["source"],
    ) == (
        "node/n1",
        "n1",
        "sign",
        "cam-2",
    )
    (m,) = d.mitigations["n1"]
    assert (m.model_name, m.source, m.rate_limit_rps, m.latency_budget_ms) == ("sign", "cam-2", 3, 2)
    assert guard.mitigations("n1") == [m]
    assert [window(clean, attack).notices for _ in range(5)] == [[]] * 5  # one alert per episode

    for _ in range(50):
        d = window(clean)
        if d.notices:
            break
    assert [n.kind for n in d.notices] == ["alert.slowdown.cleared", "mitigation.lifted"]
    assert d.notices[0].attributes["source"] == "cam-2" and d.mitigations == {"n1": []}
    assert guard.mitigations("n1") == []


def test_guard_alerts_without_mitigating_when_mitigation_is_off():
    guard = SlowdownGuard(SlowdownConfig(learn_requests=100, mitigation={"enabled": False}))
    counters = ExitCounters()
    feed(guard, counters, "n1", "sign", {"s": [190, 8, 2]})
    d = feed(guard, counters, "n1", "sign", {"s": [190, 8, 102]})
    assert [n.kind for n in d.notices] == ["alert.slowdown"] and d.mitigations == {}


def test_only_nodes_serving_a_model_teach_its_clean_baseline():
    """Any node may report exit counts under any model name: one that serves none must not arm the
    detector with a baseline that flags honest traffic (or hides a real collapse)."""
    guard = SlowdownGuard(SlowdownConfig(learn_requests=1000, min_requests=10))
    counters = ExitCounters()
    serving = {("honest", "sign")}

    def observe():
        return guard.observe(counters.windows(), lambda node, model: (node, model) in serving)

    counters.add("hostile", [exit_stats("sign", "x", [999_000, 1000])])  # 99.9 % early: a false baseline
    observe()
    assert "sign" not in guard.detectors
    counters.add("honest", [exit_stats("sign", "cam-1", [600, 400])])
    observe()
    counters.add("honest", [exit_stats("sign", "cam-1", [1200, 800])])
    observe()
    assert guard.detectors["sign"].baseline == pytest.approx(0.6)
    counters.add("honest", [exit_stats("sign", "cam-1", [1800, 1200])])  # clean traffic: no alert
    assert not [n for n in observe().notices if n.kind == "alert.slowdown"]


def test_a_pinned_baseline_is_not_learned_from_whoever_sends_the_first_requests():
    """The first requests after a start set a learned baseline, whoever sends them (all early exits:
    honest traffic then alarms). A baseline the operator pins is used at once."""
    guard = SlowdownGuard(SlowdownConfig(learn_requests=100, min_requests=10, baselines={"sign": 0.6}))
    counters = ExitCounters()

    def observe():
        return guard.observe(counters.windows(), lambda node, model: True)

    counters.add("n1", [exit_stats("sign", "poisoner", [1000, 0])])  # all early: would teach 0.999
    observe()
    assert guard.detectors["sign"].baseline == pytest.approx(0.6)
    for k in range(1, 6):  # honest traffic at the model card's rate: no alert
        counters.add("n1", [exit_stats("sign", "cam-1", [60 * k, 40 * k])])
        assert not [n for n in observe().notices if n.kind == "alert.slowdown"]
    alerts = 0
    for k in range(1, 11):  # a slowdown attack: no early exits at all
        counters.add("n1", [exit_stats("sign", "attacked", [0, 100 * k])])
        alerts += len([n for n in observe().notices if n.kind == "alert.slowdown"])
    assert alerts == 1

"""The suite's own helper for child processes' ports (tests/processes.py)."""

from __future__ import annotations

import processes


def test_a_port_is_never_handed_out_twice(monkeypatch):
    """Two children given ports before either binds must not get the same one: free when asked is
    not enough (a replica's metrics port once equalled another replica's gRPC port)."""
    draws = iter([23_456, 23_456, 23_457])
    monkeypatch.setattr(processes.random, "randrange", lambda *_: next(draws))
    monkeypatch.setattr(processes, "_handed_out", set(), raising=False)
    assert processes.listen_port() == 23_456
    assert processes.listen_port() == 23_457


def test_consecutive_ports_do_not_overlap_a_port_handed_out(monkeypatch):
    draws = iter([24_001, 24_000, 24_002])
    monkeypatch.setattr(processes.random, "randrange", lambda *_: next(draws))
    monkeypatch.setattr(processes, "_handed_out", set(), raising=False)
    assert processes.listen_port() == 24_001
    assert processes.listen_port(count=2) == 24_002

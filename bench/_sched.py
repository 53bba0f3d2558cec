"""Where a process's time went while a benchmark waited on it: on a CPU, or runnable and waiting
for one.

On this shared 2-core machine the orchestrator, the broker and the simulated fleet take turns on
the same two cores, so a slow figure may be the machine's and not the orchestrator's own work.
Linux keeps, per thread, the time it ran and the time it spent runnable on a run queue
(``/proc/PID/task/TID/schedstat``, nanoseconds); over a window the two say which it was. A thread
neither running nor runnable was idle, or blocked (the GIL, IO).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


def _schedstat(pid: int, tid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable and waiting) of the thread so far; None if unknown."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far; 0 once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


@dataclass(frozen=True)
class Share:
    """Fractions of a window of ``wall_s`` seconds."""

    on_cpu: float
    waiting: float
    wall_s: float

    def __str__(self) -> str:
        return f"on a CPU {self.on_cpu:.0%}, runnable and waiting for one {self.waiting:.0%}"


class ThreadClock:
    """``start()``, then ``stop()``: the share of the window one thread (default: the process's
    main thread, the orchestrator's event loop) spent on a CPU and waiting for one."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self.pid, self.tid = pid, pid if tid is None else tid
        self._begin: tuple[float, float, float] | None = None

    def start(self) -> None:
        stat = _schedstat(self.pid, self.tid)
        self._begin = None if stat is None else (time.monotonic(), *stat)

    def stop(self) -> Share | None:
        stat = _schedstat(self.pid, self.tid)
        if self._begin is None or stat is None:
            return None
        t0, run0, wait0 = self._begin
        wall = time.monotonic() - t0
        if wall <= 0:
            return None
        return Share((stat[0] - run0) / wall, (stat[1] - wait0) / wall, wall)


class CpuClock:
    """``start()``, then ``stop()``: the CPU the processes used over the window, in cores."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._begin: tuple[float, float] | None = None

    def _used(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def start(self) -> None:
        self._begin = (time.monotonic(), self._used())

    def stop(self) -> float | None:
        if self._begin is None:
            return None
        t0, used0 = self._begin
        wall = time.monotonic() - t0
        return (self._used() - used0) / wall if wall > 0 else None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process, its live descendants and the children it has reaped
    (PostgreSQL's postmaster: every backend, ended or not); 0 once it is gone."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except psutil.Error:
        return 0.0
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of the process (and the threads and children it starts later) on ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def renice(pid: int, increment: int) -> None:
    """Add ``increment`` to the niceness of every thread of the process (threads it starts later
    inherit theirs), as ``renice -n`` does."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            tid = int(task.name)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))

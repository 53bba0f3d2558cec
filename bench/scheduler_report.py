"""Shared by the scheduler benchmarks: pin to one core and describe the machine. Sections of
docs/benchmarks.md are written with the bench-wide helper in ``_report``."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pin_one_core() -> int | None:
    """Run on one core (the last one we may use), as the targets are per core; None if unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def machine_note(runs: int) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{os.cpu_count()}-core {cpu} VM shared with other engineers' jobs (load average {load} at the "
        f"start), pinned to one core; numpy {np.__version__}; medians of {runs} runs."
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)

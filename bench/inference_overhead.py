"""In-process inference overhead: ``CpuLitertBackend.infer`` against a bare interpreter ``invoke()``
on the same model, for every committed use-case model (usecases/*/models/*.tflite).

The bare loop is what any serving loop must do per request: ``set_tensor`` for every input (the
same input set each call), ``invoke()``, ``get_tensor`` for every output. The backend loop calls
``infer(handle, {name: array})`` with the same arrays, by name, as the inference server does. Both
drive the same interpreter (the one the backend loaded), so kernels, buffers and delegates are
identical and the difference is the backend's own work: looking the model up, binding and
checking inputs, the lock, the clocks, the energy model and the result object.

The two loops alternate in short blocks, in ABBA order, so drifting load on the shared machine
hits both alike. Each block gives a per-call time; adjacent blocks form a pair, and a model's
overhead and ratio are the medians over its pairs (the per-call times, the medians over blocks).

    python bench/inference_overhead.py --calls 100 --blocks 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from accelerators.base import ModelArtifact, random_tensor
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.10


def models() -> list[Path]:
    return sorted(ROOT.glob("usecases/*/models/*.tflite"))


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1e3


class Figures(NamedTuple):
    """One model's medians over the block pairs."""

    bare_us: float
    backend_us: float
    overhead_us: float
    ratio: float


def measure(path: Path, calls: int, blocks: int) -> Figures:
    """The bare loop against the backend loop on one model, block pair by block pair."""
    backend = CpuLitertBackend(CpuLitertConfig(num_threads=1, energy_counter=None))
    try:
        handle = backend.load(ModelArtifact.from_bytes(path.stem, "1", path.read_bytes()))
        # The backend's own interpreter, reached through its session table: the bench compares the
        # wrapper, not two interpreters whose buffers happen to sit differently in the caches.
        interpreter = backend._loaded[handle.id].interpreter
        rng = np.random.default_rng(0)
        arrays = [random_tensor(spec, rng) for spec in handle.inputs]
        feed = {spec.name: array for spec, array in zip(handle.inputs, arrays, strict=True)}
        in_indices = [d["index"] for d in interpreter.get_input_details()]
        out_indices = [d["index"] for d in interpreter.get_output_details()]
        pairs = list(zip(in_indices, arrays, strict=True))

        def bare() -> None:
            for index, array in pairs:
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            for index in out_indices:
                interpreter.get_tensor(index)

        def wrapped() -> None:
            backend.infer(handle, feed)

        per_call_us(bare, calls)  # warm up both
        per_call_us(wrapped, calls)
        bare_us, wrapped_us = [], []
        for block in range(blocks):
            if block % 2 == 0:
                bare_us.append(per_call_us(bare, calls))
                wrapped_us.append(per_call_us(wrapped, calls))
            else:
                wrapped_us.append(per_call_us(wrapped, calls))
                bare_us.append(per_call_us(bare, calls))
    finally:
        backend.close()
    return Figures(
        statistics.median(bare_us),
        statistics.median(wrapped_us),
        statistics.median(w - b for b, w in zip(bare_us, wrapped_us, strict=True)),
        statistics.median(w / b for b, w in zip(bare_us, wrapped_us, strict=True)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per block")
    parser.add_argument("--blocks", type=int, default=100, help="blocks per loop and model (ABBA order)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    rows, ratios = [], []
    for path in models():
        got = measure(path, args.calls, args.blocks)
        ratios.append(got.ratio)
        name = f"{path.parent.parent.name}/{path.stem}"
        rows.append(
            f"| {name} | {got.bare_us:.1f} | {got.backend_us:.1f} | {got.overhead_us:.2f} | {got.ratio:.3f} |"
        )
        print(rows[-1], flush=True)
    overall = statistics.median(ratios)
    worst = max(ratios)
    body = f"""## In-process inference overhead (cpu-litert vs bare interpreter)

`{command()}` ({machine()})

Every committed use-case model (float32 and int8), one interpreter thread, XNNPACK. The bare loop
sets the same input set, calls `invoke()` and reads every output; the backend loop calls
`backend.infer(handle, {{name: array}})` with the same arrays on the same interpreter. The loops
alternate in {args.blocks} blocks of {args.calls} calls each (ABBA order); per-call times are medians
over blocks, overhead and ratio medians over adjacent block pairs. The backend's cost is a fixed
amount per call (model lookup, input binding and checks, the lock, two wall-clock reads, the CPU
clock read on one call in 16 for the modelled energy, the result), so the ratio is largest on the
fastest models.

| model | bare invoke µs | backend.infer µs | overhead µs | ratio |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Median ratio over the {len(ratios)} models: **{overall:.3f}** (target ≤ {TARGET:.2f}:
{"met" if overall <= TARGET else "not met"}); largest {worst:.3f}.
"""
    print(body)
    if not args.no_write:
        write_section("inference-overhead", body)


if __name__ == "__main__":
    main()

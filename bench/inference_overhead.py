"""In-process inference overhead: ``CpuLitertBackend.infer`` against a bare interpreter on the
same model (set_tensor, invoke, get_tensor), for every committed use-case model.

Both loops run in this process, interleaved in rounds so the shared machine's load hits both
alike; the figure is the median per-call time of each over the rounds, and their ratio.

    python bench/inference_overhead.py --calls 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from accelerators.base import ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from accelerators.tflite_model import open_interpreter
from usecases import CASES, model_card, model_path


def models() -> list[tuple[str, Path]]:
    out = []
    for case in CASES:
        try:
            card = model_card(case)
        except FileNotFoundError:
            continue
        for variant in ("float32", "int8"):
            if "stages" in card:
                out.append((f"{case} stage 1 {variant}", model_path(case, variant, stage=1)))
            else:
                out.append((f"{case} {variant}", model_path(case, variant)))
    return out


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(path: Path, calls: int, rounds: int) -> tuple[float, float]:
    data = path.read_bytes()
    backend = CpuLitertBackend(CpuLitertConfig(num_threads=1, energy_counter=None))
    handle = backend.load(ModelArtifact.from_bytes(path.stem, "1.0.0", data))
    bare = open_interpreter(data, num_threads=1)
    bare.allocate_tensors()
    detail = bare.get_input_details()[0]
    x = np.zeros(detail["shape"], dtype=detail["dtype"])
    out_index = bare.get_output_details()[0]["index"]
    feed = {handle.inputs[0].name: x}

    def bare_call() -> None:
        bare.set_tensor(detail["index"], x)
        bare.invoke()
        bare.get_tensor(out_index)

    def backend_call() -> None:
        backend.infer(handle, feed)

    for _ in range(50):  # warm up both
        bare_call()
        backend_call()
    b, e = [], []
    for _ in range(rounds):
        b.append(per_call_us(bare_call, calls))
        e.append(per_call_us(backend_call, calls))
    backend.close()
    return statistics.median(b), statistics.median(e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, path in models():
        bare, ours = measure(path, args.calls, args.rounds)
        rows.append(f"| {name} | {bare:.1f} | {ours:.1f} | {ours - bare:.1f} | {ours / bare:.3f} |")
        print(rows[-1], flush=True)
    body = f"""## In-process inference overhead (cpu-litert vs bare interpreter)

`{command()}` ({machine()})

Median per-call time over {args.rounds} interleaved rounds of {args.calls} calls, one thread, XNNPACK.
The backend call adds input validation, the lock, and wall/CPU clocks for the energy model.

| model | bare invoke µs | backend.infer µs | overhead µs | ratio (target ≤ 1.10) |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    print(body)
    if not args.no_write:
        write_section("inference-overhead", body)


if __name__ == "__main__":
    main()

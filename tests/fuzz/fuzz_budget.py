"""The fuzzing budget: a few seconds per harness in the normal test run; set EDGEWARD_FUZZ_EXAMPLES
to fuzz longer (e.g. 20000 in a nightly job)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EDGEWARD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes overwritten, inserted or deleted, and maybe truncated: mostly
    well-formed input that goes wrong somewhere deep, which random bytes rarely reach."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(("set", "insert", "delete")))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i : i + draw(st.integers(1, 16))]
    if draw(st.booleans()) and data:
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)

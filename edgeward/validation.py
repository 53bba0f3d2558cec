"""How a config or document that pydantic refused is reported: one line, each problem as its field
path and reason."""

from __future__ import annotations

from pydantic import ValidationError


def problems(err: ValidationError) -> str:
    """``'broker.url: ...; node_timeout_s: ...'``; a whole-document check (no field path) gives its
    reason alone, without pydantic's "Value error, " prefix."""
    parts = []
    for e in err.errors():
        where = ".".join(map(str, e["loc"]))
        reason = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" if where else reason)
    return "; ".join(parts)

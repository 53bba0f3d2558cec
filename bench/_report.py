"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are.

A section is everything between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a run
replaces its own section (or appends it) so the file always shows the latest figures of each
benchmark with the exact command that produced them.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Figures measured by the scripts in `bench/`, each section written by its script with the exact
command. The machine is a shared 2-core VM: absolute numbers move with the neighbours' load, so
each benchmark compares ratios within one run and quotes medians over repeated rounds.
"""


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def machine() -> str:
    return f"{platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def write_section(name: str, body: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)

"""The agent.code measurement: computed once per process, and a changed file still changes the
digest that the next process measures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from attestation.artifacts import AGENT_CODE_PACKAGES, code_digest, package_dir

_MEASURE = "from attestation.artifacts import code_digest; print(code_digest().hex())"


def _measure_in_new_process(path: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE],
        env=env,
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_code_digest_is_computed_once_per_process() -> None:
    assert code_digest() is code_digest()


def test_a_changed_file_changes_the_digest_of_the_next_process(tmp_path: Path) -> None:
    for name in AGENT_CODE_PACKAGES:
        shutil.copytree(package_dir(name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert _measure_in_new_process(tmp_path) == code_digest().hex(), "a faithful copy measures the same"
    runtime = tmp_path / "node_agent" / "runtime.py"
    runtime.write_text(runtime.read_text() + "\nEXFILTRATE = True\n")
    assert _measure_in_new_process(tmp_path) != code_digest().hex()

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


_FOREIGN = """
import site, sys
site.addsitedir(sys.argv[1])  # as the interpreter's start does with a site directory's .pth files
from edgeward.bytecode import isolate
isolate(whole_process=True)  # what `edgeward agent` does before it imports the agent
from attestation.artifacts import foreign_modules
print(sorted(m for m, _ in foreign_modules()))
import planted  # loaded by the agent's process later, from outside the measured installation
print(sorted(m for m, _ in foreign_modules()))
"""


def test_only_what_the_agent_loads_from_outside_its_installation_is_foreign(tmp_path: Path) -> None:
    """A process that runs the agent alone reports modules from outside its measured installation.
    Installed packages that the site's .pth files import at every start (environments add such
    files: one imports certifi to add a CA) belong to the interpreter's start, not to an attacker:
    an agent of such an interpreter was refused for good before they were told apart."""
    (tmp_path / "startup.pth").write_text("import packaging.version\n")  # an installed, unmeasured package
    (tmp_path / "planted.py").write_text("PLANTED = True\n")
    out = subprocess.run(
        [sys.executable, "-c", _FOREIGN, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.splitlines() == ["[]", "['planted']"], out.stdout + out.stderr

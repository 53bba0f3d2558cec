"""Bytecode of a measured process comes from its measured sources, not from ``__pycache__``.

The node agent measures its code as source files (``attestation.artifacts``); CPython would run a
``__pycache__/*.pyc`` instead of its source whenever the cache's header matches the source's size
and mtime, and nothing ties the rest of the cache to the source. `isolate` points
``sys.pycache_prefix`` at a private directory of this user (0700): from then on no module is loaded
from, or written to, a cache beside an installed source; the interpreter compiles the measured
source itself, and reuses what it wrote into the private directory on the next start. The modules
imported before the switch (the ``edgeward`` entry point) are checked against their sources when the
agent measures itself (`attestation.artifacts.measured_digest`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "EDGEWARD_BYTECODE_DIR"
_WHOLE_PROCESS = False  # set by `edgeward agent`: the agent is all this process runs
_STARTUP: frozenset[str] = frozenset()  # the modules loaded before `edgeward agent` started the agent


def _private(path: Path) -> bool:
    """Whether ``path`` is a directory of this user that nobody else can write into."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def isolate(directory: Path | str | None = None, *, whole_process: bool = False) -> Path:
    """Keep this process's bytecode in a private directory (``directory``, ``$EDGEWARD_BYTECODE_DIR``
    or ``~/.cache/edgeward/bytecode``; a fresh temporary one if that is not private). Idempotent:
    the first call wins, so the caches of one process never mix. ``whole_process``: the caller is
    the entry point of a process that runs the agent and nothing else (`whole_process`)."""
    global _WHOLE_PROCESS, _STARTUP
    if whole_process and not _WHOLE_PROCESS:
        _WHOLE_PROCESS = True
        _STARTUP = frozenset(sys.modules)
    if sys.pycache_prefix is not None and _private(Path(sys.pycache_prefix)):
        return Path(sys.pycache_prefix)
    chosen = Path(directory or os.environ.get(ENV) or Path.home() / ".cache" / "edgeward" / "bytecode")
    with contextlib.suppress(OSError):
        chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(chosen):
        log.warning("%s is not a private directory of this user; bytecode goes to a temporary one", chosen)
        chosen = Path(tempfile.mkdtemp(prefix="edgeward-bytecode-"))
    sys.pycache_prefix = str(chosen)
    return chosen


def isolated() -> Path | None:
    """The private bytecode directory of this process, if `isolate` ran."""
    prefix = sys.pycache_prefix
    return Path(prefix) if prefix is not None and _private(Path(prefix)) else None


def whole_process() -> bool:
    """Whether this process runs the agent alone (``edgeward agent``), so that every module it loads is
    the agent's: the agent then refuses to vouch for modules from outside its measured installation
    (`attestation.artifacts.foreign_modules`). In-process agents (tests, ``edgeward sim-fleet``) share
    their process with other code and are not held to that."""
    return _WHOLE_PROCESS


def startup_modules() -> frozenset[str]:
    """The modules this process had loaded when ``edgeward agent`` started the agent: the interpreter's
    start (``site`` and what the site's ``.pth`` files import) and the entry point."""
    return _STARTUP

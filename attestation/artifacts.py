"""What the orchestrator (verifier, key release) and the node agent (attester) must compute alike.

* ``code_digest()``: the sha256 the agent measures as ``agent.code``, over the source files of
  the packages the agent runs. The orchestrator computes the same digest from its own
  installation for its built-in reference values, so an agent of the same release matches and a
  modified file does not. Packages are located without being imported. It is computed once per
  process (the code a process runs is what it loaded when it started; a file changed since is
  measured by the next process), so many agents in one process (``edgeward sim-fleet``) or an
  agent restarted in place pay for it once.
* ``model_aad()``: associated data of a sealed model artifact, binding the ciphertext to the
  model's name, version and plaintext digest (a blob cannot be passed off as another model).
* ``key_context()``: the context a model data key is wrapped under for one node.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from .errors import AttestationError

#: The packages whose code the node agent runs (the shared ``edgeward`` package included).
AGENT_CODE_PACKAGES: tuple[str, ...] = ("node_agent", "attestation", "accelerators", "edgeward")
AGENT_CODE = "agent.code"
AGENT_CONFIG = "agent.config"


def package_dir(name: str) -> Path:
    """The directory of top-level package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AttestationError("attestation.code.not_found", f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


_CODE_DIGESTS: dict[tuple[str, ...], bytes] = {}


def code_digest(packages: Iterable[str] = AGENT_CODE_PACKAGES) -> bytes:
    """The ``agent.code`` digest of the installed ``packages``, computed once per process."""
    key = tuple(packages)
    digest = _CODE_DIGESTS.get(key)
    if digest is None:
        digest = _CODE_DIGESTS[key] = tree_digest((name, package_dir(name)) for name in key)
    return digest


def tree_digest(trees: Iterable[tuple[str, Path]]) -> bytes:
    """sha256 over every ``*.py`` file under each (name, directory): name, relative path and file
    digest, in a fixed order (caches and data files are left out: they differ between installs)."""
    h = hashlib.sha256(b"edgeward/v1 code\x00")
    for name, root in trees:
        for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
            h.update(f"{name}/{path.relative_to(root).as_posix()}\x00".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def model_component(name: str) -> str:
    return f"model.{name}"


def model_aad(name: str, version: str, sha256: str) -> bytes:
    return f"edgeward/v1 model\x00{name}\x00{version}\x00{sha256}".encode()


def key_context(node_id: str, name: str, version: str) -> str:
    return f"{node_id}/{name}/{version}"

"""What the orchestrator (verifier, key release) and the node agent (attester) must compute alike.

* ``code_digest()``: the sha256 the agent measures as ``agent.code``, over the files of the
  packages the agent runs that can execute: sources, native extensions, and bytecode that has no
  source beside it (none in a sound installation). ``deps_digest()``: the same over the installed
  dependencies the agent imports (``agent.deps``: gRPC, protobuf, numpy, cryptography, pydantic,
  PyYAML, paho-mqtt, the LiteRT interpreter, tpm2-pytss where installed). The orchestrator computes
  both from its own installation for its built-in reference values, so an agent of the same release
  matches and a modified file does not. Packages are located without being imported. Each is
  computed once per process (the code a process runs is what it loaded when it started; a file
  changed since is measured by the next process), so many agents in one process (``edgeward
  sim-fleet``) or an agent restarted in place pay for it once.
* ``measured_digest()``: what an agent reports for those components. Bytecode caches do not enter
  the digests (they differ between installs and appear lazily), so what runs must be what was
  measured: the agent keeps bytecode in a private directory (`edgeward.bytecode.isolate`, before it
  imports itself), and every module it loaded before that from a ``__pycache__`` beside its source
  is compared with its source, compiled; a cache that differs (a swapped ``.pyc`` whose header
  matches) changes the measured digest, so the verifier refuses the node.
* ``model_aad()``: associated data of a sealed model artifact, binding the ciphertext to the
  model's name, version and plaintext digest (a blob cannot be passed off as another model).
* ``key_context()``: the context a model data key is wrapped under for one node.
"""

from __future__ import annotations

import _imp
import hashlib
import importlib.machinery
import importlib.util
import logging
import marshal
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from edgeward.bytecode import isolated, startup_modules, whole_process

from .errors import AttestationError

log = logging.getLogger(__name__)

#: The packages whose code the node agent runs (the shared ``edgeward`` package included).
AGENT_CODE_PACKAGES: tuple[str, ...] = ("node_agent", "attestation", "accelerators", "edgeward")
#: The installed packages the agent imports beyond its own (measured as ``agent.deps`` where installed).
AGENT_DEPENDENCIES: tuple[str, ...] = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "numpy",
    "cryptography",
    "pydantic",
    "pydantic_core",
    "yaml",
    "paho",
    "ai_edge_litert",
    "tflite_runtime",
    "tpm2_pytss",
    # What those import in turn, outside their own trees: protobuf's parser (native), pydantic's and
    # cryptography's helpers; and what the site's .pth files import at every start.
    "google._upb",
    "typing_extensions",
    "annotated_types",
    "typing_inspection",
    "cffi",
    "_cffi_backend",
    "_distutils_hack",
    "certifi",  # imported at every start by a site .pth file in some environments
    # grpc imports grpcio-tools at its own import when it is installed (its `grpc.tools` shim): in a
    # checkout that regenerates the protocol modules every agent loads it.
    "grpc_tools",
)
AGENT_CODE = "agent.code"
AGENT_DEPS = "agent.deps"
AGENT_CONFIG = "agent.config"
_EXECUTABLE = (".py", *importlib.machinery.EXTENSION_SUFFIXES)


def package_dir(name: str) -> Path:
    """The directory of top-level package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AttestationError("attestation.code.not_found", f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def module_path(name: str) -> Path:
    """The directory of package ``name``, or the file of single-file module ``name`` (found without
    importing it; a dotted name imports its parents)."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec is not None and spec.has_location and spec.origin:
        return Path(spec.origin)
    raise AttestationError("attestation.code.not_found", f"module {name!r} is not installed")


def site_dirs() -> list[Path]:
    """The directories the interpreter's ``site`` reads ``.pth`` files from (and imports from)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [Path(d) for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _site_files() -> list[tuple[str, Path]]:
    """The top-level files of the site directories that run at start or on import: ``.pth`` files
    (``site`` executes their ``import`` lines) and single-file modules; measured with ``agent.deps``."""
    return [
        (f"site/{p.name}", p)
        for d in site_dirs()
        for p in sorted(d.iterdir())
        if p.is_file() and p.name.endswith((".pth", *_EXECUTABLE))
    ]


_DIGESTS: dict[tuple[str, ...], bytes] = {}
# The first caller computes a digest while the others wait for it: the agents of one process start
# together on its blocking pool, and each computing it again cost eight times the work (sim-fleet).
_ONCE = threading.RLock()


def _once(key: tuple[str, ...], compute: Callable[[], bytes]) -> bytes:
    with _ONCE:
        digest = _DIGESTS.get(key)
        if digest is None:
            digest = _DIGESTS[key] = compute()
        return digest


def _installed(packages: Iterable[str], required: bool) -> list[tuple[str, Path]]:
    trees = []
    for name in packages:
        try:
            trees.append((name, module_path(name)))
        except (AttestationError, ImportError, ValueError):
            if required:
                raise
    return trees


def code_digest(packages: Iterable[str] = AGENT_CODE_PACKAGES) -> bytes:
    """The ``agent.code`` digest of the installed ``packages``, computed once per process."""
    key = tuple(packages)
    return _once(key, lambda: tree_digest(_installed(key, required=True)))


def deps_digest(packages: Iterable[str] = AGENT_DEPENDENCIES) -> bytes:
    """The ``agent.deps`` digest of those of ``packages`` that are installed (each named, so a missing
    one counts), computed once per process."""
    key = ("deps", *packages)
    return _once(key, lambda: tree_digest([*_installed(key[1:], required=False), *_site_files()]))


def tree_digest(trees: Iterable[tuple[str, Path]]) -> bytes:
    """sha256 over every file that can execute under each (name, directory): sources, native
    extensions and bytecode outside ``__pycache__`` (a sourceless module), with name, relative path
    and file digest, in a fixed order. Caches in ``__pycache__`` and data files are left out."""
    h = hashlib.sha256(b"edgeward/v1 code\x00")
    for name, root in trees:
        h.update(f"tree {name}\x00".encode())
        if root.is_file():  # a single-file module (or a site file)
            h.update(f"{name}/{root.name}\x00".encode())
            h.update(hashlib.sha256(root.read_bytes()).digest())
            continue
        files = [
            p
            for p in root.rglob("*")
            if (p.name.endswith(_EXECUTABLE) or (p.suffix == ".pyc" and "__pycache__" not in p.parts))
            and p.is_file()
        ]
        for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
            h.update(f"{name}/{path.relative_to(root).as_posix()}\x00".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def measured_digest(digest: bytes, packages: Iterable[str]) -> bytes:
    """What an agent reports for a component whose files hash to ``digest``: the same, unless a
    module of ``packages`` that this process loaded from a shared bytecode cache differs from its
    source; then a digest that no reference holds (and an error in the log, naming the file).
    Once per process, like the digests: modules imported after `edgeward.bytecode.isolate` come
    from the private cache, compiled from their sources."""
    key = ("measured", digest.hex(), *packages)

    def check() -> bytes:  # what loads later comes from the private cache (isolate): checked once
        roots = [root.resolve() for _name, root in _installed(key[2:], required=False)]
        stale = sorted(_unfaithful_caches(roots))
        if not stale:
            return digest
        h = hashlib.sha256(b"edgeward/v1 unfaithful bytecode\x00" + digest)
        for path, cache_digest in stale:
            log.error("bytecode cache %s does not match its source: measured as such", path)
            h.update(f"{path}\x00".encode() + cache_digest)
        return h.digest()

    known = _once(key, check)
    foreign = foreign_modules()
    if not foreign:
        return known
    h = hashlib.sha256(b"edgeward/v1 foreign modules\x00" + known)
    for module, path in foreign:
        h.update(f"{module}\x00{path}\x00".encode())
    return h.digest()


_FOREIGN: dict[str, str] = {}  # module -> file, of the modules found outside the measured installation
_CHECKED: set[str] = set()


def foreign_modules() -> list[tuple[str, str]]:
    """(module, file) of every module this process loaded from outside its measured installation:
    the stdlib of the interpreter, the trees of ``agent.code`` and ``agent.deps``, and the site
    directories' top-level files. Only for a process that runs the agent alone (`whole_process`),
    where any other module is code nobody measured (a ``sitecustomize``, a module found first on
    ``PYTHONPATH``, an unmeasured dependency); each module is looked at once, when first seen."""
    if not whole_process():
        return []
    with _ONCE:
        return _foreign_modules()


def _foreign_modules() -> list[tuple[str, str]]:
    new = [n for n in list(sys.modules) if n not in _CHECKED]
    startup = startup_modules()
    if new:
        allowed = _allowed_roots()
        sites = [d.resolve() for d in site_dirs()]
        for name in new:
            _CHECKED.add(name)
            path = _module_file(sys.modules.get(name))
            if name == "__main__" or path is None or path.parent.resolve() in sites:
                continue  # the entry script (like the interpreter); site files are measured whole
            resolved = path.resolve()
            in_site = any(resolved.is_relative_to(s) for s in sites)
            if any(resolved.is_relative_to(root) for root in allowed[0]) and not in_site:
                continue  # the interpreter's own library
            if in_site and name in startup:
                continue  # installed, and imported by a (measured) site .pth file before the agent ran
            if any(resolved == root or resolved.is_relative_to(root) for root in allowed[1]):
                continue
            _FOREIGN[name] = str(resolved)
            log.error("module %s was loaded from %s, outside the measured installation", name, resolved)
    return sorted(_FOREIGN.items())


def _module_file(module: object) -> Path | None:
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec is not None else getattr(module, "__file__", None)
    if not origin or origin in ("built-in", "frozen") or not getattr(spec, "has_location", True):
        return None
    return Path(origin)


def _allowed_roots() -> tuple[list[Path], list[Path]]:
    """(the interpreter's library directories, the measured trees and files)."""
    paths = sysconfig.get_paths()
    stdlib = [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib") if k in paths]
    measured = [
        root.resolve() for _n, root in _installed((*AGENT_CODE_PACKAGES, *AGENT_DEPENDENCIES), required=False)
    ]
    return stdlib, measured


def _unfaithful_caches(roots: list[Path]) -> Iterable[tuple[str, bytes]]:
    """(cache, its sha256) of every loaded module under ``roots`` whose bytecode came from a cache
    beside its source (not the private one) that compiles to different code than the source."""
    private = isolated()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        source, cached = getattr(spec, "origin", None), getattr(spec, "cached", None)
        if not source or not cached or not source.endswith(".py"):
            continue
        source_path, cache_path = Path(source).resolve(), Path(cached)
        if not any(source_path.is_relative_to(root) for root in roots):
            continue
        if private is not None and cache_path.resolve().is_relative_to(private.resolve()):
            continue  # written by this installation's agents from the measured sources
        try:
            data, text = cache_path.read_bytes(), source_path.read_bytes()
        except OSError:
            continue  # no cache: the module was compiled from its source
        if not _loadable(data, source_path, text):
            continue  # stale: the interpreter compiles the source instead
        try:
            # The interpreter loaded these very bytes already: reading them again adds no risk.
            faithful = marshal.loads(data[16:]) == compile(text, str(source_path), "exec", dont_inherit=True)  # noqa: S302
        except (ValueError, EOFError, TypeError, SyntaxError):
            faithful = False
        if not faithful:
            yield str(cache_path), hashlib.sha256(data).digest()


def _loadable(data: bytes, source: Path, text: bytes) -> bool:
    """Whether the import system would run this cache for ``source`` (the checks of
    importlib._bootstrap_external: magic number, then timestamp or source hash, PEP 552)."""
    if len(data) < 16 or data[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(data[4:8], "little")
    if flags & ~0b11:
        return False
    if flags == 0:  # timestamp-based: source mtime and size
        st = source.stat()
        return data[8:12] == (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") and data[12:16] == (
            st.st_size & 0xFFFFFFFF
        ).to_bytes(4, "little")
    mode = _imp.check_hash_based_pycs
    if mode == "never" or (mode == "default" and not flags & 0b10):
        return True  # an unchecked hash-based cache is run without looking at the source
    return data[8:16] == importlib.util.source_hash(text)


def model_component(name: str) -> str:
    return f"model.{name}"


def model_aad(name: str, version: str, sha256: str) -> bytes:
    return f"edgeward/v1 model\x00{name}\x00{version}\x00{sha256}".encode()


def key_context(node_id: str, name: str, version: str) -> str:
    return f"{node_id}/{name}/{version}"

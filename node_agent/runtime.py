"""The node's model runtime: replicas, their artifacts, their backends, and inference on them.

Replica lifecycle on the node: Loading -> Running, or -> Failed with a reason id. Artifacts are
sealed (encrypted with the model's data key): they are fetched once per model digest into the
local cache (write-then-rename) and stay sealed there, so an agent restart serves again from disk
and a copied cache is useless. ``unlock`` (the agent's: unwrap the released key, decrypt, check
the digest, measure the model) turns a sealed artifact into the model, in memory only. ``wipe``
(quarantine) unloads everything and deletes the cache. Every blocking call (disk, interpreter,
TPM) goes through ``run_blocking``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accelerators.base import AcceleratorError, Backend, InferResult, InvalidInput, ModelArtifact, ModelHandle
from edgeward.security.files import private_dir
from edgeward.v1 import node_pb2
from edgeward.wire import MAX_MODEL_STATS

from .inference_server import LOADING, READY, UNAVAILABLE, LatencyStats, ModelIndexEntry, Overloaded

log = logging.getLogger(__name__)

Fetch = Callable[[node_pb2.DeployReplica], Awaitable[bytes]]
RunBlocking = Callable[..., Awaitable[Any]]
#: Blocking: the plaintext model inside a sealed artifact (raises ArtifactError).
Unlock = Callable[[node_pb2.DeployReplica, bytes], bytes]
SEALED_SUFFIX = ".sealed"
CONFIDENT_P = 0.8  # an output is confident when its top-1 probability reaches this


class ArtifactError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class ReplicaState:
    spec: node_pb2.DeployReplica
    phase: node_pb2.ReplicaPhase = node_pb2.REPLICA_PHASE_LOADING
    reason: str = ""
    message: str = ""
    backend: Backend | None = None
    handle: ModelHandle | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    fetching: bool = False  # its load waits for the artifact's download

    def report(self) -> node_pb2.ReplicaReport:
        return node_pb2.ReplicaReport(
            replica_id=self.spec.replica_id,
            deployment=self.spec.deployment,
            model_name=self.spec.model_name,
            model_version=self.spec.model_version,
            phase=self.phase,
            reason=self.reason,
            message=self.message,
            accelerator=self.spec.accelerator,
        )


#: Inferences a node takes at once, waiting for a thread or running; more are refused (RESOURCE_EXHAUSTED).
MAX_IN_FLIGHT = 64


class Runtime:
    def __init__(
        self,
        backends: dict[str, Backend],
        cache_dir: Path,
        run_blocking: RunBlocking,
        on_change: Callable[[], None],
        unlock: Unlock,
        run_inference: RunBlocking | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        """``run_blocking`` runs the node's control work (unlocks, loads, cache), ``run_inference``
        (default: the same) the inferences: on a node, threads of their own."""
        self.backends = backends
        self.cache_dir = private_dir(cache_dir)
        for stale in self.cache_dir.glob(".tmp-*"):  # a write a crash interrupted before its rename
            stale.unlink(missing_ok=True)
        self.fetched = 0  # artifacts downloaded since start
        self.from_cache = 0  # artifacts served from the local cache since start
        #: (plaintext digest, model name, version or "*") of the model versions wiped on this node:
        #: never loaded again (a deploy of one from an orchestrator that had not heard of the wipe
        #: fails, ``agent.model.wiped``); the same bytes published as another version may load.
        self.wiped: set[tuple[str, str, str]] = set()
        self._run_blocking = run_blocking
        self._run_inference = run_inference or run_blocking
        self.max_in_flight = max_in_flight
        self._unlock = unlock
        self._on_change = on_change
        self.replicas: dict[str, ReplicaState] = {}
        # Per model version served since start, least recently used first (at most MAX_MODEL_STATS).
        self.stats: OrderedDict[tuple[str, str], LatencyStats] = OrderedDict()
        # Accuracy proxy for rollout gates: (outputs scored, of them confident) per model version.
        self.confidence: dict[tuple[str, str], list[int]] = {}
        self.energy_j = 0.0  # energy of inference work, from the backends
        self.busy_s = 0.0
        self.energy_source = "modelled"
        self._rr = 0
        self.in_flight = 0

    # ------------------------------------------------------------ desired state

    def deploy(self, spec: node_pb2.DeployReplica, fetch: Fetch) -> bool:
        """Start loading ``spec`` unless already there; returns False when it was a no-op.

        A replica whose download is still in progress starts again when the command names another
        artifact endpoint: with several orchestrator replicas each tells nodes its own, and a leader
        that died after dispatching leaves downloads retrying an endpoint that is gone; the next
        leader's command (its sync at takeover) brings one that answers; a load that has not begun
        its download (reading the cache) downloads from the newer endpoint. The owner team a command
        names is taken at once, without a reload (a replica deployed before the orchestrator sent
        owners gets its owner from the next sync)."""
        current = self.replicas.get(spec.replica_id)
        if (
            current is not None
            and current.spec.sha256 == spec.sha256
            and current.phase != node_pb2.REPLICA_PHASE_FAILED
            and not (current.fetching and current.spec.artifact_endpoint != spec.artifact_endpoint)
        ):
            # A model's owner never changes: a command without one (from an orchestrator of an
            # earlier release, during an upgrade) does not open the replica to every team.
            current.spec.owner_team = spec.owner_team or current.spec.owner_team
            if current.phase == node_pb2.REPLICA_PHASE_LOADING:  # not downloading yet: it will ask there
                current.spec.artifact_endpoint = spec.artifact_endpoint
            return False
        if current is not None:
            self._drop(current)
        state = ReplicaState(spec)
        self.replicas[spec.replica_id] = state
        state.task = asyncio.get_running_loop().create_task(
            self._load(state, fetch), name=f"load-{spec.replica_id}"
        )
        self._on_change()
        return True

    async def undeploy(self, replica_id: str) -> bool:
        state = self.replicas.pop(replica_id, None)
        if state is None:
            return False
        await self._unload(state)
        self._on_change()
        return True

    async def sync(self, wanted: list[node_pb2.DeployReplica], fetch: Fetch) -> None:
        ids = {spec.replica_id for spec in wanted}
        for rid in [r for r in self.replicas if r not in ids]:
            await self.undeploy(rid)
        for spec in wanted:
            self.deploy(spec, fetch)

    async def close(self) -> None:
        for state in list(self.replicas.values()):
            await self._unload(state)
        self.replicas.clear()

    async def wipe(self) -> tuple[int, int]:
        """Unload every replica and delete every cached artifact; (replicas, files) removed."""
        states = list(self.replicas.values())
        self.replicas.clear()
        for state in states:
            await self._unload(state)
        files = await self._run_blocking(self._clear_cache)
        self._on_change()
        return len(states), files

    def _drop(self, state: ReplicaState) -> None:
        if state.task is not None and not state.task.done():
            state.task.cancel()
        if state.backend is not None and state.handle is not None:
            state.backend.unload(state.handle)

    async def _unload(self, state: ReplicaState) -> None:
        if state.task is not None and not state.task.done():
            state.task.cancel()
            await asyncio.gather(state.task, return_exceptions=True)
        if state.backend is not None and state.handle is not None:
            await self._run_blocking(state.backend.unload, state.handle)
            state.handle = None

    def _refuse_wiped(self, spec: node_pb2.DeployReplica) -> None:
        if {
            (spec.sha256, spec.model_name, spec.model_version),
            (spec.sha256, spec.model_name, "*"),
        } & self.wiped:
            spec.wrapped_key = b""  # the failed replica keeps no key
            raise ArtifactError(
                "agent.model.wiped",
                f"{spec.model_name}:{spec.model_version} was wiped on this node; it is never loaded again",
            )

    async def _load(self, state: ReplicaState, fetch: Fetch) -> None:
        spec = state.spec
        try:
            self._refuse_wiped(spec)
            backend = self.backends.get(spec.accelerator) or next(iter(self.backends.values()))
            data = None
            sealed = await self._run_blocking(self._read_cache, spec.sha256)
            if sealed is not None:
                try:
                    data = await self._run_blocking(self._unlock, spec, sealed)
                except ArtifactError as err:  # torn, tampered or from an older key: fetch again
                    log.info("cached artifact of %s unusable (%s); fetching it again", spec.replica_id, err)
                    await self._run_blocking(self._drop_cache, spec.sha256)
                else:
                    self.from_cache += 1
            if data is None:
                state.fetching = True
                try:
                    sealed = await fetch(spec)
                finally:
                    state.fetching = False
                self.fetched += 1
                self._refuse_wiped(spec)  # wiped while it was downloading: not cached again
                data = await self._run_blocking(self._unlock, spec, sealed)
                await self._run_blocking(self._write_cache, spec.sha256, sealed)
            # unlock checked the digest and the backend checks it again as it reads: no third hash.
            artifact = ModelArtifact(spec.model_name, spec.model_version, data, spec.sha256)
            handle = await self._run_blocking(backend.load, artifact)
        except asyncio.CancelledError:
            raise
        except (AcceleratorError, ArtifactError) as err:
            reason = getattr(err, "reason", None) if isinstance(err, ArtifactError) else type(err).event_id
            self._fail(state, reason or "agent.model.load_failed", str(err))
            return
        except Exception as err:  # the artifact server is away, the disk is full, ...
            self._fail(state, "agent.model.fetch_failed", f"{type(err).__name__}: {err}")
            return
        if self.replicas.get(spec.replica_id) is not state:  # undeployed while loading
            await self._run_blocking(backend.unload, handle)
            return
        state.backend, state.handle = backend, handle
        state.phase, state.reason, state.message = node_pb2.REPLICA_PHASE_RUNNING, "", ""
        log.info(
            "replica %s running %s:%s on %s",
            spec.replica_id,
            spec.model_name,
            spec.model_version,
            backend.kind,
        )
        self._on_change()

    def _fail(self, state: ReplicaState, reason: str, message: str) -> None:
        log.warning("replica %s failed: %s %s", state.spec.replica_id, reason, message)
        state.phase, state.reason, state.message = node_pb2.REPLICA_PHASE_FAILED, reason, message[:500]
        self._on_change()

    # The cache holds sealed artifacts only, named by the digest of the model they contain; whether
    # a file is intact is known once it is unlocked (AES-GCM tag, then the model digest).

    def _cache_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ArtifactError("agent.artifact.bad_digest", f"{sha256[:80]!r} is not a sha256")
        return self.cache_dir / (sha256 + SEALED_SUFFIX)

    def _read_cache(self, sha256: str) -> bytes | None:
        try:
            return self._cache_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def _drop_cache(self, sha256: str) -> None:
        self._cache_path(sha256).unlink(missing_ok=True)

    def _write_cache(self, sha256: str, sealed: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._cache_path(sha256))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is: a crash right after must find
        # either the whole artifact under its name or none.
        dir_fd = os.open(self.cache_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _clear_cache(self) -> int:
        removed = 0
        for path in self.cache_dir.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------ serving

    def running(self, name: str, version: str = "") -> list[ReplicaState]:
        return [
            s
            for s in self.replicas.values()
            if s.phase == node_pb2.REPLICA_PHASE_RUNNING
            and s.spec.model_name == name
            and (not version or s.spec.model_version == version)
        ]

    def loading(self, name: str, version: str = "") -> bool:
        return any(
            s.phase == node_pb2.REPLICA_PHASE_LOADING
            and s.spec.model_name == name
            and (not version or s.spec.model_version == version)
            for s in self.replicas.values()
        )

    def teams(self, name: str, version: str = "") -> set[str]:
        """The teams owning the replicas of ``name`` held here, in any phase ("" for one no team owns)."""
        return {
            s.spec.owner_team
            for s in self.replicas.values()
            if s.spec.model_name == name and (not version or s.spec.model_version == version)
        }

    def index(self) -> list[ModelIndexEntry]:
        """One row per (model, version) held: READY if a replica runs it, else LOADING while one
        loads, else UNAVAILABLE with the replica's reason."""
        rows: dict[tuple[str, str], ModelIndexEntry] = {}
        rank = {READY: 0, LOADING: 1, UNAVAILABLE: 2}
        for state in self.replicas.values():
            key = (state.spec.model_name, state.spec.model_version)
            if state.phase == node_pb2.REPLICA_PHASE_RUNNING and state.handle is not None:
                row = ModelIndexEntry(*key, READY)
            elif state.phase == node_pb2.REPLICA_PHASE_LOADING:
                row = ModelIndexEntry(*key, LOADING)
            else:
                row = ModelIndexEntry(*key, UNAVAILABLE, state.reason or state.message)
            if key not in rows or rank[row.state] < rank[rows[key].state]:
                rows[key] = row
        return list(rows.values())

    def resolve(self, name: str, version: str = "") -> tuple[Backend, ModelHandle] | None:
        states = self.running(name, version)
        if not states:
            return None
        self._rr += 1
        state = states[self._rr % len(states)]
        assert state.backend is not None
        assert state.handle is not None
        return state.backend, state.handle

    async def infer(self, backend: Backend, handle: ModelHandle, inputs: Any) -> InferResult:
        """Run one inference on the inference threads (never on those of the node's control work:
        attestation answers, unlocks, wipes; a flood of requests starved them until the node's
        result expired and it was quarantined). Beyond ``max_in_flight`` waiting or running, a
        request is refused at once (Overloaded). A request the model refuses (InvalidInput: shape,
        dtype) is the caller's error, not the model's: it is not counted as one (rollout gates
        read the error count; callers could fail a canary with wrong shapes)."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"{self.in_flight} inferences in flight on this node, at most {self.max_in_flight}"
            )
        key = (handle.name, handle.version)
        stats = self.stats.get(key)
        if stats is None:
            if (
                len(self.stats) >= MAX_MODEL_STATS
            ):  # telemetry carries at most that many: the least recent goes
                gone = next(iter(self.stats))
                del self.stats[gone]
                self.confidence.pop(gone, None)
            stats = self.stats[key] = LatencyStats()
        else:
            self.stats.move_to_end(key)
        self.in_flight += 1
        started = time.perf_counter()
        try:
            result: InferResult = await self._run_inference(backend.infer, handle, inputs)
        except InvalidInput:
            raise
        except Exception:
            stats.record_error()
            raise
        finally:
            self.in_flight -= 1
        stats.record(time.perf_counter() - started, result.energy_j, result.energy_source, handle.kind)
        scored = _confidence(handle, result.outputs)
        if scored is not None:
            counts = self.confidence.setdefault(key, [0, 0])
            counts[0] += scored[0]
            counts[1] += scored[1]
        self.energy_j += result.energy_j
        self.busy_s += result.latency_s
        self.energy_source = result.energy_source
        return result

    def model_stats(self) -> list[node_pb2.ModelStats]:
        out = []
        for (name, version), stats in sorted(self.stats.items()):
            snap = stats.snapshot()
            out.append(
                node_pb2.ModelStats(
                    model_name=name,
                    model_version=version,
                    inferences=snap.count,
                    errors=snap.errors,
                    latency_p50_ms=snap.p50_ms,
                    latency_p95_ms=snap.p95_ms,
                    latency_p99_ms=snap.p99_ms,
                    scored=self.confidence.get((name, version), (0, 0))[0],
                    confident=self.confidence.get((name, version), (0, 0))[1],
                    latency_buckets=stats.cumulative_buckets(),
                    latency_sum_s=stats.latency_sum_s,
                    inferences_by_accelerator=stats.by_kind,
                )
            )
        return out


def _confidence(handle: ModelHandle, outputs: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(outputs scored, of them confident) when the first output is a batch of probability
    distributions (values in [0, 1] summing to 1, after dequantisation), else None: only a
    classifier's output says how sure it is."""
    if not handle.outputs:
        return None
    spec = handle.outputs[0]
    raw = outputs.get(spec.name)
    if raw is None or raw.ndim == 0 or raw.shape[-1] < 2:
        return None
    values = raw.astype(np.float32)
    if spec.quantization is not None and spec.quantization.scale:
        values = (values - spec.quantization.zero_point) * spec.quantization.scale
    rows = values.reshape(-1, values.shape[-1])
    if rows.min() < 0 or rows.max() > 1.0 + 1e-3 or not np.allclose(rows.sum(axis=1), 1.0, atol=0.05):
        return None
    return len(rows), int((rows.max(axis=1) >= CONFIDENT_P).sum())

"""The artifact server: sealed model artifacts for nodes, served on threads of their own.

After an apply to a large fleet every chosen node downloads its artifact at once. On the gRPC API
those downloads wait for the orchestrator's event loop, which is busy with the same fleet's ingest:
at 10,000 nodes the asyncio server took up waiting calls at under one a second, and the apply's
replicas missed their deadline. This server takes no turn on that loop: a synchronous gRPC server
whose calls run on a small pool of threads, reading each model version from the store once per
``ttl_s`` (on the store's own thread) and sending the same sealed bytes to every node that asks.

It serves one method, ``edgeward.v1.ModelService/Download``, to **node** certificates only (with
security on): mutual TLS with the API's credentials, the same certificate revocation list, and an
audit line for every refusal. Operators and teams download through the gRPC API, where ownership is
checked. A fleet's downloads wait their turn in gRPC's queues (a waiting download holds its request
only: the artifact is read and sent once a thread takes it up); beyond ``limit`` downloads at once
gRPC refuses the call with RESOURCE_EXHAUSTED, which agents try again after a jittered pause.

The artifact is sealed: without the data key, released only inside a deploy command to an attested
node, it is useless. A revoked model version stops being served within ``ttl_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from edgeward.security.audit import AuditEntry, AuditLog
from edgeward.security.authz import MAX_NAME, Authenticator, Denied, client_pem
from edgeward.security.identity import Role
from edgeward.v1 import api_pb2
from orchestrator.errors import NotFound
from orchestrator.store import ModelRecord, SealedArtifact, Store

log = logging.getLogger(__name__)

METHOD = "/edgeward.v1.ModelService/Download"
THREADS = 8  # each sends one artifact at a time; a send to a slow reader waits on flow control
# Downloads held at once (waiting for a thread or sending); beyond: RESOURCE_EXHAUSTED. Only the
# THREADS being sent hold artifact bytes, so the limit bounds requests, not copies of models: at
# 256, an apply to 10,000 nodes had 9,000 downloads refused and tried again after pauses of up to
# 15 s, while the threads had the capacity to serve them in turn.
LIMIT = 4096
# Calls that gRPC's core holds before the server takes them up. Past its default (1,000) the core
# cancels new calls: after an apply to 10,000 nodes 3,600 downloads came back CANCELLED and were
# tried again after a pause. Each holds its request (a model name) only.
PENDING = 20_000
TTL_S = 2.0  # how long one read of a model version serves every download of it
READ_TIMEOUT_S = 60.0  # a store that answers slower than this: UNAVAILABLE, the agent tries again
CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Artifact:
    record: ModelRecord
    sealed: SealedArtifact
    data: bytes


def read_artifact(store: Store, name: str, version: str) -> Artifact:
    """On the store's thread: one model version's record and sealed bytes (``version`` "": the
    newest). Raises `NotFound`."""
    record = store.get_model(name, version or None)
    sealed = store.get_sealed(record.name, record.version)
    return Artifact(record, sealed, store.read_artifact(sealed.sha256))


def chunks(artifact: Artifact) -> Iterator[api_pb2.ModelChunk]:
    """The sealed bytes as the stream of ``ModelChunk`` that ``Download`` answers with."""
    data, digest = artifact.data, artifact.sealed.sha256
    for offset in range(0, len(data), CHUNK):
        yield api_pb2.ModelChunk(
            data=data[offset : offset + CHUNK], offset=offset, size=len(data), sha256=digest
        )


class ArtifactCache:
    """``get(name, version)``: the artifact read by ``read`` at most ``ttl_s`` ago. Threads asking
    for one version while it is read wait for that read (one read per burst, not one per node);
    entries older than ``ttl_s`` are dropped, so the cache holds only what is being downloaded."""

    def __init__(
        self,
        read: Callable[[str, str], Artifact],
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, Artifact]] = {}
        self._reading: dict[tuple[str, str], threading.Lock] = {}
        self.reads = 0

    def get(self, name: str, version: str) -> Artifact:
        key = (name, version)
        with self._lock:
            hit = self._fresh(key)
            if hit is not None:
                return hit
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:  # one thread reads; the others wait for it and take what it read
            with self._lock:
                hit = self._fresh(key)
                if hit is not None:
                    return hit
            try:
                artifact = self._read(name, version)
            finally:
                with self._lock:
                    self._reading.pop(key, None)
            with self._lock:
                self.reads += 1
                now = self._clock()
                self._entries = {k: e for k, e in self._entries.items() if now - e[0] < self._ttl_s}
                self._entries[key] = (now, artifact)
            return artifact

    def _fresh(self, key: tuple[str, str]) -> Artifact | None:
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry[0] >= self._ttl_s:
            return None
        return entry[1]


class ArtifactServer:
    """``start(bind)`` binds and serves (returns the port); ``stop()`` ends it. ``authn`` and
    ``audit``: with security on, the API's authenticator (its CRL) and audit log; ``credentials``:
    the API's mutual-TLS server credentials (None: plaintext, like the API without security)."""

    def __init__(
        self,
        cache: ArtifactCache,
        *,
        authn: Authenticator | None = None,
        audit: AuditLog | None = None,
        credentials: grpc.ServerCredentials | None = None,
        limit: int = LIMIT,
        threads: int = THREADS,
    ) -> None:
        if (authn is None) != (credentials is None):
            raise ValueError("the artifact server needs an authenticator exactly when it has TLS credentials")
        self._cache = cache
        self._authn = authn
        self._audit = audit
        self._credentials = credentials
        self.limit = limit
        self._threads = threads
        self._server: grpc.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._counts_lock = threading.Lock()
        self.counts: dict[str, int] = {"served": 0, "refused": 0, "failed": 0}

    def start(self, bind: str) -> int:
        handler = grpc.method_handlers_generic_handler(
            "edgeward.v1.ModelService",
            {
                "Download": grpc.unary_stream_rpc_method_handler(
                    self._download,
                    request_deserializer=api_pb2.DownloadModelRequest.FromString,
                    response_serializer=api_pb2.ModelChunk.SerializeToString,
                )
            },
        )
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="edgeward-artifacts")
        server = grpc.server(
            self._pool,
            handlers=[handler],
            maximum_concurrent_rpcs=self.limit,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024),  # a request names a model, no more
                ("grpc.max_send_message_length", 2 * CHUNK),
                ("grpc.server.max_pending_requests", PENDING),
                ("grpc.server.max_pending_requests_hard_limit", PENDING),
            ],
        )
        if self._credentials is None:
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, self._credentials)
        if port == 0:
            raise OSError(f"cannot bind the artifact server to {bind}")
        server.start()
        self._server = server
        log.info(
            "artifact server on %s (%s, %d downloads at once)",
            bind.rsplit(":", 1)[0] + f":{port}",
            "plaintext" if self._credentials is None else "mutual TLS, nodes only",
            self.limit,
        )
        return port

    def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._pool is not None:  # gRPC leaves the pool it was given running
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------ the method

    def _download(
        self, request: api_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ModelChunk]:
        try:
            self._admit(request, context)
        except Denied as denial:
            self._count("refused")
            context.abort(denial.code, str(denial))
        try:
            artifact = self._cache.get(request.name, request.version)
        except NotFound as err:
            self._count("refused")
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except Exception as err:  # the store is unreachable or slow: the agent tries again
            self._count("failed")
            log.warning("artifact %s:%s unreadable: %s", request.name, request.version, err)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"model.download.unavailable: {type(err).__name__}")
        if artifact.sealed.revoked_ms:
            self._count("refused")
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model.revoked: {artifact.record.name}:{artifact.record.version} is revoked",
            )
        yield from chunks(artifact)
        self._count("served")

    def _admit(self, request: api_pb2.DownloadModelRequest, context: grpc.ServicerContext) -> None:
        """Refuse (`Denied`, audited) anything but an unrevoked node certificate asking by a name of
        sane length; without security, only the names are checked."""
        identity = None
        try:
            if self._authn is not None:
                identity = self._authn.identify(client_pem(context))  # type: ignore[arg-type]
                self._authn.check_revoked(identity)
                if identity.role is not Role.NODE:
                    raise Denied(
                        "security.authz.role",
                        f"{identity.role} may not call {METHOD} on the artifact server (nodes only; "
                        "operators and teams download through the gRPC API)",
                    )
            if not request.name or len(request.name) > MAX_NAME or len(request.version) > MAX_NAME:
                raise Denied(
                    "request.invalid",
                    f"name: 1 to {MAX_NAME} characters; version: at most {MAX_NAME}",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
        except Denied as denial:
            log.warning("refused %s to %s: %s", METHOD, identity or context.peer(), denial)
            if self._audit is not None:
                target = f"model/{request.name[:MAX_NAME]}"
                entry = AuditEntry.make(
                    identity, context.peer(), METHOD, target, denial.code.name, str(denial)
                )
                self._audit.record_blocking(entry)
            raise

    def _count(self, result: str) -> None:
        with self._counts_lock:
            self.counts[result] += 1

"""Publishing a model version: everything its metadata decides is checked before the artifact
streams in (:meth:`ModelPublisher.admit`); the artifact is then inspected, sealed with a data key
of its own (AES-256-GCM, one key per model version) and stored, and the verifier learns its
digest (:meth:`ModelPublisher.publish`). The key leaves the orchestrator only wrapped to an
attested node (docs/attestation.md)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from attestation.artifacts import model_aad
from attestation.keyrelease import new_data_key, seal
from edgeward.v1 import api_pb2
from edgeward.wire import now_ms

from ..errors import AlreadyExists, Busy, InvalidModel, NotFound
from ..events import EventBus
from ..fleet import model_work_pb
from ..manifest import LABEL_RE, NAME_RE, SEMVER_RE, SEMVER_STORED_RE
from ..store import ModelRecord, SealedArtifact, Store
from .errors import VersionExists
from .signing import PublisherTrust

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024  # a push's metadata: description, labels, profiles
MAX_LABELS = 64
#: Pushes are received whole into memory before they are sealed: at most this many bytes (announced
#: sizes) at once, and at most PUSHES_PER_CALLER pushes of one caller (certificate) at once.
PUSH_BYTES_IN_FLIGHT = 4 * MAX_MODEL_BYTES
PUSHES_PER_CALLER = 2

Call = Callable[..., Awaitable[Any]]


class ModelPublisher:
    """Admits and publishes model versions (``ModelService.Push``)."""

    def __init__(
        self,
        *,
        trust: PublisherTrust,
        store: Store,
        db: Call,
        run_blocking: Call,
        events: EventBus,
        allow_model: Callable[[str, str], None],
        on_change: Callable[[], None],
    ) -> None:
        self.trust = trust
        self._store = store
        self._db = db
        self._run_blocking = run_blocking
        self._events = events
        self._allow_model = allow_model
        self._on_change = on_change

    async def admit(self, meta: api_pb2.ModelMetadata) -> str:
        """Refuse a push by its metadata alone: names, sizes, the publisher's signature, and the
        catalog (the version is new, its parent exists). The publisher's key id ('' unsigned)."""
        check_metadata(meta)
        publisher = self.trust.verify(meta)
        await self._check_catalog(meta)
        return publisher

    async def _check_catalog(self, meta: api_pb2.ModelMetadata) -> None:
        try:
            await self._db(self._store.get_model, meta.name, meta.version)
        except NotFound:
            pass
        else:
            raise VersionExists(meta.name, meta.version)
        if not meta.parent_version:
            return
        if not SEMVER_STORED_RE.fullmatch(meta.parent_version):  # a version stored before the bounds too
            raise InvalidModel("model.push.bad_parent", "metadata.parent_version must be a semantic version")
        try:
            await self._db(self._store.get_model, meta.name, meta.parent_version)
        except NotFound as err:
            raise InvalidModel(
                "model.push.parent_not_found",
                f"metadata.parent_version: {meta.name}:{meta.parent_version} is not in the catalog",
            ) from err

    async def publish(
        self, meta: api_pb2.ModelMetadata, data: bytes, publisher: str, owner_team: str
    ) -> api_pb2.Model:
        """Inspect, seal and store the artifact ``meta`` announced; the published model."""
        if len(data) != meta.size:
            raise InvalidModel(
                "model.push.size_mismatch", f"received {len(data)} bytes, announced {meta.size}"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.sha256:
            raise InvalidModel("model.push.sha256_mismatch", f"received {digest}, announced {meta.sha256}")
        info = await self._run_blocking(_inspect, data)
        created = now_ms()
        model = api_pb2.Model(
            name=meta.name,
            version=meta.version,
            sha256=digest,
            size=len(data),
            use_case=meta.use_case,
            description=meta.description,
            labels=meta.labels,
            created_unix_ms=created,
            updated_unix_ms=created,
            inputs=[_tensor(t) for t in info.inputs],
            outputs=[_tensor(t) for t in info.outputs],
            ops=sorted(info.ops),
            dtypes=sorted(info.dtypes),
            parent_version=meta.parent_version,
            owner_team=owner_team,
            signature=meta.signature if publisher else None,
            state=api_pb2.MODEL_STATE_PUBLISHED,
            profiles=meta.profiles,
            work=None if info.work is None else model_work_pb(info.work),
        )
        record = ModelRecord(
            meta.name, meta.version, digest, len(data), model.SerializeToString(), created, updated_ms=created
        )
        blob, sealed = await self._run_blocking(
            seal_artifact, data, model_aad(meta.name, meta.version, digest)
        )
        try:
            await self._db(self._store.put_model, record, blob, sealed)
        except AlreadyExists as err:  # pushed concurrently since the check
            raise VersionExists(meta.name, meta.version) from err
        self._allow_model(meta.name, digest)
        log.info(
            "model %s:%s pushed (%d bytes, sha256 %s, publisher %s), stored sealed",
            meta.name,
            meta.version,
            len(data),
            digest[:12],
            publisher or "unsigned",
        )
        self._on_change()
        self._events.publish(
            "model.published",
            f"model/{meta.name}",
            f"{meta.name}:{meta.version} published ({len(data)} bytes"
            + (f", derived from {meta.parent_version}" if meta.parent_version else "")
            + (f", signed by {publisher})" if publisher else ", unsigned)"),
            model=f"{meta.name}:{meta.version}",
            sha256=digest,
            publisher=publisher or None,
            parent_version=meta.parent_version or None,
        )
        return model


def check_metadata(meta: api_pb2.ModelMetadata) -> None:
    if not NAME_RE.fullmatch(meta.name):
        raise InvalidModel("model.push.bad_name", "metadata.name must be a DNS-1123 label")
    if not SEMVER_RE.fullmatch(meta.version):
        raise InvalidModel(
            "model.push.bad_version", "metadata.version must be a semantic version such as 1.0.0"
        )
    if len(meta.sha256) != 64:
        raise InvalidModel("model.push.bad_sha256", "metadata.sha256 must be 64 hex digits")
    if not 0 < meta.size <= MAX_MODEL_BYTES:
        raise InvalidModel("model.push.bad_size", f"metadata.size must be within 1..{MAX_MODEL_BYTES}")
    # Every version's metadata is kept and comes back whole in each Get and List, the operator's
    # catalogue included: a few versions of megabytes would outgrow what clients accept (4 MiB).
    if meta.ByteSize() > MAX_METADATA_BYTES:
        raise InvalidModel(
            "model.push.metadata_too_large",
            f"metadata is {meta.ByteSize()} bytes, at most {MAX_METADATA_BYTES} (description, labels and "
            "profiles included)",
        )
    if len(meta.labels) > MAX_LABELS:
        raise InvalidModel("model.push.bad_labels", f"metadata.labels: at most {MAX_LABELS} labels")
    for key, value in meta.labels.items():
        if not LABEL_RE.fullmatch(key) or (value and not LABEL_RE.fullmatch(value)):
            raise InvalidModel(
                "model.push.bad_labels", f"metadata.labels: {key!r}: {value!r} is not a valid label"
            )


def seal_artifact(data: bytes, aad: bytes) -> tuple[bytes, SealedArtifact]:
    """The artifact sealed with a fresh data key, and what the store keeps of it."""
    data_key = new_data_key()
    blob = seal(data_key, data, aad)
    return blob, SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), data_key)


def _inspect(data: bytes) -> Any:
    from accelerators.base import InvalidModel as NotTflite
    from accelerators.tflite_model import inspect_tflite_isolated

    try:
        return inspect_tflite_isolated(data)  # in a child: a crafted file may crash the runtime
    except NotTflite as err:
        raise InvalidModel("model.push.not_tflite", str(err)) from err


def _tensor(spec: Any) -> api_pb2.TensorSpec:
    quant = spec.quantization
    scale, zero = (quant.scale, quant.zero_point) if quant is not None else (0.0, 0)
    return api_pb2.TensorSpec(
        name=spec.name, datatype=spec.dtype, shape=list(spec.shape), scale=scale, zero_point=zero
    )


class PushBudget:
    """The pushes being received at once, by caller: each holds its announced size in memory until it
    is published. A push past `PUSH_BYTES_IN_FLIGHT` in all, or past `PUSHES_PER_CALLER` of its
    caller, is refused (`Busy`) before its artifact streams in."""

    def __init__(self, total: int = PUSH_BYTES_IN_FLIGHT, per_caller: int = PUSHES_PER_CALLER) -> None:
        self.total = total
        self.per_caller = per_caller
        self.held = 0
        self._calls: dict[str, int] = {}

    def take(self, caller: str, size: int) -> None:
        calls = self._calls.get(caller, 0)
        if calls >= self.per_caller:
            raise Busy("model.push.busy", f"{caller} has {calls} pushes under way, at most {self.per_caller}")
        if self.held + size > self.total:
            raise Busy(
                "model.push.busy", f"{self.held} bytes of pushes under way, at most {self.total}: retry later"
            )
        self._calls[caller] = calls + 1
        self.held += size

    def give(self, caller: str, size: int) -> None:
        self.held -= size
        if self._calls[caller] <= 1:
            del self._calls[caller]
        else:
            self._calls[caller] -= 1

"""The TPM 2.0 attester, through tpm2-pytss (ESAPI) and any TCTI (``device:``, ``swtpm:``...).

Keys, all under the TPM's own seeds, so they are useless on any other TPM:

* EK: the RSA-2048 endorsement key at its persistent handle (0x81010001) where the platform
  provisioned one, else recreated from the TCG template (and its certificate, if any, read from
  NV index 0x01C00002). Using it as a parent needs a PolicySecret(endorsement) session.
* AK: a restricted signing key (ECC P-256/ECDSA by default, RSA-2048/RSASSA as an option)
  created under the EK; its private blob, encrypted by the TPM, is kept in ``key_dir``.
* Binding key: an ECC P-256 decryption key under an ECC storage primary (SRK) in the owner
  hierarchy, whose only authorisation for use is ``PolicyPCR(platform PCR = value at
  creation)``; certified by the AK with TPM2_Certify over the challenge nonce. It is remade when
  the platform PCR moves on, so it works only in the measured state that was attested.

Without a resource manager (swtpm, or ``device:/dev/tpm0``) the TPM has room for very few
transient objects and sessions, so every operation loads what it needs and flushes every
handle it made before returning (:class:`_Op`). The attester is not thread-safe; the responder
serialises calls.

tpm2-pytss is imported by ``open()`` only, so a node without it can still use the software
attester, and the configuration validates without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeward.v1 import attestation_pb2 as pb

from .. import tpm_wire
from ..errors import AttestationError, ChallengeMalformed, KeyReleaseError, TpmError
from ..eventlog import ZERO
from ..results import read_private, write_private
from .base import Attester

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

log = logging.getLogger(__name__)

EK_PERSISTENT_HANDLE = 0x81010001
EK_CERTIFICATE_INDEX = 0x01C00002
AK_ATTRIBUTES = (
    tpm_wire.RESTRICTED
    | tpm_wire.SIGN
    | tpm_wire.FIXED_TPM
    | tpm_wire.FIXED_PARENT
    | tpm_wire.SENSITIVE_DATA_ORIGIN
    | tpm_wire.USER_WITH_AUTH
)
# No userWithAuth: using the key needs the PCR policy. No adminWithPolicy: TPM2_Certify (an
# admin-role command) works with the empty password, which grants nothing but the certification.
BINDING_ATTRIBUTES = (
    tpm_wire.DECRYPT
    | tpm_wire.FIXED_TPM
    | tpm_wire.FIXED_PARENT
    | tpm_wire.SENSITIVE_DATA_ORIGIN
    | 0x00000400
)  # noDA
AK_TEMPLATES = {"ecc256": "ecc256:ecdsa-sha256:null", "rsa2048": "rsa2048:rsassa-sha256:null"}
_TPM_RC_POLICY_FAIL = 0x09D
_TPM_RC_HANDLE = 0x08B
_NV_CHUNK = 512


class Tpm2AttesterConfig(BaseModel):
    """Settings of the TPM 2.0 attester."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tpm2"] = Field("tpm2", description="Attester kind.")
    tcti: str = Field(
        description="TCTI of the TPM, as tpm2-tools spell it: 'device:' plus the kernel resource manager "
        "device on a board, 'swtpm:host=127.0.0.1,port=2321' for a software TPM."
    )
    key_dir: Path = Field(Path("state/attestation"), description="Directory of the TPM-encrypted key blobs.")
    ak_algorithm: Literal["ecc256", "rsa2048"] = Field("ecc256", description="Attestation key type.")
    ek_handle: int = Field(
        EK_PERSISTENT_HANDLE, description="Persistent handle of the RSA EK, if provisioned."
    )
    ek_certificate_index: int = Field(EK_CERTIFICATE_INDEX, description="NV index of the RSA EK certificate.")


def _fmt1_error(rc: int) -> int | None:
    """The error number of a format-one TPM response code (handle/session/parameter bits cleared)."""
    return rc & 0xBF if rc >> 16 == 0 and rc & 0x80 else None


def _tss() -> Any:
    try:
        import tpm2_pytss
    except ImportError as err:  # the optional 'tpm' extra, and libtss2 underneath it
        raise TpmError("attestation.tpm.unavailable", f"tpm2-pytss cannot be imported: {err}") from err
    return tpm2_pytss


class _Op:
    """One TPM operation: tracks the transient handles it creates and flushes them all at exit."""

    def __init__(self, ctx: ESAPI, tss: Any, config: Tpm2AttesterConfig) -> None:
        self.ctx = ctx
        self.tss = tss
        self.config = config
        self._flush: list[Any] = []
        self._close: list[Any] = []
        self._ek: Any = None

    def track(self, handle: Any) -> Any:
        self._flush.append(handle)
        return handle

    def release(self, handle: Any) -> None:
        self._flush.remove(handle)
        self.ctx.flush_context(handle)

    def finish(self) -> None:
        for handle in reversed(self._flush):
            try:
                self.ctx.flush_context(handle)
            except Exception as err:  # already gone (a failed command may flush its session)
                log.debug("flush of %s failed: %s", handle, err)
        for handle in self._close:
            try:
                self.ctx.tr_close(handle)
            except Exception as err:
                log.debug("close of %s failed: %s", handle, err)
        self._flush.clear()
        self._close.clear()

    def ek(self) -> Any:
        """The EK: the persistent one, or a transient one from the TCG template."""
        if self._ek is not None:
            return self._ek
        t = self.tss
        try:
            handle = self.ctx.tr_from_tpmpublic(self.config.ek_handle)
            self._close.append(handle)
            self._ek = handle
            return handle
        except t.TSS2_Exception as err:
            if err.error != _TPM_RC_HANDLE:
                raise
        from tpm2_pytss.utils import create_ek_template

        _, template = create_ek_template("EK-RSA2048", self._nv_reader())
        self._ek = self.track(self.ctx.create_primary(None, template, t.ESYS_TR.ENDORSEMENT)[0])
        return self._ek

    def _nv_reader(self) -> Callable[[int], bytes]:
        from tpm2_pytss.utils import NoSuchIndex

        def read(index: int) -> bytes:
            data = self.read_nv(index)
            if data is None:
                raise NoSuchIndex(index)
            return data

        return read

    def read_nv(self, index: int) -> bytes | None:
        t = self.tss
        try:
            handle = self.ctx.tr_from_tpmpublic(index)
        except t.TSS2_Exception:
            return None
        self._close.append(handle)
        public, _ = self.ctx.nv_read_public(handle)
        size = public.nvPublic.dataSize
        data = b""
        while len(data) < size:
            chunk = self.ctx.nv_read(handle, min(_NV_CHUNK, size - len(data)), len(data), auth_handle=handle)
            data += bytes(chunk)
        return data

    def policy_session(self) -> Any:
        t = self.tss
        return self.track(
            self.ctx.start_auth_session(
                t.ESYS_TR.NONE,
                t.ESYS_TR.NONE,
                t.TPM2_SE.POLICY,
                t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL),
                t.TPM2_ALG.SHA256,
            )
        )

    def ek_session(self) -> Any:
        session = self.policy_session()
        self.ctx.policy_secret(self.tss.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        return session

    def load_under_ek(self, private: Any, public: Any) -> Any:
        ek = self.ek()
        session = self.ek_session()
        handle = self.track(self.ctx.load(ek, private, public, session1=session))
        self.release(session)
        return handle

    def srk(self) -> Any:
        t = self.tss
        template = t.TPM2B_PUBLIC(
            t.TPMT_PUBLIC.parse(
                "ecc256:aes128cfb", objectAttributes=t.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
            )
        )
        return self.track(self.ctx.create_primary(None, template, t.ESYS_TR.OWNER)[0])


class Tpm2Attester(Attester):
    kind = pb.ATTESTER_KIND_TPM2
    name = "tpm2"

    def __init__(self, config: Tpm2AttesterConfig) -> None:
        self.config = config
        self._ctx: ESAPI | None = None
        self._t: Any = None
        self._ak: tuple[Any, Any] | None = None  # (TPM2B_PRIVATE, TPM2B_PUBLIC)
        self._ak_public = b""
        self._ek_public = b""
        self._ek_certificate: bytes | None = None
        self._binding: tuple[Any, Any, bytes] | None = None  # (private, public, PCR value)
        # Saved contexts of the AK and SRK: reloading one needs no parent, so the EK (an RSA
        # primary, seconds to recreate on some TPMs) is needed only at start and enrollment.
        self._saved: dict[str, Any] = {}

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _op(self, failure: str = "attestation.tpm.failed") -> Iterator[_Op]:
        if self._ctx is None:
            raise AttestationError("attestation.attester.closed", "open() the attester first")
        op = _Op(self._ctx, self._t, self.config)
        try:
            yield op
        except self._t.TSS2_Exception as err:
            raise TpmError(failure, str(err), rc=int(err.rc)) from err
        finally:
            op.finish()

    def _file(self, name: str) -> Path:
        return self.config.key_dir / name

    def _save(self, name: str, obj: Any) -> None:
        write_private(self._file(name), obj.marshal())

    def _restore(self, name: str, cls: Any) -> Any:
        return cls.unmarshal(read_private(self._file(name)))[0]

    def _cached(self, op: _Op, name: str, load: Callable[[], Any]) -> Any:
        """A handle to the AK or SRK: from its saved context, else ``load()`` and save it."""
        saved = self._saved.get(name)
        if saved is not None:
            try:
                return op.track(op.ctx.context_load(saved))
            except self._t.TSS2_Exception:  # the TPM restarted: saved contexts are void
                del self._saved[name]
        handle = load()
        self._saved[name] = op.ctx.context_save(handle)
        return handle

    def _ak_handle(self, op: _Op) -> Any:
        ak = self._ak
        assert ak is not None
        return self._cached(op, "ak", lambda: op.load_under_ek(*ak))

    def _srk(self, op: _Op) -> Any:
        return self._cached(op, "srk", op.srk)

    def _pcr(self, index: int) -> Any:
        return getattr(self._t.ESYS_TR, f"PCR{index}")

    # ------------------------------------------------------------ lifecycle

    def open(self, pcrs: Sequence[int]) -> None:
        t = self._t = _tss()
        self.config.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._ctx = t.ESAPI(self.config.tcti)
        except (t.TSS2_Exception, RuntimeError, ValueError) as err:
            raise TpmError(
                "attestation.tpm.unavailable", f"cannot open TPM at {self.config.tcti!r}: {err}"
            ) from err
        try:
            with self._op() as op:
                ek = op.ek()
                ek_public, _, _ = op.ctx.read_public(ek)
                self._ek_public = ek_public.marshal()
                self._ek_certificate = op.read_nv(self.config.ek_certificate_index)
                self._ak = self._load_or_create_ak(op)
                ak = self._ak_handle(op)
                self._ak_public = op.ctx.read_public(ak)[0].marshal()
                for index in pcrs:
                    op.ctx.pcr_reset(self._pcr(index))
            if any(v != ZERO for v in self.read_pcrs(pcrs).values()):
                raise TpmError("attestation.tpm.pcr_not_fresh", f"PCRs {list(pcrs)} did not reset to zero")
            if self._file("binding.pub").exists():
                self._binding = (
                    self._restore("binding.priv", t.TPM2B_PRIVATE),
                    self._restore("binding.pub", t.TPM2B_PUBLIC),
                    bytes.fromhex(self._file("binding.state").read_text().strip()),
                )
        except BaseException:
            self.close()
            raise

    def _load_or_create_ak(self, op: _Op) -> tuple[Any, Any]:
        t = self._t
        alg = self.config.ak_algorithm
        priv_name, pub_name = f"ak-{alg}.priv", f"ak-{alg}.pub"
        if self._file(pub_name).exists():
            return self._restore(priv_name, t.TPM2B_PRIVATE), self._restore(pub_name, t.TPM2B_PUBLIC)
        template = t.TPM2B_PUBLIC(t.TPMT_PUBLIC.parse(AK_TEMPLATES[alg], objectAttributes=AK_ATTRIBUTES))
        ek = op.ek()
        session = op.ek_session()
        private, public, *_ = op.ctx.create(ek, None, template, session1=session)
        op.release(session)
        self._save(priv_name, private)
        self._save(pub_name, public)
        log.info("created a %s attestation key under the EK", alg)
        return private, public

    def close(self) -> None:
        self._saved.clear()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    @property
    def ak_public(self) -> bytes:
        return self._ak_public

    # ------------------------------------------------------------ enrollment

    def enrollment_request(self, node_id: str) -> pb.EnrollmentRequest:
        certs = [self._ek_certificate] if self._ek_certificate else []
        return pb.EnrollmentRequest(
            node_id=node_id,
            kind=self.kind,
            ak_public=self._ak_public,
            ek_public=self._ek_public,
            ek_certificates=certs,
        )

    def answer_enrollment(self, challenge: pb.EnrollmentChallenge) -> bytes:
        t = self._t
        try:
            blob = t.TPM2B_ID_OBJECT.unmarshal(challenge.credential_blob)[0]
            secret = t.TPM2B_ENCRYPTED_SECRET.unmarshal(challenge.encrypted_secret)[0]
        except Exception as err:
            raise ChallengeMalformed(detail=f"credential does not parse: {err}") from err
        assert self._ak is not None
        with self._op("attestation.enroll.activation_failed") as op:
            ak = self._ak_handle(op)
            session = op.ek_session()
            certinfo = op.ctx.activate_credential(
                ak, op.ek(), blob, secret, session1=t.ESYS_TR.PASSWORD, session2=session
            )
            return bytes(certinfo)

    # ------------------------------------------------------------ PCRs and quotes

    def extend(self, pcr: int, value: bytes) -> None:
        t = self._t
        digest = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=value))
        with self._op() as op:
            op.ctx.pcr_extend(self._pcr(pcr), t.TPML_DIGEST_VALUES([digest]))

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        ordered = sorted(pcrs)
        selection = self._t.TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, ordered)))
        with self._op() as op:
            _, _, digests = op.ctx.pcr_read(selection)
        values = [bytes(d) for d in digests]
        if len(values) != len(ordered):
            raise TpmError("attestation.tpm.pcr_read", f"asked for {len(ordered)} PCRs, got {len(values)}")
        return dict(zip(ordered, values, strict=True))

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> pb.SignedAttest:
        t = self._t
        selection = t.TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, sorted(pcrs))))
        assert self._ak is not None
        with self._op() as op:
            ak = self._ak_handle(op)
            attest, signature = op.ctx.quote(ak, selection, nonce, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL))
        return pb.SignedAttest(attest=attest.marshal()[2:], signature=signature.marshal())

    # ------------------------------------------------------------ binding key

    def binding(self, nonce: bytes, platform_pcr: int) -> pb.Binding:
        t = self._t
        state = self.read_pcrs([platform_pcr])[platform_pcr]
        assert self._ak is not None
        with self._op() as op:
            if self._binding is None or self._binding[2] != state:
                policy = tpm_wire.policy_pcr_digest([platform_pcr], [state])
                template = t.TPM2B_PUBLIC(
                    t.TPMT_PUBLIC.parse(
                        "ecc256:ecdh-sha256", objectAttributes=BINDING_ATTRIBUTES, authPolicy=policy
                    )
                )
                srk = self._srk(op)
                private, public, *_ = op.ctx.create(srk, None, template)
                op.release(srk)
                self._save("binding.priv", private)
                self._save("binding.pub", public)
                write_private(self._file("binding.state"), state.hex().encode())
                self._binding = (private, public, state)
                log.info("made a binding key for PCR %d = %s...", platform_pcr, state.hex()[:16])
            key = self._load_binding(op)
            ak = self._ak_handle(op)
            attest, signature = op.ctx.certify(
                key,
                ak,
                nonce,
                t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL),
                session1=t.ESYS_TR.PASSWORD,
                session2=t.ESYS_TR.PASSWORD,
            )
            public_bytes = self._binding[1].marshal()
        return pb.Binding(
            public=public_bytes,
            certify=pb.SignedAttest(attest=attest.marshal()[2:], signature=signature.marshal()),
        )

    def _load_binding(self, op: _Op) -> Any:
        assert self._binding is not None
        srk = self._srk(op)
        key = op.track(op.ctx.load(srk, self._binding[0], self._binding[1]))
        op.release(srk)  # frees a slot: the loaded key does not need its parent
        return key

    def shared_secret(self, wrapped: pb.WrappedKey, platform_pcr: int) -> bytes:
        t = self._t
        if self._binding is None or wrapped.binding_public != self._binding[1].marshal():
            raise KeyReleaseError("attestation.key.unwrap_failed", "wrapped to another binding key")
        point = wrapped.ephemeral_public
        if len(point) != 65 or point[0] != 4:
            raise KeyReleaseError(
                "attestation.key.malformed", "ephemeral key is not an uncompressed P-256 point"
            )
        in_point = t.TPM2B_ECC_POINT(t.TPMS_ECC_POINT(x=point[1:33], y=point[33:]))
        try:
            with self._op("attestation.key.unwrap_failed") as op:
                key = self._load_binding(op)
                session = op.policy_session()
                op.ctx.policy_pcr(session, b"", t.TPML_PCR_SELECTION.parse(f"sha256:{platform_pcr}"))
                z = op.ctx.ecdh_zgen(key, in_point, session1=session)
                return bytes(z.point.x)
        except TpmError as err:
            if err.rc is not None and _fmt1_error(err.rc) == _TPM_RC_POLICY_FAIL:
                raise KeyReleaseError(
                    "attestation.key.policy_failed",
                    f"PCR {platform_pcr} no longer holds the value the key is bound to",
                ) from err
            raise KeyReleaseError("attestation.key.unwrap_failed", err.detail) from err

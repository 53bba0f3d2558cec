"""Interoperability with tpm2-tools: our quotes pass tpm2_checkquote, and a node driven only by
tpm2-tools (createak, activatecredential, pcrextend, quote) enrolls and attests with our verifier."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import AGENT_CODE, AGENT_CONFIG, BITSTREAM, measure_platform

from attestation.eventlog import PcrLayout, event_hash
from edgeward.v1 import attestation_pb2 as pb

pytestmark = pytest.mark.tpm

TOOLS = all(
    shutil.which(t) for t in ("tpm2_checkquote", "tpm2_quote", "tpm2_createak", "tpm2_activatecredential")
)


def tool(tpm, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not TOOLS:
        pytest.skip("tpm2-tools not installed: apt-get install tpm2-tools")
    return subprocess.run(
        ["tpm2_" + args[0], "-T", tpm.tcti, *args[1:]] if tpm else ["tpm2_" + args[0], *args[1:]],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_our_quote_passes_tpm2_checkquote(tpm_node, tpm_verifier, tmp_path):
    node = tpm_node()
    measure_platform(node)
    challenge_bytes = tpm_verifier.challenge("node-a")
    challenge = pb.VerifierMessage.FromString(challenge_bytes).challenge
    evidence = pb.AttesterMessage.FromString(node.handle(challenge_bytes)).evidence
    (tmp_path / "ak.pub").write_bytes(evidence.ak_public)
    (tmp_path / "quote.msg").write_bytes(evidence.quote.attest)
    (tmp_path / "quote.sig").write_bytes(evidence.quote.signature)
    (tmp_path / "pcrs.bin").write_bytes(b"".join(v.digest for v in evidence.pcrs))
    args = [
        "checkquote",
        "-u",
        "ak.pub",
        "-m",
        "quote.msg",
        "-s",
        "quote.sig",
        "-f",
        "pcrs.bin",
        "-l",
        "sha256:16,23",
        "-g",
        "sha256",
        "-q",
        challenge.nonce.hex(),
    ]
    ok = tool(None, tmp_path, *args)
    assert ok.returncode == 0, ok.stderr

    (tmp_path / "pcrs.bin").write_bytes(bytes(32) * 2)  # the PCR values do not match the quote
    assert tool(None, tmp_path, *args).returncode != 0


def test_tpm2_tools_node_enrolls_and_attests(swtpm_factory, tpm_verifier, tmp_path):
    tpm = swtpm_factory(0)
    run = lambda *args: tool(tpm, tmp_path, *args)  # noqa: E731

    def check(result: subprocess.CompletedProcess[str]) -> None:
        assert result.returncode == 0, result.stderr

    # Enrollment: AK under the persistent EK, the EK certificate from NV, credential activation.
    check(
        run(
            "createak",
            "-C",
            "0x81010001",
            "-c",
            "ak.ctx",
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            "ak.pub",
            "-n",
            "ak.name",
        )
    )
    check(run("readpublic", "-c", "0x81010001", "-o", "ek.pub"))
    check(run("nvread", "0x1c00002", "-C", "o", "-o", "ek.crt"))
    request = pb.EnrollmentRequest(
        node_id="tools-node",
        kind=pb.ATTESTER_KIND_TPM2,
        ak_public=(tmp_path / "ak.pub").read_bytes(),
        ek_public=(tmp_path / "ek.pub").read_bytes(),
        ek_certificates=[(tmp_path / "ek.crt").read_bytes()],
    )
    reply = tpm_verifier.enroll_begin("tools-node", request)
    enroll = pb.VerifierMessage.FromString(reply).enroll_challenge
    # tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    (tmp_path / "cred.bin").write_bytes(
        bytes.fromhex("badcc0de00000001") + enroll.credential_blob + enroll.encrypted_secret
    )
    check(run("startauthsession", "--policy-session", "-S", "session.ctx"))
    check(run("policysecret", "-S", "session.ctx", "-c", "e"))
    check(
        run(
            "activatecredential",
            "-c",
            "ak.ctx",
            "-C",
            "0x81010001",
            "-i",
            "cred.bin",
            "-o",
            "secret.bin",
            "-P",
            "session:session.ctx",
        )
    )
    check(run("flushcontext", "session.ctx"))
    enrolled = tpm_verifier.enroll_finish(
        "tools-node", pb.EnrollmentAnswer(node_id="tools-node", proof=(tmp_path / "secret.bin").read_bytes())
    )
    assert enrolled.ek_certified

    # Measurements extended by tpm2_pcrextend, then a tpm2_quote over the verifier's nonce.
    layout = PcrLayout()
    events = [
        pb.MeasurementEvent(
            pcr=layout.platform, component=c, digest=hashlib.sha256(d).digest(), description=desc
        )
        for c, d, desc in [
            ("agent.code", AGENT_CODE, "agent/__init__.py"),
            ("agent.config", AGENT_CONFIG, "node.yaml"),
            ("accelerator.fpga-pynq.bitstream", BITSTREAM, "overlay.bit"),
        ]
    ]
    for e in events:
        check(run("pcrextend", f"{e.pcr}:sha256={event_hash(e.component, e.digest, e.description).hex()}"))
    challenge = pb.VerifierMessage.FromString(tpm_verifier.challenge("tools-node")).challenge
    check(
        run(
            "quote",
            "-c",
            "ak.ctx",
            "-l",
            "sha256:16,23",
            "-q",
            challenge.nonce.hex(),
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-o",
            "pcrs.bin",
            "-F",
            "values",
            "-g",
            "sha256",
        )
    )
    values = (tmp_path / "pcrs.bin").read_bytes()
    evidence = pb.AttestationEvidence(
        node_id="tools-node",
        kind=pb.ATTESTER_KIND_TPM2,
        ak_public=request.ak_public,
        quote=pb.SignedAttest(
            attest=(tmp_path / "quote.msg").read_bytes(), signature=(tmp_path / "quote.sig").read_bytes()
        ),
        pcr_bank="sha256",
        pcrs=[pb.PcrValue(index=16, digest=values[:32]), pb.PcrValue(index=23, digest=values[32:])],
        events=events,
    )
    outcome = tpm_verifier.receive(
        "tools-node", pb.AttesterMessage(schema=1, evidence=evidence).SerializeToString()
    )
    assert outcome.rejected is None, outcome.rejected
    assert outcome.result.status == pb.ATTESTATION_STATUS_AFFIRMING, outcome.result.reasons
    assert not outcome.result.binding_public  # tpm2-tools made no binding key: no key release

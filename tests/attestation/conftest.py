"""Fixtures for attestation: real software TPMs (swtpm) with EK certificates from a local CA,
reference values, and ready-made nodes (responder + verifier) of each attester kind.

Two TPM states are manufactured once per session by ``swtpm_setup`` (distinct seeds, so two
distinct "chips", both with EK certificates from the same local CA); each test gets fresh copies
of them and its own ``swtpm socket`` processes on free loopback ports, stopped at teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Expected TPM refusals (a policy that no longer holds) are asserted, not printed by libtss2.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from attestation import attesters
from attestation.enrollment import load_ca_bundle
from attestation.reference import ReferenceValues
from attestation.responder import AttestationResponder
from attestation.service import AttestationVerifierService, VerifierConfig

SWTPM = shutil.which("swtpm")
SWTPM_SETUP = shutil.which("swtpm_setup")
SWTPM_LOCALCA = shutil.which("swtpm_localca")
NEEDS = "swtpm not installed: apt-get install swtpm swtpm-tools tpm2-tools (make system-deps)"

AGENT_CODE = b"agent code v1\n"
AGENT_CONFIG = b"node_id: node-a\n"
BITSTREAM = b"\x00fpga overlay bitstream\xff" * 64
MODEL = b"TFL3 model bytes" * 256


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reference_values(**extra: object) -> ReferenceValues:
    """Reference values matching what :func:`measure_platform` and MODEL measure."""
    data: dict[str, object] = {
        "version": 1,
        "required": ["agent.code", "agent.config"],
        "components": {
            "agent.code": {"digests": [sha(AGENT_CODE)]},
            "agent.config": {"digests": [sha(AGENT_CONFIG)]},
            "accelerator.*": {"digests": [sha(BITSTREAM)]},
            "model.*": {"digests": [sha(MODEL)]},
        },
    }
    data.update(extra)
    return ReferenceValues.model_validate(data)


def measure_platform(responder: AttestationResponder, code: bytes = AGENT_CODE) -> None:
    responder.measure("agent.code", code, "agent/__init__.py")
    responder.measure("agent.config", AGENT_CONFIG, "node.yaml")
    responder.measure("accelerator.fpga-pynq.bitstream", BITSTREAM, "overlay.bit")


# ------------------------------------------------------------------------------ swtpm


@dataclass
class Manufactured:
    """TPM states made by swtpm_setup, and the local CA that signed their EK certificates."""

    states: list[Path]
    ca_bundle: Path


@pytest.fixture(scope="session")
def manufactured(tmp_path_factory: pytest.TempPathFactory) -> Manufactured:
    if not (SWTPM and SWTPM_SETUP and SWTPM_LOCALCA):
        pytest.skip(NEEDS)
    root = tmp_path_factory.mktemp("swtpm-manufacture")
    ca = root / "ca"
    ca.mkdir()
    (root / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (root / "localca.options").write_text(
        "--platform-manufacturer edgeward\n--platform-version 1\n--platform-model test\n"
    )
    (root / "setup.conf").write_text(
        f"create_certs_tool = {SWTPM_LOCALCA}\ncreate_certs_tool_config = {root}/localca.conf\n"
        f"create_certs_tool_options = {root}/localca.options\nactive_pcr_banks = sha256\n"
    )
    states = []
    for name in ("chip-a", "chip-b"):
        state = root / name
        state.mkdir()
        proc = subprocess.run(
            [
                SWTPM_SETUP,
                "--tpm2",
                "--tpmstate",
                str(state),
                "--create-ek-cert",
                "--config",
                str(root / "setup.conf"),
                "--logfile",
                str(root / f"{name}.log"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"swtpm_setup failed:\n{proc.stdout}{proc.stderr}{(root / f'{name}.log').read_text()}"
            )
        states.append(state)
    bundle = root / "ek-ca.pem"
    bundle.write_bytes(
        (ca / "swtpm-localca-rootca-cert.pem").read_bytes() + (ca / "issuercert.pem").read_bytes()
    )
    return Manufactured(states, bundle)


class Swtpm:
    """One ``swtpm socket`` over a private copy of a manufactured state, on Unix sockets: the data
    socket and, beside it, the control socket (``.ctrl``) that the swtpm TCTI of tpm2-tss (3.2 and
    later) derives from ``path``. No ports: on a busy machine (thousands of sockets open) a pair of
    consecutive free loopback ports was not always to be had."""

    def __init__(self, state: Path, workdir: Path) -> None:
        self.state = workdir / "state"
        shutil.copytree(state, self.state)
        self.log = workdir / "swtpm.log"
        # A short directory of its own: a socket path has at most 107 bytes, a test's tmp_path may not.
        self.sockets = Path(tempfile.mkdtemp(prefix="swtpm-"))
        self.path = self.sockets / "tpm.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.path}"

    def start(self) -> None:
        assert SWTPM is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    SWTPM,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state}",
                    "--server",
                    f"type=unixio,path={self.path}",
                    "--ctrl",
                    f"type=unixio,path={self.path}.ctrl",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60  # only a hang takes this long: swtpm listens at once
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.path))
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"swtpm did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.sockets, ignore_errors=True)


@pytest.fixture
def swtpm_factory(manufactured: Manufactured, tmp_path: Path) -> Iterator[Callable[[int], Swtpm]]:
    """Start ``factory(i)``: a fresh copy of manufactured chip ``i`` (0 or 1) in its own swtpm."""
    started: list[Swtpm] = []

    def start(chip: int = 0) -> Swtpm:
        workdir = tmp_path / f"swtpm-{len(started)}"
        workdir.mkdir()
        tpm = Swtpm(manufactured.states[chip], workdir)
        started.append(tpm)
        tpm.start()
        return tpm

    try:
        yield start
    finally:
        for tpm in started:
            tpm.stop()


# ------------------------------------------------------------------------------ nodes


class Clock:
    """A settable wall clock for the verifier (seconds)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> AttestationVerifierService:
    """A verifier with the test reference values and a settable clock (no EK trust anchors)."""
    return AttestationVerifierService(VerifierConfig(), reference_values(), clock=clock)


@pytest.fixture
def tpm_verifier(clock: Clock, manufactured: Manufactured) -> AttestationVerifierService:
    """A verifier that trusts the local CA of the manufactured swtpm chips."""
    trust = load_ca_bundle(manufactured.ca_bundle)
    return AttestationVerifierService(VerifierConfig(), reference_values(), ek_trust=trust, clock=clock)


def enroll(verifier: AttestationVerifierService, responder: AttestationResponder) -> None:
    """Run the enrollment protocol as the wire would."""
    outcome = verifier.receive(responder.node_id, responder.enrollment_request())
    assert outcome.rejected is None, outcome.rejected
    assert outcome.reply is not None
    outcome = verifier.receive(responder.node_id, responder.handle(outcome.reply))
    assert outcome.rejected is None, outcome.rejected
    assert outcome.enrolled is not None


def attest(verifier: AttestationVerifierService, responder: AttestationResponder):
    """One challenge/evidence round trip; returns the Outcome."""
    return verifier.receive(responder.node_id, responder.handle(verifier.challenge(responder.node_id)))


@pytest.fixture
def software_node(tmp_path: Path) -> Iterator[Callable[..., AttestationResponder]]:
    """Open software-attester responders (closed at teardown)."""
    opened: list[AttestationResponder] = []

    def make(node_id: str = "node-a") -> AttestationResponder:
        config = attesters.SoftwareAttesterConfig(key_dir=tmp_path / f"keys-{node_id}-{len(opened)}")
        responder = AttestationResponder(node_id, attesters.create(config))
        responder.open()
        opened.append(responder)
        return responder

    yield make
    for responder in opened:
        responder.close()


@pytest.fixture
def tpm_node(
    swtpm_factory: Callable[[int], Swtpm], tmp_path: Path
) -> Iterator[Callable[..., AttestationResponder]]:
    """Open tpm2-attester responders, each on its own swtpm (closed before the swtpm stops)."""
    opened: list[AttestationResponder] = []

    def make(
        node_id: str = "node-a", chip: int = 0, ak_algorithm: str = "ecc256", tpm: Swtpm | None = None
    ) -> AttestationResponder:
        tpm = tpm or swtpm_factory(chip)
        config = attesters.Tpm2AttesterConfig(
            tcti=tpm.tcti, key_dir=tmp_path / f"tpmkeys-{node_id}-{len(opened)}", ak_algorithm=ak_algorithm
        )  # type: ignore[arg-type]
        responder = AttestationResponder(node_id, attesters.create(config))
        responder.open()
        opened.append(responder)
        return responder

    yield make
    for responder in opened:
        responder.close()

"""Shared fixtures: real MQTT brokers on free loopback ports, per-test topic prefixes, and a check
that fails any test leaving threads, asyncio tasks or child processes behind."""

from __future__ import annotations

import asyncio
import getpass
import inspect
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from nats_cluster import NatsCluster, find_nats_server
from pg_server import PostgresServer, find_bindir
from processes import listen_port

from accelerators.tflite_model import inspect_tflite_isolated
from edgeward.mqtt import BrokerURL
from edgeward.mqtt.broker import EmbeddedBroker
from edgeward.security.mqtt_acl import mosquitto_config
from edgeward.security.pki import FleetCA, parse_subject
from usecases import model_path

LOOPBACK = "127.0.0.1"
# How long threads, tasks and processes get to finish on their own after a test.
LEAK_GRACE_S = 2.0

# Debian installs the broker in sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=_SEARCH_PATH)

# Processes started by session-scoped fixtures; the leak check does not count them.
_SESSION_PIDS: set[int] = set()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks: skip the thread/task/process leak check (say why in the test)"
    )


class Mosquitto:
    """A private Mosquitto on a loopback port, with its config and log in ``workdir``."""

    def __init__(
        self, workdir: Path, listener_conf: str = "", conf_factory: Callable[[int], str] | None = None
    ) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto not installed: apt-get install mosquitto")
        self.workdir = workdir
        self.listener_conf = listener_conf
        # port -> a whole listener configuration (replaces the anonymous plaintext one)
        self.conf_factory = conf_factory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> BrokerURL:
        return BrokerURL(host=LOOPBACK, port=self.port)

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start on ``self.port``, or on a free port the first time (retried if someone takes it)."""
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if attempts > 1:
                self.port = listen_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def _spawn(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        # Never drop privileges to the 'mosquitto' user: it could not read our tmp dir.
        common = [f"user {getpass.getuser()}", "persistence false", "log_dest stderr", "log_type all"]
        if self.conf_factory is not None:
            conf.write_text("\n".join([*common, self.conf_factory(self.port), ""]))
        else:
            conf.write_text(
                "\n".join(
                    [
                        *common,
                        "per_listener_settings false",
                        "allow_anonymous true",
                        "max_packet_size 16777216",
                        f"listener {self.port} {LOOPBACK}",
                        self.listener_conf,
                        "",
                    ]
                )
            )
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start:\n{self.log}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s:\n{self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerURL]:
    """One Mosquitto shared by the whole run; tests keep apart through `topic_prefix`."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    assert broker.proc is not None
    _SESSION_PIDS.add(broker.proc.pid)
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole run (random loopback port); tests get their own databases."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed: apt-get install postgresql")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-server processes in one cluster, JetStream clustered, an MQTT gateway on each."""
    if find_nats_server() is None:
        pytest.skip("nats-server not installed: apt-get install nats-server")
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        cluster.start()
        for proc in cluster.procs:
            assert proc is not None
            _SESSION_PIDS.add(proc.pid)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """The store's engine, for tests that run on both: None (SQLite under the state dir) or a fresh
    PostgreSQL database."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return None


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start private Mosquittos (to restart them, or with TLS listener settings); all stop at the end."""
    started: list[Mosquitto] = []

    def start(listener_conf: str = "") -> Mosquitto:
        workdir = tmp_path / f"mosquitto-{len(started)}"
        workdir.mkdir()
        broker = Mosquitto(workdir, listener_conf)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def fleet_ca(tmp_path: Path) -> FleetCA:
    """A fresh fleet CA with an orchestrator certificate ``orchestrator:main`` (127.0.0.1)."""
    ca = FleetCA.init(tmp_path / "pki")
    ca.issue(parse_subject("orchestrator", "main"))
    return ca


@pytest.fixture
def mosquitto_tls(tmp_path: Path, fleet_ca: FleetCA, topic_prefix: str) -> Iterator[Callable[[], Mosquitto]]:
    """Start Mosquitto from `edgeward pki mosquitto-conf`'s configuration (mutual TLS, CRL, per-node ACL
    for `topic_prefix`) on a free loopback port; issue the certificates the ACL names first."""
    started: list[Mosquitto] = []

    def start() -> Mosquitto:
        workdir = tmp_path / f"mosquitto-tls-{len(started)}"
        workdir.mkdir()
        broker_files = fleet_ca.issue(parse_subject("broker", f"mosquitto-{len(started)}"))

        def conf(port: int) -> str:
            path = mosquitto_config(
                fleet_ca, workdir / "generated", broker=broker_files, port=port, prefix=topic_prefix
            )
            return path.read_text()

        broker = Mosquitto(workdir, conf_factory=conf)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(host=LOOPBACK, port=0) as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "embedded"])
def mqtt_url(request: pytest.FixtureRequest) -> BrokerURL:
    """The same test against Mosquitto and against the embedded broker."""
    if request.param == "mosquitto":
        return request.getfixturevalue("mosquitto")
    return request.getfixturevalue("embedded_broker").url


@pytest.fixture
def topic_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/edgeward/v1"


def _process_wide(thread: threading.Thread) -> bool:
    """grpc.aio's completion-queue poller lives as long as any gRPC object of the process does and
    is released by the garbage collector, not by the test; it is shared infrastructure, not a leak."""
    return thread.name.endswith("(_poll_wrapper)")


@pytest.fixture(scope="session", autouse=True)
def _model_inspection_server() -> None:
    """multiprocessing's fork server and resource tracker, which the isolated model inspection
    (accelerators/tflite_model.py, run on every push) starts once per process and keeps: started
    here, so the leak check counts them as the session's, not as the first pushing test's."""
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    inspect_tflite_isolated(model_path("industrial", "int8").read_bytes())
    _SESSION_PIDS.update(child.pid for child in me.children(recursive=True) if child.pid not in before)


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads, asyncio tasks (async tests) or child processes behind."""
    if request.node.get_closest_marker("allow_leaks") is not None:
        yield
        return
    me = psutil.Process()
    threads_before = set(threading.enumerate())
    children_before = {child.pid for child in me.children(recursive=True)}
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        # Set up after this fixture, hence torn down before it, inside the test's event loop.
        request.getfixturevalue("_task_leak_check")
    yield

    def leftovers() -> tuple[list[threading.Thread], list[psutil.Process]]:
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not _process_wide(t)
        ]
        children = [
            child
            for child in me.children(recursive=True)
            if child.pid not in children_before and child.pid not in _SESSION_PIDS
        ]
        return threads, children

    deadline = time.monotonic() + LEAK_GRACE_S
    threads, children = leftovers()
    while (threads or children) and time.monotonic() < deadline:
        time.sleep(0.05)
        threads, children = leftovers()
    if not threads and not children:
        return
    for child in children:  # do not let one leak spill into the next tests
        try:
            child.kill()
            child.wait(timeout=5)
        except psutil.Error:
            pass
    problems = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    problems += [f"child process {c.pid}" for c in children]
    pytest.fail("test left behind: " + ", ".join(problems), pytrace=False)


@pytest.fixture
async def _task_leak_check() -> AsyncIterator[None]:
    yield
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    deadline = loop.time() + LEAK_GRACE_S
    while True:
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not pending or loop.time() >= deadline:
            break
        await asyncio.sleep(0.05)
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        pytest.fail("test left pending asyncio tasks: " + ", ".join(map(repr, pending)), pytrace=False)

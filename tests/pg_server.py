"""A private PostgreSQL for the tests: Debian's server binaries, ``initdb`` + ``pg_ctl`` into a temp dir,
listening on a random loopback port only (never the machine's own PostgreSQL on 5432).

PostgreSQL refuses to run as root: as root, the cluster belongs to an unprivileged user (``nobody``)
and its directory lives outside pytest's root-only temp dirs. The server is tuned for tests (no fsync):
a crash of the server is not what these tests exercise; a crash of its clients is.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
SUPERUSER = "edgeward"
UNPRIVILEGED = "nobody"


def find_bindir() -> Path | None:
    """The newest installed server's bin dir (Debian keeps it off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    """One cluster, one superuser with a password (scram-sha-256 over TCP), databases made per test."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        # Not under pytest's temp dir: that one is private to root, and the server may not run as root.
        self.root = Path(tempfile.mkdtemp(prefix="edgeward-pg-"))
        self.datadir = self.root / "data"
        self.log = self.root / "server.log"
        self._user: pwd.struct_passwd | None = pwd.getpwnam(UNPRIVILEGED) if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"},
            **kwargs,
        )

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        done = self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=reject",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        # Imported here: bench/scale_out.py loads this file by path, and tests/processes.py after it.
        from processes import listen_port

        for attempt in range(3):
            self.port = listen_port()
            options = " ".join(
                [
                    f"-p {self.port}",
                    f"-h {LOOPBACK}",
                    "-k ''",  # no unix socket: TCP on loopback only
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c shared_buffers=64MB",
                ]
            )
            done = self._run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
            if done.returncode == 0:
                return
            if attempt == 2:
                raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{self.server_log()}")

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.datadir.exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{LOOPBACK}:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=LOOPBACK,
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

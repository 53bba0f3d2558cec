"""Model data keys at rest (issue #15, 3): a private state directory, data keys wrapped under a
key-encryption key kept outside the database, existing stores upgraded, rotation."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from security_support import Client, manifest

from attestation.artifacts import model_aad
from attestation.errors import KeyReleaseError
from attestation.keyrelease import new_data_key, open_sealed, seal
from edgeward.security.keywrap import DataKeys, FileKeyring, KeyWrapError, key_id_of
from orchestrator.server import Orchestrator
from orchestrator.store import ModelRecord, SealedArtifact, SqlStore


def loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:o}")
    return found


def stored_key(state_dir: Path, name: str, version: str = "1.0.0") -> bytes:
    """The model's data key as the database file holds it (what a copy of the file gives)."""
    db = sqlite3.connect(state_dir / "edgeward.db")
    try:
        row = db.execute(
            "SELECT data_key FROM model_keys WHERE name=? AND version=?", (name, version)
        ).fetchone()
    finally:
        db.close()
    return bytes(row[0])


async def test_a_running_orchestrator_keeps_its_state_private(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    team = connect("team", "ci", team="smart-home")
    await team.push("home-model")
    await team.apply(manifest("home-dep", "home-model"))
    state_dir = secure_orchestrator.config.state_dir
    # The test process runs with its usual umask (022): the modes must not depend on it.
    assert loose_modes(state_dir) == []
    for name in ("edgeward.db", "edgeward.db-wal", "security/audit.jsonl"):
        assert (state_dir / name).exists(), name


async def test_the_database_holds_no_usable_data_key(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    team = connect("team", "ci", team="smart-home")
    model = await team.push("home-model")
    state_dir = secure_orchestrator.config.state_dir
    store = secure_orchestrator.store
    sealed = await secure_orchestrator.db(store.get_sealed, "home-model", "1.0.0")
    blob = (state_dir / "artifacts" / sealed.sha256).read_bytes()
    aad = model_aad("home-model", "1.0.0", model.sha256)
    assert len(open_sealed(sealed.data_key, blob, aad)) == model.size  # the orchestrator can open it

    # What a local reader of the database gets: no key, nothing that opens the artifact.
    on_disk = b"".join(p.read_bytes() for p in state_dir.glob("edgeward.db*"))
    assert sealed.data_key not in on_disk
    row = stored_key(state_dir, "home-model")
    assert row != sealed.data_key and key_id_of(row) is not None
    with pytest.raises(KeyReleaseError):
        open_sealed(row[-32:], blob, aad)
    # The KEK lives in its own 0600 file, outside the database.
    kek_file = state_dir / "kek" / f"{key_id_of(row)}.key"
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    assert kek_file.read_bytes() not in on_disk


def _legacy_store(state_dir: Path) -> tuple[bytes, str]:
    """A state dir as the previous release left it: a raw data key in the database, files 0644."""
    store = SqlStore(state_dir)
    data_key = new_data_key()
    blob = seal(data_key, b"model bytes", b"aad")
    digest = hashlib.sha256(blob).hexdigest()
    store.put_model(
        ModelRecord("old-model", "1.0.0", "ab" * 32, 11, b"", 1),
        blob,
        SealedArtifact(digest, len(blob), data_key),
    )
    store.close()
    db = sqlite3.connect(state_dir / "edgeward.db")
    db.execute("UPDATE model_keys SET data_key=?", (data_key,))
    db.commit()
    db.close()
    shutil.rmtree(state_dir / "kek")  # that release had no KEK
    for path in [state_dir, *state_dir.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return data_key, digest


def test_an_existing_store_is_upgraded_raw_keys_wrapped_modes_tightened(tmp_path: Path):
    state_dir = tmp_path / "orch"
    data_key, _ = _legacy_store(state_dir)
    assert stored_key(state_dir, "old-model") == data_key
    store = SqlStore(state_dir)
    try:
        assert store.get_sealed("old-model", "1.0.0").data_key == data_key
    finally:
        store.close()
    row = stored_key(state_dir, "old-model")
    assert row != data_key and key_id_of(row) is not None
    assert loose_modes(state_dir) == []


def test_rotating_the_kek_rewraps_every_data_key(tmp_path: Path):
    state_dir = tmp_path / "orch"
    data_key, _ = _legacy_store(state_dir)
    SqlStore(state_dir).close()  # wrapped under the first KEK
    first = key_id_of(stored_key(state_dir, "old-model"))
    assert (state_dir / "kek" / f"{first}.key").exists()

    def keys(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "edgeward", "keys", *args, "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = keys("rotate", "--retire")
    second = key_id_of(stored_key(state_dir, "old-model"))
    assert second != first
    assert f"active KEK {second}; 1 data key(s) re-wrapped; retired {first}" in out
    assert f"{second} (active): wraps 1 data key(s)" in keys("status")
    assert not (state_dir / "kek" / f"{first}.key").exists()
    store = SqlStore(state_dir)
    try:
        assert store.get_sealed("old-model", "1.0.0").data_key == data_key
    finally:
        store.close()
    # The retired KEK is gone: nothing can open a copy of the old database with the current keys.
    with pytest.raises(KeyWrapError):
        DataKeys(FileKeyring.open(state_dir / "kek")).provider.get(first or "")


def test_processes_opening_a_new_kek_dir_together_agree_on_one_kek(tmp_path: Path):
    """Replicas that share a key directory may start together: exactly one first KEK is created,
    and every process ends up with it as the active one."""
    shared = tmp_path / "kek"
    code = (
        "import sys; from edgeward.security.keywrap import FileKeyring;"
        "print(FileKeyring.open(sys.argv[1]).active().key_id)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(shared)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert FileKeyring(shared).ids() == [outs[0]]
    assert not [p for p in shared.iterdir() if p.name.endswith(".tmp")]

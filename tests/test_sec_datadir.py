"""The data directory is its owner's alone, whatever was there before the node came.

Defects seen: a directory that existed before ``init`` stayed 0755 and the SQLite and
WAL files were 0644, so another user read stored values out of the WAL; ``init`` wrote
``config.toml`` through a symlink another user had planted. The attacks run through the
real ``eidetica-node`` binary; the reader is a real second user (``nobody``, so these
tests need root, as CI has) in a directory every user can traverse.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dag import Instance, KeyFormatError, StorageError
from dag.files import open_private, private_directory, read_private, write_new_private
from dag.keys import SigningKey, load_or_create_key_file
from scripts.cli_node import NodeProcess, cli

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
CAT = shutil.which("cat") or "/bin/cat"
SECRET = "s3cret-value-only-the-owner-may-read"


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory under /tmp that every user can traverse (pytest's tmp_path is 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="eidetica-sec-", dir="/tmp"))
    os.chmod(parent, 0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _modes(data: Path) -> dict[str, int]:
    return {child.name: _mode(child) for child in data.iterdir() if not child.is_socket()}


def _as_nobody_read(path: Path) -> subprocess.CompletedProcess[str]:
    """Try to read ``path`` as another user (with cat: nobody may not run this venv's python)."""
    return subprocess.run(
        [CAT, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )


# ---- through the real binary -------------------------------------------------------------


def test_init_makes_an_existing_open_directory_owner_only(open_parent: Path) -> None:
    data = open_parent / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    result = cli("init", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert _mode(data) == 0o700  # it used to stay 0755
    assert _modes(data) == {"LOCK": 0o600, "device.key": 0o600, "eidetica.sqlite3": 0o600, "config.toml": 0o600}


@ROOT_ONLY
@pytest.mark.slow
def test_another_user_cannot_read_values_out_of_the_wal(open_parent: Path) -> None:
    """A node on a directory that was 0755 with 0644 files (an older node's): all made owner-only."""
    data = open_parent / "data"
    assert cli("init", "--data-dir", str(data)).returncode == 0
    node = NodeProcess.start(data, "--no-p2p")
    try:
        node.ok("db", "create", "notes")
        node.ok("db", "set", "notes", "title", SECRET)
    finally:
        node.stop()
    # What an older node left: an open directory and world-readable database files.
    os.chmod(data, 0o755)
    for name in ("eidetica.sqlite3", "eidetica.sqlite3-wal", "eidetica.sqlite3-shm"):
        if (data / name).exists():
            os.chmod(data / name, 0o644)

    node = NodeProcess.start(data, "--no-p2p")
    try:
        node.ok("db", "set", "notes", "title", SECRET + "-2")  # the WAL holds it now
        wal = data / "eidetica.sqlite3-wal"
        assert wal.exists()
        assert _mode(data) == 0o700
        for name in ("eidetica.sqlite3", "eidetica.sqlite3-wal", "eidetica.sqlite3-shm", "device.key", "LOCK"):
            assert _mode(data / name) == 0o600, name
        for target in (wal, data / "eidetica.sqlite3", data / "device.key"):
            attempt = _as_nobody_read(target)
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt.stdout[:200]
            assert SECRET not in attempt.stdout
    finally:
        node.stop()


def test_init_refuses_to_write_config_through_a_planted_symlink(open_parent: Path) -> None:
    data = open_parent / "data"
    data.mkdir(mode=0o700)
    target = open_parent / "victim.toml"  # where the planted link points: must never be created
    os.symlink(target, data / "config.toml")
    result = cli("init", "--data-dir", str(data))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "symlink" in result.stderr and "config.toml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()  # it used to be written through the link


def test_a_symlinked_data_directory_is_refused(open_parent: Path) -> None:
    real = open_parent / "real"
    real.mkdir(mode=0o700)
    link = open_parent / "data"
    os.symlink(real, link)
    result = cli("init", "--data-dir", str(link))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "is a symlink" in result.stderr
    assert list(real.iterdir()) == []  # nothing was created through it


@ROOT_ONLY
def test_a_directory_of_another_user_is_refused(open_parent: Path) -> None:
    data = open_parent / "data"
    data.mkdir(mode=0o777)
    os.chown(data, NOBODY, NOBODY)
    result = cli("init", "--data-dir", str(data))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "belongs to another user" in result.stderr
    assert list(data.iterdir()) == []


# ---- the pieces --------------------------------------------------------------------------


def test_instance_open_makes_existing_files_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "n"
    Instance.open(data).close()
    os.chmod(data, 0o755)
    for child in data.iterdir():
        os.chmod(child, 0o644 if child.name != "device.key" else 0o600)
    Instance.open(data).close()
    assert _mode(data) == 0o700
    assert all(mode == 0o600 for mode in _modes(data).values()), _modes(data)


@pytest.mark.parametrize("name", ["LOCK", "eidetica.sqlite3", "eidetica.sqlite3-wal", "device.key"])
def test_a_symlink_in_the_data_directory_is_refused(tmp_path: Path, name: str) -> None:
    data = tmp_path / "n"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    if name == "device.key":  # a valid key the planter controls: it must not become our identity
        elsewhere.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
        os.chmod(elsewhere, 0o600)
    os.symlink(elsewhere, data / name)
    with pytest.raises(StorageError, match=rf"{name} is a symlink; refusing to follow it"):
        Instance.open(data)
    if name != "device.key":
        assert not elsewhere.exists()


def test_device_key_is_never_written_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    os.symlink(target, tmp_path / "device.key")  # dangling: "missing" to exists(), but planted
    with pytest.raises(StorageError, match="is a symlink"):
        load_or_create_key_file(tmp_path / "device.key")
    assert not target.exists()
    key = load_or_create_key_file(tmp_path / "fresh.key")
    assert _mode(tmp_path / "fresh.key") == 0o600
    assert load_or_create_key_file(tmp_path / "fresh.key").pubkey == key.pubkey
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_an_exposed_device_key_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    load_or_create_key_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFormatError, match=r"accessible by others \(mode 640\)"):
        load_or_create_key_file(path)


def test_write_new_private_keeps_an_existing_file_and_refuses_links(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert write_new_private(path, b"one")
    assert not write_new_private(path, b"two")
    assert path.read_bytes() == b"one" and _mode(path) == 0o600
    os.symlink(tmp_path / "nowhere", tmp_path / "link.toml")
    with pytest.raises(StorageError, match="is a symlink"):
        write_new_private(tmp_path / "link.toml", b"x")
    assert not (tmp_path / "nowhere").exists()


def test_private_directory_refuses_a_file_and_fixes_a_mode(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a directory"):
        private_directory(tmp_path / "file")
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    private_directory(tmp_path / "open")
    assert _mode(tmp_path / "open") == 0o700
    private_directory(tmp_path / "new" / "deeper")
    assert _mode(tmp_path / "new" / "deeper") == 0o700


@ROOT_ONLY
def test_files_of_another_user_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.write_bytes(base64_key())
    os.chmod(path, 0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(StorageError, match="belongs to another user"):
        open_private(path)
    with pytest.raises(StorageError, match="belongs to another user"):
        read_private(path)


def base64_key() -> bytes:
    import base64

    return base64.b64encode(SigningKey.generate().seed) + b"\n"


def test_run_refuses_a_symlinked_data_directory_in_one_line(open_parent: Path) -> None:
    real = open_parent / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, open_parent / "data")
    result = cli("run", "--data-dir", str(open_parent / "data"), "--no-p2p", "--http-bind", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr == (
        f"eidetica-node: error: data directory {open_parent / 'data'} is a symlink; "
        "refusing to follow it (remove it, or use the real path)\n"
    )
    assert list(real.iterdir()) == []

"""The data directory: device key, lock, reopening; the package's public names (the CLI: test_cli.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import dag
from dag import DataDirLockedError, Instance, KeyFormatError, NotFoundError


def test_device_key_is_created_owner_only_and_kept(tmp_path: Path) -> None:
    with Instance.open(tmp_path / "n") as first:
        device = first.device_id
        db = first.create_database(name="keep")
        with db.transaction() as txn:
            txn.doc("d").set("x", 1)
    key_file = tmp_path / "n" / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "n").stat().st_mode) == 0o700
    with Instance.open(tmp_path / "n") as again:
        assert again.device_id == device
        [reopened] = again.databases()
        assert reopened.name == "keep" and reopened.doc("d").get("x") == 1
        assert reopened.tips() == db.tips()


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    Instance.open(tmp_path / "n").close()
    os.chmod(tmp_path / "n" / "device.key", 0o644)
    with pytest.raises(KeyFormatError, match=r"accessible by others \(mode 644\); run: chmod 600"):
        Instance.open(tmp_path / "n")


def test_data_dir_is_locked_while_open(tmp_path: Path) -> None:
    with Instance.open(tmp_path / "n"):
        with pytest.raises(DataDirLockedError, match=r"is in use by another process$"):
            Instance.open(tmp_path / "n")
        code = "import sys; from dag import Instance; Instance.open(sys.argv[1])"
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "n")], capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another process" in other.stderr
    Instance.open(tmp_path / "n").close()


def test_unknown_database(instance: Instance) -> None:
    with pytest.raises(NotFoundError, match=r"^no database bafyr4i"):
        instance.open_database("bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4")
    assert not instance.has_database("bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4")


def test_public_names_are_exported_once() -> None:
    assert len(dag.__all__) == len(set(dag.__all__))
    for name in dag.__all__:
        assert getattr(dag, name) is not None
    public = {name for name in vars(dag) if not name.startswith("_") and name[0].isupper()}
    assert public <= set(dag.__all__)

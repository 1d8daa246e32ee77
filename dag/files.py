"""Owner-only files and directories that no other user can redirect.

A data directory holds the device key and every stored value, so it and every file the
node puts in it are for the owner alone: the directory 0700, the files 0600, whatever
was there before. Nothing here follows a symlink: another user who could plant one (in a
directory that was once open to them) must not make the node write its key or its
config through it, or read its database from somewhere else. Each refusal is a
:class:`~dag.errors.StorageError` with one line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import DagError, StorageError

DIR_MODE = 0o700
FILE_MODE = 0o600
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _refuse_symlink(path: Path, what: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise StorageError(f"{what} {path} is a symlink; refusing to follow it (remove it, or use the real path)")


def private_directory(path: Path) -> None:
    """Make ``path`` a directory of ours, mode 0700: created, or an existing one chmodded.

    Refused: a symlink, something that is not a directory, a directory of another user.
    The checks and the chmod go through one descriptor opened without following links,
    so the directory cannot be swapped between the check and the chmod.
    """
    try:
        os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another opener may have made it meanwhile
            os.mkdir(path, DIR_MODE)
    _refuse_symlink(path, "data directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except NotADirectoryError:
        raise StorageError(f"data directory {path} is not a directory") from None
    except OSError as exc:
        raise StorageError(f"cannot use data directory {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise StorageError(
                f"data directory {path} belongs to another user (uid {info.st_uid}); use a directory of your own"
            )
        if stat.S_IMODE(info.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int = os.O_RDWR, *, what: str = "file") -> int:
    """A descriptor for ``path`` (created if missing), owner-only: mode 0600 and ours.

    An existing file is chmodded to 0600; a symlink or another user's file is refused.
    """
    _refuse_symlink(path, what)
    try:
        fd = os.open(path, flags | os.O_CREAT | _NOFOLLOW, FILE_MODE)
    except OSError as exc:
        raise StorageError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        _make_private(fd, path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_private(fd: int, path: Path, what: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{what} {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise StorageError(f"{what} {path} belongs to another user (uid {info.st_uid}); refusing to use it")
    if stat.S_IMODE(info.st_mode) != FILE_MODE:
        os.fchmod(fd, FILE_MODE)


def make_private_if_present(path: Path, *, what: str = "file") -> None:
    """chmod an existing ``path`` to 0600 without following links (nothing if it is absent)."""
    _refuse_symlink(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        _make_private(fd, path, what)
    finally:
        os.close(fd)


def write_new_private(path: Path, data: bytes, *, what: str = "file") -> bool:
    """Write ``data`` to ``path``, 0600, only if nothing is there; True if this call wrote it.

    The file appears whole or not at all: written and synced under a temporary name
    (created exclusively, never through a link), then hard-linked into place, which
    fails rather than replace or follow anything already at ``path``. A symlink at
    ``path`` is refused; an existing file is left as it is (False).
    """
    _refuse_symlink(path, what)
    if os.path.lexists(path):
        return False
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    except OSError as exc:
        raise StorageError(f"cannot write {what} {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path, follow_symlinks=False)
        except FileExistsError:
            _refuse_symlink(path, what)
            return False  # another writer won the race: its file stands
        except OSError as exc:
            raise StorageError(f"cannot write {what} {path}: {exc.strerror}") from None
        sync_directory(path.parent)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def read_private(path: Path, *, what: str = "file", exposed: type[DagError] = StorageError) -> bytes:
    """The bytes of an owner-only file: refused if it is a symlink, another user's, or open to others.

    Unlike :func:`open_private` it does not fix the mode: a secret that others could
    already read is reported (as ssh does, raising ``exposed``), not silently kept in use.
    """
    _refuse_symlink(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        raise StorageError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{what} {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise StorageError(f"{what} {path} belongs to another user (uid {info.st_uid}); refusing to use it")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise exposed(f"{what} {path} is accessible by others (mode {mode:o}); run: chmod 600 {path}")
        return handle.read()


def sync_directory(directory: Path) -> None:
    """fsync a directory, so a name just linked into it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "make_private_if_present",
    "open_private",
    "private_directory",
    "read_private",
    "sync_directory",
    "write_new_private",
]

"""An instance: one node's storage and device key, and the databases it holds."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import libipld

from .auth import ACTIVE, Permission
from .crdt.doc import DocDelta, doc_from_value, encode_doc_delta
from .database import Database
from .entry import ROOT_STORE, SETTINGS_STORE, build_entry
from .errors import DataDirLockedError, NotFoundError, StorageError
from .files import make_private_if_present, open_private, private_directory
from .ids import cid_from_text, cid_to_text, join_cids
from .ingest import Ingest, IngestLimits, PutResult
from .keys import SigningKey, load_or_create_key_file
from .prepared import PreparedEntries
from .repair import purge_stale_unverified, repair_corrupt
from .replica import MAIN, Replica
from .storage.base import EntryMeta, EntryRecord, Status, Storage, WriteBatch
from .storage.memory import MemoryStorage
from .storage.sqlite import SqliteStorage
from .verifier import SignatureProcesses
from .writer import Writer

log = logging.getLogger(__name__)

DB_FILE = "eidetica.sqlite3"
KEY_FILE = "device.key"
LOCK_FILE = "LOCK"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

WriteCallback = Callable[[Database, list[str], list[str], bool], None]
"""``callback(db, tips_before, tips_after, local)``, called after every write that moved tips."""


def _private_opener(path: str, flags: int) -> int:
    """``open(..., opener=)`` for the lock file: created 0600, never through a symlink."""
    return open_private(Path(path), flags, what="lock file")


def _private_database_files(db_file: Path) -> None:
    """The SQLite file and its -wal/-shm files owner-only before SQLite opens them.

    SQLite creates -wal and -shm with the main file's mode, so the main file is created
    0600 here first; files left by an older node (0644) are chmodded.
    """
    os.close(open_private(db_file, what="database file"))
    for suffix in SQLITE_SIDE_FILES:
        make_private_if_present(db_file.with_name(db_file.name + suffix), what="database file")


@dataclass(frozen=True)
class CallbackHandle:
    """Returned by :meth:`Instance.on_write`; ``remove()`` unregisters the callback."""

    _instance: Instance
    _key: int

    def remove(self) -> None:
        self._instance._callbacks.pop(self._key, None)


class Instance:
    """The entry point of the database core.

    ``Instance.open(path)`` keeps everything in a data directory (SQLite, the device key)
    and holds an exclusive lock on it, so that no second process writes behind its back.
    ``Instance.in_memory()`` is the same with nothing on disk.
    """

    def __init__(
        self,
        storage: Storage,
        device_key: SigningKey,
        *,
        lock: IO[Any] | None = None,
        limits: IngestLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limits = limits or IngestLimits()
        self._clock = clock
        _check_storage(storage, self._limits, clock())  # before any cache over it exists
        self._replica = Replica(storage)
        self._writer = Writer(self._replica, self._notify)
        self._device_key = device_key
        self._lock = lock
        self._callbacks: dict[int, tuple[bytes | None, WriteCallback]] = {}
        self._next_callback = 0
        self._pool: ThreadPoolExecutor | None = None
        self._processes: SignatureProcesses | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    # ---- opening and closing -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        limits: IngestLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Instance:
        """Open (or create) the data directory at ``path``."""
        directory = Path(path)
        try:
            # Owner-only, whatever was there before: the directory 0700, every file 0600,
            # no symlink followed (see dag.files).
            private_directory(directory)
            lock = open(directory / LOCK_FILE, "a+", opener=_private_opener)  # noqa: SIM115 - held for the instance's life
        except OSError as exc:
            raise StorageError(f"cannot use data directory {directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise DataDirLockedError(f"data directory {directory} is in use by another process") from None
        storage: SqliteStorage | None = None
        try:
            key = load_or_create_key_file(directory / KEY_FILE)
            _private_database_files(directory / DB_FILE)
            storage = SqliteStorage(directory / DB_FILE, synchronous=synchronous)
            return cls(storage, key, lock=lock, limits=limits, clock=clock)
        except BaseException:
            if storage is not None:
                storage.close()
            lock.close()
            raise

    @classmethod
    def in_memory(cls, device_key: SigningKey | None = None) -> Instance:
        return cls(MemoryStorage(), device_key or SigningKey.generate())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            if self._processes is not None:
                self._processes.close()
        # Store states need no saving: their checkpoints advance with every write.
        try:
            self._replica.storage.close()
        finally:
            if self._lock is not None:
                self._lock.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- identity -----------------------------------------------------------------------

    @property
    def device_key(self) -> SigningKey:
        return self._device_key

    @property
    def device_id(self) -> str:
        """The device's public key in text form; it names this node."""
        return self._device_key.pubkey

    @property
    def limits(self) -> IngestLimits:
        """How much each database keeps of entries that are not Verified yet."""
        return self._limits

    @limits.setter
    def limits(self, limits: IngestLimits) -> None:
        self._limits = limits  # read by each put: the next one keeps to the new limits

    @property
    def storage(self) -> Storage:
        return self._replica.storage

    def get_value(self, key: str) -> bytes | None:
        """Instance-level metadata (for example, which database holds sync state)."""
        return self._replica.storage.get_value(key)

    def set_value(self, key: str, value: bytes) -> None:
        self._replica.storage.set_value(key, value)

    # ---- databases ----------------------------------------------------------------------

    def create_database(
        self,
        *,
        name: str | None = None,
        key: SigningKey | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Database:
        """A new database whose creator (``key``, the device key by default) is Admin(0)."""
        signer = key or self._device_key
        values = dict(settings or {})
        if name is not None:
            values["name"] = name
        delta: DocDelta = doc_from_value(values, atomic=False)
        delta.fields["auth"] = doc_from_value(
            {"keys": {signer.pubkey: {"name": "creator", "permissions": str(Permission.admin(0)), "status": ACTIVE}}},
            atomic=False,
        )
        data = bytes(libipld.encode_dag_cbor(encode_doc_delta(delta)))
        entry = build_entry(
            signer=signer,
            root=None,
            parents=[],
            height=0,
            settings_tips=[],
            stores=[(ROOT_STORE, [], None), (SETTINGS_STORE, [], data)],
            entropy=int.from_bytes(os.urandom(8), "big"),
        )
        cid = entry.cid
        batch = WriteBatch(
            entries=[EntryRecord(cid, EntryMeta(cid, 0, Status.VERIFIED, b"", join_cids([cid])), entry.raw)],
            tips_added=[(cid, MAIN, cid), (cid, ROOT_STORE, cid), (cid, SETTINGS_STORE, cid)],
            trees_added=[cid],
        )
        with self._writer:
            self._writer.write(batch, [entry], local=True, trees=(cid,))
        return Database(self._writer, cid, signer)

    def open_database(self, database_id: str | bytes, *, key: SigningKey | None = None) -> Database:
        """A database this instance holds; raises :class:`NotFoundError` otherwise."""
        cid = cid_from_text(database_id) if isinstance(database_id, str) else database_id
        meta = self._replica.meta_of(cid)
        if meta is None or meta.tree != cid or meta.status is not Status.VERIFIED:
            raise NotFoundError(f"no database {cid_to_text(cid)} here")
        return Database(self._writer, cid, key or self._device_key)

    def has_database(self, database_id: str | bytes) -> bool:
        try:
            self.open_database(database_id)
        except NotFoundError:
            return False
        return True

    def databases(self) -> list[Database]:
        return [Database(self._writer, cid, self._device_key) for cid in self._replica.storage.trees()]

    # ---- entries from elsewhere ---------------------------------------------------------

    def use_signature_processes(self, count: int | None = None) -> int:
        """Check received signatures in ``count`` worker processes (default: one per core).

        For a process that is a node: it starts processes, so it is the process owner's
        choice, made at start-up; see :mod:`dag.verifier` for why and what was measured.
        Returns how many workers run. Without this, signatures are checked on threads.
        """
        with self._pool_lock:
            if self._processes is None:
                self._processes = SignatureProcesses(count)
            return self._processes.count

    @property
    def signature_processes(self) -> SignatureProcesses | None:
        """The worker processes started by :meth:`use_signature_processes`, if any."""
        return self._processes

    def _verify_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                threads = max(1, min(os.cpu_count() or 1, 8))
                if self._processes is not None:
                    threads = self._processes.count  # more feeders only fight the writer for the GIL
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eidetica-verify")
            return self._pool

    def prepare_remote_entries(self, entries: Sequence[bytes]) -> PreparedEntries:
        """Start decoding and signature-checking received entries on the verifying threads.

        Returns at once, without touching storage; pass the result to
        :meth:`put_remote_entries`. A receiver that prepares frame k+1 as it arrives, while
        frame k is being put, keeps every core busy.
        """
        pool = self._verify_pool()
        return PreparedEntries(entries, pool, self._processes)

    def put_remote_entries(
        self, entries: Iterable[bytes] | PreparedEntries, *, database_id: bytes | None = None
    ) -> PutResult:
        """Store entries received from a peer, then verify them locally.

        Every entry is decoded and checked first; one malformed entry raises an
        :class:`~dag.errors.EntryError` and nothing is stored. Valid entries are verified
        against the settings they pin: Verified (stored), Failed (not stored: the ID goes
        on storage's ban list, so the same bytes are refused again at once), or Unverified
        while something they depend on is missing (stored, within the database's
        ``IngestLimits``; past them, listed in ``PutResult.refused`` and not stored). With ``database_id`` (a
        binary ID), an entry of any other database is refused like a malformed one.
        ``entries`` may come from :meth:`prepare_remote_entries`.
        """
        pool = self._verify_pool()
        if not isinstance(entries, PreparedEntries):
            entries = PreparedEntries(list(entries), pool, self._processes)
        with self._writer as replica:
            if replica.storage.corrupt() and repair_corrupt(replica.storage, self._clock()):
                # Bytes found corrupt during this run: what was verified on them waits for
                # them again (as at open), so this batch can bring the genuine entries.
                replica.reset_caches()
            return Ingest(self._writer, pool, limits=self._limits, now=self._clock()).run(entries, database_id)

    def unverified_usage(self, database_id: bytes) -> tuple[int, int]:
        """How many Unverified entries of a database are stored, and their bytes."""
        with self._replica.lock:
            return self._replica.storage.unverified_usage(database_id)

    # ---- write callbacks ----------------------------------------------------------------

    def on_write(self, callback: WriteCallback, database_id: str | None = None) -> CallbackHandle:
        """Call ``callback(db, tips_before, tips_after, local)`` after writes (to one database or all)."""
        tree = cid_from_text(database_id) if database_id is not None else None
        key = self._next_callback
        self._next_callback += 1
        self._callbacks[key] = (tree, callback)
        return CallbackHandle(self, key)

    def _notify(self, tree: bytes, before: frozenset[bytes], after: frozenset[bytes], local: bool) -> None:
        """Called by the writer once a write moved ``tree``'s tips and the lock is released."""
        if before == after or not self._callbacks:
            return
        db = Database(self._writer, tree, self._device_key)
        tips_before = [cid_to_text(c) for c in sorted(before)]
        tips_after = [cid_to_text(c) for c in sorted(after)]
        for wanted, callback in list(self._callbacks.values()):
            if wanted is not None and wanted != tree:
                continue
            try:
                callback(db, tips_before, tips_after, local)
            except Exception:  # a callback can never undo or break a commit
                log.exception("write callback %r failed", callback)

    # ---- the node's own bookkeeping (not a DAG: see Storage.local_items) -----------------

    def local_items(self, space: str) -> dict[str, bytes]:
        """Every ``key -> value`` kept in ``space`` of the local table."""
        with self._replica.lock:  # one SQLite connection, shared with the writer
            return self._replica.storage.local_items(space)

    def local_write(self, space: str, upserts: Mapping[str, bytes], deletes: Collection[str] = ()) -> None:
        """Replace ``upserts`` and drop ``deletes`` in ``space``, in one transaction (not fsynced)."""
        with self._replica.lock:
            self._replica.storage.local_write(space, upserts, deletes)


def _check_storage(storage: Storage, limits: IngestLimits, now: float) -> None:
    """What opening does to storage before use: hash recent entries, repair, give up stale waits.

    Entries found corrupt (by this check, or by a read in an earlier run) are removed and
    what depends on them waits for them again; Unverified entries that waited past the
    TTL are removed (a peer that holds them sends them again).
    """
    started = time.perf_counter()
    checked = storage.check_ids()
    repaired = repair_corrupt(storage, now)
    purged = purge_stale_unverified(storage, limits, now)
    if checked or repaired or purged:
        log.info(
            "storage checked at open: %d entries hashed, %d corrupt removed, %d stale unverified removed (%.0f ms)",
            checked,
            repaired,
            purged,
            1000 * (time.perf_counter() - started),
        )

"""Every error the database core raises, in one tree.

    DagError                      base of everything raised by ``dag``
    ├── EntryError                an entry's bytes are not a valid entry (nothing is stored)
    │   ├── GarbageEntryError     not DAG-CBOR, or not the entry shape at all
    │   ├── NonCanonicalError     valid CBOR, but not the canonical bytes of its own value
    │   ├── UnsupportedVersionError
    │   ├── UnsortedParentsError  parents (main or store) not strictly ascending
    │   ├── BadCidError           a link that is not a CIDv1 dag-cbor BLAKE3-256
    │   ├── RootRuleError         a root with parents, a non-root without, misplaced `_root`
    │   └── OversizeError         past a size or count limit
    ├── KeyFormatError            a public key or signature text that is not canonical
    ├── PermissionDeniedError     the signer may not make this write (nothing is written)
    ├── StoreTypeError            a store opened as a type other than the one it has
    ├── InvalidValueError         a value or path a store cannot hold
    ├── NotFoundError             an unknown database or entry
    ├── TransactionError          a transaction used after it ended
    └── StorageError              the storage could not be opened or written
        └── DataDirLockedError    another process holds the data directory

Each class has a ``code`` (a short stable name, sent as the code of a sync ``Error`` answer,
so a peer learns which refusal it got without parsing text) and carries the fields a caller
needs (``pubkey`` on a permission refusal; ``store``, ``expected`` and ``actual`` on a store
type mismatch) so that a message can be produced at the edge without parsing strings.
"""

from __future__ import annotations


class DagError(Exception):
    """Base class of every error raised by the ``dag`` package."""

    code = "dag"


class EntryError(DagError):
    """The bytes given as an entry cannot be accepted; nothing was stored."""

    code = "bad-entry"


class GarbageEntryError(EntryError):
    """Not DAG-CBOR, or not shaped like an entry."""

    code = "bad-entry-garbage"


class NonCanonicalError(EntryError):
    """Decodes, but re-encoding gives other bytes: the sender's bytes are not canonical."""

    code = "bad-entry-noncanonical"


class UnsupportedVersionError(EntryError):
    """The entry declares a version this node does not speak."""

    code = "bad-entry-version"


class UnsortedParentsError(EntryError):
    """A parent list is not strictly ascending by binary ID."""

    code = "bad-entry-parents"


class BadCidError(EntryError):
    """A link is not a CIDv1 dag-cbor BLAKE3-256."""

    code = "bad-entry-cid"


class RootRuleError(EntryError):
    """Root entries have no parents and hold `_root`; every other entry has parents."""

    code = "bad-entry-root"


class OversizeError(EntryError):
    """An entry or one of its fields is over a limit."""

    code = "bad-entry-oversize"


class KeyFormatError(DagError):
    """A key or signature in text form is malformed or not canonical."""

    code = "bad-key"


class PermissionDeniedError(DagError):
    """The signing key lacks the permission this write needs."""

    code = "permission-denied"

    def __init__(self, message: str, *, pubkey: str | None = None) -> None:
        super().__init__(message)
        self.pubkey = pubkey


class StoreTypeError(DagError):
    """A store was opened as a type other than the one recorded in `_index`."""

    code = "store-type"

    def __init__(self, store: str, expected: str, actual: str) -> None:
        super().__init__(f"store {store!r} is a {actual}, not a {expected}")
        self.store = store
        self.expected = expected
        self.actual = actual


class InvalidValueError(DagError):
    """A path or value a store cannot hold (empty path segment, NaN, bytes ...)."""

    code = "invalid-value"


class NotFoundError(DagError):
    """An unknown database or entry."""

    code = "not-found"


class TransactionError(DagError):
    """A transaction used after it committed or was abandoned."""

    code = "transaction"


class StorageError(DagError):
    """The storage could not be opened, read or written."""

    code = "storage"


class DataDirLockedError(StorageError):
    """Another process has the data directory open."""

    code = "storage-locked"

"""eidetica's database core: signed, content-addressed Merkle-DAG entries, CRDT stores,
auth and local verification, on SQLite or in memory. Synchronous, no networking."""

from .auth import AuthSettings, KeyGrant, Kind, Permission
from .database import Database
from .entry import Entry, decode_entry
from .errors import (
    BadCidError,
    DagError,
    DataDirLockedError,
    EntryError,
    GarbageEntryError,
    InvalidValueError,
    KeyFormatError,
    NonCanonicalError,
    NotFoundError,
    OversizeError,
    PermissionDeniedError,
    RootRuleError,
    StorageError,
    StoreTypeError,
    TransactionError,
    UnsortedParentsError,
    UnsupportedVersionError,
)
from .ids import cid_from_text, cid_to_text
from .ingest import PutResult
from .instance import CallbackHandle, Instance
from .keys import SigningKey
from .prepared import PreparedEntries
from .storage import MemoryStorage, SqliteStorage, Status
from .stores import Doc, Settings, Table
from .transaction import Transaction

__all__ = [
    "AuthSettings",
    "BadCidError",
    "CallbackHandle",
    "DagError",
    "DataDirLockedError",
    "Database",
    "Doc",
    "Entry",
    "EntryError",
    "GarbageEntryError",
    "Instance",
    "InvalidValueError",
    "KeyFormatError",
    "KeyGrant",
    "Kind",
    "MemoryStorage",
    "NonCanonicalError",
    "NotFoundError",
    "OversizeError",
    "Permission",
    "PermissionDeniedError",
    "PreparedEntries",
    "PutResult",
    "RootRuleError",
    "Settings",
    "SigningKey",
    "SqliteStorage",
    "Status",
    "StorageError",
    "StoreTypeError",
    "Table",
    "Transaction",
    "TransactionError",
    "UnsortedParentsError",
    "UnsupportedVersionError",
    "cid_from_text",
    "cid_to_text",
    "decode_entry",
]

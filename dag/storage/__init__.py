"""Storage backends: one small interface, SQLite (the embedded default) and in-memory.

The database core owns the meaning of what is stored (statuses, tips, waits); a backend
only keeps rows and applies each :class:`WriteBatch` atomically.
"""

from .base import EntryMeta, EntryRecord, Status, Storage, WriteBatch
from .memory import MemoryStorage
from .sqlite import SqliteStorage

__all__ = ["EntryMeta", "EntryRecord", "MemoryStorage", "SqliteStorage", "Status", "Storage", "WriteBatch"]

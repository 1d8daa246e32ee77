"""Typed views of stores: Doc and Table, read-only or bound to a transaction.

A view reads the store's state at a fixed set of tips; inside a transaction it also sees
the transaction's own writes (read-your-writes). Every value handed out is a copy, so a
caller can never change cached state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .auth import ACTIVE, REVOKED, AuthSettings, Permission
from .crdt.doc import (
    MISSING,
    TOMBSTONE,
    DocDelta,
    check_json,
    copy_value,
    delta_set,
    doc_from_value,
    lookup,
    resolve,
    split_path,
)
from .errors import InvalidValueError, TransactionError
from .keys import pubkey_from_text

DOCSTORE_TYPE = "docstore:v0"
TABLE_TYPE = "table:v0"

StateSource = Callable[[], dict[str, Any]]
RowSource = Callable[[str], Any]
"""One top-level value of the state (MISSING if absent), read without the whole state."""


class Doc:
    """A nested document store. Paths are dotted: ``doc.get("a.b")``."""

    def __init__(self, name: str, base: StateSource, delta: DocDelta | None, row: RowSource | None = None) -> None:
        self.name = name
        self._base = base
        self._delta = delta
        self._row = row if delta is None else None  # a transaction's view reads its own writes

    def _lookup(self, path: str) -> Any:
        parts = split_path(path)
        if self._row is not None:
            top = self._row(parts[0])
            return MISSING if top is MISSING else lookup({parts[0]: top}, MISSING, parts)
        return lookup(self._base(), MISSING if self._delta is None else self._delta, parts)

    def _writable(self) -> DocDelta:
        if self._delta is None:
            raise TransactionError(f"store {self.name!r} is read-only here; write inside db.transaction()")
        return self._delta

    def get(self, path: str, default: Any = None) -> Any:
        value = self._lookup(path)
        return default if value is MISSING else value

    def __getitem__(self, path: str) -> Any:
        value = self._lookup(path)
        if value is MISSING:
            raise KeyError(path)
        return value

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path, MISSING) is not MISSING

    def to_dict(self) -> dict[str, Any]:
        value = resolve(self._base(), MISSING if self._delta is None else self._delta)
        return value if isinstance(value, dict) else {}

    def keys(self) -> list[str]:
        return list(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def set(self, path: str, value: Any) -> None:
        """Write ``value`` at ``path``; a dict replaces what was there (use update to merge)."""
        node = doc_from_value(value, atomic=True) if isinstance(value, dict) else check_json(value, path)
        delta_set(self._writable(), split_path(path), node)

    def update(self, path: str, value: dict[str, Any]) -> None:
        """Merge the keys of ``value`` into the document at ``path``."""
        if not isinstance(value, dict):
            raise InvalidValueError("update takes a dict")
        delta = self._writable()
        for key, item in value.items():
            if not isinstance(key, str) or key == "" or "." in key:
                raise InvalidValueError(f"update keys are non-empty text without dots, got {key!r}")
            self.set(f"{path}.{key}", item)
        if not value:
            current = lookup(self._base(), delta, split_path(path))
            if not isinstance(current, dict):
                delta_set(delta, split_path(path), DocDelta(atomic=True))

    def delete(self, path: str) -> None:
        delta_set(self._writable(), split_path(path), TOMBSTONE)


class Table:
    """Rows of JSON objects keyed by generated UUIDs; the last write of a row wins."""

    def __init__(
        self, name: str, base: StateSource, delta: dict[str, Any] | None, row: RowSource | None = None
    ) -> None:
        self.name = name
        self._base = base
        self._delta = delta
        self._row = row if delta is None else None

    def _writable(self) -> dict[str, Any]:
        if self._delta is None:
            raise TransactionError(f"table {self.name!r} is read-only here; write inside db.transaction()")
        return self._delta

    def get(self, row_id: str) -> dict[str, Any] | None:
        if self._delta is not None and row_id in self._delta:
            row = self._delta[row_id]
            return None if row is TOMBSTONE else copy_value(row)
        if self._row is not None:
            found = self._row(row_id) if isinstance(row_id, str) else MISSING
            return None if found is MISSING else copy_value(found)
        row = self._base().get(row_id)
        return None if row is None else copy_value(row)

    def rows(self) -> dict[str, dict[str, Any]]:
        rows = {key: copy_value(row) for key, row in self._base().items()}
        for row_id, row in (self._delta or {}).items():
            if row is TOMBSTONE:
                rows.pop(row_id, None)
            else:
                rows[row_id] = copy_value(row)
        return rows

    def __len__(self) -> int:
        return len(self.rows())

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, str) and self.get(row_id) is not None

    def search(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, dict[str, Any]]:
        return {row_id: row for row_id, row in self.rows().items() if predicate(row)}

    def insert(self, row: dict[str, Any]) -> str:
        """Add a row under a new UUID and return the UUID."""
        row_id = str(uuid.uuid4())
        self.set(row_id, row)
        return row_id

    def set(self, row_id: str, row: dict[str, Any]) -> None:
        """Replace the row ``row_id`` (or create it under that ID)."""
        if not isinstance(row, dict):
            raise InvalidValueError("a row is a dict")
        if not isinstance(row_id, str) or row_id == "":
            raise InvalidValueError("a row ID is non-empty text")
        self._writable()[row_id] = check_json(row, f"row {row_id}", 2)  # in the table (depth 1)

    update = set

    def delete(self, row_id: str) -> None:
        self._writable()[row_id] = TOMBSTONE


class Settings(Doc):
    """The `_settings` document: the database's name and who may do what."""

    @property
    def database_name(self) -> str | None:
        name = self.get("name")
        return name if isinstance(name, str) else None

    def auth(self) -> AuthSettings:
        return AuthSettings.from_settings(self.to_dict())

    def set_database_name(self, name: str) -> None:
        self.set("name", name)

    def add_key(self, pubkey: str, permission: Permission, *, name: str | None = None) -> None:
        """Grant ``permission`` to ``pubkey`` (replacing any earlier grant)."""
        pubkey_from_text(pubkey)
        grant: dict[str, Any] = {"permissions": str(permission), "status": ACTIVE}
        if name is not None:
            grant["name"] = name
        self.set(f"auth.keys.{pubkey}", grant)

    set_key = add_key

    def revoke_key(self, pubkey: str) -> None:
        pubkey_from_text(pubkey)
        if self.get(f"auth.keys.{pubkey}") is None:
            raise InvalidValueError(f"key {pubkey} has no grant to revoke")
        self.set(f"auth.keys.{pubkey}.status", REVOKED)

    def set_global(self, permission: Permission | None) -> None:
        """Give every key ``permission`` (None removes the global grant)."""
        if permission is None:
            self.delete("auth.global")
        else:
            self.set("auth.global", {"permissions": str(permission), "status": ACTIVE})

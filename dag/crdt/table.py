"""Table: rows keyed by generated UUIDs; each row is a JSON object, last writer wins per row.

A delta maps row IDs to the whole new row, or to the empty byte string (a tombstone) to
delete it. State is a dict of row ID to row.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidValueError
from .doc import TOMBSTONE, decode_json


def apply_table_delta(state: dict[str, Any], delta: dict[str, Any]) -> None:
    for row_id, row in delta.items():
        if row is TOMBSTONE:
            state.pop(row_id, None)
        else:
            state[row_id] = row


def encode_table_delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {row_id: (b"" if row is TOMBSTONE else row) for row_id, row in delta.items()}


def decode_table_delta(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValueError("a table delta is a map")
    delta: dict[str, Any] = {}
    for row_id, row in value.items():
        if row == b"":
            delta[row_id] = TOMBSTONE
        elif isinstance(row, dict):
            delta[row_id] = decode_json(row, 2)  # a row sits in the table (depth 1): depth 2
        else:
            raise InvalidValueError(f"row {row_id!r} is not an object")
    return delta

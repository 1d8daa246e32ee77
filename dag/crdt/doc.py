"""Doc: a nested document whose deltas fold last-writer-wins.

State is plain Python: a dict whose values are null, bool, int, float, text, lists of
JSON values, or nested dicts (nested documents). A delta is a :class:`DocDelta`.

Merge rules, applied in the total order (height, ID) that every node shares:
* doc onto doc merges per key, recursively;
* a tombstone deletes the key;
* anything else (a value, a list, an atomic doc, a doc onto a non-doc) replaces.

Wire form of a delta (DAG-CBOR): a map per document; a tombstone is the empty byte
string (no value a user can store is bytes); an atomic document carries the reserved key
``""`` set to true (users cannot use the empty key: it is not addressable by a dotted
path). Maps inside lists are plain JSON objects, never documents.

Depth: a document is at most ``MAX_VALUE_DEPTH`` maps and lists deep, counted from the
document itself (a document holding ``{"a": [1]}`` is 3 deep: the document, the map, the
list). The same limit holds at every door: a write past it is refused with
:class:`InvalidValueError`, and a received delta past it does not decode (the entry
carrying it fails, and a fold skips it). Every node folds the same deltas, so the merged
state can never be deeper than one delta, and nothing that reads, merges, copies or prints
a value can run out of stack on what a peer sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidValueError

ATOMIC_KEY = ""
# 64 levels hold any document people write by hand or generate from JSON (JSON parsers
# commonly stop at 100-512), while the recursive merge, copy and JSON encoding stay far
# below Python's stack limit of 1,000 frames (each level costs 1-3 frames).
MAX_VALUE_DEPTH = 64


def _too_deep(where: str) -> InvalidValueError:
    return InvalidValueError(f"{where}: nested deeper than {MAX_VALUE_DEPTH} levels of maps and lists")


class _Tombstone:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TOMBSTONE"


TOMBSTONE: Any = _Tombstone()
MISSING: Any = object()


@dataclass(slots=True)
class DocDelta:
    """The writes to one document: per key a value, a tombstone or a nested delta."""

    fields: dict[str, Any] = field(default_factory=dict)
    atomic: bool = False


def split_path(path: str) -> list[str]:
    if not isinstance(path, str) or path == "":
        raise InvalidValueError("a path is non-empty text")
    parts = path.split(".")
    if any(part == "" for part in parts):
        raise InvalidValueError(f"path {path!r} has an empty segment")
    return parts


def check_json(value: Any, where: str = "value", depth: int = 1) -> Any:
    """A JSON value as stored (tuples become lists); raises on what cannot be stored.

    ``depth`` is how deep the value sits (1: directly in a document), so that a value
    past ``MAX_VALUE_DEPTH`` is refused before anything recursive touches it.
    """
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise InvalidValueError(f"{where}: integer {value} is out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValueError(f"{where}: {value} cannot be stored (NaN and infinity are not allowed)")
        return value if value != 0.0 else 0.0  # DAG-CBOR has no negative zero: store what reads back
    if isinstance(value, list | tuple | dict) and depth > MAX_VALUE_DEPTH:
        raise _too_deep(where)
    if isinstance(value, list | tuple):
        return [check_json(item, where, depth + 1) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidValueError(f"{where}: keys must be text, got {key!r}")
            out[key] = check_json(item, where, depth + 1)
        return out
    raise InvalidValueError(f"{where}: a {type(value).__name__} cannot be stored")


def doc_from_value(value: dict[str, Any], *, atomic: bool, depth: int = 1) -> DocDelta:
    """A dict written into a document becomes a nested document delta.

    ``depth`` is the depth of the new document (1: the document itself).
    """
    if depth > MAX_VALUE_DEPTH:
        raise _too_deep("value")
    delta = DocDelta(atomic=atomic)
    for key, item in value.items():
        if not isinstance(key, str) or key == ATOMIC_KEY:
            raise InvalidValueError(f"document keys are non-empty text, got {key!r}")
        if isinstance(item, dict):
            delta.fields[key] = doc_from_value(item, atomic=False, depth=depth + 1)
        else:
            delta.fields[key] = check_json(item, "value", depth + 1)
    return delta


def delta_depth(delta: DocDelta) -> int:
    """How deep ``delta`` reaches, counting the document itself as 1 (iterative: any depth)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(delta, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, DocDelta):
            stack.extend(
                (child, level + 1) for child in node.fields.values() if isinstance(child, DocDelta | list | dict)
            )
        elif isinstance(node, list):
            stack.extend((child, level + 1) for child in node if isinstance(child, list | dict))
        elif isinstance(node, dict):
            stack.extend((child, level + 1) for child in node.values() if isinstance(child, list | dict))
    return deepest


def delta_set(delta: DocDelta, parts: list[str], node: Any) -> None:
    """Record a write of ``node`` (value, delta or tombstone) at ``parts`` inside ``delta``."""
    current = delta
    for part in parts[:-1]:
        child = current.fields.get(part, MISSING)
        if not isinstance(child, DocDelta):
            # Writing below a deleted or non-document key in this transaction replaces it.
            child = DocDelta(atomic=child is not MISSING)
            current.fields[part] = child
        current = child
    current.fields[parts[-1]] = node


def resolve(base: Any, delta: Any) -> Any:
    """The value after applying ``delta`` (or MISSING) to ``base`` (or MISSING); copies."""
    if delta is MISSING:
        return copy_value(base)
    if delta is TOMBSTONE:
        return MISSING
    if isinstance(delta, DocDelta):
        result: dict[str, Any] = {}
        if not delta.atomic and isinstance(base, dict):
            result = {key: copy_value(value) for key, value in base.items()}
        for key, child in delta.fields.items():
            value = resolve(result.get(key, MISSING), child)
            if value is MISSING:
                result.pop(key, None)
            else:
                result[key] = value
        return result
    return copy_value(delta)


def lookup(base: Any, delta: Any, parts: list[str]) -> Any:
    """The value at ``parts`` of ``resolve(base, delta)`` without resolving the rest."""
    for part in parts:
        if delta is TOMBSTONE:
            return MISSING
        if isinstance(delta, DocDelta):
            base = MISSING if delta.atomic or not isinstance(base, dict) else base.get(part, MISSING)
            delta = delta.fields.get(part, MISSING)
        elif delta is not MISSING:
            return MISSING  # a scalar written over a document: nothing below it
        else:
            base = base.get(part, MISSING) if isinstance(base, dict) else MISSING
        if base is MISSING and delta is MISSING:
            return MISSING
    return resolve(base, delta)


def copy_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: copy_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_value(item) for item in value]
    return value


def apply_doc_delta(state: dict[str, Any], delta: DocDelta) -> None:
    """Fold ``delta`` into ``state``, which the caller owns.

    Nested documents the delta touches are copied before they change (path copying), so
    a nested dict that ``state`` shares with another state is never changed under it.
    """
    for key, node in delta.fields.items():
        if node is TOMBSTONE:
            state.pop(key, None)
        elif isinstance(node, DocDelta):
            current = state.get(key)
            current = {} if node.atomic or not isinstance(current, dict) else dict(current)
            state[key] = current
            apply_doc_delta(current, node)
        else:
            state[key] = node


def wire_too_deep(value: Any) -> bool:
    """Whether a delta in its decoded wire form (maps and lists) is past ``MAX_VALUE_DEPTH``.

    Iterative, so any depth a decoder returns is measured without recursion; what ingest
    runs on every received data delta, so it stops at the first level past the limit.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if level >= MAX_VALUE_DEPTH:
                    return True
                stack.append((child, level + 1))
    return False


def encode_doc_delta(delta: DocDelta) -> dict[str, Any]:
    """The wire form of ``delta``; raises :class:`InvalidValueError` past ``MAX_VALUE_DEPTH``.

    Writes at dotted paths build a delta one level per segment, so the depth is checked
    here, on the whole delta a transaction is about to commit.
    """
    if delta_depth(delta) > MAX_VALUE_DEPTH:
        raise _too_deep("value")
    return _encode_doc_delta(delta)


def _encode_doc_delta(delta: DocDelta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.atomic:
        out[ATOMIC_KEY] = True
    for key, node in delta.fields.items():
        if node is TOMBSTONE:
            out[key] = b""
        elif isinstance(node, DocDelta):
            out[key] = _encode_doc_delta(node)
        else:
            out[key] = node
    return out


def decode_json(value: Any, depth: int = 1) -> Any:
    """A JSON value from its decoded wire form, ``depth`` deep (1: directly in a document)."""
    if isinstance(value, list | dict) and depth > MAX_VALUE_DEPTH:
        raise _too_deep("received value")
    if isinstance(value, list):
        return [decode_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {key: decode_json(item, depth + 1) for key, item in value.items()}
    if isinstance(value, bytes):
        raise InvalidValueError("bytes inside a list")
    return value


def decode_doc_delta(value: Any, depth: int = 1) -> DocDelta:
    """Read a delta from its decoded wire form; raises :class:`InvalidValueError`.

    ``depth`` is the depth of this document (1: the store's document itself).
    """
    if not isinstance(value, dict):
        raise InvalidValueError("a document delta is a map")
    if depth > MAX_VALUE_DEPTH:
        raise _too_deep("received value")
    delta = DocDelta(atomic=value.get(ATOMIC_KEY) is True)
    for key, node in value.items():
        if key == ATOMIC_KEY:
            if node is not True:
                raise InvalidValueError("the atomic marker must be true")
            continue
        if isinstance(node, bytes):
            if node != b"":
                raise InvalidValueError(f"key {key!r} holds bytes")
            delta.fields[key] = TOMBSTONE
        elif isinstance(node, dict):
            delta.fields[key] = decode_doc_delta(node, depth + 1)
        else:
            delta.fields[key] = decode_json(node, depth + 1)
    return delta

"""How checkpointed store states are written down (see ``dag/checkpoints.py``).

A checkpoint row holds one top-level value of a store's state in msgpack (which keeps
the order of keys inside the value), after the first 16 bytes of its BLAKE3 hash: a
checkpoint is served as Verified data without replaying anything, so a row whose bytes
do not match (a flipped bit on disk) makes the whole checkpoint unusable and the store is
folded from its history again.

Rows sort by ``seq``: the fold position of the write that last inserted the key (the
key was absent before it), then the key's index inside that write. A fold puts a key
at the end of the state when it is inserted and leaves it where it is when it is
updated, so rows in seq order give exactly the dict the fold makes, whatever order the
entries arrived in. ``FORMAT`` is raised with any change to folding, to the CRDTs or to
this encoding; a checkpoint of another format is rebuilt.

Before checkpoints, whole states were saved at a clean close in the key-value table
under ``state/v1/...`` and ``state/v2/...``; those are not read any more and are deleted
when the store's first checkpoint is written.
"""

from __future__ import annotations

from typing import Any

import blake3
import msgpack

FORMAT = 3  # 3: rows and heads (1 and 2 were whole states in the key-value table)
_DIGEST = 16
_ORDER_CID_BYTES = 64  # IDs are left-padded to this: bytes compare like int.from_bytes(cid)


class DamagedCheckpoint(Exception):
    """A checkpoint row that does not read back (checksum or encoding)."""


def legacy_keys(tree: bytes, store: str, kind: str) -> list[str]:
    """Where the close-time states of formats 1 and 2 were kept."""
    return [f"state/v{version}/{tree.hex()}/{kind}/{store}" for version in (1, 2)]


def order_of(height: int, cid: bytes) -> bytes:
    """The fold position (store height, then ID as a number) as bytes that sort the same way."""
    return height.to_bytes(8, "big") + cid.rjust(_ORDER_CID_BYTES, b"\0")


def seq_of(order: bytes, index: int) -> bytes:
    """Where a key inserted by the write at ``order`` (its ``index``-th field) sorts."""
    return order + index.to_bytes(4, "big")


def encode_value(value: Any) -> bytes:
    raw: bytes = msgpack.packb(value, use_bin_type=True)
    return blake3.blake3(raw).digest(length=_DIGEST) + raw


def decode_value(data: bytes) -> Any:
    digest, raw = data[:_DIGEST], data[_DIGEST:]
    if blake3.blake3(raw).digest(length=_DIGEST) != digest:
        raise DamagedCheckpoint("checksum")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData) as exc:
        raise DamagedCheckpoint(str(exc)) from exc

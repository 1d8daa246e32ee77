"""Store states kept in storage's key-value table between runs (see ``dag.state``).

A state is a pure function of the store's tips and of how a fold works, so a saved one
stays true as long as the fold does not change: the key carries ``FORMAT``, to be raised
with any change to folding or to the CRDTs, and states saved under another are ignored.
A state is only used when all its tips are Verified here. It is kept in msgpack, which
keeps the order of keys (so rows and keys come back in the order the fold made them), and
a state that does not come back exactly as it went in is not saved at all.

A saved state is served as Verified data without replaying anything, so its bytes are
checked: they are stored after their BLAKE3 hash, and a state whose bytes do not match (a
flipped bit on disk, a partial write) is ignored and the store folded from its history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import blake3
import msgpack

from .ids import is_cid
from .storage.base import Storage

log = logging.getLogger(__name__)

FORMAT = 2  # raise with any change to how states are folded or saved (2: checksummed)
PREFIX = "state/"
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
_DIGEST_BYTES = 32  # BLAKE3-256 of the msgpack bytes, stored in front of them


class StorageSnapshots:
    def __init__(self, storage: Storage, verified: Callable[[bytes], bool]) -> None:
        self._storage = storage
        self._verified = verified

    @staticmethod
    def _key(tree: bytes, store: str, kind: str) -> str:
        return f"{PREFIX}v{FORMAT}/{tree.hex()}/{kind}/{store}"

    def load(self, tree: bytes, store: str, kind: str) -> tuple[frozenset[bytes], dict[str, Any]] | None:
        saved = self._storage.get_value(self._key(tree, store, kind))
        if saved is None:
            return None
        digest, raw = saved[:_DIGEST_BYTES], saved[_DIGEST_BYTES:]
        if blake3.blake3(raw).digest() != digest:
            log.warning("saved state of %s/%s is damaged (checksum); folding from the history", tree.hex(), store)
            return None
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            tips, state = value["tips"], value["state"]
        except (ValueError, KeyError, TypeError, RecursionError, msgpack.ExtraData):
            log.warning("saved state of %s/%s is unreadable; folding from the history", tree.hex(), store)
            return None
        if not isinstance(state, dict) or not isinstance(tips, list) or not all(is_cid(t) for t in tips):
            return None
        if not tips or not all(self._verified(t) for t in tips):
            return None
        return frozenset(tips), state

    def save(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], state: dict[str, Any]) -> None:
        if not tips or not all(self._verified(t) for t in tips):
            return  # only states over Verified entries are facts worth keeping
        try:
            raw = msgpack.packb({"tips": sorted(tips), "state": state}, use_bin_type=True)
            if len(raw) > MAX_SNAPSHOT_BYTES or msgpack.unpackb(raw, raw=False)["state"] != state:
                return
        except (ValueError, TypeError, OverflowError, RecursionError):
            return
        self._storage.set_value(self._key(tree, store, kind), blake3.blake3(raw).digest() + raw)

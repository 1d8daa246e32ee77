"""Store states kept in storage's key-value table between runs (see ``dag.state``).

A state is a pure function of the store's tips, so a saved one stays true forever; it is
only used when all its tips are Verified here, and a value that does not come back from
DAG-CBOR exactly as it went in is not saved at all (the fold computes it as before).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import libipld

from .ids import is_cid
from .storage.base import Storage

log = logging.getLogger(__name__)

PREFIX = "state/"
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024


class StorageSnapshots:
    def __init__(self, storage: Storage, verified: Callable[[bytes], bool]) -> None:
        self._storage = storage
        self._verified = verified

    @staticmethod
    def _key(tree: bytes, store: str, kind: str) -> str:
        return f"{PREFIX}{tree.hex()}/{kind}/{store}"

    def load(self, tree: bytes, store: str, kind: str) -> tuple[frozenset[bytes], dict[str, Any]] | None:
        raw = self._storage.get_value(self._key(tree, store, kind))
        if raw is None:
            return None
        try:
            value = libipld.decode_dag_cbor(raw)
            tips, state = value["tips"], value["state"]
        except (ValueError, KeyError, TypeError):
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
            raw = bytes(libipld.encode_dag_cbor({"tips": sorted(tips), "state": state}))
            if len(raw) > MAX_SNAPSHOT_BYTES or libipld.decode_dag_cbor(raw)["state"] != state:
                return
        except (ValueError, TypeError, OverflowError):
            return
        self._storage.set_value(self._key(tree, store, kind), raw)

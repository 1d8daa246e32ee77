"""The rules a received entry must pass once everything it depends on is Verified.

Every answer is computed from the entry's bytes and the Verified entries it names (no
peer can assert a status); see the invariants in ``dag/ingest.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import libipld

from .auth import AuthSettings, check_write
from .crdt.doc import MAX_VALUE_DEPTH, DocDelta, apply_doc_delta, decode_doc_delta, wire_too_deep
from .entry import INDEX_STORE, ROOT_STORE, SETTINGS_STORE, Entry
from .errors import InvalidValueError, PermissionDeniedError
from .ids import cid_to_text, split_cids
from .keys import pubkey_to_text
from .replica import Replica
from .storage.base import EntryMeta

_RESERVED_NAMES = frozenset({SETTINGS_STORE, INDEX_STORE, ROOT_STORE})  # the "_" stores an entry may write


def _data_too_deep(data: bytes) -> bool:
    """A data delta past the depth limit (shorter ones cannot be: a level costs a byte)."""
    try:
        value = libipld.decode_dag_cbor(data)
    except RecursionError:
        return True
    except ValueError:
        return False  # unreadable data writes nothing: every fold skips it the same way
    return isinstance(value, dict | list) and wire_too_deep(value)


class EntryChecks:
    """The checks of one ingest batch, with its memos: the entries of a batch mostly share
    a settings view and a writer, so those answers are looked up once per batch."""

    def __init__(
        self,
        replica: Replica,
        load: Callable[[bytes], Entry | None],
        signatures: dict[bytes, bool],
        views: dict[bytes, bytes],
    ) -> None:
        self.replica = replica
        self._load = load  # an entry of the batch or a stored one
        self.signatures = signatures  # checked ahead (PreparedEntries), by binary ID
        self.views = views  # settings views of the entries the batch verified so far
        self._pins: dict[bytes, tuple[bytes, ...]] = {}
        self._may_write: dict[tuple[bytes, tuple[bytes, ...], bytes], str | None] = {}

    def refusal(self, entry: Entry, metas: dict[bytes, EntryMeta]) -> str | None:
        """Why ``entry`` fails, or None when it verifies.

        All its dependencies are Verified; ``metas`` holds their metadata.
        """
        valid = self.signatures.get(entry.cid)
        if not (entry.signature_valid() if valid is None else valid):
            return "signature does not verify"
        for node in entry.stores:
            if node.height_override is not None and node.height_override > entry.height:
                return f"store {node.name!r} height {node.height_override} is above the entry's height {entry.height}"
        stores: dict[str, DocDelta | None] = {}
        try:
            for node in entry.stores:
                name = node.name
                if name[0] == "_":
                    if name not in _RESERVED_NAMES:
                        return f"writes reserved store {name!r}"
                    if name != ROOT_STORE and node.data is not None:
                        stores[name] = decode_doc_delta(libipld.decode_dag_cbor(node.data))
                        continue
                elif node.data is not None and len(node.data) > MAX_VALUE_DEPTH and _data_too_deep(node.data):
                    return f"store {name!r}: value nested deeper than {MAX_VALUE_DEPTH} levels of maps and lists"
                stores[name] = None
        except (ValueError, InvalidValueError, RecursionError) as exc:
            return f"unreadable settings delta: {exc}"
        if entry.is_root:
            return self._check_root(entry, stores)
        tree = entry.tree
        for parent in entry.parents:
            if metas[parent].tree != tree:
                return f"parent {cid_to_text(parent)} belongs to another database"
        expected_height = 1 + max(metas[p].height for p in entry.parents)
        if entry.height != expected_height:
            return f"height is {entry.height}, parents give {expected_height}"
        pin = self._expected_pin(entry.parents, metas)
        if entry.settings_tips != pin:
            return "settings pin is not the settings tips of its parents"
        for node in entry.stores:
            own_height = entry.height if node.height_override is None else node.height_override
            for parent in node.parents:
                parent_entry = self._load(parent)
                if parent_entry is None or parent_entry.tree != tree or parent_entry.store(node.name) is None:
                    return f"store parent {cid_to_text(parent)} is not in store {node.name!r}"
                if parent_entry.store_height(node.name) >= own_height:
                    return f"store {node.name!r} height does not increase"
            if node.name == SETTINGS_STORE and node.parents != pin:
                return "settings parents are not the settings tips of its parents"
        if SETTINGS_STORE in stores:
            return self._write_refusal(tree, pin, entry.pubkey, stores)
        # Without a settings change the answer depends only on the settings and the key.
        key = (tree, pin, entry.pubkey)
        if key not in self._may_write:
            self._may_write[key] = self._write_refusal(tree, pin, entry.pubkey, stores)
        return self._may_write[key]

    def _write_refusal(
        self, tree: bytes, pin: tuple[bytes, ...], pubkey: bytes, stores: dict[str, DocDelta | None]
    ) -> str | None:
        at = frozenset(pin)
        try:
            settings = self.replica.settings_state(tree, at)
            check_write(settings, pubkey_to_text(pubkey), stores, self.replica.auth_at_held(tree, at))
        except PermissionDeniedError as exc:
            return str(exc)
        return None

    def _expected_pin(self, parents: tuple[bytes, ...], metas: dict[bytes, EntryMeta]) -> tuple[bytes, ...]:
        """The `_settings` tips over ``parents``' closure (``Replica.expected_pin``).

        With one parent that is its own settings view, which is already sorted and has no
        entry below another: the common case is a dictionary lookup.
        """
        if len(parents) != 1:
            return self.replica.expected_pin_held(parents, self.views)
        parent = parents[0]
        view = self.views.get(parent)
        if view is None:
            view = metas[parent].settings_view
        pin = self._pins.get(view)
        if pin is None:
            pin = self._pins[view] = tuple(split_cids(view))
        return pin

    def _check_root(self, entry: Entry, stores: dict[str, DocDelta | None]) -> str | None:
        settings = stores.get(SETTINGS_STORE)
        if settings is None:
            return None
        state: dict[str, object] = {}
        apply_doc_delta(state, settings)
        auth = AuthSettings.from_settings(state)
        held = auth.permission_of(entry.pubkey_text)
        if auth.configured and (held is None or not held.is_admin):
            return "root entry is not signed by an admin of the settings it creates"
        return None

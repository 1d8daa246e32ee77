"""Transactions: one entry per transaction, touching any number of stores atomically."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import libipld

from .auth import AuthSettings, check_write
from .authority import may_write
from .crdt.doc import DocDelta, apply_doc_delta, encode_doc_delta
from .crdt.table import encode_table_delta
from .entry import INDEX_STORE, SETTINGS_STORE, Entry, build_entry
from .errors import InvalidValueError, StoreTypeError, TransactionError
from .ids import join_cids
from .keys import SigningKey
from .replica import MAIN, Replica
from .state import DOC, TABLE
from .storage.base import EntryMeta, EntryRecord, Status, WriteBatch
from .stores import DOCSTORE_TYPE, TABLE_TYPE, Doc, Settings, Table
from .writer import Writer


def check_store_name(name: str) -> None:
    if not isinstance(name, str) or name == "" or len(name) > 255:
        raise InvalidValueError(f"a store name is 1-255 characters of text, got {name!r}")
    if name.startswith("_"):
        raise InvalidValueError(f"store names starting with '_' are reserved: {name!r}")


class Transaction:
    """Collects writes; ``commit()`` turns them into one signed entry.

    Reads see the store as it was when the transaction first opened it, plus the
    transaction's own writes. On commit the entry's parents are the database's tips at
    that moment, so two transactions open at once simply make two concurrent entries.
    """

    def __init__(self, writer: Writer, tree: bytes, signer: SigningKey) -> None:
        self._writer = writer
        self._tree = tree
        self._signer = signer
        self._docs: dict[str, DocDelta] = {}
        self._tables: dict[str, dict[str, Any]] = {}
        self._snapshots: dict[str, frozenset[bytes]] = {}
        self._done = False
        self.entry: Entry | None = None

    # ---- store access ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._done:
            raise TransactionError("this transaction has ended; open a new one with db.transaction()")

    def _snapshot(self, store: str) -> frozenset[bytes]:
        tips = self._snapshots.get(store)
        if tips is None:
            # The effective tips: writes by keys revoked since do not show (dag/authority.py).
            tips = self._writer.replica.effective_tips(self._tree, store)
            self._snapshots[store] = tips
        return tips

    def _base(self, store: str, kind: str) -> Any:
        replica, tree = self._writer.replica, self._tree
        return lambda: replica.states.state(tree, store, kind, self._snapshot(store))

    def _registered_type(self, name: str) -> str | None:
        entry = self._base(INDEX_STORE, DOC)().get(name)
        kind = entry.get("type") if isinstance(entry, dict) else None
        return kind if isinstance(kind, str) else None

    def _open(self, name: str, store_type: str) -> None:
        self._check_open()
        check_store_name(name)
        actual = self._registered_type(name)
        if actual is None and name in (self._tables if store_type == DOCSTORE_TYPE else self._docs):
            actual = TABLE_TYPE if store_type == DOCSTORE_TYPE else DOCSTORE_TYPE
        if actual is not None and actual != store_type:
            raise StoreTypeError(name, store_type, actual)

    def doc(self, name: str) -> Doc:
        self._open(name, DOCSTORE_TYPE)
        delta = self._docs.setdefault(name, DocDelta())
        return Doc(name, self._base(name, DOC), delta)

    def table(self, name: str) -> Table:
        self._open(name, TABLE_TYPE)
        delta = self._tables.setdefault(name, {})
        return Table(name, self._base(name, TABLE), delta)

    def settings(self) -> Settings:
        self._check_open()
        delta = self._docs.setdefault(SETTINGS_STORE, DocDelta())
        return Settings(SETTINGS_STORE, self._base(SETTINGS_STORE, DOC), delta)

    # ---- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Drop every write; nothing is stored."""
        self._done = True

    def commit(self) -> str | None:
        """Write the entry and return its ID (None when nothing was written)."""
        self._check_open()
        self._done = True
        deltas: dict[str, bytes] = {}
        decoded: dict[str, Any] = {}
        index = DocDelta()
        for name, delta in self._docs.items():
            if delta.fields or delta.atomic:
                deltas[name] = bytes(libipld.encode_dag_cbor(encode_doc_delta(delta)))
                decoded[name] = delta
                if name != SETTINGS_STORE and self._registered_type(name) is None:
                    index.fields[name] = DocDelta({"type": DOCSTORE_TYPE}, atomic=True)
        for name, rows in self._tables.items():
            if rows:
                deltas[name] = bytes(libipld.encode_dag_cbor(encode_table_delta(rows)))
                decoded[name] = None
                if self._registered_type(name) is None:
                    index.fields[name] = DocDelta({"type": TABLE_TYPE}, atomic=True)
        if index.fields:
            deltas[INDEX_STORE] = bytes(libipld.encode_dag_cbor(encode_doc_delta(index)))
            decoded[INDEX_STORE] = index
        if not deltas:
            return None
        self.entry = commit_entry(self._writer, self._tree, self._signer, deltas, decoded)
        return self.entry.id


def commit_entry(
    writer: Writer, tree: bytes, signer: SigningKey, deltas: dict[str, bytes], decoded: dict[str, Any]
) -> Entry:
    """Build, check, sign and store one local entry; nothing is written if any step fails.

    The tips it builds on and the write are one hold of the lock, so two commits racing
    on threads never both take the same parents as "the" tips."""
    with writer as replica:
        parents = sorted(replica.effective_tips(tree))  # never on a write whose key was revoked since
        pin = replica.expected_pin(parents)
        at = frozenset(pin)
        check_write(replica.settings_state(tree, at), signer.pubkey, decoded, replica.auth_at(tree, at))
        settings_delta = decoded.get(SETTINGS_STORE)
        regained = _regained_auth(replica, tree, at, settings_delta) if isinstance(settings_delta, DocDelta) else None
        if regained is not None:
            parents = sorted({*parents, *_regained_tips(replica, tree, MAIN, parents, regained)})
            if (new_pin := replica.expected_pin(parents)) != pin:
                pin, at = new_pin, frozenset(new_pin)
                check_write(replica.settings_state(tree, at), signer.pubkey, decoded, replica.auth_at(tree, at))
        metas = replica.meta(parents)
        height = 1 + max(metas[p].height for p in parents)
        stores: list[tuple[str, list[bytes], bytes | None]] = []
        for name in sorted(deltas):
            if name == SETTINGS_STORE:
                store_parents = list(pin)
            else:
                store_parents = sorted(replica.effective_tips(tree, name))
                if regained is not None:
                    store_parents = sorted(
                        {*store_parents, *_regained_tips(replica, tree, name, store_parents, regained)}
                    )
            stores.append((name, store_parents, deltas[name]))
        entry = build_entry(
            signer=signer, root=tree, parents=parents, height=height, settings_tips=list(pin), stores=stores
        )
        batch = WriteBatch()
        view = join_cids(replica.settings_view(entry))
        batch.entries.append(
            EntryRecord(entry.cid, EntryMeta(tree, height, Status.VERIFIED, join_cids(parents), view), entry.raw)
        )
        batch.tips_removed.extend((tree, MAIN, p) for p in parents)
        batch.tips_added.append((tree, MAIN, entry.cid))
        for name, store_parents, _data in stores:
            batch.tips_removed.extend((tree, name, p) for p in store_parents)
            batch.tips_added.append((tree, name, entry.cid))
        writer.write(batch, [entry], local=True, trees=(tree,))
    return entry


def _regained_auth(replica: Replica, tree: bytes, pin: frozenset[bytes], delta: DocDelta) -> AuthSettings:
    """The rights in force once this settings change is made (its delta over the settings at ``pin``)."""
    state = dict(replica.settings_state(tree, pin))  # top level copied; the fold copies nested paths
    apply_doc_delta(state, delta)
    return AuthSettings.from_settings(state)


def _regained_tips(
    replica: Replica, tree: bytes, store: str, effective: list[bytes], auth: AuthSettings
) -> list[bytes]:
    """Verified tips of ``store`` left out of the effective tips whose writes count again under ``auth``.

    A settings change that gives a key back its right makes that key's left-out tips effective
    again: built on here, they become this entry's ancestors, so that after the commit it is
    the only effective tip (as after any local commit). Tips that still do not count stay out.
    """
    left_out = replica.tips(tree, store) - set(effective)
    return [
        cid for cid in sorted(left_out) if (entry := replica.entry(cid)) is not None and may_write(entry, store, auth)
    ]

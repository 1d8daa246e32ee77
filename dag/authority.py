"""Whose writes still count: the settings and tips that reads and new entries use.

Verification (``dag/ingest.py``) judges an entry against the settings its pin names, and
the pin is computed from the entry's parents. That makes a status a function of the
entry's own past, the same on every node, but the writer chooses the parents: a key
revoked at entry R can still sign an entry E on parents from before R, and E verifies
(nothing in E's past revokes anyone). No node can tell whether E was signed before or
after R: there is no trusted clock, only the DAG. So E stays Verified (every node agrees),
is stored and synced, and the decision moves to where the revocation *is* known: the
settings and tips that a read or a new entry starts from. The rule, stated in full in
``docs/dag.md``:

1. **Settings cut.** In the `_settings` state at tips P, a settings entry signed by a key
   that is not an active admin of that state counts only if it is an ancestor of (or is)
   the last change to that key's grant, the one that took the right away. A revoked or
   demoted admin's settings written concurrently with its revocation are left out of the
   fold, and so is anything those settings granted (a "puppet" admin it added has no grant
   once they are left out; its own settings entries are cut on the next pass). Passes
   repeat until nothing more is cut.
2. **Effective tips.** A read, and the parents of a new local entry, use the Verified
   tips less every tip whose signer may not make that tip's write under the current
   (cut) settings; a removed tip's parents take its place, unless another tip already
   covers them. An entry nobody with rights built on does not show; one that a writer
   with rights built on (before it heard of the revocation) is history and stays.

The same function of the same entries gives the same answer on every node, so replicas
that hold the same entries read the same state. Both steps cost nothing while no settings
entry in the closure is signed by a key that lacks admin rights, which is the common case:
the signers of each settings entry's closure are memoised.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import libipld

from .auth import AuthSettings
from .crdt.doc import MISSING, DocDelta, apply_doc_delta, decode_doc_delta
from .entry import SETTINGS_STORE, Entry
from .errors import InvalidValueError
from .ids import split_cids
from .storage.base import EntryMeta

Load = Callable[[bytes], Entry | None]
Meta = Callable[[bytes], EntryMeta | None]
Fold = Callable[[bytes, frozenset[bytes]], dict[str, Any]]

_SIGNERS_MEMO = 16_384  # settings entries whose closure's signers are remembered (a few sets, shared)
_CUT_MEMO = 256  # effective settings remembered per (tree, settings tips)
_TIPS_MEMO = 256  # effective tips remembered per (tree, store, tips, settings tips)
_BEFORE_MEMO = 4_096  # "is this entry older than that revocation" answers remembered
# Looking for a removed tip's parent below the other tips visits at most this many
# entries; past it the parent is kept as a tip (redundant, never wrong: a fold over a
# closure is the same with or without an ancestor in the tip set).
_COVER_BUDGET = 1_024


class _Memo(OrderedDict[Any, Any]):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


def _order(entry: Entry) -> tuple[int, int]:
    return (entry.store_height(SETTINGS_STORE), int.from_bytes(entry.cid, "big"))


def _settings_parents(entry: Entry) -> tuple[bytes, ...]:
    node = entry.store(SETTINGS_STORE)
    return node.parents if node is not None else ()


def _delta(entry: Entry) -> DocDelta | None:
    node = entry.store(SETTINGS_STORE)
    if node is None or node.data is None:
        return None
    try:
        return decode_doc_delta(libipld.decode_dag_cbor(node.data))
    except (ValueError, InvalidValueError, RecursionError):
        return None  # the fold skips it the same way (``state.decode_delta``)


def _touches_grant(delta: DocDelta | None, pubkey: str, by_global: bool) -> bool:
    """Whether ``delta`` writes ``pubkey``'s grant (or, for a key that had rights only
    through the global grant, the global grant), directly or by replacing a section."""
    if delta is None:
        return False
    auth = delta.fields.get("auth", MISSING)
    if auth is MISSING:
        return False
    if not isinstance(auth, DocDelta) or auth.atomic:
        return True
    keys = auth.fields.get("keys", MISSING)
    if keys is not MISSING and (not isinstance(keys, DocDelta) or keys.atomic or pubkey in keys.fields):
        return True
    return by_global and "global" in auth.fields


def _is_active_admin(auth: AuthSettings, pubkey: str) -> bool:
    held = auth.permission_of(pubkey)
    return held is not None and held.is_admin


def may_write(entry: Entry, store: str, auth: AuthSettings) -> bool:
    """Whether ``entry``'s signer may, under ``auth``, make ``entry``'s write to ``store``
    (``""``: the whole entry). A root entry always may: it is the database."""
    if entry.is_root or not auth.configured:
        return True
    held = auth.permission_of(entry.pubkey_text)
    if held is None or not held.can_write:
        return False
    writes_settings = store == SETTINGS_STORE or (store == "" and entry.store(SETTINGS_STORE) is not None)
    return held.is_admin or not writes_settings


class Authority:
    """Effective settings and effective tips over one replica's entries (see the module doc).

    ``load`` returns a stored entry and ``meta`` its metadata (the caller holds the
    replica's lock), ``fold`` the plain `_settings` state at a set of settings tips (the
    replica's state cache).
    """

    def __init__(self, load: Load, meta: Meta, fold: Fold) -> None:
        self._load = load
        self._meta = meta
        self._fold = fold
        self._before: _Memo = _Memo(_BEFORE_MEMO)
        self._changes: _Memo = _Memo(_CUT_MEMO)
        self._signers: _Memo = _Memo(_SIGNERS_MEMO)
        self._settings: _Memo = _Memo(_CUT_MEMO)
        self._tips: _Memo = _Memo(_TIPS_MEMO)

    def clear(self) -> None:
        self._settings.clear()
        self._tips.clear()
        self._changes.clear()
        self._signers.clear()
        self._before.clear()

    # ---- rule 1: the settings cut --------------------------------------------------

    def settings(self, tree: bytes, tips: frozenset[bytes]) -> dict[str, Any]:
        """The `_settings` state at ``tips`` with the settings cut applied (read-only)."""
        key = (tree, tips)
        found = self._settings.get(key)
        if found is not None:
            self._settings.move_to_end(key)
            return found  # type: ignore[no-any-return]
        plain = self._fold(tree, tips)
        auth = AuthSettings.from_settings(plain)
        suspects = {k for k in self._signers_of(tips) if not _is_active_admin(auth, k)}
        state = plain if not suspects else self._cut_state(tips)
        self._settings.put(key, state)
        return state

    def _signers_of(self, tips: Iterable[bytes]) -> frozenset[str]:
        """Every key that signed a non-root settings entry in the closure of ``tips``."""
        result: set[str] = set()
        for tip in tips:
            result |= self._signers_of_entry(tip)
        return frozenset(result)

    def _signers_of_entry(self, cid: bytes) -> frozenset[str]:
        memo = self._signers
        if cid in memo:
            return memo[cid]  # type: ignore[no-any-return]
        # Post-order over the settings sub-DAG, iteratively (histories can be long), into a
        # dict of this walk's own: the bounded memo may drop an early answer before a later
        # child needs it, and an answer over an entry not held is never remembered.
        done: dict[bytes, frozenset[str]] = {}
        complete = True

        def known(key: bytes) -> frozenset[str] | None:
            return done.get(key) if key in done else memo.get(key)

        stack: list[tuple[bytes, bool]] = [(cid, False)]
        while stack:
            current, expanded = stack.pop()
            if known(current) is not None:
                continue
            entry = self._load(current)
            if entry is None:
                complete = False  # not held (a batch being decided, or corrupt): answer, do not keep
                done[current] = frozenset()
                continue
            parents = _settings_parents(entry)
            if not expanded:
                stack.append((current, True))
                stack.extend((p, False) for p in parents if known(p) is None)
                continue
            own: frozenset[str] = frozenset() if entry.is_root else frozenset([entry.pubkey_text])
            below = [known(p) or frozenset() for p in parents]
            if len(below) == 1 and own <= below[0]:
                done[current] = below[0]  # share the set: most entries add no new signer
            else:
                done[current] = frozenset(own.union(*below))
        if complete:
            for key, value in done.items():
                memo.put(key, value)
        found: frozenset[str] | None = known(cid)
        return found if found is not None else frozenset()

    def _closure(self, tips: Iterable[bytes]) -> dict[bytes, Entry]:
        found: dict[bytes, Entry] = {}
        stack = list(tips)
        while stack:
            cid = stack.pop()
            if cid in found:
                continue
            entry = self._load(cid)
            if entry is None or entry.store(SETTINGS_STORE) is None:
                continue
            found[cid] = entry
            stack.extend(p for p in _settings_parents(entry) if p not in found)
        return found

    def _cut_state(self, tips: frozenset[bytes]) -> dict[str, Any]:
        ordered = sorted(self._closure(tips).values(), key=_order)
        deltas = {entry.cid: _delta(entry) for entry in ordered}
        return _fold_skipping(ordered, deltas, self._cut_of(ordered, deltas))

    def _cut_of(self, ordered: list[Entry], deltas: dict[bytes, DocDelta | None]) -> set[bytes]:
        cut: set[bytes] = set()
        # Each pass can only add to the cut, and each added entry has a signer: at most
        # one pass per signer, plus the one that finds nothing new.
        for _ in range(len({e.pubkey_text for e in ordered}) + 1):
            auth = AuthSettings.from_settings(_fold_skipping(ordered, deltas, cut))
            more = self._to_cut(ordered, deltas, cut, auth)
            if not more:
                break
            cut |= more
        return cut

    def _to_cut(
        self, ordered: list[Entry], deltas: dict[bytes, DocDelta | None], cut: set[bytes], auth: AuthSettings
    ) -> set[bytes]:
        more: set[bytes] = set()
        for pubkey in sorted({e.pubkey_text for e in ordered if not e.is_root and e.cid not in cut}):
            if _is_active_admin(auth, pubkey):
                continue
            last_change = _last_change(ordered, deltas, cut, pubkey, pubkey not in auth.keys)
            before = self._closure([last_change.cid]) if last_change is not None else {}
            for entry in ordered:
                if (
                    entry.pubkey_text == pubkey
                    and not entry.is_root
                    and entry.cid not in cut
                    and entry.cid not in before
                ):
                    more.add(entry.cid)
        return more

    # ---- rule 2: effective tips -----------------------------------------------------

    def tips(
        self,
        tree: bytes,
        store: str,
        tips: frozenset[bytes],
        settings_tips: frozenset[bytes],
        auth_of: Callable[[], AuthSettings],
    ) -> frozenset[bytes]:
        """``tips`` of ``store`` (``""``: the main DAG) less the writes that no longer count.

        ``auth_of`` gives the parsed ``settings(tree, settings_tips)`` (the caller caches
        it). Answers are memoised per (tips, settings tips): a read costs a lookup.
        """
        key = (tree, store, tips, settings_tips)
        found = self._tips.get(key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        result = self._effective(tree, store, tips, settings_tips, auth_of())
        self._tips.put(key, result)
        return result

    def _effective(
        self, tree: bytes, store: str, tips: frozenset[bytes], settings_tips: frozenset[bytes], auth: AuthSettings
    ) -> frozenset[bytes]:
        if not auth.configured:
            return tips
        # Sorted, highest first, everywhere below: which redundant ancestor stays a tip must
        # not depend on a set's iteration order (it differs between processes).
        bad = [cid for cid in self._descending(tips, store) if not self._counts(cid, store, auth, tree, settings_tips)]
        if not bad:
            return tips
        kept = set(tips) - set(bad)
        visited = set(tips)
        frontier = bad
        while frontier:
            candidates = []
            for cid in frontier:
                entry = self._load(cid)
                for parent in self._parents(entry, store) if entry is not None else ():
                    if parent not in visited:
                        visited.add(parent)
                        candidates.append(parent)
            frontier = []
            for cid in self._descending(candidates, store):
                if self._covered(cid, kept, store):
                    continue
                if self._counts(cid, store, auth, tree, settings_tips):
                    kept.add(cid)
                else:
                    frontier.append(cid)
        return frozenset(kept)

    def _descending(self, cids: Iterable[bytes], store: str) -> list[bytes]:
        def key(cid: bytes) -> tuple[int, bytes]:
            entry = self._load(cid)
            return (self._height(entry, store) if entry is not None else -1, cid)

        return sorted(cids, key=key, reverse=True)

    def _counts(self, cid: bytes, store: str, auth: AuthSettings, tree: bytes, settings_tips: frozenset[bytes]) -> bool:
        """Whether the write ``cid`` made to ``store`` counts: its signer may make it now, or
        it is older than (a main-DAG ancestor of) the change that took the right away."""
        entry = self._load(cid)
        if entry is None or may_write(entry, store, auth):
            return True
        change = self.last_grant_change(tree, settings_tips, entry.pubkey_text, auth)
        return change is not None and self._is_before(cid, change)

    def last_grant_change(
        self, tree: bytes, settings_tips: frozenset[bytes], pubkey: str, auth: AuthSettings
    ) -> bytes | None:
        """The last settings entry (fold order, cut applied) that wrote ``pubkey``'s grant."""
        key = (tree, settings_tips, pubkey)
        if key in self._changes:
            return self._changes[key]  # type: ignore[no-any-return]
        ordered = sorted(self._closure(settings_tips).values(), key=_order)
        deltas = {entry.cid: _delta(entry) for entry in ordered}
        cut = self._cut_of(ordered, deltas)
        change = _last_change(ordered, deltas, cut, pubkey, pubkey not in auth.keys)
        found = change.cid if change is not None else None
        self._changes.put(key, found)
        return found

    def _is_before(self, cid: bytes, later: bytes) -> bool:
        """Whether ``cid`` is a main-DAG ancestor of ``later`` (a walk down to ``cid``'s height)."""
        key = (cid, later)
        if key in self._before:
            return self._before[key]  # type: ignore[no-any-return]
        answer = self._reaches(later, cid)
        if answer is None:
            return False  # an entry not held (a batch being decided): answer, do not keep
        self._before.put(key, answer)
        return answer

    def _reaches(self, start: bytes, target: bytes) -> bool | None:
        """Whether ``target`` is reachable from ``start``; None when either is not held."""
        goal = self._meta(target)
        first = self._meta(start)
        if goal is None or first is None:
            return None
        heap: list[tuple[int, bytes]] = [(-first.height, start)]
        seen = {start}
        while heap:
            negative, cid = heapq.heappop(heap)
            if cid == target:
                return True
            if -negative <= goal.height:
                continue
            meta = self._meta(cid)
            for parent in split_cids(meta.parents) if meta is not None else ():
                if parent not in seen:
                    seen.add(parent)
                    parent_meta = self._meta(parent)
                    if parent_meta is not None and parent_meta.height >= goal.height:
                        heapq.heappush(heap, (-parent_meta.height, parent))
        return False

    @staticmethod
    def _parents(entry: Entry, store: str) -> tuple[bytes, ...]:
        if store == "":
            return entry.parents
        node = entry.store(store)
        return node.parents if node is not None else ()

    def _height(self, entry: Entry, store: str) -> int:
        return entry.height if store == "" else entry.store_height(store)

    def _covered(self, cid: bytes, kept: set[bytes], store: str) -> bool:
        """Whether ``cid`` is an ancestor of a kept tip (a bounded walk; see _COVER_BUDGET)."""
        target = self._load(cid)
        if target is None:
            return True
        floor = self._height(target, store)
        heap: list[tuple[int, bytes]] = []
        seen: set[bytes] = set()
        for tip in kept:
            entry = self._load(tip)
            if entry is not None:
                heapq.heappush(heap, (-self._height(entry, store), tip))
                seen.add(tip)
        visits = 0
        while heap and visits < _COVER_BUDGET:
            negative, current = heapq.heappop(heap)
            if -negative < floor:
                return False
            visits += 1
            entry = self._load(current)
            if entry is None:
                continue
            for parent in self._parents(entry, store):
                if parent == cid:
                    return True
                if parent not in seen:
                    seen.add(parent)
                    parent_entry = self._load(parent)
                    if parent_entry is not None:
                        heapq.heappush(heap, (-self._height(parent_entry, store), parent))
        return False


def _last_change(
    ordered: list[Entry], deltas: dict[bytes, DocDelta | None], cut: set[bytes], pubkey: str, by_global: bool
) -> Entry | None:
    for entry in reversed(ordered):
        if entry.cid not in cut and _touches_grant(deltas[entry.cid], pubkey, by_global):
            return entry
    return None


def _fold_skipping(ordered: list[Entry], deltas: dict[bytes, DocDelta | None], cut: set[bytes]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for entry in ordered:
        delta = deltas[entry.cid]
        if delta is not None and entry.cid not in cut:
            apply_doc_delta(state, delta)
    return state


__all__ = ["Authority", "may_write"]

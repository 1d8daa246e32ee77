"""Entries: their canonical DAG-CBOR bytes, their IDs, signing, and strict decoding.

An entry on the wire is its canonical bytes and nothing else; the receiver recomputes
the ID from those bytes, so no entry can arrive under a false ID. Decoding checks every
structural rule before anything is stored:

* the bytes are DAG-CBOR and re-encode to exactly themselves (canonical form; this also
  closes libipld's trap where a byte string that parses as a CID is re-encoded as a link);
* version 0 only (the field is omitted when it holds its default);
* a root has no parents, no height and a `_root` store; every other entry names its root,
  has parents and a height of at least 1, and no `_root` store;
* parent lists are strictly ascending by binary ID (sorted, no duplicates);
* store names are non-empty, sorted and unique; store data is a DAG-CBOR map;
* the signature and key hint are canonical text; sizes and counts are within limits.

Semantic checks that need other entries (heights, permissions, settings pins) belong to
verification, not here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import libipld

from . import keys
from .errors import (
    BadCidError,
    GarbageEntryError,
    KeyFormatError,
    NonCanonicalError,
    OversizeError,
    RootRuleError,
    UnsortedParentsError,
    UnsupportedVersionError,
)
from .ids import CID_LENGTH, CID_PREFIX, cid_of, cid_to_text, is_cid

MAX_ENTRY_BYTES = 4 * 1024 * 1024
MAX_PARENTS = 1024
MAX_STORES = 256
MAX_STORE_NAME = 255
MAX_METADATA_BYTES = 64 * 1024
ROOT_STORE = "_root"
SETTINGS_STORE = "_settings"
INDEX_STORE = "_index"

_TOP_KEYS = frozenset({"tree", "subtrees", "sig", "v"})
_TREE_KEYS = frozenset({"root", "parents", "metadata", "h"})
_STORE_KEYS = frozenset({"name", "parents", "data", "h"})
_SIG_KEYS = frozenset({"key", "sig"})
_META_KEYS = frozenset({"settings_tips", "entropy"})


@dataclass(frozen=True, slots=True)
class StoreNode:
    """One store an entry touches: its own parents, the delta it writes, its height.

    ``height_override`` (``h``) is only structurally checked here (a positive integer
    below 2^63). Verification bounds it: above every store parent's height and at most
    the entry's own height (``dag.ingest``, invariant 7), so that no entry can put a
    store's height out of reach of the honest entries after it. Local commits never
    write one.
    """

    name: str
    parents: tuple[bytes, ...]
    data: bytes | None
    height_override: int | None


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded, structurally valid entry. ``cid`` is computed from ``raw``."""

    cid: bytes
    raw: bytes
    root: bytes | None
    parents: tuple[bytes, ...]
    height: int
    settings_tips: tuple[bytes, ...]
    entropy: int | None
    stores: tuple[StoreNode, ...]
    pubkey: bytes
    signature: bytes | None
    tree: bytes  # the database this entry belongs to: its root, or itself for a root

    @property
    def id(self) -> str:
        return cid_to_text(self.cid)

    @property
    def is_root(self) -> bool:
        return self.root is None

    @property
    def pubkey_text(self) -> str:
        return keys.pubkey_to_text(self.pubkey)

    def store(self, name: str) -> StoreNode | None:
        for node in self.stores:
            if node.name == name:
                return node
        return None

    def store_height(self, name: str) -> int:
        """The height that orders this entry inside store ``name``."""
        node = self.store(name)
        if node is not None and node.height_override is not None:
            return node.height_override
        return self.height

    def signing_message(self) -> bytes:
        """The canonical bytes of this entry without ``sig.sig``: what the key signs.

        ``raw`` passed the canonical check, so its layout is fixed: the top map's first key
        is ``sig`` (keys sort by length), whose map holds ``key`` then ``sig``. Cutting the
        signature item out of the bytes gives the same message as decoding, deleting and
        re-encoding, at a fraction of the cost; anything unexpected takes the slow way.
        """
        raw = self.raw
        if self.signature is not None:
            hint = _hint_item(self.pubkey)
            cut = _SIG_ITEM_HEAD + keys.signature_to_text(self.signature).encode("ascii")
            end = _HINT_START + len(hint)
            if (
                raw[1:_HINT_START] == _SIG_MAP_HEAD
                and raw[_HINT_START:end] == hint
                and raw[end : end + len(cut)] == cut
            ):
                return raw[:_SIG_MAP_AT] + b"\xa1" + hint + raw[end + len(cut) :]
        value = libipld.decode_dag_cbor(raw)
        value["sig"].pop("sig", None)
        return bytes(libipld.encode_dag_cbor(value))

    def signature_valid(self) -> bool:
        if self.signature is None:
            return False
        return keys.verify_signature(self.pubkey, self.signing_message(), self.signature)


def key_hint(pubkey_text: str) -> dict[str, Any]:
    return {"Direct": {"hint": {"pubkey": pubkey_text}}}


# Byte layout of a signed entry's start: map header, "sig", a two-item map, "key", hint.
_SIG_MAP_AT = 5
_SIG_MAP_HEAD = b"\x63sig\xa2"
_HINT_START = 6
_SIG_ITEM_HEAD = b"\x63sig\x78\x58"  # "sig", then a text of 88 characters (64 bytes in base64)


@functools.lru_cache(maxsize=1024)
def _hint_item(pubkey: bytes) -> bytes:
    """The encoded ``key`` item of the sig map: its key and the hint naming ``pubkey``."""
    return b"\x63key" + bytes(libipld.encode_dag_cbor(key_hint(keys.pubkey_to_text(pubkey))))


def encode_metadata(settings_tips: list[bytes], entropy: int | None) -> bytes | None:
    value: dict[str, Any] = {}
    if settings_tips:
        value["settings_tips"] = settings_tips
    if entropy is not None:
        value["entropy"] = entropy
    return bytes(libipld.encode_dag_cbor(value)) if value else None


def build_entry(
    *,
    signer: keys.SigningKey,
    root: bytes | None,
    parents: list[bytes],
    height: int,
    settings_tips: list[bytes],
    stores: list[tuple[str, list[bytes], bytes | None]],
    entropy: int | None = None,
) -> Entry:
    """Assemble, sign and encode a new entry. Inputs must already be sorted and valid."""
    tree: dict[str, Any] = {}
    if root is not None:
        tree["root"] = root
    if parents:
        tree["parents"] = parents
    metadata = encode_metadata(settings_tips, entropy)
    if metadata is not None:
        tree["metadata"] = metadata
    if height:
        tree["h"] = height
    subtrees = []
    for name, store_parents, data in stores:
        node: dict[str, Any] = {"name": name}
        if store_parents:
            node["parents"] = store_parents
        if data is not None:
            node["data"] = data
        subtrees.append(node)
    value: dict[str, Any] = {"tree": tree, "sig": {"key": key_hint(signer.pubkey)}}
    if subtrees:
        value["subtrees"] = subtrees
    message = bytes(libipld.encode_dag_cbor(value))
    signature = signer.sign(message)
    value["sig"]["sig"] = keys.signature_to_text(signature)
    raw = bytes(libipld.encode_dag_cbor(value))
    cid = cid_of(raw)
    return Entry(
        cid=cid,
        raw=raw,
        root=root,
        parents=tuple(parents),
        height=height,
        settings_tips=tuple(settings_tips),
        entropy=entropy,
        stores=tuple(StoreNode(n, tuple(p), d, None) for n, p, d in stores),
        pubkey=signer.pubkey_bytes,
        signature=signature,
        tree=cid if root is None else root,
    )


def _dict(value: object, allowed: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GarbageEntryError(f"{where} is not a map")
    if not allowed.issuperset(value):
        raise GarbageEntryError(f"{where} has unknown fields {sorted(set(value) - allowed)}")
    return value


def _cid_list(value: object, where: str, limit: int) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise GarbageEntryError(f"{where} is not a list")
    if len(value) > limit:
        raise OversizeError(f"{where} has {len(value)} items (limit {limit})")
    previous = b""
    for item in value:
        # is_cid(), inlined: this runs for every parent of every entry received
        if item.__class__ is not bytes or len(item) != CID_LENGTH or item[:4] != CID_PREFIX:
            raise BadCidError(f"{where} holds a link that is not an entry ID")
        if item <= previous:
            raise UnsortedParentsError(f"{where} is not sorted and unique")
        previous = item
    return tuple(value)


def _height(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
        raise GarbageEntryError(f"{where} is not a positive integer")
    return value


def _decode_metadata(raw: object) -> tuple[tuple[bytes, ...], int | None]:
    if not isinstance(raw, bytes):
        raise GarbageEntryError("tree.metadata is not bytes")
    if len(raw) > MAX_METADATA_BYTES:
        raise OversizeError("tree.metadata is too large")
    if len(raw) <= _CACHED_METADATA_BYTES:
        return _decode_metadata_cached(raw)
    return _decode_metadata_bytes(raw)


def _decode_metadata_bytes(raw: bytes) -> tuple[tuple[bytes, ...], int | None]:
    try:
        value = libipld.decode_dag_cbor(raw)
        canonical = bytes(libipld.encode_dag_cbor(value)) == raw
    except (ValueError, RecursionError) as exc:
        raise GarbageEntryError(f"tree.metadata is not DAG-CBOR: {exc}") from None
    if not canonical:
        raise NonCanonicalError("tree.metadata is not canonical")
    meta = _dict(value, _META_KEYS, "tree.metadata")
    if not meta:
        raise NonCanonicalError("tree.metadata is present but empty")
    pins: tuple[bytes, ...] = ()
    if "settings_tips" in meta:
        pins = _cid_list(meta["settings_tips"], "settings_tips", MAX_PARENTS)
        if not pins:
            raise NonCanonicalError("empty settings_tips must be omitted")
    entropy = meta.get("entropy")
    if entropy is not None and (not isinstance(entropy, int) or isinstance(entropy, bool)):
        raise GarbageEntryError("entropy is not an integer")
    return pins, entropy


# Consecutive entries of a database usually pin the same settings tips, so their metadata
# bytes are identical: small ones are decoded once. (Errors raise and are not cached.)
_CACHED_METADATA_BYTES = 1024
_decode_metadata_cached = functools.lru_cache(maxsize=256)(_decode_metadata_bytes)


def _decode_store(value: object, index: int) -> StoreNode:
    node = _dict(value, _STORE_KEYS, f"subtrees[{index}]")
    name = node.get("name")
    if not isinstance(name, str) or name == "":
        raise GarbageEntryError(f"subtrees[{index}].name is empty or not text")
    if len(name) > MAX_STORE_NAME:
        raise OversizeError(f"subtrees[{index}].name is too long")
    parents: tuple[bytes, ...] = ()
    if "parents" in node:
        parents = _cid_list(node["parents"], f"subtrees[{index}].parents", MAX_PARENTS)
        if not parents:
            raise NonCanonicalError(f"subtrees[{index}]: empty parents must be omitted")
    data = node.get("data")
    # A delta is always an encoded map, so it can never be mistaken for a bare CID.
    if data is not None and (not isinstance(data, bytes) or not data or not 0xA0 <= data[0] <= 0xBF):
        raise GarbageEntryError(f"subtrees[{index}].data is not an encoded map")
    height = _height(node["h"], f"subtrees[{index}].h") if "h" in node else None
    return StoreNode(name, parents, data, height)


def _decode_stores(raw_stores: object) -> tuple[StoreNode, ...]:
    """The ``subtrees`` list: at least one, sorted by unique name, within ``MAX_STORES``."""
    if not isinstance(raw_stores, list):
        raise GarbageEntryError("subtrees is not a list")
    if not raw_stores:
        raise NonCanonicalError("empty subtrees must be omitted")
    if len(raw_stores) > MAX_STORES:
        raise OversizeError(f"entry touches {len(raw_stores)} stores")
    stores = tuple([_decode_store(node, i) for i, node in enumerate(raw_stores)])
    previous = ""
    for node in stores:
        if node.name <= previous:
            raise GarbageEntryError("subtrees are not sorted by unique name")
        previous = node.name
    return stores


def _check_root_rule(
    root: bytes | None, parents: tuple[bytes, ...], height: int, pins: tuple[bytes, ...], stores: tuple[StoreNode, ...]
) -> None:
    """A root entry (no ``tree.root``) starts a tree: no parents, height 0, no pin, the
    ``_root`` store; any other entry has parents and never the ``_root`` store."""
    has_root_store = any(node.name == ROOT_STORE for node in stores)
    if root is None:
        if parents:
            raise RootRuleError("a root entry cannot have parents")
        if height != 0:
            raise RootRuleError("a root entry has height 0")
        if pins:
            raise RootRuleError("a root entry pins no settings")
        if not has_root_store:
            raise RootRuleError("a root entry must hold the _root store")
    else:
        if not parents:
            raise RootRuleError("a non-root entry must have parents")
        if has_root_store:
            raise RootRuleError("only a root entry holds the _root store")


def _decode_sig(sig: dict[str, Any]) -> tuple[bytes, bytes | None]:
    """``sig``: the signer's key (only the ``Direct`` hint form) and the signature, if any."""
    hint = sig.get("key")
    try:
        direct = hint["Direct"]  # type: ignore[index]
        inner = direct["hint"]
        pubkey_text = inner["pubkey"]
        if len(hint) != 1 or len(direct) != 1 or len(inner) != 1:  # type: ignore[arg-type]
            raise GarbageEntryError("sig.key has unknown fields")
        pubkey = keys.pubkey_from_text(pubkey_text)
        signature = keys.signature_from_text(sig["sig"]) if "sig" in sig else None
    except (KeyError, TypeError) as exc:
        raise GarbageEntryError(f"sig.key is not a key hint: {exc}") from None
    except KeyFormatError as exc:
        raise GarbageEntryError(str(exc)) from None
    return pubkey, signature


def decode_entry(raw: bytes) -> Entry:
    """Decode and check an entry from its bytes; raises an :class:`EntryError` subclass."""
    if not isinstance(raw, bytes):
        if not isinstance(raw, bytearray | memoryview):
            raise GarbageEntryError("an entry must be bytes")
        raw = bytes(raw)
    if len(raw) > MAX_ENTRY_BYTES:
        raise OversizeError(f"entry is {len(raw)} bytes (limit {MAX_ENTRY_BYTES})")
    try:
        value = libipld.decode_dag_cbor(raw)
    except (ValueError, RecursionError) as exc:
        raise GarbageEntryError(f"entry is not DAG-CBOR: {exc}") from None
    top = _dict(value, _TOP_KEYS, "entry")
    if "v" in top:
        raise UnsupportedVersionError(f"entry version {top['v']!r} is not supported (only 0)")
    try:
        canonical = bytes(libipld.encode_dag_cbor(value)) == raw
    except (ValueError, RecursionError):
        canonical = False
    if not canonical:
        raise NonCanonicalError("entry bytes are not canonical DAG-CBOR")

    tree = _dict(top.get("tree"), _TREE_KEYS, "tree")
    root = tree.get("root")
    if root is not None and not is_cid(root):
        raise BadCidError("tree.root is not an entry ID")
    parents = _cid_list(tree["parents"], "tree.parents", MAX_PARENTS) if "parents" in tree else ()
    height = _height(tree["h"], "tree.h") if "h" in tree else 0
    pins, entropy = _decode_metadata(tree["metadata"]) if "metadata" in tree else ((), None)

    raw_stores = top.get("subtrees")
    stores = _decode_stores(raw_stores) if raw_stores is not None else ()
    _check_root_rule(root, parents, height, pins, stores)
    pubkey, signature = _decode_sig(_dict(top.get("sig"), _SIG_KEYS, "sig"))
    cid = cid_of(raw)
    return Entry(
        cid=cid,
        raw=raw,
        root=root,
        parents=parents,
        height=height,
        settings_tips=pins,
        entropy=entropy,
        stores=stores,
        pubkey=pubkey,
        signature=signature,
        tree=cid if root is None else root,
    )


def dependencies_of(entry: Entry) -> set[bytes]:
    """Every entry ``entry`` names and is verified against: parents, store parents, the
    settings it pins and its root; it can be Verified only once all of them are."""
    deps = {*entry.parents, *entry.settings_tips}
    for node in entry.stores:
        deps.update(node.parents)
    if entry.root is not None:
        deps.add(entry.root)
    return deps

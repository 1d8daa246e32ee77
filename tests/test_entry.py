"""Entry format: canonical bytes, IDs, signatures, and every structural rejection."""

from __future__ import annotations

import base64
from typing import Any

import libipld
import pytest

from dag import (
    BadCidError,
    GarbageEntryError,
    NonCanonicalError,
    OversizeError,
    RootRuleError,
    SigningKey,
    UnsortedParentsError,
    UnsupportedVersionError,
    cid_from_text,
    cid_to_text,
    decode_entry,
)
from dag.entry import MAX_ENTRY_BYTES, build_entry
from dag.ids import cid_of
from dag.keys import pubkey_from_text, pubkey_to_text

KEY = SigningKey(bytes(range(32)))


def _root() -> Any:
    return build_entry(
        signer=KEY, root=None, parents=[], height=0, settings_tips=[], stores=[("_root", [], None)], entropy=7
    )


def _child(**changes: Any) -> bytes:
    """Canonical bytes of a signed non-root entry built from a mutable dict."""
    root = _root()
    value: dict[str, Any] = {
        "tree": {
            "root": root.cid,
            "parents": [root.cid],
            "h": 1,
            "metadata": libipld.encode_dag_cbor({"settings_tips": [root.cid]}),
        },
        "subtrees": [{"name": "notes", "parents": [root.cid], "data": libipld.encode_dag_cbor({"a": 1})}],
        "sig": {"key": {"Direct": {"hint": {"pubkey": KEY.pubkey}}}},
    }
    for path, new in changes.items():
        target = value
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if new is _DELETE:
            del target[parts[-1]]
        else:
            target[parts[-1]] = new
    message = libipld.encode_dag_cbor(value)
    value["sig"]["sig"] = base64.b64encode(KEY.sign(message)).decode()
    return bytes(libipld.encode_dag_cbor(value))


_DELETE = object()


def test_cid_text_form_matches_the_known_vector() -> None:
    cid = cid_of(b"hello")
    assert cid_to_text(cid) == "bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"
    assert cid_from_text(cid_to_text(cid)) == cid


@pytest.mark.parametrize(
    "text", ["", "b", "bafyr4i", "Bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4", "x" * 59]
)
def test_bad_cid_text_is_refused(text: str) -> None:
    with pytest.raises(BadCidError, match=r"^not an entry ID"):
        cid_from_text(text)


def test_root_round_trip_and_signature() -> None:
    root = _root()
    assert root.id.startswith("bafyr4i")
    decoded = decode_entry(root.raw)
    assert decoded == root
    assert decoded.signature_valid()
    assert decoded.is_root and decoded.tree == decoded.cid


def test_child_round_trip() -> None:
    entry = decode_entry(_child())
    assert entry.height == 1 and entry.signature_valid()
    assert entry.store("notes") is not None and entry.store("other") is None


def test_pubkey_text_form() -> None:
    assert KEY.pubkey.startswith("ed25519:") and len(KEY.pubkey) == len("ed25519:") + 44
    assert pubkey_to_text(pubkey_from_text(KEY.pubkey)) == KEY.pubkey


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (b"\xff\x00garbage", GarbageEntryError, r"^entry is not DAG-CBOR"),
        (bytes(libipld.encode_dag_cbor([1, 2])), GarbageEntryError, r"^entry is not a map$"),
        (bytes(libipld.encode_dag_cbor({"tree": {}, "x": 1})), GarbageEntryError, r"unknown fields \['x'\]"),
        (bytes(libipld.encode_dag_cbor({"v": 1, "tree": {}})), UnsupportedVersionError, r"version 1"),
    ],
)
def test_garbage_is_refused(raw: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_entry(raw)


def test_non_canonical_bytes_are_refused() -> None:
    raw = _child()
    # The same map with a non-minimal encoding of the height: valid CBOR, other bytes.
    assert raw.count(b"\x61\x68\x01") == 1
    bloated = raw.replace(b"\x61\x68\x01", b"\x61\x68\x18\x01")
    assert libipld.decode_dag_cbor(bloated) == libipld.decode_dag_cbor(raw)
    with pytest.raises(NonCanonicalError):
        decode_entry(bloated)


def test_unsorted_parents_are_refused() -> None:
    a, b = sorted([cid_of(b"a"), cid_of(b"b")])
    with pytest.raises(UnsortedParentsError, match=r"^tree.parents is not sorted and unique$"):
        decode_entry(_child(tree__parents=[b, a]))
    with pytest.raises(UnsortedParentsError):
        decode_entry(_child(tree__parents=[a, a]))


def test_bad_cid_in_parents_is_refused() -> None:
    with pytest.raises(BadCidError, match=r"^tree.parents holds a link"):
        decode_entry(_child(tree__parents=[b"\x01\x55\x12\x20" + bytes(32)]))


def test_root_rules() -> None:
    with pytest.raises(RootRuleError, match=r"^a non-root entry must have parents$"):
        decode_entry(_child(tree__parents=_DELETE))
    with pytest.raises(RootRuleError, match=r"^only a root entry holds the _root store$"):
        decode_entry(_child(subtrees=[{"name": "_root"}]))
    root = _root()
    with pytest.raises(RootRuleError, match=r"^a root entry cannot have parents$"):
        decode_entry(
            _child(
                tree__root=_DELETE,
                tree__h=_DELETE,
                tree__metadata=_DELETE,
                subtrees=[{"name": "_root"}],
                tree__parents=[root.cid],
            )
        )


def test_store_rules() -> None:
    with pytest.raises(GarbageEntryError, match=r"name is empty"):
        decode_entry(_child(subtrees__0__name=""))
    with pytest.raises(GarbageEntryError, match=r"data is not an encoded map"):
        decode_entry(_child(subtrees__0__data=b"\x01"))
    with pytest.raises(GarbageEntryError, match=r"not sorted by unique name"):
        decode_entry(_child(subtrees=[{"name": "b"}, {"name": "a"}]))


def test_deeply_nested_bytes_are_garbage_not_a_crash() -> None:
    with pytest.raises(GarbageEntryError, match="not DAG-CBOR"):
        decode_entry(b"\x81" * 3000 + b"\x01")


def test_oversize_entry_is_refused() -> None:
    with pytest.raises(OversizeError):
        decode_entry(b"\xa0" * (MAX_ENTRY_BYTES + 1))


def test_non_canonical_signature_text_is_refused() -> None:
    raw = _child()
    value = libipld.decode_dag_cbor(raw)
    sig = value["sig"]["sig"]
    # Flip the spare bits of the last base64 character: same signature bytes, other text.
    last = sig[-3]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    value["sig"]["sig"] = sig[:-3] + twin + sig[-2:]
    assert base64.b64decode(value["sig"]["sig"]) == base64.b64decode(sig)
    with pytest.raises(GarbageEntryError, match=r"not canonical base64"):
        decode_entry(bytes(libipld.encode_dag_cbor(value)))


def test_tampered_data_breaks_the_signature() -> None:
    good = decode_entry(_child())
    value = libipld.decode_dag_cbor(good.raw)
    value["subtrees"][0]["data"] = libipld.encode_dag_cbor({"a": 2})
    forged = decode_entry(bytes(libipld.encode_dag_cbor(value)))
    assert forged.cid != good.cid
    assert not forged.signature_valid()


def _message_by_reencoding(raw: bytes) -> bytes:
    value = libipld.decode_dag_cbor(raw)
    value["sig"].pop("sig", None)
    return bytes(libipld.encode_dag_cbor(value))


@pytest.mark.parametrize(
    "raw",
    [
        _root().raw,
        _child(),
        _child(subtrees__0__name="x"),
        _child(tree__h=2**40),
    ],
    ids=["root", "child", "other-store", "large-height"],
)
def test_signing_message_cut_from_the_bytes_equals_the_reencoded_one(raw: bytes) -> None:
    entry = decode_entry(raw)
    assert entry.signing_message() == _message_by_reencoding(raw)
    assert entry.signature_valid()


def test_signing_message_of_an_unsigned_entry_is_its_bytes() -> None:
    value = libipld.decode_dag_cbor(_child())
    del value["sig"]["sig"]
    raw = bytes(libipld.encode_dag_cbor(value))
    entry = decode_entry(raw)
    assert entry.signature is None
    assert entry.signing_message() == raw
    assert not entry.signature_valid()

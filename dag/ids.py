"""Entry IDs: CIDv1, codec dag-cbor, multihash BLAKE3-256 over an entry's canonical bytes.

Inside the package an ID is its 36 binary bytes (what DAG-CBOR links decode to, what
SQLite sorts as a BLOB). Users see the text form (multibase base32 lower, ``bafyr4i...``).
Every ordering of IDs uses the binary form; the text form sorts differently because
base32's digits come after its letters.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

import blake3
import libipld

from .errors import BadCidError

CID_PREFIX = bytes([0x01, 0x71, 0x1E, 0x20])  # CIDv1, dag-cbor, blake3, 32 bytes
CID_LENGTH = len(CID_PREFIX) + 32
_TEXT_LENGTH = 1 + 58  # "b" + unpadded base32 of 36 bytes


def cid_of(data: bytes) -> bytes:
    """The binary ID of an entry whose canonical bytes are ``data``."""
    return CID_PREFIX + blake3.blake3(data).digest()


def is_cid(value: object) -> bool:
    """Whether ``value`` is a binary ID of the one kind entries use."""
    return isinstance(value, bytes) and len(value) == CID_LENGTH and value[:4] == CID_PREFIX


def cid_to_text(cid: bytes) -> str:
    """The text form of a binary ID (libipld's encoder: ~20x the stdlib's base32)."""
    text: str = libipld.encode_cid(cid)
    return text


def cid_from_text(text: str) -> bytes:
    """Parse an ID's text form; raises :class:`BadCidError` on anything else."""
    if not isinstance(text, str) or len(text) != _TEXT_LENGTH or text[0] != "b":
        raise BadCidError(f"not an entry ID: {text!r}")
    try:
        body = text[1:].upper()
        cid = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError) as exc:
        raise BadCidError(f"not an entry ID: {text!r}") from exc
    if not is_cid(cid) or cid_to_text(cid) != text:
        raise BadCidError(f"not an entry ID: {text!r}")
    return cid


def sorted_cids(cids: Iterable[bytes]) -> list[bytes]:
    """Unique binary IDs in the one order used everywhere."""
    return sorted(set(cids))


def join_cids(cids: Iterable[bytes]) -> bytes:
    """Pack binary IDs into one blob (for storage columns)."""
    return b"".join(cids)


def split_cids(blob: bytes) -> list[bytes]:
    """Unpack a blob made by :func:`join_cids`."""
    return [blob[i : i + CID_LENGTH] for i in range(0, len(blob), CID_LENGTH)]

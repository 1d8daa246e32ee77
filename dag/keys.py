"""Ed25519 keys: signing, verifying, the text form of public keys, the device key file."""

from __future__ import annotations

import base64
import binascii
import functools
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing

from .errors import KeyFormatError
from .files import read_private, write_new_private

PUBKEY_PREFIX = "ed25519:"
SIGNATURE_LENGTH = 64


def _b64_canonical(text: str, length: int, what: str) -> bytes:
    """Strict base64: only the one text that encodes the bytes is accepted.

    Base64 has spare bits in its last character; accepting any of the texts that decode
    to the same bytes would let an entry be re-encoded under a new ID with a valid
    signature.
    """
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{what} is not base64: {text!r}") from exc
    if len(raw) != length or binascii.b2a_base64(raw, newline=False) != text.encode("ascii"):
        raise KeyFormatError(f"{what} is not canonical base64 of {length} bytes: {text!r}")
    return raw


@functools.lru_cache(maxsize=4096)
def pubkey_to_text(raw: bytes) -> str:
    """``ed25519:`` plus padded standard base64 of the 32 key bytes."""
    return PUBKEY_PREFIX + base64.b64encode(raw).decode("ascii")


@functools.lru_cache(maxsize=4096)
def pubkey_from_text(text: str) -> bytes:
    """The 32 bytes of a public key in text form; raises :class:`KeyFormatError`.

    Cached: a database has few writers, and every entry names one.
    """
    if not isinstance(text, str) or not text.startswith(PUBKEY_PREFIX):
        raise KeyFormatError(f"public key must start with {PUBKEY_PREFIX!r}: {text!r}")
    return _b64_canonical(text[len(PUBKEY_PREFIX) :], 32, "public key")


def signature_to_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def signature_from_text(text: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFormatError("signature must be text")
    return _b64_canonical(text, SIGNATURE_LENGTH, "signature")


class SigningKey:
    """An Ed25519 private key and its public key text."""

    __slots__ = ("_key", "pubkey", "pubkey_bytes")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFormatError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.pubkey_bytes: bytes = bytes(self._key.verify_key)
        self.pubkey: str = pubkey_to_text(self.pubkey_bytes)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def seed(self) -> bytes:
        """The 32-byte seed: all that is needed to recreate the key (libp2p uses the same)."""
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def __repr__(self) -> str:
        return f"SigningKey({self.pubkey})"


@functools.lru_cache(maxsize=4096)
def _verify_key(pubkey: bytes) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(pubkey)


def verify_signature(pubkey: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``pubkey``'s signature of ``message``. Releases the GIL."""
    try:
        _verify_key(pubkey).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def load_or_create_key_file(path: Path) -> SigningKey:
    """The device key kept at ``path`` (created, owner-only, on first use).

    A key file that others can read is refused rather than silently used, the way ssh
    treats private keys; so is a symlink or another user's file (see :mod:`dag.files`:
    nothing here follows a link another user could have planted). The file appears
    whole or not at all: it is written and synced under a temporary name, then linked
    into place, so a process killed mid-way leaves no empty key behind.
    """
    if not os.path.lexists(path):
        key = SigningKey.generate()
        if write_new_private(
            path, (base64.b64encode(key.seed).decode("ascii") + "\n").encode("ascii"), what="device key"
        ):
            return key
        # another opener won the race: use its key
    raw = read_private(path, what="device key", exposed=KeyFormatError)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFormatError(f"device key in {path} is not base64 text") from None
    return SigningKey(_b64_canonical(text, 32, f"device key in {path}"))

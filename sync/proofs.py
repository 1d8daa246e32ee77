"""Signatures that prove who is asking: handshake challenges and signed sync requests.

Each signed message is a msgpack array that starts with a domain string, so a signature
made for one purpose can never be replayed as another.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import msgpack

from dag import SigningKey
from dag.errors import KeyFormatError
from dag.keys import pubkey_from_text, verify_signature

from .errors import BusyError, ReplayedRequestError, StaleRequestError, UnauthorizedError
from .messages import AuthProof

HANDSHAKE_DOMAIN = "eidetica/handshake/v1"
REQUEST_DOMAIN = "eidetica/sync-request/v1"
MAX_AGE_MS = 60_000  # a signed request older (or further in the future) than this is refused
NONCE_BYTES = 16


def handshake_message(challenge: bytes, signer: str) -> bytes:
    packed: bytes = msgpack.packb([HANDSHAKE_DOMAIN, challenge, signer], use_bin_type=True)
    return packed


def sign_challenge(key: SigningKey, challenge: bytes) -> bytes:
    return key.sign(handshake_message(challenge, key.pubkey))


def check_challenge(pubkey: str, challenge: bytes, signature: bytes) -> bool:
    try:
        raw = pubkey_from_text(pubkey)
    except KeyFormatError:
        return False
    return verify_signature(raw, handshake_message(challenge, pubkey), signature)


def request_message(server_key: str, db: bytes, tips: Sequence[bytes], timestamp_ms: int, nonce: bytes) -> bytes:
    packed: bytes = msgpack.packb(
        [REQUEST_DOMAIN, server_key, db, sorted(tips), timestamp_ms, nonce], use_bin_type=True
    )
    return packed


def make_proof(key: SigningKey, server_key: str, db: bytes, tips: Sequence[bytes], now_ms: int) -> AuthProof:
    nonce = os.urandom(NONCE_BYTES)
    signature = key.sign(request_message(server_key, db, tips, now_ms, nonce))
    return AuthProof(key.pubkey, now_ms, nonce, signature)


# Nonces remembered at once. A nonce is kept while its proof could still pass the age check
# (at most 2 x MAX_AGE_MS after it was accepted), so this allows ~830 signed requests per
# second sustained, at about 150 bytes each (~15 MiB at most). When it is full of fresh
# nonces new requests are refused as busy: forgetting a fresh nonce would allow its replay.
MAX_REMEMBERED_NONCES = 100_000


class ReplayGuard:
    """Remembers the nonces of accepted requests for as long as they could be replayed.

    Across restarts: nonces live in memory only, so a proof signed before this guard was
    made (``started_ms``, the process start) is refused as stale: any nonce a previous
    process accepted had such a timestamp. This is chosen over persisting nonces because it
    needs no write per request and holds after a crash too (a store saved at close would
    not); its cost is that for up to a minute after a restart a peer whose clock lags ours
    is refused as stale, and its engine's retry a few seconds later signs anew and passes.
    """

    def __init__(self, capacity: int = MAX_REMEMBERED_NONCES, *, started_ms: int = 0) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._capacity = capacity
        self._started_ms = started_ms

    def check(self, proof: AuthProof, server_key: str, db: bytes, tips: Sequence[bytes], now_ms: int) -> str:
        """The proven key; raises an :class:`~sync.errors.AccessError` subclass (or ``BusyError``)."""
        if abs(now_ms - proof.timestamp_ms) > MAX_AGE_MS:
            raise StaleRequestError(f"signed request is {abs(now_ms - proof.timestamp_ms) // 1000} s off; limit 60 s")
        if proof.timestamp_ms < self._started_ms:
            raise StaleRequestError("signed request predates this node's start (a replay is refused); sign it anew")
        try:
            raw_key = pubkey_from_text(proof.key)
        except KeyFormatError:
            raise UnauthorizedError(f"not a public key: {proof.key!r}") from None
        message = request_message(server_key, db, tips, proof.timestamp_ms, proof.nonce)
        if not verify_signature(raw_key, message, proof.signature):
            raise UnauthorizedError("request signature does not verify")
        token = proof.key.encode() + proof.nonce
        while self._seen and next(iter(self._seen.values())) < now_ms - 2 * MAX_AGE_MS:
            self._seen.popitem(last=False)
        if token in self._seen:
            raise ReplayedRequestError("signed request was already used (replay)")
        if len(self._seen) >= self._capacity:
            raise BusyError(f"{self._capacity} signed requests in the last two minutes (the limit); try again later")
        self._seen[token] = now_ms
        return proof.key

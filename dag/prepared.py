"""Received entries decoded and signature-checked on a thread pool, before ingest decides them.

Decoding and Ed25519 checks need nothing but the bytes (no storage, no lock), so they are
the part of taking in entries that can run beside the writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .entry import Entry, decode_entry
from .verifier import SignatureProcesses

PARALLEL_SIGNATURES_FROM = 64  # below this a thread pool costs more than it saves
SIGNATURE_CHUNK = 100


def _decode_and_check(raws: Sequence[bytes], processes: SignatureProcesses | None) -> tuple[list[Entry], list[bool]]:
    if processes is not None:
        # Decode the chunk, then wait for a worker process without holding the GIL.
        entries = [decode_entry(raw) for raw in raws]
        signed = [(entry, entry.signature) for entry in entries if entry.signature is not None]
        answers = processes.check([(entry.pubkey, entry.signing_message(), sig) for entry, sig in signed])
        valid = {entry.cid: ok for (entry, _sig), ok in zip(signed, answers, strict=True)}
        return entries, [valid.get(entry.cid, False) for entry in entries]
    # One entry at a time, decode then check: the GIL is let go (during the check) every
    # few microseconds, so the thread writing to storage never waits long to get it back.
    entries = []
    checks = []
    for raw in raws:
        entry = decode_entry(raw)
        entries.append(entry)
        checks.append(entry.signature_valid())
    return entries, checks


class PreparedEntries:
    """Remote entries being decoded and signature-checked on a thread pool, ahead of ingest.

    Decoding and Ed25519 checks need nothing but the bytes, so they can start the moment
    a frame arrives, while the previous frame is still being decided and written: the
    pool's threads (PyNaCl releases the GIL while it verifies) keep the other core busy
    instead of waiting for the writer. A malformed entry surfaces when the batch is put,
    as the same error decoding inline would raise, and nothing of the batch is stored.
    """

    def __init__(
        self, raws: Sequence[bytes], pool: ThreadPoolExecutor | None, processes: SignatureProcesses | None = None
    ) -> None:
        self.count = len(raws)
        self._raws: Sequence[bytes] = ()
        self._chunks: list[Future[tuple[list[Entry], list[bool]]]] = []
        if pool is None or len(raws) < PARALLEL_SIGNATURES_FROM:
            self._raws = raws  # decoded inline when put: a pool hand-off costs more here
            return
        for start in range(0, len(raws), SIGNATURE_CHUNK):
            self._chunks.append(pool.submit(_decode_and_check, raws[start : start + SIGNATURE_CHUNK], processes))

    def results(self) -> tuple[list[Entry], dict[bytes, bool]]:
        """The decoded entries in order and the signature checks done so far (by binary ID)."""
        if not self._chunks:
            return [decode_entry(raw) for raw in self._raws], {}
        entries: list[Entry] = []
        valid: dict[bytes, bool] = {}
        for chunk in self._chunks:
            decoded, checks = chunk.result()  # re-raises the first decoding error
            entries.extend(decoded)
            for entry, ok in zip(decoded, checks, strict=True):
                valid[entry.cid] = ok
        return entries, valid

    def cancel(self) -> None:
        """Drop the work not started yet (the batch will not be put)."""
        for chunk in self._chunks:
            chunk.cancel()

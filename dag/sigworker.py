"""A signature-checking worker process: ``python dag/sigworker.py``, spoken to over its pipes.

Run by :class:`dag.verifier.SignatureProcesses`, one per core. It imports nothing of this
package (only PyNaCl), so it starts in ~40 ms from any working directory.

Protocol, both ways a 4-byte big-endian length and then a body. A request body is a run
of items ``pubkey (32 bytes) | signature (64) | message length (4, big-endian) | message``;
the answer body holds one byte per item, 1 when the signature verifies. The worker exits
when its standard input closes (the parent ended, however it ended).
"""

from __future__ import annotations

import sys
from typing import BinaryIO

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.exceptions import ValueError as NaclValueError

PUBKEY_BYTES = 32
SIGNATURE_BYTES = 64
ITEM_HEAD = PUBKEY_BYTES + SIGNATURE_BYTES + 4
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    while data is not None and 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            return None
        data += more
    return data if data and len(data) == size else None


def check_items(body: bytes) -> bytes:
    """One byte per item of ``body``: whether its signature verifies."""
    answers = bytearray()
    view = memoryview(body)
    position = 0
    while position + ITEM_HEAD <= len(body):
        pubkey = bytes(view[position : position + PUBKEY_BYTES])
        signature = bytes(view[position + PUBKEY_BYTES : position + PUBKEY_BYTES + SIGNATURE_BYTES])
        length = int.from_bytes(view[position + PUBKEY_BYTES + SIGNATURE_BYTES : position + ITEM_HEAD], "big")
        start = position + ITEM_HEAD
        message = bytes(view[start : start + length])
        position = start + length
        if position > len(body):  # the item claims more bytes than the request holds
            answers.append(0)
            break
        try:
            crypto_sign_open(signature + message, pubkey)
        except (BadSignatureError, NaclValueError, ValueError):
            answers.append(0)
        else:
            answers.append(1)
    return bytes(answers)


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = _read_exactly(stdin, 4)
        if head is None:
            return 0
        size = int.from_bytes(head, "big")
        if size > MAX_REQUEST_BYTES:
            return 2
        body = _read_exactly(stdin, size) if size else b""
        if body is None:
            return 0
        answers = check_items(body)
        stdout.write(len(answers).to_bytes(4, "big") + answers)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

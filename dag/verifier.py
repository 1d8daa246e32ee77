"""Ed25519 checks in worker processes, for a process that receives long histories.

Threads alone do not keep two cores verifying: PyNaCl lets go of the GIL during a check,
but every check must take it back, and while the ingesting thread runs Python a checking
thread waits for it (measured in a 100K-entry bootstrap over libp2p: the checking
threads spent half their time waiting for the GIL, and the ingest waited on them). A
worker process has its own interpreter: it verifies without waiting, and the threads
that feed it spend their time blocked on a pipe, without the GIL.

Opt-in (:meth:`dag.Instance.use_signature_processes`): the process's owner decides to
start processes; the library's default stays threads only. A worker that dies or
answers nonsense is dropped and its checks are done in the calling thread, so a failure
here costs speed, never a wrong answer or a lost batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .keys import verify_signature
from .sigworker import PUBKEY_BYTES, SIGNATURE_BYTES

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("sigworker.py")
STOP_WAIT_S = 2.0
# A chunk of 100 checks takes ~4 ms; a worker silent for this long is stuck, not busy.
ANSWER_TIMEOUT_S = 30.0

SignatureItem = tuple[bytes, bytes, bytes]  # (pubkey, message, signature)


class _Worker:
    def __init__(self) -> None:
        # -I: no user site, no PYTHON* variables, no current directory on the path.
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            bufsize=0,  # raw pipes: read straight from the descriptor
            start_new_session=True,  # a Ctrl-C meant for the node must not kill its workers mid-shutdown
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin: IO[bytes] = self.process.stdin
        self.stdout: IO[bytes] = self.process.stdout

    def check(self, items: Sequence[SignatureItem], watchdog: _Watchdog) -> list[bool]:
        parts: list[bytes] = []
        for pubkey, message, signature in items:
            parts += (pubkey, signature, len(message).to_bytes(4, "big"), message)
        body = b"".join(parts)
        # A worker that stops reading or answering is killed by the watchdog: the blocked
        # write or read then fails like any dead worker's, and the checks are done here.
        watchdog.watch(self)
        try:
            request = memoryview(len(body).to_bytes(4, "big") + body)
            while request:  # a raw pipe may take a long request in several writes
                written = self.stdin.write(request)
                request = request[written or 0 :]
            head = self._read(4)
            answers = self._read(int.from_bytes(head, "big"))
        finally:
            watchdog.release(self)
        if len(answers) != len(items) or not set(answers) <= {0, 1}:
            raise EOFError("signature worker answered out of protocol")
        return [byte == 1 for byte in answers]

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(self.stdout.fileno(), size - len(data))
            if not chunk:
                raise EOFError("signature worker closed its pipe (or was stopped by its watchdog)")
            data += chunk
        return data

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stdout.close()


class _Watchdog:
    """One thread that kills the workers whose current check has run past its deadline."""

    def __init__(self) -> None:
        self._deadlines: dict[_Worker, float] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eidetica-verify-watchdog", daemon=True)
        self._thread.start()

    def watch(self, worker: _Worker) -> None:
        self._deadlines[worker] = time.monotonic() + ANSWER_TIMEOUT_S

    def release(self, worker: _Worker) -> None:
        self._deadlines.pop(worker, None)

    def _run(self) -> None:
        while not self._stopped.wait(min(1.0, ANSWER_TIMEOUT_S / 3)):
            now = time.monotonic()
            for worker, deadline in list(self._deadlines.items()):
                if deadline < now:
                    worker.process.kill()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=STOP_WAIT_S)


class SignatureProcesses:
    """A set of signature-checking worker processes, shared by the threads that feed them."""

    def __init__(self, count: int | None = None) -> None:
        self.count = max(1, count if count is not None else (os.cpu_count() or 1))
        # Idle workers; None once none is left, passed on by each thread that takes it.
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._alive = 0
        self._closed = False
        self._watchdog = _Watchdog()
        try:
            for _ in range(self.count):
                worker = _Worker()
                self._all.append(worker)
                self._idle.put(worker)
                self._alive += 1
        except BaseException:
            for worker in self._all:
                worker.stop()
            self._watchdog.stop()
            raise

    @property
    def alive(self) -> int:
        return self._alive

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every worker process started, dead ones included: for whoever supervises them."""
        return [worker.process for worker in self._all]

    def check(self, items: Sequence[SignatureItem]) -> list[bool]:
        """Whether each ``(pubkey, message, signature)`` verifies (blocks; call from a thread)."""
        if not items:
            return []
        if any(len(pubkey) != PUBKEY_BYTES or len(signature) != SIGNATURE_BYTES for pubkey, _, signature in items):
            return [verify_signature(pubkey, message, signature) for pubkey, message, signature in items]
        worker = self._idle.get()
        if worker is None:
            self._idle.put(None)
        else:
            try:
                answers = worker.check(items, self._watchdog)
            except (OSError, EOFError, ValueError) as exc:
                self._drop(worker, exc)
            else:
                self._idle.put(worker)
                return answers
        return [verify_signature(pubkey, message, signature) for pubkey, message, signature in items]

    def _drop(self, worker: _Worker, exc: Exception) -> None:
        if not self._closed:
            log.warning("signature worker %d failed (%s); checking in this process instead", worker.process.pid, exc)
        worker.process.kill()
        with self._lock:
            self._alive -= 1
            if self._alive == 0:
                self._idle.put(None)

    def close(self) -> None:
        """Stop the workers; checks still asked for afterwards run in the calling thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._idle.put(None)  # whoever waits for a worker now checks in its own thread
        for worker in self._all:
            worker.stop()
        self._watchdog.stop()

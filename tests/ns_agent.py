"""A ``scripts.proc_node`` test agent inside a network namespace, driven over stdin/stdout.

For tests of one transport mechanism behind NAT (reachability): what a user does is tested
through the real binary in tests/test_nat.py; this drives the transports directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.netns import NatTopology
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
PORT = 4001  # every node listens here (each in its own namespace)
READY_TIMEOUT_S = 60.0  # a fresh interpreter importing py-libp2p, trio and the node
LINE_TIMEOUT_S = 40.0  # one command: at most a handshake and a bootstrap through the relay
STATE_TIMEOUT_S = 60.0  # reachability (a dial-back that times out: 5 s), reservations
SYNC_TIMEOUT_S = 60.0  # a commit reaching the other side


class NsNode:
    """One ``scripts.proc_node`` process inside a namespace, driven over stdin/stdout."""

    def __init__(self, topo: NatTopology, node: str, data_dir: Path, *extra: str) -> None:
        self.name = node
        self.stderr_path = data_dir.parent / f"{node}.stderr"
        argv = [sys.executable, "-m", "scripts.proc_node", "--transport", "p2p", "--data-dir", str(data_dir)]
        argv += ["--bind", f"/ip4/0.0.0.0/tcp/{PORT}", "--name", node, *extra]
        with self.stderr_path.open("ab") as stderr:
            self.process = topo.run(node, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        self._buffer = b""
        self.ready = self.line(READY_TIMEOUT_S)
        assert self.ready.get("ready"), f"{node} did not start: {self.ready}; stderr:\n{self.stderr()}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def line(self, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"{self.name}: no answer in {timeout_s:g} s; stderr:\n{self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"{self.name} exited; stderr:\n{self.stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, text: str, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()
        answer = self.line(timeout_s)
        assert answer.get("ok"), f"{self.name}: {text!r} failed: {answer}; stderr:\n{self.stderr()}"
        return answer

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.command("status")["status"]
        return status

    def wait_status(self, what: str, predicate: Any, timeout_s: float = STATE_TIMEOUT_S) -> dict[str, Any]:
        return wait_until(self.status, f"{self.name}: {what}", timeout_s=timeout_s, poll_s=0.2, done=predicate)

    def wait_value(self, db: str, key: str, value: str, timeout_s: float = SYNC_TIMEOUT_S) -> float:
        """Seconds until ``key`` reads ``value``."""
        started = time.monotonic()
        wait_until(
            lambda: self.command(f"get {db} {key}")["value"],
            f"{self.name}: {key}={value!r} arriving",
            timeout_s=timeout_s,
            done=lambda seen: seen == value,
            detail=lambda: f"stderr:\n{self.stderr()}",
        )
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

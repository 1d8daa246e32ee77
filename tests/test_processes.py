"""Two nodes in two separate processes sync over each real transport."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.waiting import until_awaited

REPO = Path(__file__).resolve().parent.parent

# ---- two nodes, two processes -------------------------------------------------------------

READY_TIMEOUT_S = 60  # a fresh interpreter imports trio, hypercorn, starlette, httpx and the node
LINE_TIMEOUT_S = 30  # one command: at most a handshake and a bootstrap on loopback
SYNC_WAIT_S = 30  # sync on commit reaches the other process in well under a second; bounded anyway


class ProcNode:
    """One ``scripts.proc_node`` process, driven over its stdin and stdout."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self._buffer = b""

    @classmethod
    async def start(cls, transport: str, data_dir: Path, stderr: Path) -> ProcNode:
        args = [sys.executable, "-m", "scripts.proc_node", "--transport", transport, "--data-dir", str(data_dir)]
        args += ["--bind", "127.0.0.1:0" if transport == "http" else "/ip4/127.0.0.1/tcp/0"]
        with stderr.open("wb") as log:
            process = await trio.lowlevel.open_process(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO
            )
        return cls(process, stderr)

    async def line(self, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdout is not None
        with trio.move_on_after(timeout_s):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    break
                self._buffer += chunk
        line, sep, self._buffer = self._buffer.partition(b"\n")
        assert sep, f"no answer from the node; its stderr:\n{self.stderr.read_text()}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")
        answer = await self.line()
        assert answer.get("ok"), f"{text!r} failed: {answer}; stderr:\n{self.stderr.read_text()}"
        return answer

    async def until(self, db: str, key: str, value: str) -> None:
        await until_awaited(
            lambda: self.command(f"get {db} {key}"),
            f"{key}={value!r} arriving",
            timeout_s=SYNC_WAIT_S,
            poll_s=0.05,
            done=lambda answer: answer["value"] == value,
            detail=lambda: f"stderr:\n{self.stderr.read_text()}",
        )

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["http", "p2p"])
async def test_two_processes_sync(transport: str, tmp_path: Path) -> None:
    nodes: list[ProcNode] = []
    try:
        with trio.fail_after(READY_TIMEOUT_S + 4 * LINE_TIMEOUT_S + 2 * SYNC_WAIT_S):
            for name in ("alice", "bob"):
                nodes.append(await ProcNode.start(transport, tmp_path / name, tmp_path / f"{name}.stderr"))
            alice, bob = nodes
            ready = [await node.line(READY_TIMEOUT_S) for node in nodes]
            prefix = "http:127.0.0.1:" if transport == "http" else "p2p:/ip4/127.0.0.1/tcp/"
            assert all(r["ready"] and r["addresses"][0].startswith(prefix) for r in ready)
            assert ready[0]["device_id"] != ready[1]["device_id"]

            created = await alice.command("create notes")
            assert ready[0]["addresses"][0] in created["ticket"]
            db = created["db"]
            assert (await bob.command(f"join {created['ticket']}"))["db"] == db

            await alice.command(f"set {db} from_alice hello bob")
            await bob.command(f"set {db} from_bob hello alice")
            await bob.until(db, "from_alice", "hello bob")
            await alice.until(db, "from_bob", "hello alice")
            assert ready[0]["device_id"] in (await bob.command("info"))["peers"]

            for node in nodes:
                await node.process.stdin.send_all(b"quit\n")  # type: ignore[union-attr]
                assert (await node.line()) == {"ok": True}
            for node in nodes:
                with trio.fail_after(LINE_TIMEOUT_S):
                    assert await node.process.wait() == 0
    finally:
        for node in nodes:
            await node.kill()

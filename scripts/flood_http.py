"""A slow-body flood against a real ``eidetica-node run`` process, and what it costs the node.

    .venv/bin/python -m scripts.flood_http [--quick] [--json] [--connections N] [--body-mb MB]

The attack measured (issue: "slow HTTP bodies"): N connections to the node's HTTP
transport each declare a body of the frame limit (16 MiB), send 15.7 MB of it as fast
as loopback takes it, then send one byte every ``TRICKLE_S`` seconds. The node runs as
``eidetica-node run --no-p2p`` on a fresh data directory (signature checks on threads,
so its RSS is the whole node).

Reported (VmRSS and VmHWM from /proc; data-directory bytes summed over its files):
``before`` (node ready), ``during`` (every connection has sent its bulk), ``peak``
(highest VmRSS sampled every 0.2 s), ``after`` (past the node's 30 s whole-body deadline
plus a margin, every flood connection answered or closed). ``answers`` counts how each
flood connection ended (HTTP status, or ``closed`` when the node hung up first);
``health_ms`` is the slowest ``GET /health`` on a fresh connection during the flood.
``--sources N`` spreads the connections over N loopback addresses (the node gives each
address a share of its body budget; with several, the total cap is what holds).
``--quick`` runs 30 connections and finishes in about 45 s; the default is the 60 of
the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

BIN = str(Path(sys.executable).parent / "eidetica-node")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
TRICKLE_S = 5.0  # one byte this often once the bulk is sent (the attack used 45 s)
BODY_DEADLINE_S = 30.0  # transports.http.DEFAULT_BODY_TIMEOUT_S: the node's whole-body deadline
AFTER_MARGIN_S = 4.0
SAMPLE_S = 0.2
CONNECT_TIMEOUT_S = 10.0
HEAD = b"POST /api/v0 HTTP/1.1\r\nhost: node\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n"
SEND_CHUNK = 64 * 1024
DECLARED_BYTES = 16 * 1024 * 1024  # transports.http.DEFAULT_MAX_FRAME_BYTES: the largest body a node takes
NODE_FLAGS = ("--http-bind", "127.0.0.1:0", "--signature-processes", "0")


@dataclass
class Sample:
    rss_mib: float
    hwm_mib: float
    data_dir_bytes: int


@dataclass
class Result:
    connections: int
    sources: int
    body_bytes: int
    before: Sample
    during: Sample
    peak_rss_mib: float
    after: Sample
    answers: dict[str, int] = field(default_factory=dict)
    health_ms: float = 0.0
    elapsed_s: float = 0.0


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # SQLite may remove -journal meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sample(pid: int, data_dir: Path) -> Sample:
    return Sample(_proc_kib(pid, "VmRSS") / 1024, _proc_kib(pid, "VmHWM") / 1024, _dir_bytes(data_dir))


class Node:
    """One ``eidetica-node run`` child with HTTP on an OS-chosen loopback port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith("EIDETICA_")}
        self.stderr = (data_dir.parent / "node.stderr").open("w")
        self.process = subprocess.Popen(
            [*(BIN, "run", "--data-dir", str(data_dir), "--json", "--no-p2p"), *NODE_FLAGS],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.port = self._ready_port()

    def _ready_port(self) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                ready: dict[str, Any] = json.loads(self.process.stdout.readline())
                address = next(a for a in ready["addresses"] if a.startswith("http:"))
                return int(address.rsplit(":", 1)[1])
            if self.process.poll() is not None:
                break
        self.stop()
        raise SystemExit("the node never got ready (see node.stderr)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.stderr.close()


async def _status_of(stream: trio.SocketStream) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return "closed"
        data += chunk
    return data.split(b" ", 2)[1].decode()


async def _open_from(source: str, port: int) -> trio.SocketStream:
    """A connection to the node from ``source``, one of the loopback addresses (127.0.0.0/8)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def flood_one(
    port: int, source: str, body_bytes: int, until: float, bulk_done: list[int], answers: Counter[str]
) -> None:
    """One attacker connection: the bulk at once, then a byte every TRICKLE_S until answered or ``until``.

    Appends to ``bulk_done`` once its bulk is sent or the node has cut it off, and adds
    how it ended to ``answers``.
    """
    outcome: list[str] = []
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await _open_from(source, port)
    except (OSError, trio.TooSlowError):
        bulk_done.append(1)
        answers["connect failed"] += 1
        return

    async def read() -> None:
        try:
            outcome.append(await _status_of(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            outcome.append("closed")

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        try:
            await stream.send_all(HEAD % max(DECLARED_BYTES, body_bytes + 1))
            zeros = b"\x00" * SEND_CHUNK
            left = body_bytes
            while left and not outcome:
                piece = zeros[: min(left, SEND_CHUNK)]
                await stream.send_all(piece)
                left -= len(piece)
            bulk_done.append(1)
            while not outcome and trio.current_time() < until:
                with trio.move_on_after(TRICKLE_S):
                    while not outcome:
                        await trio.sleep(0.05)
                if not outcome:
                    await stream.send_all(b"\x00")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            bulk_done.append(1)  # the node cut it off mid-bulk
        with trio.move_on_after(2.0):
            while not outcome:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    answers[outcome[0] if outcome else "no answer"] += 1


async def health_ms(port: int) -> float:
    started = time.perf_counter()
    with trio.fail_after(CONNECT_TIMEOUT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nhost: node\r\nconnection: close\r\n\r\n")
            status = await _status_of(stream)
    if status != "200":
        raise RuntimeError(f"/health answered {status} during the flood")
    return (time.perf_counter() - started) * 1000


async def run_flood(
    node: Node,
    connections: int,
    body_bytes: int,
    observe_s: float = BODY_DEADLINE_S + AFTER_MARGIN_S,
    sources: int = 1,
) -> Result:
    """Flood ``node`` and sample it; flood connections still unanswered after ``observe_s`` give up."""
    pid = node.process.pid
    before = sample(pid, node.data_dir)
    started = trio.current_time()
    until = started + observe_s
    bulk_done: list[int] = []
    answers: Counter[str] = Counter()
    peak = before.rss_mib
    during: Sample | None = None
    worst_health = 0.0
    async with trio.open_nursery() as nursery:
        for index in range(connections):
            source = f"127.0.0.{1 + index % sources}"
            nursery.start_soon(flood_one, node.port, source, body_bytes, until, bulk_done, answers)
        while trio.current_time() < until and sum(answers.values()) < connections:
            await trio.sleep(SAMPLE_S)
            now = sample(pid, node.data_dir)
            peak = max(peak, now.rss_mib)
            if during is None and len(bulk_done) >= connections:
                during = now
                worst_health = max(worst_health, await health_ms(node.port))
            elif during is not None and int((trio.current_time() - started) / SAMPLE_S) % 25 == 0:
                worst_health = max(worst_health, await health_ms(node.port))
    await trio.sleep(1.0)  # let the node release what the last answers held
    after = sample(pid, node.data_dir)
    return Result(
        connections=connections,
        sources=sources,
        body_bytes=body_bytes,
        before=before,
        during=during or after,
        peak_rss_mib=max(peak, after.rss_mib),
        after=after,
        answers=dict(sorted(answers.items())),
        health_ms=round(worst_health, 1),
        elapsed_s=round(trio.current_time() - started, 1),
    )


def table(result: Result) -> str:
    mib = 1024 * 1024
    lines = [
        f"slow-body flood: {result.connections} connections from {result.sources} address(es) x "
        f"{result.body_bytes / 1e6:.1f} MB sent at once, "
        f"then one byte every {TRICKLE_S:g} s ({result.elapsed_s:g} s)",
        f"{'when':<8} {'RSS MiB':>9} {'HWM MiB':>9} {'data dir MiB':>13}",
    ]
    for name, point in (("before", result.before), ("during", result.during), ("after", result.after)):
        lines.append(f"{name:<8} {point.rss_mib:>9.1f} {point.hwm_mib:>9.1f} {point.data_dir_bytes / mib:>13.2f}")
    lines.append(f"{'peak':<8} {result.peak_rss_mib:>9.1f}")
    lines.append("answers  " + ", ".join(f"{k}: {v}" for k, v in result.answers.items()))
    lines.append(f"slowest GET /health during the flood: {result.health_ms:g} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 connections (about 45 s in all)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--connections", type=int, help="flood connections (default 60; quick 30)")
    parser.add_argument("--body-mb", type=float, default=15.7, help="MB each sends at once (default 15.7)")
    parser.add_argument(
        "--sources", type=int, default=1, help="spread the connections over 127.0.0.1..127.0.0.N (default 1)"
    )
    args = parser.parse_args(argv)
    connections = args.connections or (30 if args.quick else 60)
    body_bytes = int(args.body_mb * 1e6)
    workdir = Path(tempfile.mkdtemp(prefix="eidetica-flood-"))
    try:
        node = Node(workdir / "data")
        try:
            result = trio.run(run_flood, node, connections, body_bytes, BODY_DEADLINE_S + AFTER_MARGIN_S, args.sources)
        finally:
            node.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(table(result))


if __name__ == "__main__":
    main()

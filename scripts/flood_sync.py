"""Flood a real ``eidetica-node`` daemon the way the security sweep did, and measure it.

    .venv/bin/python -m scripts.flood_sync [--quick] [--json]

Starts the daemon (``eidetica-node run``, p2p and HTTP on loopback, in its own process and
data directory), then runs three floods against its HTTP API from this process:

- handshake flood: many Handshakes as large as the protocol allows (64 addresses of 1,024
  characters and a 4,000-character name), never confirmed, from several connections; then
  handshakes completed by throwaway keys;
- access-request flood: throwaway keys with no rights ask for read on a private database;
- dial reflection: throwaway keys handshake announcing the address of a TCP "victim" this
  script listens on, read a public database once each, then one local ``db set`` runs.

For each it prints the node's RSS (its main process, from /proc) and the bytes of its data
directory before, at the peak during, and after the flood, and what the flood got (answers
by kind, connections the victim saw, peers recorded). ``--json`` prints one JSON object.
``--quick`` (under a minute) uses smaller floods and measures "after" 5 s after each flood
instead of after the 60 s handshake expiry.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from dag import SigningKey, cid_from_text
from scripts.cli_node import NodeProcess, cli
from sync import Address
from sync.messages import Handshake, Message, SyncTree
from sync.peer import handshake
from sync.proofs import make_proof
from transports.http import HttpTransport

SAMPLE_S = 0.2  # how often RSS is sampled during a flood
CONNECTIONS = 8  # concurrent attacker connections for the handshake flood
QUICK_AFTER_S = 5.0
# The largest Handshake the protocol decodes: 64 addresses of at most 1,024 characters
# (sync.messages); kept here as numbers so the script runs against older code as well.
HELLO_ADDRESSES = 64
HELLO_ADDRESS_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Sizes:
    quick: bool
    handshakes: int
    completed: int
    requests: int
    reflectors: int
    reflection_wait_s: float
    after_s: float


QUICK = Sizes(True, handshakes=1_000, completed=100, requests=500, reflectors=100, reflection_wait_s=8.0, after_s=5.0)
FULL = Sizes(
    False, handshakes=5_000, completed=200, requests=1_500, reflectors=200, reflection_wait_s=30.0, after_s=65.0
)


@dataclass
class Measure:
    rss_mib: float
    disk_mib: float


@dataclass
class FloodResult:
    name: str
    sent: int
    seconds: float
    before: Measure
    peak: Measure
    after: Measure
    got: dict[str, Any] = field(default_factory=dict)


def rss_mib(pid: int) -> float:
    """The process's resident set, in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def disk_mib(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):  # a file SQLite removed while we walked
                total += os.path.getsize(os.path.join(root, name))
    return total / (1024 * 1024)


class Target:
    """The daemon under attack: where it listens and how to measure it."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.pid = node.process.pid
        self.device_id: str = node.ready["device_id"]
        self.http = next(a.split(":", 1)[1] for a in node.ready["addresses"] if a.startswith("http:"))

    def measure(self) -> Measure:
        return Measure(round(rss_mib(self.pid), 1), round(disk_mib(self.node.data_dir), 2))

    async def cli_json(self, *args: str) -> Any:
        return await trio.to_thread.run_sync(functools.partial(self.node.json, *args))

    async def cli_ok(self, *args: str) -> str:
        return await trio.to_thread.run_sync(functools.partial(self.node.ok, *args))


async def ask(client: HttpTransport, address: str, message: Message) -> list[Message]:
    async with aclosing(client.request(address, message)) as answers:
        return [answer async for answer in answers]


def kind(answers: list[Message]) -> str:
    last = answers[-1] if answers else None
    if last is None:
        return "nothing"
    code = getattr(last, "code", None)
    return f"Error({code})" if code else last.TYPE


async def measured(
    target: Target, name: str, sent: int, after_s: float, flood: Callable[[], Awaitable[dict[str, Any]]]
) -> FloodResult:
    """Run ``flood`` while sampling RSS and disk; then measure again ``after_s`` later."""
    before = target.measure()
    peak = Measure(before.rss_mib, before.disk_mib)
    done = trio.Event()

    async def sample() -> None:
        while not done.is_set():
            now = target.measure()
            peak.rss_mib = max(peak.rss_mib, now.rss_mib)
            peak.disk_mib = max(peak.disk_mib, now.disk_mib)
            with trio.move_on_after(SAMPLE_S):
                await done.wait()

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        got = await flood()
        done.set()
    seconds = round(time.monotonic() - started, 1)
    await trio.sleep(after_s)
    return FloodResult(name, sent, seconds, before, peak, target.measure(), got)


def big_hello(key: SigningKey) -> Handshake:
    """As large as a Handshake may be: 64 addresses of 1,024 characters, a 4,000-character name."""
    addresses = tuple(("http", f"127.0.0.1:{i}/" + "x" * (HELLO_ADDRESS_CHARS - 20)) for i in range(HELLO_ADDRESSES))
    return Handshake(key.pubkey, "n" * 4000, 1, os.urandom(32), addresses)


async def handshake_flood(target: Target, sizes: Sizes) -> FloodResult:
    async def flood() -> dict[str, Any]:
        answers: Counter[str] = Counter()
        per = sizes.handshakes // CONNECTIONS

        async def connection() -> None:
            client = HttpTransport(bind="127.0.0.1:0")
            try:
                for _ in range(per):
                    try:
                        answers[kind(await ask(client, target.http, big_hello(SigningKey.generate())))] += 1
                    except Exception as exc:  # a refused or cut request is a result too
                        answers[type(exc).__name__] += 1
            finally:
                await client.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(connection)
        completed = 0
        client = HttpTransport(bind="127.0.0.1:0")
        try:
            junk = [Address("http", f"10.0.0.{i % 250}:{i}/" + "x" * 900) for i in range(HELLO_ADDRESSES)]
            for _ in range(sizes.completed):
                await handshake(client, target.http, SigningKey.generate(), "stranger" * 400, junk)
                completed += 1
        finally:
            await client.aclose()
        started = time.monotonic()
        await target.cli_json("health")  # a CLI call's own cost (a fresh interpreter), to subtract
        health_s = time.monotonic() - started
        started = time.monotonic()
        peers = len((await target.cli_json("peers"))["peers"])
        return {
            "answers": dict(answers),
            "completed_handshakes": completed,
            "peers_recorded": peers,
            "peers_command_s_over_health": round(time.monotonic() - started - health_s, 2),
        }

    return await measured(target, "handshake flood", sizes.handshakes + sizes.completed, sizes.after_s, flood)


async def access_flood(target: Target, sizes: Sizes, db_id: str) -> FloodResult:
    db = cid_from_text(db_id)

    async def flood() -> dict[str, Any]:
        answers: Counter[str] = Counter()
        timings: list[float] = []
        client = HttpTransport(bind="127.0.0.1:0")
        try:
            for _ in range(sizes.requests):
                key = SigningKey.generate()
                request = SyncTree(
                    db, auth=make_proof(key, target.device_id, db, (), int(time.time() * 1000)), access="read"
                )
                started = time.perf_counter()
                answers[kind(await ask(client, target.http, request))] += 1
                timings.append((time.perf_counter() - started) * 1000)
        finally:
            await client.aclose()
        pending = len((await target.cli_json("access", "list"))["requests"])
        first, last = timings[:100], timings[-100:]
        return {
            "answers": dict(answers),
            "pending_requests": pending,
            "ms_per_request_first_100": round(sum(first) / len(first), 2),
            "ms_per_request_last_100": round(sum(last) / len(last), 2),
        }

    return await measured(target, "access-request flood", sizes.requests, sizes.after_s, flood)


async def reflection_flood(target: Target, sizes: Sizes, db_id: str) -> FloodResult:
    db = cid_from_text(db_id)
    dials = 0

    async def victim(stream: trio.SocketStream) -> None:
        nonlocal dials
        dials += 1
        await stream.aclose()

    async def flood() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(functools.partial(trio.serve_tcp, victim, 0, host="127.0.0.1"))
            aim = f"127.0.0.1:{listener.socket.getsockname()[1]}"
            answers: Counter[str] = Counter()
            client = HttpTransport(bind="127.0.0.1:0")
            try:
                for _ in range(sizes.reflectors):
                    key = SigningKey.generate()
                    await handshake(client, target.http, key, "reflector", [Address("http", aim)])
                    proof = make_proof(key, target.device_id, db, (), int(time.time() * 1000))
                    answers[kind(await ask(client, target.http, SyncTree(db, auth=proof)))] += 1
            finally:
                await client.aclose()
            await target.cli_ok("db", "set", db_id, "poke", "1")  # the one local write
            await trio.sleep(sizes.reflection_wait_s)
            nursery.cancel_scope.cancel()
        shown = await target.cli_json("db", "show", db_id)
        return {
            "reads": dict(answers),
            "victim_connections": dials,
            "waited_s": sizes.reflection_wait_s,
            "peers_recorded": len((await target.cli_json("peers"))["peers"]),
            "relationships": len(shown.get("peers", [])),
        }

    return await measured(target, "dial reflection", sizes.reflectors, sizes.after_s, flood)


async def run(sizes: Sizes, data_dir: Path) -> list[FloodResult]:
    init = cli("init", "--data-dir", str(data_dir))
    if init.returncode != 0:
        raise SystemExit(f"eidetica-node init failed: {init.stderr.strip()}")
    node = NodeProcess.start(data_dir, "--name", "flooded")
    try:
        target = Target(node)
        private = await target.cli_ok("db", "create", "private")
        public = await target.cli_ok("db", "create", "public", "--public", "read")
        await trio.sleep(1.0)  # let start-up settle before the first "before"
        return [
            await handshake_flood(target, sizes),
            await access_flood(target, sizes, private),
            await reflection_flood(target, sizes, public),
        ]
    finally:
        node.stop()


def table(results: list[FloodResult]) -> str:
    header = f"{'flood':<22}{'sent':>7}{'s':>7}  {'RSS MiB before/peak/after':<28}{'disk MiB before/peak/after':<28}"
    lines = [header, "-" * len(header)]
    for r in results:
        rss = f"{r.before.rss_mib:.1f} / {r.peak.rss_mib:.1f} / {r.after.rss_mib:.1f}"
        disk = f"{r.before.disk_mib:.2f} / {r.peak.disk_mib:.2f} / {r.after.disk_mib:.2f}"
        lines.append(f"{r.name:<22}{r.sent:>7}{r.seconds:>7}  {rss:<28}{disk:<28}")
        for key, value in r.got.items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller floods, under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data-dir", help="where the node keeps its data (default: a temporary directory)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="flood-sync-") as scratch:
        data_dir = Path(args.data_dir) if args.data_dir else Path(scratch) / "node"
        results = trio.run(run, sizes, data_dir)
    if args.json:
        print(json.dumps({"sizes": asdict(sizes), "floods": [asdict(r) for r in results]}))
    else:
        print(table(results))
        if sizes.quick:
            print(f"(--quick: 'after' is {QUICK_AFTER_S:g} s after each flood, before the 60 s handshake expiry)")


if __name__ == "__main__":
    main()

"""Disk fill by a stranger: flood a real node with Failed and Unverified entries, measure.

    .venv/bin/python -m scripts.flood_disk [--quick] [--json]

The victim is a node in a process of its own (``python -m scripts.proc_node --transport
http``: SQLite in a temporary data directory, the real HTTP transport on 127.0.0.1) holding
one public database (global Write, as ``create`` makes it). The attacker, in this process,
joins it with the ticket (a real bootstrap over HTTP) and then, with a key nobody granted
anything, POSTs ``SendEntries`` requests of junk from ``--sources`` loopback addresses
(default 3: more than one, so that the sync layer's per-peer bound does not stop the flood
before the database's own bound in storage is reached), half of each kind:

* **Unverified**: well-formed, validly signed entries whose parent is an ID nobody holds,
  so they can only wait; each carries ``PAD`` bytes of data;
* **Failed**: entries on the real tips whose signature does not verify.

Measured (``disk`` = the bytes of every file in the data directory, ``rss`` = the victim's
VmRSS): before the flood, the largest value seen during it (sampled after every request),
right after it, and after the node was stopped and started again on the same directory.
Then the stopped node's SQLite file is read: what it stores of the junk (Unverified rows
and their bytes, Failed rows, banned IDs). Quick: 160 MiB of junk (80 MiB of each kind,
past the 64 MiB Unverified cap); full: 400 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import libipld
import trio

from dag import Entry, Instance, SigningKey
from dag.ids import CID_PREFIX
from dag.ingest import MAX_UNVERIFIED_BYTES, MAX_UNVERIFIED_ENTRIES
from dag.instance import DB_FILE
from sync import SyncConfig, enable_sync
from sync.messages import Count, SendEntries, decode_message, encode_message
from tests.forge import forge
from transports.http import API_PATH, HttpTransport
from transports.http_codec import CONTENT_MSGPACK, FrameReader

PAD = 16 * 1024  # data bytes per junk entry: big entries fill a disk fastest per signature
PER_REQUEST = 128  # junk entries per SendEntries (~2 MiB: far under the 16 MiB frame limit)
QUICK_BYTES = 160 * 1024 * 1024
FULL_BYTES = 400 * 1024 * 1024
READY_TIMEOUT_S = 60.0  # a node process that is not serving by then is broken
ANSWER_TIMEOUT_S = 60.0  # one request: decoding, checking and storing ~2 MiB
# The junk is sent from this many loopback addresses (127.0.0.2, .3, ...), round robin: the
# sync layer bounds what each peer leaves Unverified (64 MiB), so one source alone stops at
# that bound; three go past it, to the database's own bound in storage.
SOURCES = 3


@dataclass
class Sample:
    disk_bytes: int
    rss_bytes: int


@dataclass
class Report:
    quick: bool
    sources: int
    sent_entries: int = 0
    sent_bytes: int = 0
    requests: int = 0
    answered_failed: int = 0
    answered_verified: int = 0
    refused_requests: dict[str, int] = field(default_factory=dict)  # answer code -> requests
    flood_s: float = 0.0
    limits: dict[str, int] = field(default_factory=dict)
    phases: dict[str, Sample] = field(default_factory=dict)
    stored_after_restart: dict[str, int] = field(default_factory=dict)


class NodeProcess:
    """``scripts.proc_node`` driven over its stdin/stdout JSON lines."""

    def __init__(self, data_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scripts.proc_node", "--transport", "http", "--data-dir", str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.ready = self._line(READY_TIMEOUT_S)
        if not self.ready.get("ready"):
            raise RuntimeError(f"node did not start: {self.ready}")

    def _line(self, timeout_s: float) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = stdout.readline()
            if line:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}")
        raise RuntimeError("node did not answer in time")

    def command(self, line: str) -> dict[str, Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()
        answer = self._line(ANSWER_TIMEOUT_S)
        if not answer.get("ok"):
            raise RuntimeError(f"{line!r}: {answer}")
        return answer

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        try:
            self.command("quit")
        finally:
            self.process.wait(timeout=READY_TIMEOUT_S)


def disk_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.iterdir() if p.is_file())


def _bad_signature(entry: Entry) -> bytes:
    value = libipld.decode_dag_cbor(entry.raw)
    text = value["sig"]["sig"]
    value["sig"]["sig"] = ("B" if text[0] != "B" else "C") + text[1:]
    return bytes(libipld.encode_dag_cbor(value))


def junk_batch(db: Any, stranger: SigningKey, serial: int) -> list[bytes]:
    """Half Unverified (a parent nobody holds), half Failed (a signature that does not verify)."""
    raws = []
    for i in range(PER_REQUEST // 2):
        missing = CID_PREFIX + os.urandom(32)
        pad = {"n": i, "r": serial, "pad": "u" * PAD}
        raws.append(forge(db, stranger, {"junk": pad}, parents=[missing], height=3).raw)
        raws.append(_bad_signature(forge(db, stranger, {"junk": {"n": i, "r": serial, "pad": "f" * PAD}})))
    return raws


async def _joined_copy(ticket: str, workdir: Path) -> tuple[Instance, Any, str]:
    """The attacker's own copy of the public database (a real bootstrap over HTTP)."""
    instance = Instance.open(workdir / "attacker", synchronous="off")
    async with enable_sync(instance, config=SyncConfig(display_name="stranger")) as sync:
        transport = HttpTransport(bind="127.0.0.1:0")
        try:
            sync.register_transport("http", transport)
            db = await sync.join(ticket)
        finally:
            await transport.aclose()
    address = ticket_address(ticket)
    return instance, db, f"http://{address}{API_PATH}"


def ticket_address(ticket: str) -> str:
    from sync.ticket import Ticket

    parsed = Ticket.parse(ticket)
    return next(a.address for a in parsed.addresses if a.transport == "http")


async def flood(report: Report, node: NodeProcess, data_dir: Path, workdir: Path, total: int) -> None:
    created = node.command("create flood")
    instance, db, url = await _joined_copy(created["ticket"], workdir)
    stranger = SigningKey.generate()
    report.phases["before"] = Sample(disk_bytes(data_dir), node.rss_bytes())
    peak = Sample(0, 0)
    started = time.monotonic()
    try:
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        timeout=ANSWER_TIMEOUT_S,
                        trust_env=False,
                        transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{2 + k}"),
                    )
                )
                for k in range(report.sources)
            ]
            while report.sent_bytes < total:
                client = clients[report.requests % len(clients)]
                raws = junk_batch(db, stranger, report.requests)
                body = encode_message(SendEntries(db.root_cid, tuple(raws)))
                response = await client.post(url, content=body, headers={"content-type": CONTENT_MSGPACK})
                frames = FrameReader(len(response.content) + 1).feed(response.content)
                answer = decode_message(frames[0]) if frames else None
                if isinstance(answer, Count):
                    report.answered_failed += answer.failed
                    report.answered_verified += answer.stored
                else:
                    kind = getattr(answer, "code", None) or f"HTTP {response.status_code}"
                    report.refused_requests[kind] = report.refused_requests.get(kind, 0) + 1
                report.requests += 1
                report.sent_entries += len(raws)
                report.sent_bytes += sum(len(r) for r in raws)
                now = Sample(disk_bytes(data_dir), node.rss_bytes())
                peak = Sample(max(peak.disk_bytes, now.disk_bytes), max(peak.rss_bytes, now.rss_bytes))
    finally:
        instance.close()
    report.flood_s = round(time.monotonic() - started, 1)
    report.phases["during_max"] = peak
    report.phases["after"] = Sample(disk_bytes(data_dir), node.rss_bytes())


def stored_junk(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{data_dir / DB_FILE}?mode=ro", uri=True) as db:
        unverified, unverified_bytes = db.execute(
            "SELECT count(*), coalesce(sum(length(raw)), 0) FROM entries WHERE status = 0"
        ).fetchone()
        failed = db.execute("SELECT count(*) FROM entries WHERE status = 2").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        banned = db.execute("SELECT count(*) FROM banned").fetchone()[0] if "banned" in tables else 0
    return {
        "unverified_entries": unverified,
        "unverified_bytes": unverified_bytes,
        "failed_entries_stored": failed,
        "banned_ids": banned,
    }


def run(quick: bool, sources: int = SOURCES) -> Report:
    limits = {"max_unverified_entries": MAX_UNVERIFIED_ENTRIES, "max_unverified_bytes": MAX_UNVERIFIED_BYTES}
    report = Report(quick=quick, sources=sources, limits=limits)
    with tempfile.TemporaryDirectory(prefix="flood-disk-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "victim"
        node = NodeProcess(data_dir)
        try:
            trio.run(flood, report, node, data_dir, workdir, QUICK_BYTES if quick else FULL_BYTES)
        finally:
            node.stop()
        node = NodeProcess(data_dir)
        try:
            time.sleep(0.5)  # let the restarted node settle before reading its RSS
            report.phases["after_restart"] = Sample(disk_bytes(data_dir), node.rss_bytes())
        finally:
            node.stop()
        report.stored_after_restart = stored_junk(data_dir)
    return report


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def print_table(report: Report) -> None:
    print(
        f"flood: {report.sent_entries:,} junk entries, {_mib(report.sent_bytes)} in {report.requests} SendEntries"
        f" over HTTP from {report.sources} addresses in {report.flood_s} s"
        f" (answers: {report.answered_failed:,} failed)"
    )
    if report.refused_requests:
        print(f"requests answered with an error: {report.refused_requests}")
    print(f"limits: {report.limits}")
    print(f"{'phase':<16}{'data dir':>14}{'victim RSS':>14}")
    for name, sample in report.phases.items():
        print(f"{name:<16}{_mib(sample.disk_bytes):>14}{_mib(sample.rss_bytes):>14}")
    print("stored after restart: " + ", ".join(f"{k} {v:,}" for k, v in report.stored_after_restart.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="160 MiB of junk instead of 400 MiB (under ~60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--sources", type=int, default=SOURCES, help="loopback addresses the junk comes from")
    args = parser.parse_args(argv)
    report = run(args.quick, max(1, args.sources))
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_table(report)


if __name__ == "__main__":
    main()

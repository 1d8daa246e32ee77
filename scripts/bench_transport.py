"""Suite ``transport``: two nodes in two processes, on loopback, over each real transport.

For each transport (``libp2p``: TCP + Noise + Yamux; ``http``: HTTP/1.1 POST), every
figure is measured between two separate processes, each one node started by this module
in child mode (``python -m scripts.bench_transport --child ...``): a SQLite data dir in a
temporary directory (``Instance.open(dir)``, the default ``synchronous="full"``), sync
enabled, the one transport registered and serving on 127.0.0.1, then the heap settled
(``node.runtime.settle_heap``) and signatures checked in worker processes (one per core,
``dag.verifier``), as ``eidetica-node run`` does by default. The driver speaks to a
child in JSON lines over stdin/stdout; timestamps crossing processes are
``time.monotonic()`` (CLOCK_MONOTONIC is system-wide on Linux).

* ``bootstrap_s`` (size -> s): the source database holds N entries in all (its root, one
  settings commit granting global Write, N-2 commits of one DocStore write each). It is
  built once per run in the driver with ``Instance.open(dir, synchronous="off")`` (the
  10K data dir is a copy taken on the way to 100K) and each server child opens a fresh
  copy of that data dir. A fresh client process per size joins with the server's ticket;
  the time is from the ``await sync.join(ticket)`` call to its return, and counts only
  once the client's ``status_counts()`` says verified == N. ``entries_per_s`` and
  ``mb_per_s`` (raw entry bytes, 10^6 bytes per MB) are for the largest size.
  ``cpu_s`` is each child's CPU time (user+system, from /proc) during the join.
* ``p50_ms`` / ``p95_ms``: after the first bootstrap, with the two nodes connected, the
  server commits one entry every 50 ms (``LIVE_COMMITS``, quick: 30). The latency of a
  commit is the client's ``on_write`` callback time (remote writes) minus the time the
  server *started* the commit (so the local commit, signing and fsync count, as in the
  anchors' "one live write reaching a connected peer"); ``*_after_commit_ms`` are from
  the moment the commit returned. The history is one chain, so a callback whose tips
  include commit k delivers every commit up to k. Percentiles are nearest-rank.
* ``connect_ms``: the median over ``CONNECTS`` fresh client transports (a new key, a new
  libp2p host or HTTP client each, created and started before the clock starts) of one
  handshake (``sync.peer.handshake``: Handshake + HandshakeConfirm) with the server, so
  it includes TCP and, for libp2p, Noise + Yamux + multistream negotiation.
  ``connect_warm_ms``: the same handshake over the client's own (registered) transport,
  whose connection is already open; ``connect_sync_call_ms``: ``sync.connect(address)``
  over it (the handshake, then the peer recorded in ``_sync``: one more local commit).
* ``rss_mib``: VmRSS of both children right after the first bootstrap (10K; quick: 2K);
  ``rss_mib_max`` the larger; ``rss_peak_mib`` their VmHWM; ``rss_mib_largest`` after the
  largest bootstrap; ``rss_workers_mib`` the summed VmRSS of each node's signature worker
  processes, which ``cpu_s`` also counts.

* ``relay``: libp2p through a circuit relay v2, every byte between the two nodes relayed:
  each child reserves a slot on the relay and advertises only its ``/p2p-circuit``
  address (its handshakes and tickets carry nothing else), hole punching is off, and the
  server's database has the smallest size of the run. ``relay.bootstrap_s`` (size -> s),
  ``relay.p50_ms`` and ``relay.p95_ms`` (as above; quick: 30 commits) are measured through
  a relay with the standard limits, 128 KiB and 2 minutes per circuit: js-libp2p's own
  relay with its defaults (``tests/js/relay.mjs``) when Node and ``tests/js/node_modules``
  are present, else our ``RelayService`` configured with those limits; ``relay.standard``
  says which. ``relay.ours`` has the same figures through our ``RelayService`` with its
  own (generous) defaults. A relay that cannot carry the bootstrap is reported with its
  error (``relay.error``/``relay.ours.error``), not as a crash of the suite.

``python -m scripts.bench_transport --profile [--transport libp2p] [--size N]`` runs one
bootstrap with py-spy (``$PY_SPY`` or on PATH) recording the client child and prints
where its CPU time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from dag import Instance, Permission, SigningKey, Status, cid_from_text
from node import runtime
from node.config import NodeConfig
from sync import Address, Sync, SyncConfig, enable_sync

REPO = Path(__file__).resolve().parent.parent
TRANSPORTS = {"libp2p": "p2p", "http": "http"}  # suite key -> the name it is registered (and addressed) under
FULL_SIZES = [10_000, 100_000]
QUICK_SIZES = [2_000]
LIVE_COMMITS = 200
QUICK_LIVE_COMMITS = 30
LIVE_INTERVAL_S = 0.05
CONNECTS = 10
QUICK_CONNECTS = 5

READY_TIMEOUT_S = 60.0  # a fresh interpreter imports trio, libp2p, hypercorn, httpx and the node
COMMAND_TIMEOUT_S = 60.0  # a command without its own bound
JOIN_TIMEOUT_S = 600.0  # 100K entries on a busy 2-core machine; normally seconds
CHILD_REQUEST_TIMEOUT_S = (
    600.0  # the engine's bound on one exchange (default 60 s): a slow run is a figure, not a failure
)
ANSWER_SLACK_S = 30.0  # the driver waits this much longer than the child's own bound
QUIT_WAIT_S = 3.0
MAX_COMMANDS = 10_000

BOOTSTRAP_GOALS_S = {"10000": 0.6, "100000": 6.0}  # from the issue, over libp2p, by history size
GOALS = {  # from the issue
    "p50_ms": 8.0,
    "p95_ms": 15.0,
    "rss_mib": 110.0,
}
ANCHORS = {
    "10000": "Automerge 0.80-0.88 s, OrbitDB 49-52 s",
    "p50_ms": "Automerge 13.6-15.8, OrbitDB 12.5-13.8",
    "p95_ms": "Automerge 20.7-23.4, OrbitDB 15.0-21.1",
    "rss_mib": "anchors 164-251 MiB",
}


def _progress(message: str) -> None:
    print(f"[transport] {message}", file=sys.stderr, flush=True)


# ---- child mode: one node, driven over stdin/stdout --------------------------------------------


def _new_transport(name: str, key: SigningKey, relay: str | None = None) -> Any:
    if name == "p2p" and relay:
        return _relayed_only_transport(key, relay)
    if name == "p2p":
        from transports.libp2p import Libp2pTransport

        return Libp2pTransport(key, listen=["/ip4/127.0.0.1/tcp/0"])
    if name == "http":
        from transports.http import HttpTransport

        return HttpTransport(bind="127.0.0.1:0")
    raise ValueError(f"unknown transport {name!r}")


def _relayed_only_transport(key: SigningKey, relay: str) -> Any:
    """A libp2p transport reserved on ``relay`` that tells peers only its circuit address
    and never punches a hole: so that all the traffic of the ``relay`` figures is relayed
    (on loopback a direct dial or a punch would always win)."""
    from transports.libp2p import Libp2pTransport

    class RelayedOnly(Libp2pTransport):
        def listen_addresses(self) -> list[str]:
            return [a for a in super().listen_addresses() if "/p2p-circuit/" in a]

    return RelayedOnly(key, listen=["/ip4/127.0.0.1/tcp/0"], relays=[relay], hole_punching=False)


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


class _Node:
    """The child's commands; each takes the request's fields and returns the answer's."""

    def __init__(self, instance: Instance, sync: Sync, transport: str, own_transport: Any) -> None:
        self.instance = instance
        self.sync = sync
        self.transport = transport
        self.own_transport = own_transport  # the one registered with sync (its connections are open)
        self.arrivals: list[tuple[float, list[str]]] = []

    async def ticket(self, db: str) -> dict[str, Any]:
        return {"ticket": str(self.sync.create_ticket(db)), "entries": len(self.instance.open_database(db))}

    async def join(self, ticket: str, expect: int) -> dict[str, Any]:
        started = time.monotonic()
        db = await self.sync.join(ticket)
        seconds = time.monotonic() - started
        counts = db.status_counts()
        if counts.get("verified") != expect:
            raise AssertionError(f"joined with {counts}, expected {expect} verified")
        return {"db": db.id, "seconds": seconds, "counts": counts}

    async def relate(self, db: str, peer: str) -> dict[str, Any]:
        """The sharer's choice to push to a reader (a peer that only read is never dialled)."""
        self.sync.state.relate(db, peer)
        return {}

    async def watch(self, db: str) -> dict[str, Any]:
        def on_write(_db: Any, _before: list[str], after: list[str], local: bool) -> None:
            if not local:  # may run on a worker thread: list.append is atomic
                self.arrivals.append((time.monotonic(), after))

        self.instance.on_write(on_write, database_id=db)
        return {}

    async def live(self, db: str, count: int, interval_s: float) -> dict[str, Any]:
        database = self.instance.open_database(db)
        commits = []
        start = time.monotonic()
        for i in range(count):
            began = time.monotonic()
            txn = database.transaction()
            txn.doc("live").set("n", i)
            cid = txn.commit()
            commits.append((cid, began, time.monotonic()))
            await trio.sleep(max(0.0, start + (i + 1) * interval_s - time.monotonic()))
        return {"commits": commits}

    async def arrivals_until(self, db: str, last: str, wait_s: float) -> dict[str, Any]:
        database = self.instance.open_database(db)
        target = cid_from_text(last)
        with trio.move_on_after(wait_s):
            while database.status_of(target) is not Status.VERIFIED:
                await trio.sleep(0.02)
        return {"arrivals": list(self.arrivals), "complete": database.status_of(target) is Status.VERIFIED}

    async def connect(self, address: str, count: int) -> dict[str, Any]:
        from sync.peer import handshake
        from sync.transport import BackgroundTransport, ClosingTransport

        name, _, where = address.partition(":")
        fresh = []
        for _ in range(count):
            key = SigningKey.generate()
            transport = _new_transport(name, key)
            async with trio.open_nursery() as nursery:
                if isinstance(transport, BackgroundTransport):
                    await nursery.start(transport.run)  # the libp2p host's service (needed to dial)
                make_client = getattr(transport, "_http_client", None)
                if make_client is not None:
                    make_client()  # httpx builds its SSL context here: a per-transport, not per-connection, cost
                with trio.fail_after(COMMAND_TIMEOUT_S):
                    started = time.monotonic()
                    await handshake(transport, where, key, "probe", [])
                    fresh.append((time.monotonic() - started) * 1000)
                if isinstance(transport, ClosingTransport):
                    with trio.move_on_after(5):
                        await transport.aclose()
                nursery.cancel_scope.cancel()
        warm, call = [], []
        for _ in range(count):
            started = time.monotonic()
            await handshake(self.own_transport, where, self.instance.device_key, "probe", [])
            warm.append((time.monotonic() - started) * 1000)
            started = time.monotonic()
            await self.sync.connect(Address(name, where))  # also records the peer in _sync (a commit)
            call.append((time.monotonic() - started) * 1000)
        return {"fresh_ms": fresh, "warm_ms": warm, "sync_connect_ms": call}

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.pop("cmd")
        request.pop("timeout_s", None)
        calls: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
            "ticket": self.ticket,
            "join": self.join,
            "watch": self.watch,
            "relate": self.relate,
            "live": self.live,
            "arrivals": self.arrivals_until,
            "connect": self.connect,
        }
        if command not in calls:
            raise ValueError(f"unknown command {command!r}")
        result: dict[str, Any] = await calls[command](**request)
        return result


async def _child(args: argparse.Namespace) -> None:
    instance = Instance.open(Path(args.data_dir))
    workers = NodeConfig().signature_process_count()  # as ``eidetica-node run`` does by default
    if workers:
        instance.use_signature_processes(workers)
    try:
        config = SyncConfig(display_name=args.role, request_timeout_s=CHILD_REQUEST_TIMEOUT_S)
        async with enable_sync(instance, config=config) as sync:
            transport = _new_transport(args.transport, instance.device_key, args.relay)
            sync.register_transport(args.transport, transport)
            await sync.accept_connections()
            with trio.fail_after(READY_TIMEOUT_S):  # relayed: ready once the reservation gave an address
                while not sync.listen_addresses():
                    await trio.sleep(0.05)
            runtime.settle_heap()  # as ``eidetica-node run`` does once listening
            node = _Node(instance, sync, args.transport, transport)
            addresses = [str(a) for a in sync.listen_addresses()]
            _emit({"ready": True, "pid": os.getpid(), "device_id": instance.device_id, "addresses": addresses})
            stdin = trio.wrap_file(sys.stdin)
            for _ in range(MAX_COMMANDS):
                line = await stdin.readline()
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if request.get("cmd") == "quit":
                        _emit({"ok": True})
                        break
                    with trio.fail_after(float(request.get("timeout_s", COMMAND_TIMEOUT_S))):
                        answer = await node.dispatch(request)
                    _emit({"ok": True, **answer})
                except Exception as exc:  # answer the driver; the node carries on
                    _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        instance.close()


# ---- the driver's side of a child ---------------------------------------------------------------


def _proc_memory(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class _Child:
    """One child process; every wait on it is bounded."""

    cpu_total_s = 0.0  # CPU time of every child stopped so far (the harness counts it as other processes')

    def __init__(self, role: str, transport: str, data_dir: Path, log_path: Path, relay: str | None = None) -> None:
        self.role = role
        self.log_path = log_path
        args = [sys.executable, "-m", "scripts.bench_transport", "--child", "--role", role]
        args += ["--transport", transport, "--data-dir", str(data_dir)]
        args += ["--relay", relay] if relay else []
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO, text=True, bufsize=1
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        self.ready = self._line(READY_TIMEOUT_S)
        if not self.ready.get("ready"):
            raise RuntimeError(f"{role} did not start: {self.ready}")
        self.pid: int = self.ready["pid"]
        self.addresses: list[str] = self.ready["addresses"]

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _line(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.role}: no answer in {timeout_s:g} s; stderr:\n{self._stderr_tail()}") from None
        if line is None:
            raise RuntimeError(f"{self.role} exited; stderr:\n{self._stderr_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, cmd: str, timeout_s: float = COMMAND_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, "timeout_s": timeout_s, **fields}) + "\n")
        self.process.stdin.flush()
        answer = self._line(timeout_s + ANSWER_SLACK_S)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.role} {cmd}: {answer.get('error')}; stderr:\n{self._stderr_tail()}")
        return answer

    def workers(self) -> list[int]:
        """PIDs of the node's own child processes (its signature workers)."""
        pids: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/children", encoding="ascii") as handle:
                    pids += [int(pid) for pid in handle.read().split()]
        return pids

    def status(self) -> dict[str, float]:
        """VmRSS and VmHWM of the node process in MiB; ``workers_VmRSS``: its workers' summed."""
        out = _proc_memory(self.pid)
        out["workers_VmRSS"] = sum(_proc_memory(pid).get("VmRSS", 0.0) for pid in self.workers())
        return out

    def cpu_s(self) -> float:
        """CPU seconds of the node process and of its workers."""
        return sum(_proc_cpu_s(pid) for pid in (self.pid, *self.workers()))

    def stop(self) -> None:
        """Ask it to quit; kill it if it has not within a few seconds, or at once if it hangs."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                _Child.cpu_total_s += self.cpu_s()
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=QUIT_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


# ---- relays -------------------------------------------------------------------------------------

JS_DIR = REPO / "tests" / "js"
STANDARD_LIMITS = {"circuit_bytes": 128 * 1024, "circuit_duration_s": 120}  # js-libp2p's and go-libp2p's defaults


def js_relay_available() -> bool:
    """Node >= 20 on PATH and the pinned packages installed in tests/js."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "libp2p").is_dir():
        return False
    done = subprocess.run([node, "-p", "process.versions.node"], capture_output=True, text=True, timeout=30)
    return done.returncode == 0 and int(done.stdout.split(".")[0]) >= 20


async def _relay_child(kind: str) -> None:
    """A relay only (no sync): our RelayService with its defaults (``ours``) or the standard limits."""
    from transports.libp2p import Libp2pTransport
    from transports.relay import RelayLimits

    limits = RelayLimits(**STANDARD_LIMITS) if kind == "standard" else RelayLimits()
    relay = Libp2pTransport(
        SigningKey.generate(), listen=["/ip4/127.0.0.1/tcp/0"], relay_service=True, relay_limits=limits
    )

    async def no_requests(_message: Any, _context: Any) -> Any:
        return
        yield  # an async generator that answers nothing: a relay serves no sync requests

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await nursery.start(relay.serve, no_requests)
        _emit({"addrs": relay.listen_addresses()})
        await trio.wrap_file(sys.stdin).read()  # until the driver closes our stdin
        nursery.cancel_scope.cancel()


class _RelayProcess:
    """A relay in a process of its own: js-libp2p's (``tests/js/relay.mjs``) or ours (``--relay-child``)."""

    def __init__(self, kind: str, log_path: Path) -> None:
        if kind == "js":
            argv, cwd = [shutil.which("node") or "node", "relay.mjs"], JS_DIR
        else:
            argv, cwd = [sys.executable, "-m", "scripts.bench_transport", "--relay-child", kind], REPO
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=cwd)
        self.log_path = log_path
        try:
            self.address = self._first_line()["addrs"][0]
        except BaseException:
            self.stop()
            raise

    def _first_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            line = lines.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            line = b""
        if not line:
            raise RuntimeError(f"the relay did not start; its stderr:\n{self.log_path.read_text(errors='replace')}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=QUIT_WAIT_S + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ---- building the source databases ---------------------------------------------------------------


def _build(root: Path, sizes: list[int]) -> tuple[str, dict[int, dict[str, Any]]]:
    """One data dir per size (the smaller a copy on the way to the larger), built with synchronous=off."""
    work = root / "build"
    instance = Instance.open(work, synchronous="off")
    db = instance.create_database(name="bench")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    db_id, count = db.id, 2
    out: dict[int, dict[str, Any]] = {}
    try:
        for size in sorted(sizes):
            started = time.monotonic()
            while count < size:
                with db.transaction() as txn:
                    txn.doc("notes").set(f"k{count % 50}", count)
                count += 1
            raw_bytes = sum(len(raw) for _, raw in db.raw_entries())
            if len(db) != size:
                raise AssertionError(f"built {len(db)} entries, wanted {size}")
            instance.close()
            template = root / f"template-{size}"
            shutil.copytree(work, template)
            out[size] = {"dir": template, "raw_bytes": raw_bytes, "build_s": round(time.monotonic() - started, 2)}
            _progress(f"built {size} entries ({raw_bytes} raw bytes) in {out[size]['build_s']} s")
            instance = Instance.open(work, synchronous="off")
            db = instance.open_database(db_id)
    finally:
        instance.close()
    return db_id, out


# ---- measuring ---------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _latencies(commits: list[list[Any]], arrivals: list[list[Any]]) -> tuple[list[float], list[float]]:
    """Per commit: (arrival - commit start, arrival - commit end), in ms; commits that never arrived are left out."""
    index = {cid: i for i, (cid, _began, _done) in enumerate(commits)}
    arrived: list[float | None] = [None] * len(commits)
    for moment, tips in sorted(arrivals, key=lambda a: a[0]):
        reached = max((index[t] for t in tips if t in index), default=-1)
        for i in range(reached, -1, -1):
            if arrived[i] is not None:
                break
            arrived[i] = moment
    from_start, from_end = [], []
    for (_cid, began, done), moment in zip(commits, arrived, strict=True):
        if moment is not None:
            from_start.append((moment - began) * 1000)
            from_end.append((moment - done) * 1000)
    return from_start, from_end


def _start_pair(wire: str, template: Path, root: Path, tag: str, relay: str | None = None) -> tuple[_Child, _Child]:
    server_dir = root / f"{tag}-server"
    shutil.copytree(template, server_dir)
    server = _Child("server", wire, server_dir, root / f"{tag}-server.log", relay)
    try:
        client = _Child("client", wire, root / f"{tag}-client", root / f"{tag}-client.log", relay)
    except BaseException:
        server.stop()
        raise
    return server, client


def _timed_join(server: _Child, client: _Child, ticket: str, size: int) -> tuple[dict[str, Any], tuple[float, float]]:
    """The client's join answer, and the CPU seconds (server, client) the join took."""
    cpu_before = (server.cpu_s(), client.cpu_s())
    joined = client.call("join", timeout_s=JOIN_TIMEOUT_S, ticket=ticket, expect=size)
    return joined, (server.cpu_s() - cpu_before[0], client.cpu_s() - cpu_before[1])


def _measure(name: str, db_id: str, built: dict[int, dict[str, Any]], quick: bool, root: Path) -> dict[str, Any]:
    wire = TRANSPORTS[name]
    sizes = sorted(built)
    out: dict[str, Any] = {"bootstrap_s": {}, "cpu_s": {}, "loadavg_1min": round(os.getloadavg()[0], 2)}
    for size in sizes:
        children: list[_Child] = []
        try:
            server, client = _start_pair(wire, built[size]["dir"], root, f"{name}-{size}")
            children = [server, client]
            ticket = server.call("ticket", db=db_id)["ticket"]
            joined, cpu = _timed_join(server, client, ticket, size)
            out["bootstrap_s"][str(size)] = round(joined["seconds"], 3)
            out["cpu_s"][str(size)] = {"server": round(cpu[0], 2), "client": round(cpu[1], 2)}
            status = {"server": server.status(), "client": client.status()}
            _progress(f"{name}: bootstrap {size} in {joined['seconds']:.3f} s, cpu {out['cpu_s'][str(size)]}")
            if size == sizes[-1]:
                seconds = joined["seconds"]
                out["entries_per_s"] = round(size / seconds)
                out["mb_per_s"] = round(built[size]["raw_bytes"] / seconds / 1e6, 2)
                out["rss_mib_largest"] = {k: round(v["VmRSS"], 1) for k, v in status.items()}
            if size != sizes[0]:
                continue
            out["rss_mib"] = {k: round(v["VmRSS"], 1) for k, v in status.items()}
            out["rss_mib_max"] = max(out["rss_mib"].values())
            out["rss_workers_mib"] = {k: round(v["workers_VmRSS"], 1) for k, v in status.items()}
            out["rss_peak_mib"] = {k: round(v["VmHWM"], 1) for k, v in status.items()}
            out["rss_after_entries"] = size
            out.update(_live(client, server, db_id, QUICK_LIVE_COMMITS if quick else LIVE_COMMITS))
            _progress(f"{name}: live p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms")
            count = QUICK_CONNECTS if quick else CONNECTS
            address = next(a for a in server.addresses if a.startswith(wire + ":"))
            connects = client.call("connect", timeout_s=COMMAND_TIMEOUT_S * count, address=address, count=count)
            out["connect_ms"] = round(statistics.median(connects["fresh_ms"]), 2)
            out["connect_ms_all"] = [round(x, 2) for x in connects["fresh_ms"]]
            out["connect_warm_ms"] = round(statistics.median(connects["warm_ms"]), 2)
            out["connect_sync_call_ms"] = round(statistics.median(connects["sync_connect_ms"]), 2)
            _progress(f"{name}: connect {out['connect_ms']} ms (warm {out['connect_warm_ms']} ms)")
        finally:
            for child in children:
                child.stop()
    return out


def _live(client: _Child, server: _Child, db_id: str, count: int) -> dict[str, Any]:
    client.call("watch", db=db_id)
    server.call("relate", db=db_id, peer=client.ready["device_id"])
    time.sleep(0.5)  # let the bootstrap's own follow-ups (state writes, an empty push) settle
    live_timeout = count * LIVE_INTERVAL_S * 4 + 30
    commits = server.call("live", timeout_s=live_timeout, db=db_id, count=count, interval_s=LIVE_INTERVAL_S)
    commits = commits["commits"]
    seen = client.call("arrivals", timeout_s=60, db=db_id, last=commits[-1][0], wait_s=30)
    from_start, from_end = _latencies(commits, seen["arrivals"])
    if not from_start:
        raise RuntimeError("no live commit reached the client")
    return {
        "live_commits": count,
        "live_arrived": len(from_start),
        "p50_ms": round(_percentile(from_start, 0.5), 2),
        "p95_ms": round(_percentile(from_start, 0.95), 2),
        "max_ms": round(max(from_start), 2),
        "p50_after_commit_ms": round(_percentile(from_end, 0.5), 2),
        "p95_after_commit_ms": round(_percentile(from_end, 0.95), 2),
        "local_commit_ms": round(statistics.median((done - began) * 1000 for _c, began, done in commits), 2),
    }


def _measure_relayed(kind: str, db_id: str, size: int, template: Path, quick: bool, root: Path) -> dict[str, Any]:
    """Bootstrap and live latency with both children reserved on a relay of ``kind``, all traffic relayed."""
    out: dict[str, Any] = {"bootstrap_s": {}}
    relay = _RelayProcess(kind, root / f"relay-{kind}.log")
    children: list[_Child] = []
    try:
        server, client = _start_pair("p2p", template, root, f"relay-{kind}-{size}", relay.address)
        children = [server, client]
        ticket = server.call("ticket", db=db_id)["ticket"]
        joined, cpu = _timed_join(server, client, ticket, size)
        out["bootstrap_s"][str(size)] = round(joined["seconds"], 3)
        out["cpu_s"] = {str(size): {"server": round(cpu[0], 2), "client": round(cpu[1], 2)}}
        _progress(f"relay {kind}: bootstrap {size} in {joined['seconds']:.3f} s")
        live = _live(client, server, db_id, QUICK_LIVE_COMMITS if quick else LIVE_COMMITS)
        out.update({k: live[k] for k in ("live_commits", "live_arrived", "p50_ms", "p95_ms", "max_ms")})
        _progress(f"relay {kind}: live p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms")
    except RuntimeError as exc:  # a relay that cannot carry the bootstrap is a result, not a crash
        out["error"] = str(exc).splitlines()[0][:500]
        _progress(f"relay {kind}: FAILED: {out['error']}")
    finally:
        for child in children:
            child.stop()
        relay.stop()
    return out


def _relay_section(db_id: str, built: dict[int, dict[str, Any]], quick: bool, root: Path) -> dict[str, Any]:
    size = min(built)
    template = built[size]["dir"]
    standard = "js" if js_relay_available() else "standard"
    out = _measure_relayed(standard, db_id, size, template, quick, root)
    out["standard"] = (
        "js-libp2p 3.3.11 circuit relay v2 server, default limits (128 KiB, 2 min per circuit)"
        if standard == "js"
        else "our RelayService (tests/js/node_modules missing), standard limits (128 KiB, 2 min per circuit)"
    )
    out["ours"] = _measure_relayed("ours", db_id, size, template, quick, root)
    out["ours"]["relay"] = "our RelayService, its defaults (64 GiB, 24 h per circuit)"
    return out


def _busy_cpu_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run(quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    _Child.cpu_total_s = 0.0
    busy_before, wall_before, own_before = _busy_cpu_s(), time.monotonic(), sum(os.times()[:2])
    result: dict[str, Any] = {
        "sizes": sizes,
        "build": "driver, Instance.open(dir, synchronous='off'); each server opens a fresh copy of the data dir",
    }
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        root = Path(tmp)
        _progress(f"building {', '.join(map(str, sizes))} entries")
        db_id, built = _build(root, sizes)
        result["raw_bytes"] = {str(s): b["raw_bytes"] for s, b in built.items()}
        for name in TRANSPORTS:
            result[name] = _measure(name, db_id, built, quick, root)
        result["relay"] = _relay_section(db_id, built, quick, root)
    wall = time.monotonic() - wall_before
    children = _Child.cpu_total_s
    others = _busy_cpu_s() - busy_before - children - (sum(os.times()[:2]) - own_before)
    result["children_cpu_cores"] = round(children / wall, 2)
    result["unrelated_cpu_cores"] = round(max(0.0, others) / wall, 2)
    return result


def report(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    if "unrelated_cpu_cores" in result:
        rows.append(
            (
                "CPU cores used by other work / by the children",
                f"{result['unrelated_cpu_cores']} / {result['children_cpu_cores']}",
                "(the harness counts the children as others)",
                "",
            )
        )

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    for name in TRANSPORTS:
        r = result.get(name)
        if not r:
            continue
        for size, seconds in r["bootstrap_s"].items():
            goal = BOOTSTRAP_GOALS_S.get(size)
            anchor = ANCHORS.get(size, "")
            goal_text = "; ".join(x for x in (f"< {goal:g} s" if goal and name == "libp2p" else "", anchor) if x)
            cpu = r["cpu_s"][size]
            rows.append(
                (
                    f"{name} bootstrap {int(size):,} entries",
                    f"{seconds:.3f} s ({int(size) / seconds:,.0f}/s)",
                    goal_text,
                    verdict(seconds < goal) if goal and name == "libp2p" else "",
                )
            )
            rows.append((f"{name}   cpu s (server / client)", f"{cpu['server']} / {cpu['client']}", "", ""))
        largest = f"{int(result['sizes'][-1]):,}"
        rows.append((f"{name} entries/s ({largest})", f"{r['entries_per_s']:,}", "", ""))
        rows.append((f"{name} MB/s of raw entries ({largest})", f"{r['mb_per_s']}", "", ""))
        for key in ("p50_ms", "p95_ms"):
            rows.append(
                (
                    f"{name} live {key[:3]} ms ({r['live_arrived']}/{r['live_commits']} commits)",
                    f"{r[key]}",
                    f"< {GOALS[key]:g}; {ANCHORS[key]}",
                    verdict(r[key] < GOALS[key]),
                )
            )
        rows.append(
            (
                f"{name}   after commit p50 / p95 ms",
                f"{r['p50_after_commit_ms']} / {r['p95_after_commit_ms']}",
                f"(local commit {r['local_commit_ms']} ms)",
                "",
            )
        )
        rows.append((f"{name} connect ms (fresh, median)", f"{r['connect_ms']}", "", ""))
        rows.append((f"{name}   handshake ms (open connection)", f"{r['connect_warm_ms']}", "", ""))
        rows.append(
            (
                f"{name}   sync.connect ms (open connection)",
                f"{r['connect_sync_call_ms']}",
                "(+ peer record commit)",
                "",
            )
        )
        rss = r["rss_mib"]
        rows.append(
            (
                f"{name} RSS MiB after {r['rss_after_entries']:,} (server / client)",
                f"{rss['server']} / {rss['client']}",
                f"< {GOALS['rss_mib']:g}; {ANCHORS['rss_mib']}",
                verdict(r["rss_mib_max"] < GOALS["rss_mib"]),
            )
        )
        workers = r.get("rss_workers_mib")
        if workers:
            rows.append(
                (
                    f"{name}   RSS MiB of their signature workers (all)",
                    f"{workers['server']} / {workers['client']}",
                    "",
                    "",
                )
            )
        if r.get("rss_mib_largest") and result["sizes"][-1] != r["rss_after_entries"]:
            big = r["rss_mib_largest"]
            rows.append((f"{name}   RSS MiB after {largest}", f"{big['server']} / {big['client']}", "", ""))
    rows += _relay_rows(result.get("relay"))
    return rows


def _relay_rows(relay: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not relay:
        return []
    rows: list[tuple[str, str, str, str]] = []
    for label, r, what in (("standard", relay, relay["standard"]), ("ours", relay["ours"], relay["ours"]["relay"])):
        name, _, limits = what.partition(", ")
        rows.append((f"relay ({label}) through", name.replace(" circuit relay v2 server", ""), limits, ""))
        if r.get("error"):
            rows.append((f"relay ({label}) bootstrap", "FAILED", r["error"][:120], "MISSED"))
            continue
        for size, seconds in r["bootstrap_s"].items():
            rows.append((f"relay ({label}) bootstrap {int(size):,} entries", f"{seconds:.3f} s", "", ""))
        rows.append(
            (
                f"relay ({label}) live p50 / p95 ms ({r['live_arrived']}/{r['live_commits']} commits)",
                f"{r['p50_ms']} / {r['p95_ms']}",
                "",
                "",
            )
        )
    return rows


# ---- profiling one bootstrap ---------------------------------------------------------------------

CATEGORIES = [  # (category, substrings of a frame's file or function), checked from the leaf up
    ("signature verification", ("nacl/", "verify_signature", "_verify_key")),
    ("sqlite", ("sqlite3", "dag/storage/sqlite")),
    ("entry decode / CIDs (libipld, blake3)", ("libipld", "decode_entry", "blake3", "dag/ids.py", "dag/entry.py")),
    ("sync message codec (msgpack)", ("msgpack", "sync/messages.py", "http_codec.py")),
    ("transport: libp2p (noise, yamux, tcp)", ("libp2p/", "multiaddr/", "noise", "cryptography/")),
    ("transport: http", ("httpx/", "httpcore/", "h11/", "hypercorn/", "starlette/", "anyio/")),
    (
        "dag ingest / verification logic",
        (
            "dag/ingest.py",
            "dag/checks.py",
            "dag/prepared.py",
            "dag/writer.py",
            "dag/replica.py",
            "dag/auth.py",
            "dag/walk.py",
        ),
    ),
    ("sync engine / handler / state", ("sync/",)),
    ("trio event loop", ("trio/",)),
    ("threading / executor", ("threading.py", "concurrent/futures")),
]


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize_profile(path: Path, top: int = 25) -> str:
    """Where the samples of a py-spy ``--format raw`` (folded) file go, by category, thread and leaf."""
    by_category: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        total += count
        by_category[_category(frames)] += count
        by_thread[thread.split(" ")[0] + " " + thread.split(" ")[-1]] += count
        by_leaf[frames[-1] if frames else "?"] += count
    lines = [f"{total} samples"]
    for title, counter, limit in (
        ("by category", by_category, 20),
        ("by thread", by_thread, 10),
        ("by leaf", by_leaf, top),
    ):
        lines.append(f"-- {title}")
        for key, count in counter.most_common(limit):
            lines.append(f"{100 * count / max(1, total):5.1f}%  {key}")
    return "\n".join(lines)


def profile(name: str, size: int, out_dir: Path, rate: int) -> int:
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not spy:
        print("py-spy not found (set PY_SPY or put it on PATH)", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-transport-prof-") as tmp:
        root = Path(tmp)
        db_id, built = _build(root, [size])
        server, client = _start_pair(TRANSPORTS[name], built[size]["dir"], root, f"prof-{name}")
        spies = []
        try:
            ticket = server.call("ticket", db=db_id)["ticket"]
            for child in (client, server):
                folded = out_dir / f"{name}-{size}-{child.role}.folded"
                command = [spy, "record", "--pid", str(child.pid), "--rate", str(rate), "--format", "raw"]
                command += ["--threads", "--nonblocking", "--output", str(folded)]
                command += os.environ.get("PY_SPY_ARGS", "").split()  # e.g. --gil: only the GIL holder
                spies.append(
                    (child, folded, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                )
            time.sleep(1.0)  # let py-spy attach
            joined, cpu = _timed_join(server, client, ticket, size)
            print(
                f"{name} bootstrap {size}: {joined['seconds']:.3f} s under py-spy; cpu server {cpu[0]:.2f} s, "
                f"client {cpu[1]:.2f} s"
            )
        finally:
            for _child, _folded, spy_process in spies:
                spy_process.send_signal(signal.SIGINT)
            for _child, _folded, spy_process in spies:
                try:
                    spy_process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy_process.kill()
            server.stop()
            client.stop()
        for child, folded, _spy in spies:
            if folded.exists():
                print(f"== {child.role} ({folded})\n{summarize_profile(folded)}")
    return 0


def bootstrap_only(names: list[str], sizes: list[int], repeat: int) -> int:
    """Only the bootstrap figures, ``repeat`` times per transport and size: for quick iterations."""
    with tempfile.TemporaryDirectory(prefix="bench-transport-boot-") as tmp:
        root = Path(tmp)
        db_id, built = _build(root, sizes)
        for name in names:
            for size in sizes:
                for run_index in range(repeat):
                    server, client = _start_pair(
                        TRANSPORTS[name], built[size]["dir"], root, f"{name}-{size}-{run_index}"
                    )
                    try:
                        ticket = server.call("ticket", db=db_id)["ticket"]
                        joined, cpu = _timed_join(server, client, ticket, size)
                        print(
                            f"{name:7} {size:>7}: {joined['seconds']:.3f} s, {size / joined['seconds']:,.0f} entries/s,"
                            f" cpu server {cpu[0]:.2f} s, client {cpu[1]:.2f} s,"
                            f" RSS MiB server {server.status()['VmRSS']:.1f}, client {client.status()['VmRSS']:.1f}",
                            flush=True,
                        )
                    finally:
                        server.stop()
                        client.stop()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="run one node driven over stdin/stdout")
    parser.add_argument("--role", default="node")
    parser.add_argument("--transport", default="libp2p")
    parser.add_argument("--data-dir")
    parser.add_argument("--relay", help="child mode: reserve on this relay and advertise only the circuit")
    parser.add_argument(
        "--relay-child", choices=["ours", "standard"], help="run only a relay (ours, or standard limits)"
    )
    parser.add_argument("--profile", action="store_true", help="profile one bootstrap with py-spy")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--bootstrap", action="store_true", help="only time bootstraps (--sizes, --repeat)")
    parser.add_argument("--sizes", default="10000,100000", help="with --bootstrap: comma-separated sizes")
    parser.add_argument("--repeat", type=int, default=2, help="with --bootstrap: runs per transport and size")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the profiles go")
    args = parser.parse_args(argv)
    if args.relay_child:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        trio.run(_relay_child, args.relay_child)
        return 0
    if args.child:
        if not args.data_dir:
            parser.error("--child needs --data-dir")
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        trio.run(_child, args)
        return 0
    if args.bootstrap:
        names = list(TRANSPORTS) if args.transport == "all" else [args.transport]
        if any(name not in TRANSPORTS for name in names):
            parser.error(f"--transport is all or one of {', '.join(TRANSPORTS)}")
        return bootstrap_only(names, [int(x) for x in args.sizes.split(",")], args.repeat)
    if args.profile:
        if args.transport not in TRANSPORTS:
            parser.error(f"--transport is one of {', '.join(TRANSPORTS)}")
        return profile(args.transport, args.size, Path(args.out), args.rate)
    parser.error("use scripts/bench transport, or --child / --profile")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

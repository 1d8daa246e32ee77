"""Suite ``scale``: real ``eidetica-node`` daemons on loopback, at the sizes a node reaches in months.

Every node is the binary (``scripts/cli_node.NodeProcess``: ``eidetica-node run --json``
on a fresh data directory, libp2p on 127.0.0.1 with an OS-chosen port, signature worker
processes as configured by default). Commands go over the control socket from this
process (no CLI interpreter per call) unless a figure says it is the CLI's.

* ``bootstrap``: a server holding N entries (1M; quick: 100K) and a fresh node that runs
  ``join`` with the server's ticket reduced to its libp2p address (both nodes run with
  ``--no-http``), so every byte goes over libp2p. The server's data directory is built
  with the dag API (``Instance.open(dir, synchronous="off")``: a root, a settings commit
  granting global Write, N-2 commits of one DocStore write ``data.k{i % 50} = i``),
  cached under ``$TMPDIR/eidetica-bench-scale/`` keyed by N and the git tree of ``dag/``,
  and copied for each run. ``join_s`` is the join command's answer; ``complete_s`` the
  moment the client holds N verified entries (read from its SQLite file, read-only);
  ``cut_at``: the client's count when the join answered, if it was short (the first
  exchange was cut); ``exchanges``: the client's sync exchanges (``info`` metrics).
  ``rss_peak_mib``: VmHWM of each daemon process (``workers``: its signature workers').
* ``first_read``: on that client (its store states built by ingest), after SIGKILL and a
  restart, and after SIGTERM and a restart: the first ``eidetica-node db get DB k7`` (CLI
  process start to answer, ``cli_ms``), and, if the CLI gave up (its own 30 s bound),
  when a control call sent at the same moment answered (``answered_ms``). ``health_max_ms``:
  the slowest ``GET /health`` answer while that read ran (probed every 50 ms).
* ``soak``: two nodes share one database (A creates it, public Write; B joins) and each
  writes one value per 100 ms for 10 minutes (quick: 2). ``_sync`` entries and raw bytes
  added (from each SQLite file) over the exchanges it counted (``info`` metrics) give
  ``sync_bytes_per_exchange``. After a clean stop, ``disk_bytes`` is the data directory's
  allocated size (``du``), ``user_bytes`` the user database's raw entry bytes, and
  ``user_only_disk_bytes`` the size of a data directory holding only those entries
  (``put_remote_entries`` into a fresh instance): ``disk_ratio`` = disk / user-only disk.
* ``fanout``: one writer, 8 readers joined to three databases (1, 4 and 8 readers each).
  Per write (``db.set`` over the control socket, ~30; quick: 10) the time from the call
  to the entry being verified in each reader's SQLite file (polled read-only every ms);
  p50/p95 over all (reader, write) pairs and of the slowest reader per write; the goal
  (8 readers' p50 within 2x one reader's) is judged on these. ``after_set_*``: the same
  from the moment ``db.set`` answered.
* ``fanin``: a server holding M entries (20K; quick: 5K); 1, 4 and 8 fresh nodes run
  ``join`` at the same moment; each joiner's time and the time until the last finished,
  and the server's largest VmRSS while they ran.

A part that fails or times out is reported with its error, and the suite carries on.
``BENCH_SCALE_PARTS=bootstrap,first_read,...`` runs only some parts. The machine's other
load is in ``machine`` (``scripts/bench.py``): on 2 shared cores the figures are noisy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dag import Instance, Permission, cid_from_text
from dag.instance import DB_FILE
from node.config import CONTROL_SOCKET
from scripts.cli_node import NodeProcess
from sync.ticket import Ticket

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "eidetica-bench-scale"
P2P_ONLY = ("--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--no-http")
LOOPBACK = ("--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--http-bind", "127.0.0.1:0")
PARTS = ("bootstrap", "first_read", "soak", "fanout", "fanin")
VERIFIED = 1  # dag.storage.base.Status.VERIFIED as stored
READ_KEY = "k7"
CLI_BUDGET_S = 120.0  # the CLI's own bound is 30 s; this is ours on the process
ANSWER_BUDGET_S = 900.0  # a control call that must answer (a first read at 1M on a slow store)
STALL_S = 90.0  # a bootstrap with no new entry for this long is over
HEALTH_PROBE_S = 0.05
WRITE_INTERVAL_S = 0.1
FANOUT_GAP_S = 0.3
FANOUT_WAIT_S = 15.0
FANIN_COUNTS = (1, 4, 8)
FANOUT_COUNTS = (1, 4, 8)


@dataclass(frozen=True)
class Sizes:
    bootstrap: int
    soak_s: float
    fanout_writes: int
    fanin_entries: int


FULL = Sizes(bootstrap=1_000_000, soak_s=600.0, fanout_writes=30, fanin_entries=20_000)
QUICK = Sizes(bootstrap=100_000, soak_s=120.0, fanout_writes=10, fanin_entries=5_000)


def _progress(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- probes --------------------------------------------------------------------------------------


def _status_kib(pid: int, fields: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) / 1024
    return out


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                pids += [int(p) for p in handle.read().split()]
    return pids


def memory(node: NodeProcess) -> dict[str, float]:
    """VmRSS/VmHWM of the daemon and the sums over its signature workers, in MiB."""
    own = _status_kib(node.process.pid)
    workers = [_status_kib(p) for p in _children(node.process.pid)]
    return {
        "rss": round(own.get("VmRSS", 0.0), 1),
        "peak": round(own.get("VmHWM", 0.0), 1),
        "workers_rss": round(sum(w.get("VmRSS", 0.0) for w in workers), 1),
        "workers_peak": round(sum(w.get("VmHWM", 0.0) for w in workers), 1),
    }


def disk_bytes(path: Path) -> int:
    """Allocated bytes of every file under ``path`` (what ``du`` counts)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


class Store:
    """A read-only look at a node's SQLite file: cheap probes that never touch its event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_FILE
        self._con: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        return self._con

    def verified(self, db_id: str) -> int:
        try:
            row = (
                self._db()
                .execute("SELECT count(*) FROM entries WHERE tree = ? AND status = ?", (cid_from_text(db_id), VERIFIED))
                .fetchone()
            )
        except sqlite3.Error:
            return -1
        return int(row[0])

    def has(self, cid: bytes) -> bool:
        try:
            row = self._db().execute("SELECT status FROM entries WHERE cid = ?", (cid,)).fetchone()
        except sqlite3.Error:
            return False
        return row is not None and row[0] == VERIFIED

    def usage(self, db_id: str) -> tuple[int, int]:
        """(entries, raw bytes) of one database."""
        row = (
            self._db()
            .execute(
                "SELECT count(*), coalesce(sum(length(raw)), 0) FROM entries WHERE tree = ?", (cid_from_text(db_id),)
            )
            .fetchone()
        )
        return int(row[0]), int(row[1])

    def raws(self, db_id: str) -> list[bytes]:
        rows = self._db().execute("SELECT raw FROM entries WHERE tree = ? ORDER BY seq", (cid_from_text(db_id),))
        return [bytes(r[0]) for r in rows]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


_clients = threading.local()  # per thread: data dir -> an open httpx client on its control socket


def _client(node: NodeProcess) -> httpx.Client:
    """A kept-open client (building one costs an SSL context, ~10 ms: not part of any figure)."""
    clients: dict[Path, httpx.Client] = _clients.__dict__.setdefault("by_dir", {})
    client = clients.get(node.data_dir)
    if client is None:
        transport = httpx.HTTPTransport(uds=str(node.data_dir / CONTROL_SOCKET))
        client = clients[node.data_dir] = httpx.Client(transport=transport, base_url="http://node", trust_env=False)
    return client


def forget(node: NodeProcess) -> None:
    """Close this thread's client of a node that stops (a restarted node is a new server)."""
    client = _clients.__dict__.get("by_dir", {}).pop(node.data_dir, None)
    if client is not None:
        client.close()


def control(node: NodeProcess, command: str, timeout_s: float = 60.0, **arguments: object) -> dict[str, Any]:
    """One control call with our own bound (the CLI client caps ``join`` at 150 s); raises
    RuntimeError with the node's one-line message on an error answer."""
    body = {k: v for k, v in arguments.items() if v is not None}
    response = _client(node).post(f"/v0/{command}", json=body, timeout=timeout_s)
    answer: dict[str, Any] = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"{command}: {answer.get('error', response.status_code)}")
    return answer


def _health_ms(node: NodeProcess, timeout_s: float) -> float:
    started = time.monotonic()
    _client(node).get("/health", timeout=timeout_s)
    return (time.monotonic() - started) * 1000


class HealthProbe:
    """``GET /health`` every 50 ms on a thread, keeping the slowest answer (a timeout counts as
    its bound): how unresponsive the node was meanwhile."""

    def __init__(self, node: NodeProcess, timeout_s: float = 30.0) -> None:
        self.node, self.timeout_s = node, timeout_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(_health_ms(self.node, self.timeout_s))
            except httpx.HTTPError:
                self.samples.append(self.timeout_s * 1000)
            self._stop.wait(HEALTH_PROBE_S)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"health_probes": 0}
        return {
            "health_probes": len(self.samples),
            "health_max_ms": round(max(self.samples), 1),
            "health_p50_ms": round(percentile(self.samples, 0.5), 1),
        }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# ---- nodes ---------------------------------------------------------------------------------------


class Nodes:
    """The daemons a part started; ``stop_all`` in ``finally`` stops every one (bounded)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NodeProcess] = []
        self.cpu_s = 0.0  # CPU seconds of every daemon (and its workers) seen so far

    def note_cpu(self, node: NodeProcess) -> None:
        """Add what ``node`` used, before it stops: the harness would count it as other work."""
        self.cpu_s += sum(_cpu_s(pid) for pid in (node.process.pid, *_children(node.process.pid)))

    def start(self, name: str, network: tuple[str, ...] = LOOPBACK, data_dir: Path | None = None) -> NodeProcess:
        node = NodeProcess.start(data_dir or self.root / name, network=network)
        self.started.append(node)
        return node

    def start_many(self, names: list[str], network: tuple[str, ...] = LOOPBACK) -> list[NodeProcess]:
        """Start nodes on threads (each one waits for a fresh interpreter to import everything)."""
        out: dict[str, NodeProcess] = {}
        errors: list[BaseException] = []

        def one(name: str) -> None:
            try:
                out[name] = self.start(name, network)
            except BaseException as exc:  # reported below, after every thread ended
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(names)} nodes did not start: {errors[0]}")
        return [out[n] for n in names]

    def stop(self, node: NodeProcess, kill: bool = False) -> None:
        forget(node)
        if node.process.poll() is None:
            self.note_cpu(node)
        if kill and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)  # a crash: nothing flushed
            node.process.wait(timeout=30)
        node.stop()

    def stop_all(self) -> None:
        for node in self.started:
            with contextlib.suppress(Exception):
                self.stop(node)
        self.started.clear()


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _busy_cpu_s() -> float:
    """CPU seconds every process has spent busy since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def p2p_ticket(text: str) -> str:
    """The ticket with only its libp2p addresses, so the join is one exchange over libp2p."""
    ticket = Ticket.parse(text)
    return str(Ticket(ticket.db, tuple(a for a in ticket.addresses if a.transport == "p2p")))


def sync_db_id(node: NodeProcess) -> str:
    listing = control(node, "db.list", all=True)["databases"]
    return str(next(d["id"] for d in listing if d["name"] == "_sync"))


def exchanges(node: NodeProcess) -> dict[str, int]:
    metrics = control(node, "info")["metrics"]
    return {"syncs": int(metrics["syncs"]), "errors": int(metrics["errors"])}


def shared_db(owner: NodeProcess, name: str) -> tuple[str, str]:
    """(id, ticket) of a new database on ``owner`` that any key may write."""
    db_id = str(control(owner, "db.create", name=name, public="write:10")["id"])
    return db_id, str(control(owner, "share", db=db_id)["ticket"])


# ---- the server's data directory -------------------------------------------------------------------


def _dag_version() -> str:
    """The git tree of dag/ (plus a hash of local changes): a cached data dir is only reused
    by code that writes the same format."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout

    tree = git("rev-parse", "HEAD:dag").strip() or "unknown"
    changes = git("status", "--porcelain", "--", "dag") + git("diff", "HEAD", "--", "dag")
    return tree[:12] + ("-" + hashlib.sha256(changes.encode()).hexdigest()[:8] if changes.strip() else "")


def template(entries: int) -> tuple[Path, str]:
    """A data dir holding one database of ``entries`` entries (built once, then cached)."""
    path = CACHE / f"db-{entries}-{_dag_version()}"
    id_file = path.parent / f"{path.name}.id"
    if path.is_dir() and id_file.exists():
        return path, id_file.read_text().strip()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    started = time.monotonic()
    instance = Instance.open(work / "data", synchronous="off")
    try:
        db = instance.create_database(name="bench")
        with db.transaction() as txn:
            txn.settings().set_global(Permission.write(10))
        for i in range(2, entries):
            with db.transaction() as txn:
                txn.doc("data").set(f"k{i % 50}", i)
            if i % 100_000 == 0:
                _progress(f"built {i:,}/{entries:,} entries ({i / (time.monotonic() - started):,.0f}/s)")
        db_id = db.id
    finally:
        instance.close()
    os.replace(work / "data", path)
    id_file.write_text(db_id)
    shutil.rmtree(work, ignore_errors=True)
    _progress(f"built {entries:,} entries in {time.monotonic() - started:.0f} s: {path}")
    return path, db_id


def copy_of(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(target)], check=True)
    return target


# ---- waiting -------------------------------------------------------------------------------------


def wait_for_count(store: Store, db_id: str, target: int, stall_s: float, limit_s: float) -> tuple[int, float]:
    """Poll until ``target`` entries are verified, or no progress for ``stall_s``, or ``limit_s``;
    (count, monotonic time it was last seen to grow)."""
    count, grew = store.verified(db_id), time.monotonic()
    deadline = time.monotonic() + limit_s
    while count < target and time.monotonic() < deadline and time.monotonic() - grew < stall_s:
        time.sleep(0.25)
        now = store.verified(db_id)
        if now > count:
            count, grew = now, time.monotonic()
    return count, grew


@contextlib.contextmanager
def sampling(nodes: list[NodeProcess], every_s: float = 0.25) -> Iterator[dict[str, float]]:
    """The largest VmRSS of each node (by data dir name) while the block runs."""
    peaks: dict[str, float] = {n.data_dir.name: 0.0 for n in nodes}
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for node in nodes:
                rss = _status_kib(node.process.pid, ("VmRSS",)).get("VmRSS", 0.0)
                peaks[node.data_dir.name] = max(peaks[node.data_dir.name], round(rss, 1))
            stop.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join(timeout=5)


# ---- 1. bootstrap over libp2p ------------------------------------------------------------------


def part_bootstrap(size: int, nodes: Nodes) -> tuple[dict[str, Any], NodeProcess, str]:
    """A fresh node joins a server holding ``size`` entries over libp2p only; the client is
    left running for :func:`part_first_read`."""
    source, db_id = template(size)
    out: dict[str, Any] = {"entries": size}
    server = nodes.start("boot-server", P2P_ONLY, copy_of(source, nodes.root / "boot-server"))
    client = nodes.start("boot-client", P2P_ONLY)
    ticket = p2p_ticket(str(control(server, "share", db=db_id)["ticket"]))
    out["ticket"] = [str(a) for a in Ticket.parse(ticket).addresses]
    store = Store(client.data_dir)
    _progress(f"bootstrap: joining {size:,} entries over libp2p")
    started = time.monotonic()
    with sampling([server, client]) as rss:
        try:
            joined = control(client, "join", timeout_s=ANSWER_BUDGET_S, ticket=ticket)
            out["join_entries"] = joined.get("entries")
        except (RuntimeError, httpx.HTTPError) as exc:
            out["join_error"] = str(exc).splitlines()[0][:300]
        out["join_s"] = round(time.monotonic() - started, 2)
        out["at_answer"] = store.verified(db_id)
        _progress(f"bootstrap: join answered after {out['join_s']} s with {out['at_answer']:,} entries")
        count, grew = wait_for_count(store, db_id, size, STALL_S, ANSWER_BUDGET_S)
    store.close()
    out["verified"] = count
    out["complete"] = count == size
    if count == size:
        out["complete_s"] = round(grew - started, 2)
        out["entries_per_s"] = round(size / (grew - started))
    if out["at_answer"] < size:
        out["cut_at"] = out["at_answer"]
    out["exchanges"] = exchanges(client)
    out["one_exchange"] = out["complete"] and "cut_at" not in out and "join_error" not in out
    out["rss_mib"] = {"server": memory(server), "client": memory(client)}
    out["rss_sampled_max_mib"] = dict(rss)
    _progress(f"bootstrap: {out}")
    nodes.stop(server)
    return out, client, db_id


# ---- 2. the first read after a crash and after a restart -----------------------------------------


def _expected(size: int) -> int:
    """The value ``data.k7`` holds in a template of ``size`` entries (the last write to it)."""
    return max(i for i in range(max(2, size - 60), size) if i % 50 == int(READ_KEY[1:]))


def timed_first_get(node: NodeProcess, db_id: str, expected: int | None) -> dict[str, Any]:
    """The first ``db get`` through the CLI (and, if it gave up, when the node did answer)."""
    out: dict[str, Any] = {}
    started = time.monotonic()
    with HealthProbe(node) as probe:
        result = node.cli("db", "get", db_id, READ_KEY, "--json", timeout=CLI_BUDGET_S)
        out["cli_ms"] = round((time.monotonic() - started) * 1000, 1)
        out["cli_ok"] = result.returncode == 0
        if not out["cli_ok"]:
            out["cli_error"] = (result.stderr.strip().splitlines() or [""])[-1][:200]
            answer = control(node, "db.get", timeout_s=ANSWER_BUDGET_S, db=db_id, key=READ_KEY)
            out["answered_ms"] = round((time.monotonic() - started) * 1000, 1)
            value = answer.get("value")
        else:
            value = (json_loads(result.stdout) or {}).get("value")
    out.update(probe.summary())
    out["value_ok"] = expected is None or value == expected
    began = time.monotonic()
    control(node, "db.get", db=db_id, key=READ_KEY)
    out["second_control_ms"] = round((time.monotonic() - began) * 1000, 1)
    began = time.monotonic()
    node.cli("health")
    out["cli_health_ms"] = round((time.monotonic() - began) * 1000, 1)  # what a CLI process costs by itself
    return out


def json_loads(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def part_first_read(client: NodeProcess, db_id: str, size: int, nodes: Nodes) -> dict[str, Any]:
    store = Store(client.data_dir)
    out: dict[str, Any] = {"entries": store.verified(db_id)}
    store.close()
    expected = _expected(size) if out["entries"] == size else None
    nodes.stop(client, kill=True)
    for case in ("after_sigkill", "after_restart"):
        began = time.monotonic()
        node = nodes.start(client.data_dir.name, P2P_ONLY, client.data_dir)
        figures: dict[str, Any] = {"ready_s": round(time.monotonic() - began, 2)}
        _progress(f"first read {case}: node ready in {figures['ready_s']} s")
        figures.update(timed_first_get(node, db_id, expected))
        _progress(f"first read {case}: {figures}")
        began = time.monotonic()
        nodes.stop(node)
        figures["stop_s"] = round(time.monotonic() - began, 2)
        out[case] = figures
    return out


# ---- 3. the soak: bookkeeping per exchange and bytes on disk -------------------------------------


def _writer(node: NodeProcess, db_id: str, label: str, duration_s: float, latencies: list[float]) -> None:
    """One ``db.set`` every 100 ms (on schedule, not after each answer) for ``duration_s``."""
    started = time.monotonic()
    for i in range(int(duration_s / WRITE_INTERVAL_S)):
        time.sleep(max(0.0, started + i * WRITE_INTERVAL_S - time.monotonic()))
        began = time.monotonic()
        try:
            control(node, "db.set", db=db_id, key=f"{label}{i % 50}", value=i)
            latencies.append((time.monotonic() - began) * 1000)
        except (RuntimeError, httpx.HTTPError):
            latencies.append(-1.0)


def _usage(node: NodeProcess, db_id: str, sync_id: str) -> dict[str, Any]:
    store = Store(node.data_dir)
    try:
        user, book = store.usage(db_id), store.usage(sync_id)
    finally:
        store.close()
    return {"user_entries": user[0], "user_bytes": user[1], "sync_entries": book[0], "sync_bytes": book[1]}


def user_only_disk(source: Path, db_id: str, target: Path) -> int:
    """Bytes on disk of a data dir holding only the user database (its entries, as received)."""
    store = Store(source)
    try:
        raws = store.raws(db_id)
    finally:
        store.close()
    instance = Instance.open(target)
    try:
        for start in range(0, len(raws), 1000):
            instance.put_remote_entries(raws[start : start + 1000])
    finally:
        instance.close()
    return disk_bytes(target)


def part_soak(duration_s: float, nodes: Nodes) -> dict[str, Any]:
    pair = {"a": nodes.start("soak-a"), "b": nodes.start("soak-b")}
    db_id, ticket = shared_db(pair["a"], "soak")
    control(pair["b"], "join", timeout_s=300, ticket=ticket)
    sync_ids = {k: sync_db_id(n) for k, n in pair.items()}
    before = {k: {**_usage(n, db_id, sync_ids[k]), **exchanges(n)} for k, n in pair.items()}
    _progress(f"soak: {duration_s:g} s, one write per {WRITE_INTERVAL_S:g} s on each node; before: {before}")
    latencies: dict[str, list[float]] = {k: [] for k in pair}
    threads = [threading.Thread(target=_writer, args=(n, db_id, k, duration_s, latencies[k])) for k, n in pair.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # converged: both hold the same user entries
        counts = {k: _usage(n, db_id, sync_ids[k])["user_entries"] for k, n in pair.items()}
        if len(set(counts.values())) == 1:
            break
        time.sleep(0.5)
    after = {k: {**_usage(n, db_id, sync_ids[k]), **exchanges(n)} for k, n in pair.items()}
    for node in pair.values():
        nodes.stop(node)
    out: dict[str, Any] = {"duration_s": duration_s, "converged": len(set(counts.values())) == 1}
    for key, node in pair.items():
        b, a = before[key], after[key]
        syncs = a["syncs"] - b["syncs"]
        added = a["sync_bytes"] - b["sync_bytes"]
        ok = [x for x in latencies[key] if x >= 0]
        disk = disk_bytes(node.data_dir)
        alone = user_only_disk(node.data_dir, db_id, nodes.root / f"user-only-{key}")
        out[key] = {
            **a,
            "writes": len(latencies[key]),
            "write_errors": len(latencies[key]) - len(ok),
            "write_p50_ms": round(percentile(ok, 0.5), 1) if ok else None,
            "write_p95_ms": round(percentile(ok, 0.95), 1) if ok else None,
            "exchanges_during": syncs,
            "sync_entries_added": a["sync_entries"] - b["sync_entries"],
            "sync_bytes_added": added,
            "sync_bytes_per_exchange": round(added / syncs, 1) if syncs else None,
            "sync_mib_per_hour": round(added / duration_s * 3600 / 2**20, 1),
            "disk_bytes": disk,
            "user_only_disk_bytes": alone,
            "disk_ratio": round(disk / alone, 2) if alone else None,
            "disk_per_user_raw": round(disk / a["user_bytes"], 2) if a["user_bytes"] else None,
        }
    _progress(f"soak: {out}")
    return out


# ---- 4. fan-out: one write reaching 1, 4 and 8 readers -------------------------------------------


def _one_write(writer: NodeProcess, db_id: str, value: int, stores: list[Store]) -> tuple[float, list[float]]:
    """(ms the writer took to answer, ms until each reader held the entry verified; -1: never)."""
    started = time.monotonic()
    answer = control(writer, "db.set", db=db_id, key="fan", value=value)
    set_ms = (time.monotonic() - started) * 1000
    cid = cid_from_text(str(answer["tips"][0]))  # the writer's only tip: this write
    seen = [-1.0] * len(stores)
    pending = set(range(len(stores)))
    deadline = started + FANOUT_WAIT_S
    while pending and time.monotonic() < deadline:
        for j in list(pending):
            if stores[j].has(cid):
                seen[j] = (time.monotonic() - started) * 1000
                pending.discard(j)
        time.sleep(0.001)
    return set_ms, seen


def part_fanout(writes: int, nodes: Nodes) -> dict[str, Any]:
    writer = nodes.start("fan-w")
    readers = nodes.start_many([f"fan-r{i}" for i in range(max(FANOUT_COUNTS))])
    databases: dict[int, str] = {}
    for count in FANOUT_COUNTS:
        databases[count], ticket = shared_db(writer, f"fan{count}")
        for reader in readers[:count]:
            control(reader, "join", timeout_s=300, ticket=ticket)
    time.sleep(2.0)  # the joins' own follow-up exchanges settle
    stores = [Store(r.data_dir) for r in readers]
    out: dict[str, Any] = {"writes": writes, "layout": "one writer, 8 readers; a database per reader count"}
    try:
        for count in FANOUT_COUNTS:
            pairs: list[float] = []
            after_set: list[float] = []
            slowest: list[float] = []
            set_ms: list[float] = []
            missed = 0
            for i in range(writes):
                took, seen = _one_write(writer, databases[count], i, stores[:count])
                set_ms.append(took)
                missed += sum(1 for s in seen if s < 0)
                pairs += [s for s in seen if s >= 0]
                after_set += [s - took for s in seen if s >= 0]
                if all(s >= 0 for s in seen):
                    slowest.append(max(seen))
                time.sleep(FANOUT_GAP_S)
            out[str(count)] = {
                "p50_ms": round(percentile(pairs, 0.5), 1) if pairs else None,
                "p95_ms": round(percentile(pairs, 0.95), 1) if pairs else None,
                "last_reader_p50_ms": round(percentile(slowest, 0.5), 1) if slowest else None,
                "last_reader_p95_ms": round(percentile(slowest, 0.95), 1) if slowest else None,
                "writer_set_p50_ms": round(percentile(set_ms, 0.5), 1),
                "after_set_p50_ms": round(percentile(after_set, 0.5), 1) if after_set else None,
                "after_set_p95_ms": round(percentile(after_set, 0.95), 1) if after_set else None,
                "missed": missed,
            }
            _progress(f"fan-out to {count}: {out[str(count)]}")
    finally:
        for store in stores:
            store.close()
    nodes.stop_all()
    return out


# ---- 5. fan-in: 1, 4 and 8 joiners at once -------------------------------------------------------


def _joins_at_once(joiners: list[NodeProcess], ticket: str) -> list[tuple[float, str | None]]:
    """Every joiner runs ``join`` at the same moment; (seconds, error or None) each."""
    barrier = threading.Barrier(len(joiners))
    results: list[tuple[float, str | None]] = [(-1.0, "not run")] * len(joiners)

    def one(index: int) -> None:
        barrier.wait()
        started = time.monotonic()
        error: str | None = None
        try:
            control(joiners[index], "join", timeout_s=ANSWER_BUDGET_S, ticket=ticket)
        except (RuntimeError, httpx.HTTPError) as exc:
            error = str(exc).splitlines()[0][:200]
        results[index] = (time.monotonic() - started, error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(joiners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def part_fanin(entries: int, nodes: Nodes) -> dict[str, Any]:
    source, db_id = template(entries)
    server = nodes.start("fanin-server", LOOPBACK, copy_of(source, nodes.root / "fanin-server"))
    ticket = str(control(server, "share", db=db_id)["ticket"])
    out: dict[str, Any] = {"entries": entries}
    for count in FANIN_COUNTS:
        joiners = nodes.start_many([f"fanin-{count}-{i}" for i in range(count)])
        _progress(f"fan-in: {count} joiners of {entries:,} entries")
        started = time.monotonic()
        with sampling([server]) as rss:
            results = _joins_at_once(joiners, ticket)
        wall = time.monotonic() - started
        held = [Store(j.data_dir) for j in joiners]
        complete = sum(1 for s in held if s.verified(db_id) == entries)
        for store in held:
            store.close()
        times = [t for t, error in results if error is None]
        out[str(count)] = {
            "all_s": round(wall, 2),
            "median_s": round(statistics.median(times), 2) if times else None,
            "max_s": round(max(times), 2) if times else None,
            "complete": complete,
            "errors": [e for _t, e in results if e],
            "server_rss_max_mib": rss[server.data_dir.name],
        }
        _progress(f"fan-in {count}: {out[str(count)]}")
        for joiner in joiners:
            nodes.stop(joiner)
    out["server_rss_peak_mib"] = memory(server)["peak"]
    nodes.stop_all()
    return out


# ---- the suite -------------------------------------------------------------------------------------


def _guarded(name: str, part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A part's figures, or its error: a part that breaks is a result, not the end of the suite."""
    started = time.monotonic()
    try:
        out = part()
    except Exception as exc:
        _progress(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    out["part_s"] = round(time.monotonic() - started, 1)
    return out


def _parts() -> list[str]:
    chosen = [p for p in os.environ.get("BENCH_SCALE_PARTS", "").split(",") if p]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"BENCH_SCALE_PARTS: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    return chosen or list(PARTS)


def run(quick: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    parts = _parts()
    result: dict[str, Any] = {"sizes": dataclasses.asdict(sizes), "parts": parts}
    busy_before, wall_before, own_before = _busy_cpu_s(), time.monotonic(), sum(os.times()[:2])
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        nodes = Nodes(Path(tmp))
        try:
            if "bootstrap" in parts or "first_read" in parts:
                held: list[tuple[NodeProcess, str]] = []

                def bootstrap() -> dict[str, Any]:
                    out, client, db_id = part_bootstrap(sizes.bootstrap, nodes)
                    held.append((client, db_id))
                    return out

                result["bootstrap"] = _guarded("bootstrap", bootstrap)
                if "first_read" in parts:
                    result["first_read"] = (
                        _guarded("first_read", lambda: part_first_read(*held[0], sizes.bootstrap, nodes))
                        if held
                        else {"error": "skipped: the bootstrap did not leave a client"}
                    )
                nodes.stop_all()
            if "soak" in parts:
                result["soak"] = _guarded("soak", lambda: part_soak(sizes.soak_s, nodes))
                nodes.stop_all()
            if "fanout" in parts:
                result["fanout"] = _guarded("fanout", lambda: part_fanout(sizes.fanout_writes, nodes))
                nodes.stop_all()
            if "fanin" in parts:
                result["fanin"] = _guarded("fanin", lambda: part_fanin(sizes.fanin_entries, nodes))
        finally:
            nodes.stop_all()
    wall = time.monotonic() - wall_before
    others = _busy_cpu_s() - busy_before - nodes.cpu_s - (sum(os.times()[:2]) - own_before)
    result["daemons_cpu_cores"] = round(nodes.cpu_s / wall, 2)
    result["unrelated_cpu_cores"] = round(max(0.0, others) / wall, 2)
    return result


# ---- the table -------------------------------------------------------------------------------------

Row = tuple[str, str, str, str]


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _failed(name: str, part: dict[str, Any] | None) -> list[Row] | None:
    if part is None:
        return []
    if "error" in part:
        return [(f"{name}", "FAILED", part["error"][:100], "MISSED")]
    return None


def _bootstrap_rows(r: dict[str, Any] | None) -> list[Row]:
    failed = _failed("bootstrap", r)
    if failed is not None or r is None:
        return failed or []
    n = f"{r['entries']:,}"
    rows: list[Row] = []
    if r["complete"]:
        rows.append((f"bootstrap {n} over libp2p", f"{r['complete_s']} s ({r['entries_per_s']:,}/s)", "", ""))
    else:
        rows.append((f"bootstrap {n} over libp2p", f"stopped at {r['verified']:,}", "all entries", "MISSED"))
    cut = f"cut at {r['cut_at']:,}" if "cut_at" in r else "whole"
    answer = r.get("join_error") or f"{r.get('join_entries')} entries"
    rows.append(
        ("  in one exchange", f"{cut}; join answered in {r['join_s']} s", answer[:60], _verdict(r["one_exchange"]))
    )
    rows.append(
        ("  exchanges (client): syncs / errors", f"{r['exchanges']['syncs']} / {r['exchanges']['errors']}", "", "")
    )
    rss = r["rss_mib"]
    rows.append(("  RSS peak MiB server / client", f"{rss['server']['peak']} / {rss['client']['peak']}", "(VmHWM)", ""))
    rows.append(
        (
            "  RSS peak MiB of their sig. workers",
            f"{rss['server']['workers_peak']} / {rss['client']['workers_peak']}",
            "",
            "",
        )
    )
    return rows


def _read_rows(r: dict[str, Any] | None) -> list[Row]:
    failed = _failed("first read", r)
    if failed is not None or r is None:
        return failed or []
    rows: list[Row] = []
    for case in ("after_sigkill", "after_restart"):
        f = r.get(case)
        if not f:
            continue
        label = f"first db get at {r['entries']:,}, {case.replace('_', ' ')}"
        own = f.get("answered_ms", f["cli_ms"]) - f["cli_health_ms"]
        value = f"{f['cli_ms']:,.0f} ms (CLI)" if f["cli_ok"] else f"CLI gave up; answered {f['answered_ms']:,.0f} ms"
        rows.append((label, value, "< 1 s (minus the CLI's own cost)", _verdict(own < 1000 and f["value_ok"])))
        rows.append(
            ("  CLI's own cost (health) / 2nd get ms", f"{f['cli_health_ms']} / {f['second_control_ms']}", "", "")
        )
        rows.append(
            (
                "  slowest health during it ms",
                f"{f.get('health_max_ms')}",
                "< 200 ms",
                _verdict((f.get("health_max_ms") or 0) < 200),
            )
        )
        rows.append(("  node ready after start s", f"{f['ready_s']}", "", ""))
    return rows


def _soak_rows(r: dict[str, Any] | None) -> list[Row]:
    failed = _failed("soak", r)
    if failed is not None or r is None:
        return failed or []
    rows: list[Row] = [
        (f"soak {r['duration_s']:g} s, 10 writes/s per node", "converged" if r["converged"] else "DIVERGED", "", "")
    ]
    for key in ("a", "b"):
        n = r[key]
        rows.append(
            (
                f"  node {key}: _sync bytes per exchange",
                f"{n['sync_bytes_per_exchange']} ({n['exchanges_during']} exchanges)",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  node {key}: _sync added entries / MiB/h",
                f"{n['sync_entries_added']:,} / {n['sync_mib_per_hour']}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  node {key}: _sync / user entries (bytes)",
                f"{n['sync_entries']:,} ({n['sync_bytes']:,}) / {n['user_entries']:,} ({n['user_bytes']:,})",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  node {key}: disk / user-only disk",
                f"{n['disk_bytes']:,} / {n['user_only_disk_bytes']:,} = {n['disk_ratio']}",
                "<= 1.2",
                _verdict((n["disk_ratio"] or 99) <= 1.2),
            )
        )
        rows.append((f"  node {key}: db.set p50 / p95 ms", f"{n['write_p50_ms']} / {n['write_p95_ms']}", "", ""))
    return rows


def _fanout_rows(r: dict[str, Any] | None) -> list[Row]:
    failed = _failed("fan-out", r)
    if failed is not None or r is None:
        return failed or []
    rows: list[Row] = []
    one = (r.get("1") or {}).get("p50_ms")
    for count in FANOUT_COUNTS:
        f = r.get(str(count))
        if not f:
            continue
        goal, verdict = "", ""
        if count == max(FANOUT_COUNTS) and one and f["p50_ms"]:
            goal, verdict = f"p50 <= 2x 1 reader's ({2 * one:.1f})", _verdict(f["p50_ms"] <= 2 * one)
        missed = f" ({f['missed']} missed)" if f["missed"] else ""
        rows.append((f"fan-out to {count} p50 / p95 ms", f"{f['p50_ms']} / {f['p95_ms']}{missed}", goal, verdict))
        rows.append(("  last reader p50 / p95 ms", f"{f['last_reader_p50_ms']} / {f['last_reader_p95_ms']}", "", ""))
        rows.append(
            (
                "  from the set's answer p50 / p95 ms",
                f"{f['after_set_p50_ms']} / {f['after_set_p95_ms']}",
                f"(db.set answered in {f['writer_set_p50_ms']} ms)",
                "",
            )
        )
    return rows


def _fanin_rows(r: dict[str, Any] | None) -> list[Row]:
    failed = _failed("fan-in", r)
    if failed is not None or r is None:
        return failed or []
    rows: list[Row] = []
    for count in FANIN_COUNTS:
        f = r.get(str(count))
        if not f:
            continue
        errors = f" ({len(f['errors'])} errors)" if f["errors"] else ""
        rows.append(
            (
                f"fan-in {count} joiners of {r['entries']:,}",
                f"{f['all_s']} s (median {f['median_s']} s){errors}",
                f"{f['complete']}/{count} complete",
                _verdict(f["complete"] == count),
            )
        )
        rows.append(("  server RSS max MiB", f"{f['server_rss_max_mib']}", "", ""))
    return rows


def report(result: dict[str, Any]) -> list[Row]:
    load: list[Row] = []
    if "unrelated_cpu_cores" in result:
        cores = f"{result['unrelated_cpu_cores']} / {result['daemons_cpu_cores']}"
        load.append(("CPU cores used by other work / our daemons", cores, "(the harness counts daemons as others)", ""))
    return [
        *load,
        *_bootstrap_rows(result.get("bootstrap")),
        *_read_rows(result.get("first_read")),
        *_soak_rows(result.get("soak")),
        *_fanout_rows(result.get("fanout")),
        *_fanin_rows(result.get("fanin")),
    ]

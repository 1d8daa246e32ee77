"""The mesh of docker-compose.yml, built with network namespaces and NAT where no Docker engine is.

::

    scripts/mesh                  # run until Ctrl-C; prints how to attach the TUI to each node
    scripts/mesh --check          # write on every node, wait until all converge, print a table; exit 0/1
    scripts/mesh --check --json   # the same, one JSON object on stdout (the table goes to stderr)

Needs root, ``ip`` and ``nft`` (as the NAT tests do). The topology is ``scripts/netns.py``'s
(masquerading NATs that drop unsolicited inbound traffic); every node is the real
``eidetica-node run``, started by ``scripts/mesh-node.sh``, the entrypoint the containers of
``docker-compose.yml`` use, with a shared directory standing in for the compose file's ``mesh``
volume::

    R  198.18.0.1  namespace r  relay   eidetica-node run --relay-service; publishes its address
    A  10.201.1.2  namespace a  seed    behind NAT G1; creates the database "mesh", publishes its ticket
    C  10.201.1.2  namespace a  peer    a second host on LAN 1 (A's namespace, its own ports); joins
    B  10.201.2.2  namespace b  peer    behind NAT G2; joins (through R: it cannot reach LAN 1)

Every node's control socket is a file in its data directory, so ``eidetica-node status --data-dir
DIR`` attaches to a node from any namespace (``--check`` proves it by taking every node's
``status --json`` from the namespace this script runs in). Everything started is stopped, and
every namespace deleted, on exit (Ctrl-C, SIGTERM, ``--duration``, an error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/mesh.py` as well as `python -m scripts.mesh`
    sys.path.insert(0, str(REPO))

from scripts.netns import NatTopology, NetnsError, cleanup_stale, skip_reason  # noqa: E402

MESH_NODE = REPO / "scripts" / "mesh-node.sh"
BIN = Path(sys.executable).parent / "eidetica-node"
DB_NAME = "mesh"
SETUP_TIMEOUT_S = 120.0  # four fresh interpreters, reservations on the relay, two joins through it
CHECK_DURATION_S = 90.0  # --check: how long the writes may take to reach every node
CLI_TIMEOUT_S = 30.0  # one eidetica-node command (join is done by mesh-node.sh, not here)
STOP_TIMEOUT_S = 15.0  # SIGTERM: the node flushes sync for at most 8 s, then closes
POLL_S = 0.5


@dataclass
class MeshNode:
    """One ``mesh-node.sh`` process (and the ``eidetica-node run`` it starts) in a namespace."""

    name: str  # "R", "A", "B", "C"
    role: str  # relay, seed, peer
    netns_node: str  # the scripts.netns node whose namespace it runs in
    p2p_port: int
    http_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    ready_s: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def ready(self) -> bool:
        marker = f"mesh-node[{self.role}]: ready"
        return self.log.exists() and marker in self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


class MeshError(Exception):
    """The mesh could not be set up (a node exited, or did not get ready in time)."""


def _stop_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


class Mesh:
    def __init__(self, topo: NatTopology, root: Path, *, log_level: str, setup_timeout_s: float) -> None:
        self.topo = topo
        self.root = root
        self.shared = root / "shared"  # the compose file's `mesh` volume
        self.shared.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.setup_timeout_s = setup_timeout_s
        self.nodes = [
            self._node("R", "relay", "r", 4001, 8080),
            self._node("A", "seed", "a", 4001, 8080),
            self._node("C", "peer", "a", 4002, 8081),
            self._node("B", "peer", "b", 4001, 8080),
        ]

    def _node(self, name: str, role: str, netns_node: str, p2p: int, http: int) -> MeshNode:
        data_dir = self.root / name.lower()
        return MeshNode(name, role, netns_node, p2p, http, data_dir, self.root / f"{name.lower()}.log")

    @property
    def db_nodes(self) -> list[MeshNode]:
        return [n for n in self.nodes if n.role != "relay"]

    def namespace(self, node: MeshNode) -> str:
        return self.topo.ns[node.netns_node]

    def address(self, node: MeshNode) -> str:
        return f"{self.topo.addr[node.netns_node]}:{node.p2p_port}"

    def _env(self, node: MeshNode) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EIDETICA_", "MESH_"))}
        env["PATH"] = f"{BIN.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env.update(
            EIDETICA_DATA_DIR=str(node.data_dir),
            EIDETICA_P2P_LISTEN=f"/ip4/0.0.0.0/tcp/{node.p2p_port}",
            EIDETICA_HTTP_BIND=f"0.0.0.0:{node.http_port}",
            MESH_DIR=str(self.shared),
            MESH_DB=DB_NAME,
            MESH_WAIT_S=str(int(self.setup_timeout_s)),
            MESH_PYTHON=sys.executable,
            PYTHONUNBUFFERED="1",
        )
        return env

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, say: Any) -> None:
        """Start every node and wait until each has done its part (bounded)."""
        started = time.monotonic()
        for node in self.nodes:  # all at once: mesh-node.sh waits for the relay and the ticket itself
            argv = ["bash", str(MESH_NODE), node.role, "--name", node.name, "--log-level", self.log_level]
            with node.log.open("ab") as log:
                node.process = self.topo.run(
                    node.netns_node, argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(node), cwd=self.root
                )
        deadline = started + self.setup_timeout_s
        waiting = list(self.nodes)
        while waiting:
            for node in list(waiting):
                if node.ready():
                    node.ready_s = time.monotonic() - started
                    say(f"{node.name} ({node.role}) ready after {node.ready_s:.1f} s")
                    waiting.remove(node)
                elif node.process is not None and node.process.poll() is not None:
                    raise MeshError(
                        f"{node.name} ({node.role}) exited {node.process.returncode} during setup; "
                        f"its log ({node.log}):\n{node.log_tail()}"
                    )
            if waiting and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name} ({n.log}):\n{n.log_tail()}" for n in waiting)
                names = ", ".join(n.name for n in waiting)
                raise MeshError(f"{names} not ready after {self.setup_timeout_s:g} s\n{logs}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM to every mesh-node.sh (it stops its node as `eidetica-node stop` does), bounded."""
        running = [n.process for n in self.nodes if n.process is not None and n.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # whatever is left is killed by NatTopology.close()

    def exited(self) -> list[MeshNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is not None]

    # ---- talking to the nodes ----------------------------------------------------------

    def cli(self, node: MeshNode, *args: str, in_namespace: bool = True) -> subprocess.CompletedProcess[str]:
        """``eidetica-node ARGS --data-dir <node's>``, inside the node's namespace or from ours."""
        argv = [str(BIN), *args, "--data-dir", str(node.data_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EIDETICA_")}
        if in_namespace:
            return self.topo.exec(node.netns_node, argv, timeout=CLI_TIMEOUT_S, env=env)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL
        )

    def cli_json(self, node: MeshNode, *args: str, in_namespace: bool = True) -> Any:
        done = self.cli(node, *args, "--json", in_namespace=in_namespace)
        if done.returncode != 0:
            raise MeshError(f"{node.name}: eidetica-node {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def attach_lines(self) -> list[str]:
        lines = ["attach the TUI to a node (q quits; works from any namespace, the socket is in the data dir):"]
        for node in self.nodes:
            lines.append(
                f"  {node.name} {node.role:<5} ip netns exec {self.namespace(node)} "
                f"{BIN} status --data-dir {node.data_dir}"
            )
        lines.append(f"logs: {self.root}/<node>.log   shared directory (relay address, ticket): {self.shared}")
        return lines

    # ---- --check -------------------------------------------------------------------------

    def check(self, duration_s: float, say: Any) -> dict[str, Any]:
        """Write a key on every node; wait until every node holds every key; report."""
        token = secrets.token_hex(4)
        expected = {f"from-{n.name}": f"{token}-{n.name}" for n in self.db_nodes}
        started = time.monotonic()
        for node in self.db_nodes:
            done = self.cli(node, "db", "set", DB_NAME, f"from-{node.name}", expected[f"from-{node.name}"])
            if done.returncode != 0:
                raise MeshError(f"{node.name}: db set failed: {done.stderr.strip()}")
        say(f"wrote {', '.join(expected)} (one key on each of {', '.join(n.name for n in self.db_nodes)})")
        seen: dict[str, set[str]] = {n.name: set() for n in self.db_nodes}
        converged_s: dict[str, float] = {}
        errors: dict[str, str] = {}
        deadline = started + duration_s
        while len(converged_s) < len(self.db_nodes) and time.monotonic() < deadline:
            for node in self.db_nodes:
                if node.name in converged_s:
                    continue
                done = self.cli(node, "db", "get", DB_NAME, "--json")
                if done.returncode != 0:
                    errors[node.name] = done.stderr.strip()
                    continue
                store = json.loads(done.stdout).get("value") or {}
                seen[node.name] = {k for k, v in expected.items() if store.get(k) == v}
                if len(seen[node.name]) == len(expected):
                    converged_s[node.name] = time.monotonic() - started
                    say(f"{node.name} holds all {len(expected)} writes after {converged_s[node.name]:.2f} s")
            if len(converged_s) < len(self.db_nodes):
                time.sleep(POLL_S)
            if self.exited():
                break
        return self._report(expected, seen, converged_s, errors, time.monotonic() - started)

    def _report(
        self,
        expected: dict[str, str],
        seen: dict[str, set[str]],
        converged_s: dict[str, float],
        errors: dict[str, str],
        elapsed_s: float,
    ) -> dict[str, Any]:
        names = {}  # device ID -> node name, for the peers column
        nodes: dict[str, Any] = {}
        for node in self.nodes:
            # From this script's namespace, not the node's: the control socket is a file.
            try:
                status = self.cli_json(node, "status", in_namespace=False)
                names[status["node"]["device_id"]] = node.name
                attach = {"ok": True, "device_id": status["node"]["device_id"]}
            except (MeshError, json.JSONDecodeError, KeyError, subprocess.TimeoutExpired) as exc:
                status, attach = {}, {"ok": False, "error": str(exc)}
            nodes[node.name] = {
                "role": node.role,
                "namespace": self.namespace(node),
                "address": self.address(node),
                "data_dir": str(node.data_dir),
                "ready_s": None if node.ready_s is None else round(node.ready_s, 2),
                "status_from_outside": attach,
                "running": node.process is not None and node.process.poll() is None,
                "_status": status,
            }
        for node in self.nodes:
            item = nodes[node.name]
            status = item.pop("_status")
            transports = (status.get("node") or {}).get("transports") or []
            p2p = next((t.get("status") or {} for t in transports if t.get("name") == "p2p"), {})
            item["reachability"] = p2p.get("reachability")
            item["reservations"] = [r.get("state") for r in p2p.get("reservations") or []]
            item["peers"] = {
                names.get(p["pubkey"], p["pubkey"][:16]): p.get("connection") or "not connected"
                for p in status.get("peers") or []
            }
            if node.role != "relay":
                item["writes_seen"] = sorted(seen.get(node.name, set()))
                item["converged_s"] = round(converged_s[node.name], 2) if node.name in converged_s else None
                if node.name in errors and node.name not in converged_s:
                    item["error"] = errors[node.name]
        attached = all(n["status_from_outside"]["ok"] for n in nodes.values())
        converged = len(converged_s) == len(self.db_nodes) and attached
        return {
            "converged": converged,
            "database": DB_NAME,
            "writes": sorted(expected),
            "elapsed_s": round(elapsed_s, 2),
            "nodes": nodes,
        }


def table(report: dict[str, Any]) -> list[str]:
    header = ("node", "role", "address", "reach", "writes", "converged", "status", "peers (connection)")
    rows = [header]
    total = len(report["writes"])
    for name, node in report["nodes"].items():
        writes = "-" if node["role"] == "relay" else f"{len(node['writes_seen'])}/{total}"
        converged = "-" if node["role"] == "relay" else f"{node['converged_s']} s" if node["converged_s"] else "NO"
        peers = ", ".join(f"{peer} {kind}" for peer, kind in sorted(node["peers"].items())) or "-"
        attach = "ok" if node["status_from_outside"]["ok"] else "FAILED"
        rows.append((name, node["role"], node["address"], str(node["reachability"]), writes, converged, attach, peers))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    verdict = "converged" if report["converged"] else "NOT converged"
    lines.append(f"{verdict}: {total} writes on {total} nodes, {report['elapsed_s']} s after the writes")
    lines.append("(status: `eidetica-node status --json` answered from outside the node's namespace)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/mesh",
        description="Run the docker-compose.yml mesh (relay, seed and two peers behind NATs) in network namespaces.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write on every node, wait until all converge, print a table, exit 0/1"
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"--check: how long convergence may take (default {CHECK_DURATION_S:g}); "
        "otherwise: stop after S seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--setup-timeout", type=float, default=SETUP_TIMEOUT_S, metavar="S", help="bound on start, share and joins"
    )
    parser.add_argument("--json", action="store_true", help="--check: one JSON object on stdout (the table on stderr)")
    parser.add_argument("--nat", choices=("masquerade", "symmetric"), default="masquerade", help="the NATs' mapping")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--data-root", type=Path, help="keep data directories and logs here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="do not delete the temp dir on exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    reason = skip_reason()
    if reason is not None:
        print(f"scripts/mesh: cannot build network namespaces: {reason}", file=sys.stderr)
        return 2
    if not BIN.exists():
        print(f"scripts/mesh: {BIN} not found (run through scripts/mesh, which installs the project)", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_signal)
    cleanup_stale()
    if args.data_root is not None:
        root, remove_root = args.data_root.absolute(), False
        root.mkdir(parents=True, exist_ok=True)
    else:
        root, remove_root = Path(tempfile.mkdtemp(prefix="eidetica-mesh-")), not args.keep
    code = 1
    mesh: Mesh | None = None
    try:
        with NatTopology(nat=args.nat) as topo:
            mesh = Mesh(topo, root, log_level=args.log_level, setup_timeout_s=args.setup_timeout)
            try:
                say(f"mesh: namespaces {topo.ns['r']} ... ({args.nat} NATs), data and logs in {root}")
                mesh.start(say)
                for line in mesh.attach_lines():
                    say(line)
                if args.check:
                    report = mesh.check(args.duration or CHECK_DURATION_S, say)
                    for line in table(report):
                        say(line)
                    if args.json:
                        print(json.dumps(report, indent=2), flush=True)
                    code = 0 if report["converged"] else 1
                else:
                    code = _serve(mesh, args.duration, say)
            finally:
                mesh.stop()
    except KeyboardInterrupt:
        say("mesh: stopping")
        code = 130 if code == 1 else code
    except (MeshError, NetnsError) as exc:
        print(f"scripts/mesh: {exc}", file=sys.stderr)
        code = 1
    finally:
        if remove_root:
            shutil.rmtree(root, ignore_errors=True)
        elif mesh is not None:
            say(f"mesh: data and logs kept in {root}")
    return code


def _serve(mesh: Mesh, duration_s: float | None, say: Any) -> int:
    """Until Ctrl-C (KeyboardInterrupt), ``duration_s``, or a node exiting."""
    if duration_s is None:
        say("running; Ctrl-C stops every node and deletes the namespaces")
    else:
        say(f"running for {duration_s:g} s (Ctrl-C stops earlier)")
    deadline = None if duration_s is None else time.monotonic() + duration_s
    while deadline is None or time.monotonic() < deadline:
        gone = mesh.exited()
        if gone:
            for node in gone:
                code = node.process.returncode if node.process is not None else None  # exited(): never None
                say(f"{node.name} exited ({code}); log {node.log}:\n{node.log_tail()}")
            return 1
        time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

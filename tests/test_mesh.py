"""The docker-compose.yml mesh, run for real in network namespaces behind NAT (``scripts/mesh``).

``python -m scripts.mesh --check --json`` starts R (relay), A (seed, behind G1), C (a second
host on LAN 1) and B (behind G2), each the real ``eidetica-node run`` started by
``scripts/mesh-node.sh`` (the containers' entrypoint); the seed creates the database, the
others join from its ticket; then every node writes and the script waits until every node
holds every write. Here the report is checked, not just the exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.netns import cleanup_stale
from tests.conftest import require_netns

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CONVERGE_S = 60  # the writes reaching every node (about a second in practice)
SETUP_S = 120  # four fresh interpreters, reservations, a share and two joins through the relay
RUN_TIMEOUT_S = SETUP_S + CONVERGE_S + 60  # the whole script, teardown included
STOP_TIMEOUT_S = 30  # after SIGTERM the script stops every node and deletes the namespaces


def _run_mesh_check(data_root: Path) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "scripts.mesh", "--check", "--json"]
    argv += ["--duration", str(CONVERGE_S), "--setup-timeout", str(SETUP_S), "--data-root", str(data_root)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EIDETICA_", "MESH_"))}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the script tears its mesh down on SIGTERM
        try:
            stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate(timeout=10)
        cleanup_stale()  # whatever a killed run left (its lock died with it)
        pytest.fail(f"scripts.mesh --check ran over {RUN_TIMEOUT_S} s; stderr:\n{stderr[-6000:]}")
    return process.returncode, stdout, stderr


def _logs(data_root: Path) -> str:
    parts = []
    for log in sorted(data_root.glob("*.log")):
        with contextlib.suppress(OSError):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def test_mesh_check_every_node_converges(tmp_path: Path) -> None:
    require_netns()
    cleanup_stale()
    data_root = tmp_path / "mesh"
    code, stdout, stderr = _run_mesh_check(data_root)
    print(stderr)  # the script's progress and table (shown with -s or on failure)
    try:
        report: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (exit {code}); stderr:\n{stderr[-6000:]}\n{_logs(data_root)}")
    assert code == 0 and report["converged"], f"exit {code}: {json.dumps(report, indent=2)}\n{_logs(data_root)}"

    nodes = report["nodes"]
    assert {name: node["role"] for name, node in nodes.items()} == {"R": "relay", "A": "seed", "C": "peer", "B": "peer"}
    writes = report["writes"]
    assert writes == ["from-A", "from-B", "from-C"]
    for name in ("A", "B", "C"):
        node = nodes[name]
        assert node["writes_seen"] == writes, f"{name} saw only {node['writes_seen']}"
        assert node["converged_s"] is not None and node["converged_s"] <= CONVERGE_S
        assert node["running"], f"{name} was no longer running at the end"
    for name, node in nodes.items():
        # every node's `status --json` answered from the test's namespace, not the node's own
        assert node["status_from_outside"]["ok"], f"{name}: {node['status_from_outside']}"
    # A and B sit behind different NATs; C shares A's LAN (and namespace); R is on the public segment
    assert nodes["A"]["namespace"] == nodes["C"]["namespace"] != nodes["B"]["namespace"] != nodes["R"]["namespace"]
    assert nodes["R"]["address"].startswith("198.18.0.")
    # the seed is the hub: both peers sync with it (relayed, or direct after hole punching)
    assert set(nodes["A"]["peers"]) == {"B", "C"}
    assert set(nodes["B"]["peers"]) == {"A"} and nodes["B"]["peers"]["A"] in ("relayed", "direct")
    assert "eidetica-node status --data-dir" in stderr  # the attach instructions were printed

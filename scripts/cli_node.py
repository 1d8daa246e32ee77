"""Driving the real ``eidetica-node`` binary: a node process and CLI calls, for the tests
and for ``scripts/flood_sync.py`` (which is why it lives here and not under ``tests/``).

Every wait is bounded; ``NodeProcess.stop`` sends SIGTERM and kills after a bound, and
tests call it in ``finally``. Nodes listen on loopback with OS-chosen ports unless told
otherwise, and may run under a launcher (``ip netns exec``: ``tests/test_nat.py``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent / "eidetica-node")
if not os.path.exists(BIN):  # pragma: no cover - a venv always has it next to python
    BIN = shutil.which("eidetica-node") or BIN

LOOPBACK = ["--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--http-bind", "127.0.0.1:0"]
READY_TIMEOUT_S = 60.0  # a fresh interpreter imports trio, libp2p, hypercorn and the node
STOP_TIMEOUT_S = 30.0  # SIGTERM flushes sync for at most 8 s, then closes
CLI_TIMEOUT_S = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any EIDETICA_* the developer may have set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIDETICA_")}
    env.update(extra)
    return env


def cli(
    *args: str, timeout: float = CLI_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``eidetica-node ARGS``; never raises on a non-zero exit."""
    return subprocess.run(
        [BIN, *args], capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd=REPO
    )


class NodeProcess:
    """One ``eidetica-node run --json`` process on a data directory."""

    def __init__(self, data_dir: Path, process: subprocess.Popen[str], stderr: Path) -> None:
        self.data_dir = data_dir
        self.process = process
        self.stderr_path = stderr
        self.ready: dict[str, Any] = {}

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        network: Sequence[str] = LOOPBACK,
        launcher: Sequence[str] = (),
    ) -> NodeProcess:
        """``network``: the listen options (loopback, OS-chosen ports, by default);
        ``launcher``: a command to run the node under, such as ``ip netns exec NS`` (the CLI
        still reaches it: the control socket is a file in the data directory)."""
        stderr = data_dir.parent / f"{data_dir.name}.stderr"
        with stderr.open("w") as log:
            process = subprocess.Popen(
                [*launcher, BIN, "run", "--data-dir", str(data_dir), "--json", *network, *extra],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env or clean_env(),
                cwd=REPO,
            )
        node = cls(data_dir, process, stderr)
        try:
            node.ready = node._ready_line()
        except BaseException:
            node.stop()
            raise
        return node

    def _ready_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                line = self.process.stdout.readline()
                if not line:
                    break
                answer: dict[str, Any] = json.loads(line)
                assert answer.get("ready"), answer
                return answer
            if self.process.poll() is not None:
                break
        raise AssertionError(f"node never got ready; its stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--data-dir", str(self.data_dir), timeout=timeout)

    def ok(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        """Run a command that must succeed; its stdout, stripped."""
        result = self.cli(*args, timeout=timeout)
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}: {result.stderr}\nnode stderr:\n{self.stderr()[-4000:]}"
        )
        return result.stdout.strip()

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def call(self, command: str, **arguments: object) -> Any:
        """One control command sent straight to the node's socket: what the CLI sends, without
        starting an interpreter (~1 s on a loaded machine), for probes whose timing is measured.
        Raises ``node.errors.ControlError`` when the node refuses it."""
        from node.client import ControlClient

        with ControlClient(self.data_dir) as client:
            return client.call(command, **arguments)

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), then kill; the exit status (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return None
        return self.process.returncode

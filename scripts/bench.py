"""Benchmarks: ``python -m scripts.bench SUITE [--quick] [--json]``.

Each suite is a module ``scripts.bench_<suite>`` with two functions:

* ``run(quick: bool) -> dict``: measure, and return the figures (JSON-serializable);
* ``report(result: dict) -> list[tuple[str, str, str, str]]``: table rows of
  (metric, value, goal, verdict), where goal and verdict may be empty.

This entry point adds a ``machine`` object to every result, prints the table on stdout
(or, with ``--json``, exactly one JSON object on stdout and the table on stderr), and
sends progress lines to stderr. Add a suite by writing its module: every
``scripts/bench_<suite>.py`` is found by name.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any


def _discover_suites() -> dict[str, str]:
    """Every ``scripts/bench_<suite>.py`` next to this file is a suite."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(
        entry[len("bench_") : -len(".py")]
        for entry in os.listdir(here)
        if entry.startswith("bench_") and entry.endswith(".py")
    )
    return {name: f"scripts.bench_{name}" for name in names if name.isidentifier()}


SUITES = _discover_suites()  # e.g. dag, reconcile, transport
USAGE = f"usage: python -m scripts.bench {{{','.join(SUITES)}}} [--quick] [--json]"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; 'unknown' elsewhere)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _git_revision() -> str:
    """The commit the code under test comes from (with "+dirty" if dag/ has local changes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dag"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    tmp = tempfile.gettempdir()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "os": f"{platform.system()} {platform.release()}",
        "tmpdir": tmp,
        "tmpdir_fs": _filesystem_of(tmp),
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    """How busy the rest of the machine was while a suite ran (other processes' CPU, in cores)."""

    def __init__(self) -> None:
        self.loadavg_before = os.getloadavg()[0]
        self._busy = _cpu_busy_seconds()
        times = os.times()
        self._own = times.user + times.system
        self._wall = time.monotonic()

    def finish(self) -> dict[str, Any]:
        wall = time.monotonic() - self._wall
        times = os.times()
        own = times.user + times.system - self._own
        busy = _cpu_busy_seconds()
        other = None
        if busy is not None and self._busy is not None and wall > 0:
            other = max(0.0, (busy - self._busy - own) / wall)
        return {
            "loadavg_1min_before": round(self.loadavg_before, 2),
            "own_cpu_cores": round(own / wall, 2) if wall > 0 else None,
            "other_cpu_cores": None if other is None else round(other, 2),
        }


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("metric", "value", "goal", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    for index, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    suite: str | None = None
    quick = as_json = False
    for arg in argv:
        if arg == "--quick":
            quick = True
        elif arg == "--json":
            as_json = True
        elif arg in ("-h", "--help"):
            print(USAGE)
            return 0
        elif arg.startswith("-"):
            print(f"bench: unknown option {arg!r}; {USAGE}", file=sys.stderr)
            return 2
        elif suite is not None:
            print(f"bench: one suite at a time, got {suite!r} and {arg!r}; {USAGE}", file=sys.stderr)
            return 2
        elif arg not in SUITES:
            print(f"bench: unknown suite {arg!r} (known: {', '.join(SUITES)}); {USAGE}", file=sys.stderr)
            return 2
        else:
            suite = arg
    if suite is None:
        print(f"bench: no suite given; {USAGE}", file=sys.stderr)
        return 2

    module = importlib.import_module(SUITES[suite])
    machine = machine_info()
    monitor = LoadMonitor()
    result: dict[str, Any] = module.run(quick)
    machine.update(monitor.finish())
    result["machine"] = machine
    result["quick"] = quick
    title = (
        f"suite {suite}{' (quick)' if quick else ''}: {machine['cpu_count']} CPU {machine['cpu_model']}, "
        f"Python {machine['python']}, SQLite {machine['sqlite']}, tmp on {machine['tmpdir_fs']}, {machine['date']}, "
        f"git {machine['git']}\n"
        f"other processes used {machine['other_cpu_cores']} cores on average during the run "
        f"(this one {machine['own_cpu_cores']}; load average before {machine['loadavg_1min_before']})"
    )
    if (machine["other_cpu_cores"] or 0) > 0.2:
        title += "\nWARNING: the machine was busy with other work; the figures are pessimistic"
    table = title + "\n\n" + format_table(module.report(result))
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(result, sort_keys=True))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The ``eidetica-node`` command line.

Fast tests call ``node.cli.main`` in-process (parsing, help, errors with no node running,
``init`` and ``info`` without a node). Slow tests drive the real binary: nodes in their
own processes, two of them sharing and joining a database, every error path against a
running node, the access-request flow, and ``scripts/run`` starting a node on its defaults.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from node.cli import build_parser, main
from scripts.cli_node import REPO, NodeProcess, clean_env, cli
from tests.waiting import wait_until

ONE_LINE = "eidetica-node: error: "


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(args)`` -> (exit status, stdout, stderr), whether it returns or exits."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, fragment: str) -> None:
    assert err.startswith(ONE_LINE) and err.count("\n") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err


# ---- in-process: parsing, help, no node running --------------------------------------------


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("init", "run", "status", "info", "health", "stop", "db", "table", "share", "join", "peers", "sync"):
        assert f"    {command}" in out, command
    assert "access" in out and "EIDETICA_" in out and "Exit status" in out
    for argv in (
        ["run"],
        ["db", "create"],
        ["db", "list"],
        ["db", "show"],
        ["db", "get"],
        ["db", "set"],
        ["db", "delete"],
        ["table", "insert"],
        ["table", "list"],
        ["share"],
        ["join"],
        ["sync"],
        ["access", "approve"],
        ["status"],
    ):
        code, out, _ = run_main([*argv, "--help"], capsys)
        assert code == 0 and out.startswith("usage: eidetica-node " + " ".join(argv)), (argv, out)
    assert "--p2p-listen" in run_main(["run", "--help"], capsys)[1]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["db", "list", "--bogus"], "unrecognized arguments: --bogus"),
        (["db"], "the following arguments are required: ACTION"),
        (["db", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--log-level", "loud"], "invalid choice: 'loud'"),
        (["share"], "the following arguments are required: db"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert_one_line_error(err, fragment)


@pytest.mark.parametrize(
    "args",
    [
        ["health"],
        ["db", "list"],
        ["db", "create", "notes"],
        ["db", "get", "notes", "title"],
        ["db", "set", "notes", "title", "x"],
        ["table", "list", "notes", "todos"],
        ["share", "notes"],
        ["join", "eidetica:?db=x"],
        ["peers"],
        ["sync"],
        ["access", "list"],
        ["status"],
        ["stop"],
    ],
)
def test_commands_need_a_running_node(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "n"
    code, _, err = run_main([*args, "--data-dir", str(data)], capsys)
    assert code == 3
    assert err == (
        f"{ONE_LINE}no node is running for data directory {data}; start one with: eidetica-node run --data-dir {data}\n"
    )


def test_init_then_info_without_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "n"
    code, out, _ = run_main(["init", "--data-dir", str(data), "--json"], capsys)
    assert code == 0
    created = json.loads(out)
    assert created["device_id"].startswith("ed25519:") and created["created"]
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "device.key").stat().st_mode) == 0o600
    assert all(section == {} for section in tomllib.loads((data / "config.toml").read_text()).values())

    code, out, _ = run_main(["--data-dir", str(data), "info", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info == {"running": False, "data_dir": str(data), "device_id": created["device_id"], "databases": []}
    code, out, _ = run_main(["info", "--data-dir", str(data)], capsys)
    assert code == 0 and "not running (start it: eidetica-node run --data-dir" in out

    (data / "config.toml").write_text("# mine\n")
    code, out, _ = run_main(["init", "--data-dir", str(data)], capsys)
    assert code == 0 and "kept as it was" in out and created["device_id"] in out
    assert (data / "config.toml").read_text() == "# mine\n"


def test_data_dir_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_main(["init", "--data-dir", str(blocker / "sub")], capsys)
    assert code == 1
    assert_one_line_error(err, "cannot use data directory")
    code, _, err = run_main(["info", "--data-dir", str(tmp_path / "none")], capsys)
    assert code == 1
    assert_one_line_error(err, f"no data directory {tmp_path / 'none'}; create one with: eidetica-node init")


def test_config_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[p2p]\nlisen = []\n")
    code, _, err = run_main(["db", "list", "--config", str(bad)], capsys)
    assert code == 2
    assert_one_line_error(err, "unknown setting 'p2p.lisen'")
    monkeypatch.setenv("EIDETICA_HTTP", "maybe")
    code, _, err = run_main(["info", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, "environment variable EIDETICA_HTTP must be true or false, not 'maybe'")


def test_bad_values_are_refused_before_asking_the_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    code, _, err = run_main(["db", "set", "notes", "n", "{oops", "--json-value", *data], capsys)
    assert code == 2
    assert_one_line_error(err, "--json-value: VALUE is not JSON")
    code, _, err = run_main(["table", "insert", "notes", "todos", "[1", *data], capsys)
    assert code == 2
    assert_one_line_error(err, "ROW must be a JSON object")


def test_no_command_means_run(tmp_path: Path) -> None:
    from node.cli import _with_default_command

    assert _with_default_command([]) == ["run"]
    assert _with_default_command(["--data-dir", "x"]) == ["run", "--data-dir", "x"]
    assert _with_default_command(["--data-dir", "x", "info"]) == ["--data-dir", "x", "info"]
    assert _with_default_command(["--help"]) == ["--help"]
    args = build_parser().parse_args(_with_default_command(["--http-bind", "127.0.0.1:0"]))
    assert args.command == "run" and args.http_bind == "127.0.0.1:0"


# ---- real processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_share_join_write_and_read_each_other(tmp_path: Path) -> None:
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert cli("init", "--data-dir", str(one_dir)).returncode == 0
    assert cli("init", "--data-dir", str(two_dir)).returncode == 0
    nodes: list[NodeProcess] = []
    try:
        one = NodeProcess.start(one_dir, "--name", "one")
        nodes.append(one)
        two = NodeProcess.start(two_dir, "--name", "two")
        nodes.append(two)
        assert one.ready["display_name"] == "one"
        assert {a.split(":", 1)[0] for a in one.ready["addresses"]} == {"p2p", "http"}
        assert stat.S_IMODE((one_dir / "control.sock").stat().st_mode) == 0o600

        db = one.ok("db", "create", "notes", "--public", "write:10")
        assert db.startswith("bafyr4i")
        ticket = one.ok("share", "notes")
        assert ticket.startswith(f"eidetica:?db={db}&pr=")
        assert "joined " + db in two.ok("join", ticket)

        one.ok("db", "set", "notes", "from", "one")
        two.ok("db", "set", db, "reply", "two")
        two.ok("db", "set", "notes", "count", "3", "--json-value")
        row = two.ok("table", "insert", "notes", "todos", '{"title": "milk"}')

        wait_until(
            lambda: one.cli("db", "get", "notes", "reply").stdout.strip() == "two", "two's write on one", timeout_s=30
        )
        wait_until(
            lambda: two.cli("db", "get", "notes", "from").stdout.strip() == "one", "one's write on two", timeout_s=30
        )
        wait_until(lambda: row in one.ok("table", "list", "notes", "todos"), "two's row on one", timeout_s=30)
        assert one.json("db", "get", "notes") == {"value": {"from": "one", "reply": "two", "count": 3}}
        assert one.ok("db", "get", "notes", "count") == "3"

        [peer] = one.json("peers")["peers"]
        assert peer["pubkey"] == two.ready["device_id"] and peer["display_name"] == "two"
        assert peer["databases"] == [db]
        wait_until(
            lambda: all(p["state"] == "up to date" for p in one.json("db", "show", "notes")["peers"]),
            "one sees two up to date",
            timeout_s=30,
        )
        shown = two.json("db", "show", "notes")
        assert shown["entries"] == shown["verified"] == 6 and shown["failed"] == 0
        assert [p["peer"] for p in shown["peers"]] == [one.ready["device_id"]]
        assert two.json("sync", "notes")["results"][0]["ok"]
        assert "ok " in two.ok("sync")
        assert two.json("health")["status"] == "ok"
        listed = two.json("db", "list")["databases"]
        assert [d["name"] for d in listed] == ["notes"]
        assert {d["name"] for d in two.json("db", "list", "--all")["databases"]} == {"notes", "_sync"}
        info = one.json("info")
        assert info["running"] and info["peers"] == 1 and info["metrics"]["syncs"] > 0
        snapshot = one.json("status")  # what the TUI shows, once
        assert snapshot["node"]["device_id"] == one.ready["device_id"]
        assert [p["display_name"] for p in snapshot["peers"]] == ["two"]
        assert snapshot["databases"][0]["peers"][0]["peer"] == two.ready["device_id"]
        assert snapshot["history"] and {"at_ms", "peer", "db", "sent", "received", "error"} <= set(
            snapshot["history"][0]
        )

        two.ok("db", "delete", "notes", "count")
        wait_until(lambda: one.cli("db", "get", "notes", "count").returncode == 1, "delete reaches one", timeout_s=30)

        assert one.ok("stop").startswith("stopped the node (pid ")  # returns once the node has let go
        assert one.process.wait(timeout=10) == 0
        assert two.stop() == 0  # SIGTERM
        assert not (one_dir / "control.sock").exists() and not (two_dir / "control.sock").exists()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_error_paths_against_a_running_node(tmp_path: Path) -> None:
    node = NodeProcess.start(tmp_path / "n", "--no-p2p")
    try:
        db = node.ok("db", "create", "notes")
        node.ok("db", "create", "twin")
        node.ok("db", "create", "twin")
        cases = [
            (["join", "not-a-ticket"], "bad ticket: a ticket starts with 'eidetica:'"),
            (["join", "eidetica:?db=nope&pr=http:127.0.0.1:1"], "bad ticket: ticket's db is not a database ID"),
            (["join", f"eidetica:?db={db}"], "bad ticket: ticket has no usable address"),
            (["join", f"eidetica:?db={db}&pr=http:127.0.0.1:9", "--access", "all"], "not a permission: 'all'"),
            (["db", "show", "nothere"], "no database named 'nothere' here"),
            (["db", "get", "bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"], "no database bafyr4i"),
            (["db", "get", "bafyNOPE", "k"], "'bafyNOPE' is not a valid database ID"),
            (["db", "get", "notes", "missing"], "no key 'missing' in store 'data' of notes"),
            (["db", "delete", "notes", "missing"], "no key 'missing'"),
            (["db", "show", "twin"], "2 databases are named 'twin'; use an ID"),
            (["db", "create", "x", "--public", "everything"], "not a permission: 'everything'"),
            (["share", "nothere"], "no database named 'nothere'"),
            (["sync", "notes"], "notes syncs with no peer yet"),
            (["sync", "--peer", "ed25519:nobody"], "no database syncs with peer ed25519:nobody"),
            (["access", "approve", "nope"], "no access request nope"),
            (["access", "reject", "nope"], "no access request nope"),
        ]
        for args, fragment in cases:
            result = node.cli(*args)
            assert result.returncode == 1, (args, result)
            assert_one_line_error(result.stderr, fragment)
            assert result.stdout == ""
        # A failed join names each address tried on a line of its own (tests/test_addresses.py has more).
        result = node.cli("join", f"eidetica:?db={db}&pr=http:127.0.0.1:9")
        assert result.returncode == 1 and result.stdout == ""
        head, *tried = result.stderr.splitlines()
        assert head == f"{ONE_LINE}join failed: 1 address tried:", result.stderr
        assert len(tried) == 1 and tried[0].startswith("  http:127.0.0.1:9: cannot connect"), result.stderr
        result = node.cli("db", "list", "--bogus")
        assert result.returncode == 2
        assert_one_line_error(result.stderr, "unrecognized arguments: --bogus")

        second = cli("run", "--data-dir", str(node.data_dir), "--no-p2p", "--http-bind", "127.0.0.1:0")
        assert second.returncode == 1
        assert_one_line_error(second.stderr, "is in use by another process (a node is already running there?)")
        http_port = node.ready["addresses"][0].rsplit(":", 1)[1]
        taken = cli("run", "--data-dir", str(tmp_path / "m"), "--no-p2p", "--http-bind", f"127.0.0.1:{http_port}")
        assert taken.returncode == 1
        assert_one_line_error(taken.stderr, "the port is in use")
        bad = cli("run", "--data-dir", str(tmp_path / "b"), "--p2p-listen", "/ip4/nope/tcp/1", "--no-http")
        assert bad.returncode == 2
        assert_one_line_error(bad.stderr, "bad --p2p-listen address")
        assert node.process.poll() is None  # none of it disturbed the node
    finally:
        node.stop()
    result = node.cli("db", "list")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "no node is running for data directory")


@pytest.mark.slow
def test_access_requests_join_approve_sync(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        admin = NodeProcess.start(tmp_path / "admin", "--no-http")
        nodes.append(admin)
        guest = NodeProcess.start(tmp_path / "guest", "--no-http")
        nodes.append(guest)
        db = admin.ok("db", "create", "private")
        ticket = admin.ok("share", "private")

        refused = guest.cli("join", ticket)
        assert refused.returncode == 1
        assert_one_line_error(refused.stderr, "access refused")
        assert "--access" in refused.stderr

        pending = guest.cli("join", ticket, "--access", "write:10")
        assert pending.returncode == 1
        assert_one_line_error(pending.stderr, "waits for an admin")
        [request] = admin.json("access", "list")["requests"]
        assert request["db"] == db and request["key"] == guest.ready["device_id"]
        assert request["permission"] == "write:10" and request["status"] == "pending"
        assert f"access approve {request['id']}" in pending.stderr  # the exact command for the admin
        assert "pending" in admin.ok("access", "list")

        assert "approved" in admin.ok("access", "approve", request["id"][:8])
        assert admin.json("access", "list")["requests"] == []
        assert admin.json("access", "list", "--all")["requests"][0]["status"] == "approved"

        guest.ok("sync", db)  # the database is not here yet: an ID syncs what the join started
        guest.ok("db", "set", db, "hello", "from guest")
        wait_until(
            lambda: admin.cli("db", "get", "private", "hello").stdout.strip() == "from guest",
            "guest write",
            timeout_s=30,
        )
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_scripts_run_starts_a_node_on_its_defaults(tmp_path: Path) -> None:
    """The README's first command: ``scripts/run`` with no arguments is a running node.

    Only the ports differ from the defaults (the environment moves them off 4001/8080,
    which other nodes on this machine may hold); everything else is the embedded default.
    """
    data = tmp_path / "data"
    env = clean_env(
        EIDETICA_DATA_DIR=str(data),
        EIDETICA_P2P_LISTEN="/ip4/127.0.0.1/tcp/0",
        EIDETICA_HTTP_BIND="127.0.0.1:0",
        EIDETICA_METRICS_BIND="127.0.0.1:0",
    )
    log = (tmp_path / "run.stderr").open("w")
    process = subprocess.Popen(
        [str(REPO / "scripts" / "run")], stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=tmp_path
    )
    try:
        wait_until(
            lambda: (data / "control.sock").exists() or process.poll() is not None, "control socket", timeout_s=120
        )
        assert process.poll() is None, (tmp_path / "run.stderr").read_text()
        info = json.loads(cli("info", "--json", env=env).stdout)
        assert info["running"] and info["data_dir"] == str(data)
        assert info["metrics_address"]
        assert cli("health", env=env).stdout.startswith("ok")
        metrics = httpx.get(f"http://{info['metrics_address']}/metrics", timeout=10)
        assert metrics.status_code == 200 and "eidetica_peers 0.0" in metrics.text
        assert httpx.get(f"http://{info['metrics_address']}/health", timeout=10).json()["status"] == "ok"
        assert httpx.post(f"http://{info['metrics_address']}/v0/info", timeout=10).status_code == 404  # no commands
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert process.stdout is not None and "eidetica-node running" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_stale_socket_is_replaced_and_kill_leaves_no_lock(tmp_path: Path) -> None:
    """A node killed with SIGKILL leaves its socket behind; the next node replaces it."""
    first = NodeProcess.start(tmp_path / "n", "--no-p2p")
    try:
        first.process.kill()
        first.process.wait(timeout=10)
    finally:
        first.stop()
    assert (tmp_path / "n" / "control.sock").exists()
    result = cli("health", "--data-dir", str(tmp_path / "n"))
    assert result.returncode == 3 and "no node is running" in result.stderr
    started = time.monotonic()
    second = NodeProcess.start(tmp_path / "n", "--no-p2p")
    try:
        assert second.ok("health").startswith("ok")
        assert time.monotonic() - started < 60
        assert os.access(tmp_path / "n" / "control.sock", os.W_OK)
    finally:
        second.stop()


def _relay_support() -> bool:
    import inspect

    from transports.libp2p import Libp2pTransport

    return {"relays", "relay_service"} <= set(inspect.signature(Libp2pTransport).parameters)


@pytest.mark.slow
@pytest.mark.skipif(not _relay_support(), reason="this libp2p transport has no relay options yet")
def test_relay_options_reach_the_transport(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        relay = NodeProcess.start(tmp_path / "relay", "--no-http", "--relay-service")
        nodes.append(relay)
        relay_address = relay.ready["addresses"][0].split(":", 1)[1]
        behind = NodeProcess.start(tmp_path / "behind", "--no-http", "--relay", relay_address)
        nodes.append(behind)
        wait_until(
            lambda: any("/p2p-circuit/" in a for a in behind.json("info")["addresses"]),
            "a relayed address",
            timeout_s=30,
        )
        [transport] = relay.json("info")["transports"]
        assert transport["status"]["relay_service"] is not None
        db = behind.ok("db", "create", "notes")
        assert "/p2p-circuit/" in behind.ok("share", db)  # relayed addresses go into tickets
    finally:
        for node in nodes:
            node.stop()

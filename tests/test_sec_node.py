"""JSON a stranger sends, and text a stranger wrote, against a real ``eidetica-node``.

Defects seen: a lone surrogate (``"\\ud800"``) in a JSON request passed decoding, then
failed when the node counted the message: a traceback in the log and an ``internal``
error behind HTTP 200. A peer's display name reached the operator's terminal raw
through ``eidetica-node peers``, escape sequences included. Here the JSON goes to the
real node's HTTP transport and control socket; the name comes from a real peer process
that the node joins.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from textual.widgets import DataTable, Static

from node.metrics import Metrics
from node.render import json_safe, terminal_safe
from node.tui import DetailScreen, StatusApp
from scripts.cli_node import REPO, NodeProcess, clean_env
from sync.messages import PROTOCOL_VERSION, Error, Handshake
from tests.test_tui import APP_SIZE, FakeClient, cells, text_of, until
from transports.http_codec import JsonInputError, decode_json, encode_json, parse_json

# Clears the screen, retitles the window, a C1 CSI, a right-to-left override; then a
# name in Textual markup that would be a clickable action if read as markup.
EVIL = "mallory\x1b[2J\x1b]0;pwned\x07\x9b31m\u202eevil"
MARKUP = "[@click=app.quit]click me[/]"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")
PEER_READY_S = 60.0


def _handshake_json(display_name_json: str) -> bytes:
    """A valid Handshake in JSON whose display name is the given JSON text (escapes kept)."""
    text = encode_json(Handshake("ed25519:k", "placeholder", PROTOCOL_VERSION, b"\x01" * 32, ())).decode()
    return text.replace('"placeholder"', display_name_json).encode()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess.start(tmp_path / "node", "--no-p2p")
    try:
        yield process
    finally:
        process.stop()


def _http_url(node: NodeProcess) -> str:
    address = next(a for a in node.ready["addresses"] if a.startswith("http:"))
    return f"http://{address.removeprefix('http:')}/api/v0"


def _control(node: NodeProcess) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(node.data_dir / "control.sock"))
    return httpx.Client(transport=transport, base_url="http://node", trust_env=False, timeout=30)


# ---- JSON ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lone_surrogate_over_http_is_a_clear_400_not_an_internal_error(node: NodeProcess) -> None:
    with httpx.Client(trust_env=False, timeout=30) as client:
        response = client.post(
            _http_url(node), content=_handshake_json('"\\ud800"'), headers={"content-type": "application/json"}
        )
        assert response.status_code == 400  # it was 200, then an internal Error line
        error = decode_json(response.content)
        assert isinstance(error, Error) and error.code == "malformed"
        assert error.message == "invalid JSON: a string holds a lone surrogate \\ud800 (not valid Unicode)"

        deep = _handshake_json("[" * 65 + "]" * 65)
        response = client.post(_http_url(node), content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert decode_json(response.content) == Error("malformed", "JSON nested deeper than 64 levels")

        response = client.post(_http_url(node), content=b'{"type": ', headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert decode_json(response.content) == Error("malformed", "invalid JSON at line 1 column 10: Expecting value")

        paired = _handshake_json('"\\ud83d\\ude00"')  # a valid pair is an emoji, and fine
        response = client.post(_http_url(node), content=paired, headers={"content-type": "application/json"})
        assert response.status_code == 200
    assert "Traceback" not in node.stderr()


@pytest.mark.slow
def test_control_api_json_errors_say_what_is_wrong(node: NodeProcess) -> None:
    node.ok("db", "create", "notes")
    with _control(node) as client:
        cases = {
            b'{"db": "notes", "key": "k", "value": "\\udc00"}': (
                "body is not JSON: invalid JSON: a string holds a lone surrogate \\udc00 (not valid Unicode)"
            ),
            b'{"db": "notes", "key": "k", "value": ' + b"[" * 70 + b"]" * 70 + b"}": (
                "body is not JSON: JSON nested deeper than 64 levels"
            ),
            b'{"db": "notes",}': (
                "body is not JSON: invalid JSON at line 1 column 16: Expecting property name enclosed in double quotes"
            ),
        }
        for body, message in cases.items():
            response = client.post("/v0/db.set", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert response.json() == {"error": message, "code": "bad_request"}
    assert "Traceback" not in node.stderr()


@pytest.mark.slow
def test_cli_json_values_with_lone_surrogates_are_refused_in_one_line(node: NodeProcess) -> None:
    node.ok("db", "create", "notes")
    result = node.cli("db", "set", "notes", "k", '"\\ud800"', "--json-value")
    assert result.returncode == 2
    assert result.stderr == (
        "eidetica-node: error: --json-value: VALUE is not JSON: "
        "invalid JSON: a string holds a lone surrogate \\ud800 (not valid Unicode)\n"
    )


def test_parse_json_messages() -> None:
    for text, message in [
        (b"{not json", "invalid JSON at line 1 column 2: Expecting property name enclosed in double quotes"),
        (b"\xff", "invalid JSON: not UTF-8 (byte 0xff at offset 0)"),
        (b"[NaN]", "invalid JSON: NaN is not a JSON value"),
        (b'{"\\udc00": 1}', "invalid JSON: a string holds a lone surrogate \\udc00 (not valid Unicode)"),
        (b"[" * 65 + b"]" * 65, "JSON nested deeper than 64 levels"),
        (b"[" * 100_000, "JSON nested deeper than 64 levels"),  # past the C parser's own guard
    ]:
        with pytest.raises(JsonInputError) as caught:
            parse_json(text)
        assert str(caught.value) == message
    assert parse_json(b"[" * 64 + b"]" * 64) is not None
    assert parse_json('{"a": "\\ud83d\\ude00 é"}') == {"a": "😀 é"}


# ---- text from peers -----------------------------------------------------------------------


def _start_peer(data_dir: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.proc_node", "--transport", "http", "--data-dir", str(data_dir), "--name", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
        cwd=REPO,
    )


def _ask(peer: subprocess.Popen[str], line: str) -> dict[str, Any]:
    assert peer.stdin is not None and peer.stdout is not None
    peer.stdin.write(line + "\n")
    peer.stdin.flush()
    answer: dict[str, Any] = json.loads(peer.stdout.readline())
    assert answer.get("ok"), answer
    return answer


@pytest.mark.slow
def test_a_peers_display_name_cannot_drive_the_operators_terminal(tmp_path: Path, node: NodeProcess) -> None:
    peer = _start_peer(tmp_path / "peer", EVIL)
    try:
        assert peer.stdout is not None
        ready = json.loads(peer.stdout.readline())  # bounded: proc_node prints it once serving
        assert ready["ready"]
        ticket = _ask(peer, "create shared")["ticket"]
        node.ok("join", ticket, timeout=PEER_READY_S)

        shown = node.ok("peers")
        assert not any(control in shown for control in RAW_CONTROLS), repr(shown)
        assert "mallory\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eevil" in shown  # visible, escaped
        as_json = node.cli("peers", "--json").stdout
        assert not any(control in as_json for control in RAW_CONTROLS), repr(as_json)
        [entry] = json.loads(as_json)["peers"]
        assert entry["display_name"] == EVIL  # --json still carries the exact name
    finally:
        if peer.poll() is None:
            assert peer.stdin is not None
            peer.stdin.write("quit\n")
            peer.stdin.flush()
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait(timeout=10)


def test_terminal_safe_escapes_controls_and_keeps_unicode() -> None:
    assert terminal_safe(EVIL) == "mallory\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eevil"
    assert terminal_safe("a\nb\tc\x00\x7f") == "a\\nb\\tc\\x00\\x7f"
    assert terminal_safe("Zoë 😀 日本 مرحبا") == "Zoë 😀 日本 مرحبا"
    dumped = json.dumps({"name": EVIL}, ensure_ascii=False)
    assert json.loads(json_safe(dumped)) == {"name": EVIL}
    assert not any(control in json_safe(dumped) for control in RAW_CONTROLS)


class EvilClient(FakeClient):
    """A node whose peer and database carry hostile names."""

    async def call(self, command: str, **arguments: Any) -> Any:
        answer = await super().call(command, **arguments)
        if command == "status":
            answer["peers"][0]["display_name"] = EVIL
            answer["databases"][0]["name"] = MARKUP
            answer["history"][0]["error"] = "refused: " + EVIL
        return answer


def test_the_tui_shows_hostile_names_escaped_and_never_as_markup() -> None:
    async def scenario() -> None:
        app = StatusApp(EvilClient(), refresh_s=0.1)
        async with app.run_test(size=APP_SIZE) as pilot:
            await until(lambda: app.snapshot is not None, pilot.pause, "a snapshot")
            [db_row] = cells(app, "#databases")
            assert db_row[0] == MARKUP  # shown as written, not turned into an action
            [peer_row] = cells(app, "#peers")
            assert peer_row[0] == terminal_safe(EVIL)
            events = cells(app, "#events")
            assert events[0][1] == terminal_safe(EVIL) and events[1][5] == "refused: " + terminal_safe(EVIL)
            for selector in ("#databases", "#peers", "#events"):
                table = app.query_one(selector, DataTable)
                shown = " ".join(" ".join(map(str, table.get_row_at(i))) for i in range(table.row_count))
                assert not any(control in shown for control in RAW_CONTROLS), (selector, shown)

            await pilot.press("tab")
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the peer detail")
            detail = text_of(app.screen.query_one("#detail", Static))
            assert terminal_safe(EVIL) in detail and not any(c in detail for c in RAW_CONTROLS)
            await pilot.press("escape")
            await pilot.press("q")
            await until(lambda: not app.is_running, pilot.pause, "the app quitting")

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_log_lines_escape_what_peers_wrote() -> None:
    """The daemon's log formatter: a peer's text in a message cannot forge lines or send escapes."""
    code = (
        "import logging, sys\n"
        "from node.cli import _TerminalSafeFormatter\n"
        "handler = logging.StreamHandler(sys.stdout)\n"
        "handler.setFormatter(_TerminalSafeFormatter('%(levelname)s %(message)s'))\n"
        "log = logging.getLogger('x'); log.addHandler(handler)\n"
        f"log.warning('peer %s', {EVIL + chr(10) + 'ERROR forged'!r})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO, env=clean_env()
    ).stdout
    assert out == "WARNING peer " + terminal_safe(EVIL) + "\\nERROR forged\n"
    assert os.linesep not in out[:-1]


def test_counting_a_message_with_unencodable_text_never_fails() -> None:
    """The node's counters were where the lone surrogate blew up; they must never fail a request."""
    metrics = Metrics()
    metrics.message("http", "received", Handshake("ed25519:k", "\ud800", PROTOCOL_VERSION, b"\x01" * 32, ()))
    assert metrics.totals()["messages_received"] == 1

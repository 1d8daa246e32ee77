"""Talking to a running node over its control socket (see ``node/control.py``).

:class:`ControlClient` is for the CLI (blocking, one process per command);
:class:`AsyncControlClient` is for the TUI (asyncio, which Textual runs on). Both share
the request and answer handling below, so they cannot disagree on what an answer means:
no socket, or nobody answering on it, is :class:`NotRunningError`; an error answer is
:class:`ControlError` with the node's code and one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from .api import HEALTH, Command, HealthResult
from .config import CONTROL_SOCKET
from .errors import ControlError, NodeError, NotRunningError

BASE_URL = "http://node"  # the host is ignored: every request goes to the unix socket
DEFAULT_TIMEOUT_S = 30.0
# join and sync wait for peers: a handshake and a bootstrap per address, each bounded by
# the node (120 s); the client waits a little longer so the node's own message arrives.
SLOW_COMMANDS = {"join": 150.0, "sync": 150.0}

R = TypeVar("R")


def _path(command: str) -> str:
    return f"/v0/{command}"


def _answer(response: httpx.Response) -> object:
    """The result of a command (JSON), or the node's error raised as :class:`ControlError`."""
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ControlError("protocol", f"the node answered HTTP {response.status_code} without JSON") from None
    if response.status_code != 200:
        if isinstance(body, dict) and "error" in body:
            raise ControlError(str(body.get("code", "error")), str(body["error"]))
        raise ControlError("protocol", f"the node answered HTTP {response.status_code}")
    return body


def _clean(arguments: dict[str, object]) -> dict[str, object]:
    """Arguments without the ones left unset, so the node applies its defaults."""
    return {k: v for k, v in arguments.items() if v is not None}


@contextmanager
def _reaching(data_dir: Path, socket: Path, timeout_s: float) -> Iterator[None]:
    """httpx's failures to reach the node as the node layer's errors (one place for both clients)."""
    if not socket.exists():
        raise NotRunningError(data_dir)
    try:
        yield
    except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
        raise NotRunningError(data_dir) from None
    except httpx.TimeoutException:
        raise NodeError(f"the node at {data_dir} did not answer in {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise NodeError(f"lost the node at {data_dir}: {exc}") from None


class ControlClient:
    """Blocking client for one node, found by its data directory."""

    def __init__(self, data_dir: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / CONTROL_SOCKET
        self._timeout_s = timeout_s
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url=BASE_URL, trust_env=False
        )

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, path: str, timeout_s: float, body: dict[str, object] | None = None) -> httpx.Response:
        with _reaching(self.data_dir, self.socket, timeout_s):
            return self._client.request(method, path, json=body, timeout=timeout_s)

    def call(self, command: str, **arguments: object) -> object:
        """The node's answer to ``command`` as JSON (the CLI prints it as it is with ``--json``)."""
        timeout_s = SLOW_COMMANDS.get(command, self._timeout_s)
        return _answer(self._send("POST", _path(command), timeout_s, _clean(arguments)))

    def ask(self, command: Command[R], **arguments: object) -> R:
        """The node's answer to ``command``, typed (``node/api.py``)."""
        return command.result(self.call(command.name, **arguments))

    def health(self) -> HealthResult:
        return HEALTH.result(_answer(self._send("GET", "/health", self._timeout_s)))

    def metrics(self) -> str:
        response = self._send("GET", "/metrics", self._timeout_s)
        if response.status_code != 200:
            raise ControlError("protocol", f"the node answered HTTP {response.status_code}")
        return response.text


class AsyncControlClient:
    """The same over asyncio (or trio): used by the TUI, which must never block its loop."""

    def __init__(self, data_dir: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / CONTROL_SOCKET
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket)), base_url=BASE_URL, trust_env=False
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, command: str, **arguments: object) -> object:
        timeout_s = SLOW_COMMANDS.get(command, self._timeout_s)
        with _reaching(self.data_dir, self.socket, timeout_s):
            response = await self._client.post(_path(command), json=_clean(arguments), timeout=timeout_s)
        return _answer(response)

    async def ask(self, command: Command[R], **arguments: object) -> R:
        return command.result(await self.call(command.name, **arguments))


__all__ = ["AsyncControlClient", "ControlClient"]

"""The control API: HTTP over a unix socket in the data directory, reachable by its owner only.

    POST /v0/<command>   JSON object of arguments -> 200 JSON result
                         | 4xx/5xx {"error": "<one line>", "code": "<code>"}
    GET  /health         {"status": "ok", ...}
    GET  /metrics        Prometheus text

Commands are :meth:`NodeService.commands` (``info``, ``db.create``, ``join`` ...), named
after the CLI's. The socket is ``<data dir>/control.sock``, mode 0600 in a 0700
directory: the filesystem is the access control, as for any unix daemon's socket.

The same app (health and metrics only) can also listen on TCP (``--metrics-bind``), for
Prometheus and container health checks that cannot reach a unix socket.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import socket
import stat
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dag import DagError, InvalidValueError, NotFoundError, PermissionDeniedError
from sync import (
    AccessError,
    AccessPendingError,
    NotServedError,
    SyncError,
    TicketError,
    TransportError,
)
from sync.transport import TaskStatus
from transports.hostport import parse_host_port
from transports.http_codec import JsonInputError, parse_json

from .errors import ConfigError
from .metrics import PROMETHEUS_CONTENT_TYPE
from .service import CommandError, NodeService

log = logging.getLogger(__name__)

API_PREFIX = "/v0/"
# A sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107
MAX_BODY_BYTES = 16 * 1024 * 1024


def error_for(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, code, message) for an exception a command raised."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, CommandError):
        status = {"pending": 409, "unreachable": 502, "not_found": 404}.get(exc.code, 400)
        return status, exc.code, message
    if isinstance(exc, NotFoundError):
        return 404, "not_found", message
    if isinstance(exc, PermissionDeniedError):
        return 403, "permission", message
    if isinstance(exc, InvalidValueError):
        return 400, "bad_value", message
    if isinstance(exc, TicketError):
        return 400, "bad_ticket", f"bad ticket: {message}"
    if isinstance(exc, AccessPendingError):
        return 409, "pending", message
    if isinstance(exc, AccessError):
        return 403, "access", f"access refused: {message}"
    if isinstance(exc, NotServedError):
        return 404, "not_served", message
    if isinstance(exc, TransportError):
        return 502, "unreachable", message
    if isinstance(exc, SyncError):
        return 502, "sync", message
    if isinstance(exc, DagError):
        return 400, "dag", message
    return 500, "internal", f"the node failed: {type(exc).__name__}: {message}"


def _error(exc: BaseException) -> JSONResponse:
    status, code, message = error_for(exc)
    if status >= 500 and code == "internal":
        log.error("control command failed", exc_info=exc)
    # Lines stay lines (a failed join names each address tried on its own), each one tidied.
    lines = [" ".join(line.split()) for line in message.splitlines()]
    return JSONResponse({"error": "\n".join(line for line in lines if line), "code": code}, status_code=status)


def control_app(service: NodeService, *, commands: bool = True) -> Starlette:
    """The control API (``commands=False``: health and metrics only, for a TCP listener)."""
    table = service.commands()

    async def call(request: Request) -> Response:
        name = request.path_params["command"]
        method = table.get(name)
        if method is None:
            return JSONResponse({"error": f"unknown command {name!r}", "code": "unknown_command"}, status_code=404)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is buffered
            return JSONResponse({"error": "request body too large", "code": "bad_request"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": "request body too large", "code": "bad_request"}, status_code=413)
        try:
            arguments = parse_json(body) if body.strip() else {}
        except JsonInputError as exc:
            return JSONResponse({"error": f"body is not JSON: {exc}", "code": "bad_request"}, status_code=400)
        if not isinstance(arguments, dict):
            return JSONResponse({"error": "arguments are a JSON object", "code": "bad_request"}, status_code=400)
        try:
            inspect.signature(method).bind(**arguments)
        except TypeError as exc:
            return JSONResponse({"error": f"{name}: {exc}", "code": "bad_request"}, status_code=400)
        try:
            result = await method(**arguments)
        except Exception as exc:  # every failure is an answer; the node carries on
            return _error(exc)
        return JSONResponse(result)

    async def health(_request: Request) -> Response:
        return JSONResponse(await service.health())

    async def metrics(_request: Request) -> Response:
        return Response(await service.prometheus(), media_type=PROMETHEUS_CONTENT_TYPE)

    routes = [Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    if commands:
        routes.append(Route(API_PREFIX + "{command}", call, methods=["POST"]))
    return Starlette(routes=routes)


def _server_config() -> Config:
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{__name__}.server")
    config.keep_alive_timeout = 30
    return config


async def _serve(app: Starlette, sock: socket.socket, *, task_status: Any) -> None:
    config = _server_config()
    wrapped = wrap_app(cast(ASGIFramework, app), config.wsgi_max_body_size, "asgi")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(worker_serve, wrapped, config, sockets=Sockets([], [sock], [])))
            task_status.started()
    finally:
        sock.close()


def unix_socket(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, replacing a stale one.

    Only the process holding the data directory's lock calls this, so a socket file
    already there was left by a node that died: it is removed.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"control socket path {path} is too long for a unix socket ({MAX_SOCKET_PATH} bytes at most); "
            "use a shorter data directory path"
        )
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create control socket {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def tcp_socket(bind: str) -> socket.socket:
    """A listening TCP socket at ``host:port`` (no SO_REUSEPORT: a taken port is an error)."""
    try:
        host, port = parse_host_port(bind)
    except ValueError:
        raise ConfigError(f"--metrics-bind must be host:port, not {bind!r}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"metrics cannot listen on {bind}: the port is in use") from exc
        raise ConfigError(f"metrics cannot listen on {bind}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


async def serve_control(
    service: NodeService, path: Path, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control API on the unix socket ``path`` until cancelled; removes it after."""
    sock = unix_socket(path)
    inode = os.stat(path).st_ino
    try:
        await _serve(control_app(service), sock, task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()


async def serve_metrics(
    service: NodeService, sock: socket.socket, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``/health`` and ``/metrics`` on a TCP socket until cancelled."""
    await _serve(control_app(service, commands=False), sock, task_status=task_status)


__all__ = ["control_app", "error_for", "serve_control", "serve_metrics", "tcp_socket", "unix_socket"]

"""The HTTP transport: sync messages over ``POST /api/v0`` (hypercorn + starlette; httpx).

Serving: one request message per POST (msgpack, or JSON for people and scripts, by
``Content-Type``); the handler's answers stream back as they are produced, as
length-prefixed msgpack frames or NDJSON lines (:mod:`transports.http_codec`). A body
that cannot be decoded never reaches the handler: it gets a 400 (or 413 when too large)
whose body is an ``Error`` message in the request's format. A body is bounded before it
is buffered: a declared length over the frame limit is refused at once, a chunked one is
cut at the limit, the whole body has a deadline (408), and the bytes buffered across all
connections share one budget, with a share per remote address (503 past either; small
bodies always pass). ``GET /health`` says the server is up.

Asking: one shared ``httpx.AsyncClient`` per transport (kept-alive connections are
reused across requests), answers parsed frame by frame as bytes arrive, every httpx
failure turned into a :class:`~sync.errors.TransportError` subclass naming the address.

The listening socket is bound here, without ``SO_REUSEPORT``, and handed to hypercorn:
a port already in use is a clear error at once, never two nodes silently sharing a port
(libp2p and some servers set ``SO_REUSEPORT``), and port 0 yields the real port before
anyone is told the address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncGenerator, Iterator
from functools import partial
from typing import Final, cast

import httpx
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sync.client import raise_for
from sync.errors import (
    OversizeMessageError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
    UnreachableError,
)
from sync.messages import Bootstrap, Error, Incremental, Message, encode_message
from sync.transport import Handler, RequestContext, TaskStatus

from .errors import PortInUseError
from .hostport import join_host_port, parse_host_port
from .http_codec import CONTENT_FRAMES, CONTENT_MSGPACK, FRAME_HEADER_BYTES, FrameReader, WireFormat, format_for

log = logging.getLogger(__name__)

API_PATH: Final = "/api/v0"
HEALTH_PATH: Final = "/health"
TRANSPORT_NAME: Final = "http"

DEFAULT_MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
# Longest silence allowed while waiting for bytes of an answer (or of a request body, on
# the server). Matches SyncConfig.request_timeout_s: a slow handler (storing a pushed
# batch, walking a large history) may take a while before its first frame.
DEFAULT_REQUEST_TIMEOUT_S: Final = 60.0
# The whole request body must arrive within this long of the request's headers. A full
# 16 MiB frame takes 1.3 s at 100 Mbit/s and 27 s at 5 Mbit/s; a body that trickles in
# slower than that (a byte every 45 s was seen in an attack) is cut with a 408 and its
# buffer freed, so a slow sender cannot pin memory for longer than this.
DEFAULT_BODY_TIMEOUT_S: Final = 30.0
# Request-body bytes buffered at once across every connection of one server. Four full
# frames: a node's peers push one batch at a time each, and pushes are rarely near the
# frame limit, so honest traffic stays well under it; 60 slow connections hold at most
# this much (not 60 x 16 MiB). A body that would go over it is refused with 503 (the
# sender's engine retries with backoff).
DEFAULT_MAX_INFLIGHT_BODY_BYTES: Final = 64 * 1024 * 1024
# Of that, what the connections from one address may hold at once: one full frame. An
# attacker on one address (60 slow connections) then holds 16 MiB, and the other 48 MiB
# stay for everyone else; an honest peer pushes one batch at a time.
DEFAULT_MAX_INFLIGHT_BODY_BYTES_PER_SOURCE: Final = DEFAULT_MAX_FRAME_BYTES
# A body no larger than this is never refused for the budget (it is still counted):
# handshakes, SyncTree requests and small pushes are a few KiB, so a few connections
# holding the budget cannot shut a node off HTTP sync. Each connection already costs up
# to 640 KiB in hypercorn's queue, so this adds little to what a connection can hold.
SMALL_BODY_BYTES: Final = 64 * 1024
# Connecting on a LAN or loopback takes milliseconds; a peer that cannot be reached in
# this long is treated as unreachable and the engine tries its next address.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
# The client drops idle connections before the server does (15 s < 30 s), so it never
# sends a request on a connection the server is closing at that very moment.
CLIENT_KEEPALIVE_S: Final = 15.0
SERVER_KEEPALIVE_S: Final = 30.0
# Closing (the client pool, a handler's answer iterator) runs shielded from cancellation
# so nothing leaks, but bounded so a stuck peer cannot hold up shutdown.
CLOSE_TIMEOUT_S: Final = 5.0
# An Error answer is a few hundred bytes (its text is capped at 4096 characters).
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
# Connections kept per transport; the engine runs one exchange per peer at a time.
MAX_CONNECTIONS: Final = 64

_WILDCARD_HOSTS: Final = {"0.0.0.0", "::", ""}


@contextlib.contextmanager
def _httpx_errors(address: str) -> Iterator[None]:
    """httpx's errors as ours (every one is an ``httpx.HTTPError``); ours pass unchanged."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UnreachableError(f"cannot connect to http:{address}: {exc!r}") from exc
    except httpx.TimeoutException as exc:
        raise RequestTimeoutError(f"no answer from http:{address} in time: {exc!r}") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"request to http:{address} failed: {exc!r}") from exc


def _is_last(message: Message) -> bool:
    """Whether ``message`` ends an answer (every answer but a ``more`` frame does)."""
    return not (isinstance(message, Bootstrap | Incremental) and message.more)


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator.

    Starlette just stops iterating when the client goes away, which would leave the
    handler's answer iterator suspended until garbage collection; here it is closed as
    soon as the response ends, however it ends.
    """

    def __init__(self, body: AsyncGenerator[bytes, None], *, media_type: str) -> None:
        super().__init__(body, media_type=media_type)
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._body.aclose()


class _BodyRefused(Exception):
    """A request body that will not be read to its end: answered with ``status`` and ``error``."""

    def __init__(self, status: int, error: Error) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error


class BodyBudget:
    """Request-body bytes buffered right now, across every connection, against caps.

    Two caps: ``limit`` for all connections together and ``per_source`` for those of
    one remote address; a body that stays within ``small`` bytes passes either way.
    Only the trio thread touches it (every request handler runs there), so plain
    counters are enough; a source's entry goes when its last body does, so the map is
    never larger than the number of bodies in flight. ``used`` is exposed for tests.
    """

    def __init__(self, limit: int, per_source: int, small: int = SMALL_BODY_BYTES) -> None:
        self.limit = limit
        self.per_source = per_source
        self.small = small
        self.used = 0
        self._by_source: dict[str, int] = {}

    def take(self, source: str, size: int, held: int) -> bool:
        """Reserve ``size`` more bytes for a body from ``source`` that holds ``held``; False if over a cap."""
        mine = self._by_source.get(source, 0)
        if held + size > self.small and (self.used + size > self.limit or mine + size > self.per_source):
            return False
        self.used += size
        self._by_source[source] = mine + size
        return True

    def give(self, source: str, size: int) -> None:
        if not size:
            return
        self.used -= size
        left = self._by_source.pop(source, 0) - size
        if left > 0:
            self._by_source[source] = left


class HttpTransport:
    """Sync messages over HTTP/1.1 (see the module docstring); one instance per node."""

    def __init__(
        self,
        *,
        bind: str = "127.0.0.1:8080",
        advertise: list[str] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        max_inflight_body_bytes: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES,
        max_inflight_body_bytes_per_source: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES_PER_SOURCE,
    ) -> None:
        self._bind_host, self._bind_port = parse_host_port(bind)  # a bad bind fails here, not when serving
        for address in advertise or ():
            parse_host_port(address)
        self._advertise = list(advertise) if advertise else None
        self.max_frame_bytes = max_frame_bytes
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_budget = BodyBudget(max_inflight_body_bytes, max_inflight_body_bytes_per_source)
        self._serving = False
        self._port: int | None = None  # the bound port, once listening
        self._client: httpx.AsyncClient | None = None

    # ---- serving -------------------------------------------------------------------

    def listen_addresses(self) -> list[str]:
        if self._port is None:
            return []
        if self._advertise is not None:
            return list(self._advertise)
        host = "127.0.0.1" if self._bind_host in _WILDCARD_HOSTS else self._bind_host
        return [join_host_port(host, self._port)]

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``handler`` on the bind address until cancelled; started once listening."""
        if self._serving:
            raise RuntimeError("this HTTP transport is already serving")
        sock = self._listen()
        self._serving = True
        try:
            config = self._server_config()
            # Starlette is an ASGI 3 app; its types and hypercorn's name the same protocol differently.
            app = wrap_app(cast(ASGIFramework, self._app(handler)), config.wsgi_max_body_size, "asgi")
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(worker_serve, app, config, sockets=Sockets([], [sock], [])))
                self._port = sock.getsockname()[1]
                if self._bind_host in _WILDCARD_HOSTS and self._advertise is None:
                    log.warning("HTTP transport listens on all interfaces; tickets say 127.0.0.1 (set advertise)")
                log.info("HTTP transport listening on %s", join_host_port(self._bind_host, self._port))
                task_status.started()
        finally:
            self._serving = False
            self._port = None
            sock.close()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.aclose()

    def _listen(self) -> socket.socket:
        """Bind and listen with a plain socket: no SO_REUSEPORT, so a taken port is an error."""
        family = socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR only lets a restarted node rebind past TIME_WAIT; on Linux it
            # never lets two sockets listen on one port (that is SO_REUSEPORT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                # hypercorn sends shielded from cancellation, so a peer that stops reading
                # would hold serve() open forever on shutdown. With this, the kernel drops a
                # connection whose sent data (or zero-window probes) go unanswered that long.
                # Accepted connections inherit it.
                user_timeout_ms = int(self.request_timeout_s * 1000)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
            sock.bind((self._bind_host, self._bind_port))
            sock.listen(Config.backlog)
        except OSError as exc:
            sock.close()
            where = join_host_port(self._bind_host, self._bind_port)
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    exc.errno, f"HTTP transport cannot listen on {where}: the port is in use (another node?)"
                ) from exc
            raise OSError(exc.errno, f"HTTP transport cannot listen on {where}: {exc.strerror}") from exc
        sock.setblocking(False)
        return sock

    def _server_config(self) -> Config:
        config = Config()
        config.keep_alive_timeout = SERVER_KEEPALIVE_S
        config.accesslog = None
        config.errorlog = logging.getLogger(f"{__name__}.server")
        # h11_max_incomplete_size (16 KiB) bounds request *headers* only: hypercorn hands
        # the body to the app chunk by chunk (at most max_app_queue_size = 10 chunks of
        # 64 KiB queued per connection, then it stops reading the socket), and _read_body
        # bounds it by max_frame_bytes, body_timeout_s and the shared body budget.
        return config

    def _app(self, handler: Handler) -> Starlette:
        async def api(request: Request) -> Response:
            try:
                return await self._answer(handler, request)
            except Exception:  # one bad request must never take the server down
                log.exception("HTTP transport failed a request")
                return Response(
                    encode_message(Error("internal", "the peer could not serve this request")),
                    status_code=500,
                    media_type=CONTENT_MSGPACK,
                )

        async def health(_request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        return Starlette(routes=[Route(API_PATH, api, methods=["POST"]), Route(HEALTH_PATH, health, methods=["GET"])])

    async def _answer(self, handler: Handler, request: Request) -> Response:
        wire = format_for(request.headers.get("content-type"))
        if wire is None:
            error = Error("malformed", "Content-Type must be application/msgpack or application/json")
            return Response(WireFormat.MSGPACK.encode(error), status_code=415, media_type=CONTENT_MSGPACK)
        try:
            body = await self._read_body(request)
        except _BodyRefused as refused:
            # The body is not read to its end, so hypercorn closes the connection after this answer.
            headers = {"retry-after": "1"} if refused.status == 503 else None
            return Response(
                wire.encode(refused.error), status_code=refused.status, media_type=wire.request_type, headers=headers
            )
        except ClientDisconnect:
            return Response(b"", status_code=400)  # nobody is left to read it
        try:
            message = wire.decode(body)
        except ProtocolError as exc:
            status = 413 if isinstance(exc, OversizeMessageError) else 400
            return Response(wire.encode(Error(exc.code, str(exc))), status_code=status, media_type=wire.request_type)
        remote = f"{request.client.host}:{request.client.port}" if request.client else None
        context = RequestContext(TRANSPORT_NAME, remote=remote)
        return _ClosingStreamingResponse(self._stream(handler, message, context, wire), media_type=wire.stream_type)

    async def _read_body(self, request: Request) -> bytes:
        """The request body, read within its bounds; raises :class:`_BodyRefused` past one.

        Sizes are checked before anything is buffered: a declared ``Content-Length`` over
        ``max_frame_bytes`` is refused at once (413), and a chunked body is counted as it
        arrives and cut as soon as it passes the limit. The whole body must arrive within
        ``body_timeout_s`` and no wait for a chunk may last ``request_timeout_s`` (408).
        Every buffered byte is reserved in the server's :class:`BodyBudget` (503 past its
        total or per-address cap) and given back when this returns, however it returns.
        """
        limit = self.max_frame_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _BodyRefused(413, self._oversize())
        source = request.client.host if request.client else ""
        body = bytearray()
        chunks = request.stream()
        try:
            with trio.move_on_after(self.body_timeout_s) as deadline:
                while True:
                    # A silence shorter than the whole-body deadline can still be too long.
                    with trio.move_on_after(self.request_timeout_s) as stall:
                        chunk = await anext(chunks, None)
                    if stall.cancelled_caught:
                        raise _BodyRefused(
                            408, Error("timeout", f"request body stalled for {self.request_timeout_s:g} s")
                        )
                    if chunk is None:
                        return bytes(body)
                    if len(body) + len(chunk) > limit:
                        raise _BodyRefused(413, self._oversize())
                    if not self.body_budget.take(source, len(chunk), len(body)):
                        raise _BodyRefused(
                            503, Error("transport", "the peer is receiving too many request bodies; try again")
                        )
                    body += chunk
            assert deadline.cancelled_caught
            raise _BodyRefused(408, Error("timeout", f"request body did not arrive within {self.body_timeout_s:g} s"))
        finally:
            self.body_budget.give(source, len(body))
            del body  # freed now, not when the answer has gone out
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await chunks.aclose()

    def _oversize(self) -> Error:
        return Error("oversize", f"request body is over the limit of {self.max_frame_bytes} bytes")

    async def _stream(
        self, handler: Handler, message: Message, context: RequestContext, wire: WireFormat
    ) -> AsyncGenerator[bytes, None]:
        """The handler's answers, encoded; an Error frame if anything goes wrong mid-answer."""
        answers = handler(message, context)
        try:
            async for answer in answers:
                data = wire.encode_answer(answer)
                if wire is WireFormat.MSGPACK and len(data) - FRAME_HEADER_BYTES > self.max_frame_bytes:
                    log.warning("answer frame of %d bytes is over the limit; sending an error instead", len(data))
                    yield wire.encode_answer(Error("oversize", "the answer frame is over the frame limit"))
                    return
                yield data
        except Exception:  # the handler turns its own failures into Errors; this is the guard
            log.exception("HTTP transport failed mid-answer to %s", message.TYPE)
            yield wire.encode_answer(Error("internal", "the peer could not serve this request"))
        finally:
            close = getattr(answers, "aclose", None)
            if close is not None:
                await close()

    # ---- asking --------------------------------------------------------------------

    def _http_client(self) -> httpx.AsyncClient:
        """The shared client, created on first use (it binds to the running trio loop)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    connect=self.connect_timeout_s,
                    read=self.request_timeout_s,
                    write=self.request_timeout_s,
                    pool=self.connect_timeout_s,
                ),
                limits=httpx.Limits(
                    max_connections=MAX_CONNECTIONS,
                    max_keepalive_connections=MAX_CONNECTIONS,
                    keepalive_expiry=CLIENT_KEEPALIVE_S,
                ),
                trust_env=False,  # never route a peer's address through an environment proxy
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the shared client (its idle connections); a later request opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        """POST ``message`` to ``address``; yield the answers as their frames arrive."""
        try:
            parse_host_port(address)
        except ValueError as exc:
            raise UnreachableError(f"http:{address} is not a host:port address") from exc
        body = encode_message(message)
        if len(body) > self.max_frame_bytes:
            raise OversizeMessageError(f"{message.TYPE} of {len(body)} bytes is over the frame limit")
        url = f"http://{address}{API_PATH}"
        headers = {"content-type": CONTENT_MSGPACK, "accept": CONTENT_FRAMES}
        last: Message | None = None
        with _httpx_errors(address):
            async with self._http_client().stream("POST", url, content=body, headers=headers) as response:
                if response.status_code != 200:
                    await self._raise_for_status(address, response)
                content_type = response.headers.get("content-type", "")
                if content_type.split(";", 1)[0].strip().lower() != CONTENT_FRAMES:
                    raise TransportError(f"http:{address} answered with {content_type!r}, not {CONTENT_FRAMES}")
                reader = FrameReader(self.max_frame_bytes)
                async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes())) as chunks:
                    async for chunk in chunks:
                        for frame in reader.feed(chunk):
                            if last is not None:
                                raise TransportError(f"http:{address} sent frames after its last answer")
                            answer = WireFormat.MSGPACK.decode(frame)
                            if _is_last(answer):
                                # Hold the last answer until the body has ended, so the
                                # connection is back in the pool even if the caller stops
                                # iterating right after it.
                                last = answer
                            else:
                                yield answer
                if reader.pending:
                    raise TransportError(f"answer from http:{address} ended mid-frame")
        if last is None:
            raise TransportError(f"answer from http:{address} ended before its last message")
        yield last

    async def _raise_for_status(self, address: str, response: httpx.Response) -> None:
        """A non-200 answer: raise the error its ``Error`` body names, else a TransportError."""
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ERROR_BODY_BYTES:
                break
        wire = format_for(response.headers.get("content-type"))
        error: Message | None = None
        if wire is not None and len(body) <= MAX_ERROR_BODY_BYTES:
            with contextlib.suppress(ProtocolError):
                error = wire.decode(bytes(body))
        if isinstance(error, Error):
            raise_for(error)
        raise TransportError(f"http:{address} answered HTTP {response.status_code}")

"""The transports' own errors, and the one place py-libp2p's errors become ours.

Sync sees only :class:`~sync.errors.TransportError` and its subclasses; the classes here
are subclasses of those (or of ``OSError``, for a port that cannot be bound), so a caller
that knows nothing of transports still catches them.

py-libp2p has no common base for what it raises: a dial, a stream or a handshake can fail
with its own errors, ``OSError``, ``EOFError``, trio's ``BrokenResourceError``, a
multiaddr ``ValueError`` or a protobuf error. :func:`libp2p_errors` is therefore the one
broad ``except`` of the asking side, and it turns whatever arrives into a sync error
naming what was being done. (HTTP's client, httpx, has one base class, so
:mod:`transports.http` maps its errors by name.)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import trio

from sync.errors import OversizeMessageError, RequestTimeoutError, SyncError, TransportError, UnreachableError

log = logging.getLogger(__name__)


class FrameTooLarge(OversizeMessageError):
    """A libp2p frame's length prefix is over the transport's frame limit."""


class RelayError(UnreachableError):
    """A relay refused or failed a reservation or a circuit (the status is in the message)."""


class PortInUseError(OSError):
    """The HTTP transport's bind address is taken (by another node or another server)."""


@contextlib.contextmanager
def libp2p_errors(
    what: str,
    timeout_s: float | None,
    *,
    error: type[TransportError] = TransportError,
    timeout: type[TransportError] = RequestTimeoutError,
) -> Iterator[None]:
    """Run the block within ``timeout_s`` (None: no deadline of its own); raise ``timeout``
    past it and ``error`` for any library failure, each naming ``what`` was being done.
    Sync's own errors pass unchanged."""
    try:
        with trio.fail_after(math.inf if timeout_s is None else timeout_s):
            yield
    except trio.TooSlowError as exc:
        raise timeout(f"{what}: timed out after {timeout_s:g} s") from exc
    except SyncError:
        raise
    except Exception as exc:  # py-libp2p raises from many bases (see the module docstring)
        log.debug("%s failed: %s: %s", what, type(exc).__name__, exc)
        raise error(f"{what}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def quietly(what: str) -> Iterator[None]:
    """For closing what may already be broken (a reset stream, a host whose peer left).

    Closing is best effort and nothing is left to tell the other end, whatever the
    library raises from a dead connection (any of the bases above): it is logged at debug.
    """
    try:
        yield
    except Exception as exc:  # a dead stream raises from any layer; closing it is best effort
        log.debug("%s: %s: %s", what, type(exc).__name__, exc)


@contextlib.contextmanager
def closing_quietly(what: str, timeout_s: float) -> Iterator[None]:
    """:func:`quietly`, shielded from cancellation (a cancelled task still closes what it
    holds) but bounded by ``timeout_s`` (a stuck peer cannot hold up shutdown)."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s), quietly(what):
        yield


__all__ = ["FrameTooLarge", "PortInUseError", "RelayError", "closing_quietly", "libp2p_errors", "quietly"]

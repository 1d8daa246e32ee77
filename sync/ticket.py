"""Tickets: ``eidetica:?db=<id>&pr=<transport>:<address>`` (``pr`` repeatable).

A ticket names a database and where to find it. Unknown parameters are ignored and
malformed ``pr`` values are skipped, so tickets from newer nodes still work here; a ticket
without a valid ``db`` is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from dag import NotFoundError, cid_from_text
from dag.errors import BadCidError

from .errors import AccessError, AddressesFailedError, SyncError, TicketError, attempt_error
from .transport import Address

log = logging.getLogger(__name__)

SCHEME = "eidetica:"
_TRANSPORT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True, slots=True)
class Ticket:
    db: str
    addresses: tuple[Address, ...] = ()

    def __str__(self) -> str:
        parts = [f"db={self.db}"]
        parts.extend(f"pr={a.transport}:{quote(a.address, safe=':/[]@')}" for a in self.addresses)
        return f"{SCHEME}?" + "&".join(parts)

    @classmethod
    def parse(cls, text: str) -> Ticket:
        """Parse a ticket; raises :class:`TicketError` with what is wrong."""
        if not isinstance(text, str) or not text.startswith(SCHEME):
            raise TicketError(f"a ticket starts with {SCHEME!r}")
        query = text[len(SCHEME) :]
        if not query.startswith("?"):
            raise TicketError("a ticket is eidetica:?db=<id>&pr=<transport>:<address>")
        db: str | None = None
        addresses: list[Address] = []
        for key, value in parse_qsl(query[1:], keep_blank_values=True):
            if key == "db":
                db = value
            elif key == "pr":
                transport, sep, address = value.partition(":")
                if sep and address and _TRANSPORT_NAME.match(transport):
                    addresses.append(Address(transport, address))
        if db is None:
            raise TicketError("ticket has no db parameter")
        try:
            cid_from_text(db)
        except BadCidError:
            raise TicketError(f"ticket's db is not a database ID: {db!r}") from None
        return cls(db, tuple(addresses))


async def join_any(ticket: Ticket, bootstrap: Callable[[Address], Awaitable[object]]) -> None:
    """Bootstrap the ticket's database from whichever of its addresses answers first.

    A refusal (no access, a pending request) is an answer, so it is what the caller hears
    if no address succeeds; otherwise the error names every address tried with its own
    failure (an exchange that itself went through several of the peer's addresses counts
    each of them), one line each: a join whose direct address was refused and whose
    circuit was cut says both, not only the last.
    """
    if not ticket.addresses:
        raise TicketError("ticket has no usable address")
    attempts: list[tuple[str, str]] = []
    refusal: AccessError | None = None
    last: Exception | None = None
    for address in ticket.addresses:
        try:
            await bootstrap(address)
            return
        except AccessError as exc:
            refusal = refusal or exc
        except (SyncError, NotFoundError) as exc:
            last = exc
            tried = (
                exc.attempts
                if isinstance(exc, AddressesFailedError)
                else ((str(address), attempt_error(str(address), exc)),)
            )
            attempts += [attempt for attempt in tried if attempt not in attempts]
    if refusal is not None:
        raise refusal
    error = AddressesFailedError("join failed", attempts)
    for where, reason in attempts:
        log.info("join of %s: %s: %s", ticket.db, where, reason)
    raise error from last

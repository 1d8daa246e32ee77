"""Tickets: ``eidetica:?db=<id>&pr=<transport>:<address>`` (``pr`` repeatable).

A ticket names a database and where to find it. Unknown parameters are ignored and
malformed ``pr`` values are skipped, so tickets from newer nodes still work here; a ticket
without a valid ``db`` is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from dag import cid_from_text
from dag.errors import BadCidError

from .errors import TicketError
from .transport import Address

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

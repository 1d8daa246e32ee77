"""Reconciliation: what each side sends so that both end with the union, and little more.

Upstream walks back from its tips and stops only at the peer's *exact* tips; once both
sides have written, the peer's tips are unknown to it and it re-sends the whole shared
history. Here each node keeps, per (peer, database), a **cursor**: the peer's tips as of
the last successful sync, whose closure both sides are known to hold. Then:

1. The asker sends ``SyncTree`` with its tips, the cursor as ``common``, and, pushed in
   the same message, its entries outside the cursor's closure (``missing_from(common)``).
2. The server stores the pushed entries, so the asker's tips are now known to it, and
   answers with its entries outside the closure of (asker's tips + common + have), plus
   its tips. The asker stores them; the server's tips become the new cursor.

Common case (both sides synced before): one round trip, and both directions carry
exactly the missing entries. Without a cursor (first contact with shared history), the
asker adds ``have``: IDs of its ancestors at distances 1..16 and then doubling from its
tips; the server's boundary is the nearest of those it knows, so it over-sends at most
the entries between the true fork and that sample (exact up to 16 behind, then at most
about the divergence again); the asker then pushes what the server lacks, computed
exactly from the server's tips (two round trips). Worst case: no shared ID known on the
server's side: it sends everything the asker cannot be shown to have (upstream's case).
A cursor that went stale (the peer lost data) only costs that worst case once.
"""

from __future__ import annotations

from collections.abc import Iterable

from dag import Database, Status

EXACT_HAVE = 16  # ancestors sampled one by one before the sampling starts doubling
MAX_HAVE = 64
MAX_HAVE_WALK = 20_000  # bound the sampling walk on very long histories


def sample_have(db: Database, tips: Iterable[bytes]) -> list[bytes]:
    """Ancestor IDs at distances 1..16, then 32, 64, ... below our tips (first-parent walk)."""
    out = db.sample_ancestors(tips, exact=EXACT_HAVE, limit=MAX_HAVE, max_steps=MAX_HAVE_WALK)
    root = db.root_cid
    if root not in out and len(out) < MAX_HAVE + 1:
        out.append(root)
    return out


def known(db: Database, cids: Iterable[bytes]) -> list[bytes]:
    """The IDs among ``cids`` that we hold Verified."""
    return sorted({cid for cid in cids if db.status_of(cid) is Status.VERIFIED})


def entries_for(db: Database, boundary: Iterable[bytes]) -> list[bytes]:
    """Our Verified entries outside the closure of ``boundary`` (IDs), in height order."""
    return db.missing_from(known(db, boundary))

"""Entries built the way a hostile peer would: signed, well formed, with no local permission check."""

from __future__ import annotations

from typing import Any

import libipld

from dag import Entry, SigningKey
from dag.crdt.doc import doc_from_value, encode_doc_delta
from dag.entry import build_entry
from dag.ids import cid_from_text, cid_to_text


def forge(db: Any, signer: SigningKey, stores: dict[str, dict[str, Any]], **overrides: Any) -> Entry:
    """An entry on ``db``'s tips signed by ``signer``; ``parents``, ``height`` and ``pin`` may be overridden."""
    tree = db.root_cid
    parents = overrides.get("parents") or db.tip_cids()
    height = overrides.get("height") or 1 + max(db.entry(cid_to_text(p)).height for p in parents)
    pin = overrides.get("pin", db.expected_pin(parents))
    encoded: list[tuple[str, list[bytes], bytes | None]] = [
        (
            name,
            [cid_from_text(tip) for tip in db.store_tips(name)],
            bytes(libipld.encode_dag_cbor(encode_doc_delta(doc_from_value(value, atomic=False)))),
        )
        for name, value in sorted(stores.items())
    ]
    return build_entry(signer=signer, root=tree, parents=parents, height=height, settings_tips=pin, stores=encoded)

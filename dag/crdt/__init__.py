"""Conflict-free data types: each store's delta format and how deltas fold into state."""

from .doc import TOMBSTONE, DocDelta, apply_doc_delta, decode_doc_delta, encode_doc_delta
from .table import apply_table_delta, decode_table_delta, encode_table_delta

__all__ = [
    "TOMBSTONE",
    "DocDelta",
    "apply_doc_delta",
    "apply_table_delta",
    "decode_doc_delta",
    "decode_table_delta",
    "encode_doc_delta",
    "encode_table_delta",
]

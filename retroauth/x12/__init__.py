"""X12 EDI: a generic reader (``parse``) shared by the 835 remittance import and the 278 messages."""

from retroauth.x12.parse import (
    Segment,
    Separators,
    Transaction,
    X12Error,
    check_envelopes,
    read_segments,
    read_transactions,
)

__all__ = [
    "Segment",
    "Separators",
    "Transaction",
    "X12Error",
    "check_envelopes",
    "read_segments",
    "read_transactions",
]

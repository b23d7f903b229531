"""Submission channels: how a retro-authorization request reaches a payer (FHIR PAS, X12 278, packet).

Every channel offers the same small interface (``SubmissionChannel``): ``send`` one outbox row and say
what the payer (or the channel) answered; ``poll`` asks (PAS ``$inquire``) or looks (X12 278 responses in
the inbound location) for the payer's answer to a sent row, and returns None while there is none. ``send`` must be idempotent by ``Outgoing.idempotency_key``:
asked again with the same key (a crash between sending and recording it), it must not make a second
submission but answer as the first time did. A permanent refusal raises ``ChannelRefused`` with a
code (never patient data); anything else is transient and is retried with the same key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa


@dataclass(frozen=True)
class Outgoing:
    """One outbox row to send: ids and keys only."""

    submission_id: int
    case_id: int
    payer_id: str
    attempt: int
    kind: str
    idempotency_key: str


@dataclass(frozen=True)
class SendResult:
    """What sending produced. ``decision`` is set when the payer already decided (A1, A3, A4)."""

    tracking_number: str
    payload_key: str | None = None
    decision: str | None = None
    certification_number: str | None = None
    reason_codes: tuple[str, ...] = ()
    response_ref: str | None = None
    response_key: str | None = None


@dataclass(frozen=True)
class Answer:
    """A payer's answer found by ``poll``: A1 approved, A3 denied, A4 still pended (codes only)."""

    decision: str
    response_ref: str  # the payer's response id, or a hash of the payload: recording it twice is a no-op
    certification_number: str | None = None
    reason_codes: tuple[str, ...] = ()
    response_key: str | None = None  # the answer as received, in storage


class ChannelRefused(Exception):
    """The channel or payer refused the submission for good (fix and resend). ``code`` only, no PHI."""

    def __init__(self, code: str):
        super().__init__(f"submission refused: {code}")
        self.code = code


class SubmissionChannel(Protocol):
    name: str

    def send(self, engine: sa.Engine, storage: Any, library: Any, settings: Any, out: Outgoing) -> SendResult: ...

    def poll(self, engine: sa.Engine, storage: Any, library: Any, settings: Any, out: Outgoing,
             tracking_number: str | None) -> Answer | None: ...

"""The submission outbox: a case moves to ``submitting`` together with its Submission row, then a sender
hands each pending row to its channel and records what came back, with the case's move, in one transaction.

Exactly-once towards the payer rests on the idempotency key: it is written with the outbox row, and a
send that crashed before it was recorded is simply sent again with the same key, which the channel (or
the payer) recognises. Events and errors carry ids, channel names and codes only, never patient data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from retroauth.cases import Actor, transition_many
from retroauth.channels import ChannelRefused, Outgoing, SendResult, SubmissionChannel
from retroauth.db import session_scope
from retroauth.models import (
    Authorization, AuthorizationCode, CaseServiceLine, Coverage, Encounter, PayerResponse, RetroCase, ServiceLine,
    Submission, utcnow,
)
from retroauth.vocab import CaseStatus as S

MAX_KEY = 50  # X12 BHT03 / TRN02 hold at most 50 characters
APPROVED, DENIED, PENDED = "A1", "A3", "A4"


class OutboxError(Exception):
    """A step of the outbox that cannot go on; the message holds ids and codes only."""


class SendsIncomplete(Exception):
    """Some submissions hit a transient failure and are still pending (a retry sends them again)."""

    def __init__(self, failed: Mapping[int, str]):
        self.failed = dict(failed)
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items())[:20])
        super().__init__(f"{len(self.failed)} submission(s) still pending: {shown}")


def idempotency_key(case_id: int, attempt: int, kind: str = "request") -> str:
    """The key a submission carries to the payer: the same case, attempt and kind give the same key."""
    digest = hashlib.sha256(f"retroauth:{kind}:{case_id}:{attempt}".encode()).hexdigest()[:10]
    k = f"ra-{case_id}-{attempt}-{digest}"
    if len(k) > MAX_KEY:  # pragma: no cover - only for absurdly large ids
        raise OutboxError(f"idempotency key for case {case_id} is longer than {MAX_KEY} characters")
    return k


# --- enqueue ----------------------------------------------------------------------------------------------


@dataclass
class EnqueueResult:
    enqueued: dict[int, int] = field(default_factory=dict)  # case id -> submission id
    skipped: list[int] = field(default_factory=list)  # not in letter_rendered (already queued, moved on)

    def as_dict(self) -> dict:
        return {"enqueued": len(self.enqueued), "skipped": len(self.skipped),
                "submission_ids": sorted(self.enqueued.values())}


def cases_to_enqueue(engine: sa.Engine, limit: int | None = None) -> list[int]:
    """Cases whose request letter is rendered and not yet queued (ids only)."""
    with session_scope(engine) as s:
        q = sa.select(RetroCase.id).where(RetroCase.status == S.LETTER_RENDERED).order_by(RetroCase.id)
        return list(s.execute(q.limit(limit) if limit else q).scalars())


def enqueue(engine: sa.Engine, case_ids: Sequence[int], *, library: Any, actor: Actor = Actor(),
            kind: str = "request") -> EnqueueResult:
    """Move the letter_rendered cases of ``case_ids`` to submitting, each with a pending Submission row, in
    one transaction. A rerun finds them submitting already and does nothing."""
    result = EnqueueResult()
    ids = sorted(set(case_ids))
    if not ids:
        return result
    with session_scope(engine) as s:
        rows = s.execute(sa.select(RetroCase.id, RetroCase.payer_id)
                         .where(RetroCase.id.in_(ids), RetroCase.status == S.LETTER_RENDERED)).all()
        payer_of = {cid: p for cid, p in rows if p in library}  # an unknown payer stays for a person to see
        channel_of = {cid: str(library[p].channel) for cid, p in payer_of.items()}
        last = dict(s.execute(sa.select(Submission.case_id, sa.func.max(Submission.attempt))
                              .where(Submission.case_id.in_(list(payer_of)))
                              .group_by(Submission.case_id)).all()) if payer_of else {}
        attempt = {cid: (last.get(cid) or 0) + 1 for cid in payer_of}
        moved = transition_many(
            s, list(payer_of), S.SUBMITTING, from_statuses=[S.LETTER_RENDERED], actor=actor,
            details={cid: {"channel": channel_of[cid], "attempt": attempt[cid],
                           "idempotency_key": idempotency_key(cid, attempt[cid], kind)} for cid in payer_of},
        )
        if moved:
            s.execute(sa.insert(Submission), [
                dict(case_id=cid, attempt=attempt[cid], kind=kind, channel=channel_of[cid],
                     idempotency_key=idempotency_key(cid, attempt[cid], kind), status="pending",
                     created_at=utcnow())
                for cid in moved
            ])
            got = s.execute(sa.select(Submission.case_id, Submission.id)
                            .where(Submission.case_id.in_(moved), Submission.status == "pending")).all()
            result.enqueued = {cid: sid for cid, sid in got}
    result.skipped = [cid for cid in ids if cid not in result.enqueued]
    return result


# --- send ---------------------------------------------------------------------------------------------------


@dataclass
class SendSummary:
    sent: list[int] = field(default_factory=list)  # submission ids recorded as sent
    refused: dict[int, str] = field(default_factory=dict)  # submission id -> code (case back to letter_rendered)
    failed: dict[int, str] = field(default_factory=dict)  # submission id -> transient error class (still pending)
    decided: dict[int, str] = field(default_factory=dict)  # case id -> decision the payer gave at once

    def as_dict(self) -> dict:
        return {"sent": len(self.sent), "refused": {str(k): v for k, v in self.refused.items()},
                "failed": {str(k): v for k, v in self.failed.items()},
                "decided": {str(k): v for k, v in self.decided.items()}}


def default_channels() -> dict[str, SubmissionChannel]:
    from retroauth.channels.fhir_pas import PasChannel
    from retroauth.channels.packet import PacketChannel

    return {"packet": PacketChannel(), "fhir_pas": PasChannel()}


def pending_submissions(engine: sa.Engine, case_ids: Sequence[int] | None = None, limit: int | None = None) -> list[int]:
    """Outbox rows not yet sent (of ``case_ids``, or all), oldest first."""
    with session_scope(engine) as s:
        q = sa.select(Submission.id).where(Submission.status == "pending").order_by(Submission.id)
        if case_ids is not None:
            q = q.where(Submission.case_id.in_(sorted(set(case_ids))))
        return list(s.execute(q.limit(limit) if limit else q).scalars())


def send_pending(engine: sa.Engine, storage: Any, library: Any, settings: Any, *, actor: Actor = Actor(),
                 submission_ids: Iterable[int] | None = None,
                 channels: Mapping[str, SubmissionChannel] | None = None) -> SendSummary:
    """Send each pending submission through its channel and record the result (one transaction each).

    A transient failure leaves the row pending (``SendSummary.failed``) and the others go on; a
    permanent refusal marks it failed with its code and moves the case back to letter_rendered."""
    channels = dict(channels) if channels is not None else default_channels()
    summary = SendSummary()
    with session_scope(engine) as s:
        q = (sa.select(Submission.id, Submission.case_id, Submission.attempt, Submission.kind, Submission.channel,
                       Submission.idempotency_key, RetroCase.payer_id)
             .join(RetroCase, RetroCase.id == Submission.case_id)
             .where(Submission.status == "pending").order_by(Submission.id))
        if submission_ids is not None:
            q = q.where(Submission.id.in_(sorted(set(submission_ids))))
        rows = s.execute(q).all()
    for r in rows:
        out = Outgoing(submission_id=r.id, case_id=r.case_id, payer_id=r.payer_id, attempt=r.attempt, kind=r.kind,
                       idempotency_key=r.idempotency_key)
        channel = channels.get(r.channel)
        if channel is None:
            summary.failed[r.id] = f"no_channel:{r.channel}"
            continue
        try:
            sent = channel.send(engine, storage, library, settings, out)
        except ChannelRefused as exc:
            _record_refusal(engine, out, r.channel, exc.code, actor)
            summary.refused[r.id] = exc.code
            continue
        except Exception as exc:  # noqa: BLE001 - transient: stays pending, retried with the same key
            summary.failed[r.id] = type(exc).__name__
            continue
        if _record_sent(engine, out, r.channel, sent, actor):
            summary.sent.append(r.id)
            if sent.decision:
                summary.decided[r.case_id] = sent.decision
    return summary


def _record_sent(engine: sa.Engine, out: Outgoing, channel: str, sent: SendResult, actor: Actor) -> bool:
    """Mark the row sent and move the case submitting -> submitted (and on, if the payer decided at once)."""
    with session_scope(engine) as s:
        updated = s.execute(
            sa.update(Submission).where(Submission.id == out.submission_id, Submission.status == "pending")
            .values(status="sent", sent_at=utcnow(), tracking_number=sent.tracking_number,
                    payload_key=sent.payload_key)
            .execution_options(synchronize_session=False)
        ).rowcount
        if updated != 1:
            return False  # another worker recorded it
        transition_many(s, [out.case_id], S.SUBMITTED, from_statuses=[S.SUBMITTING], actor=actor,
                        details={out.case_id: {"submission_id": out.submission_id, "channel": channel,
                                               "tracking_number": sent.tracking_number}})
        if sent.decision:
            _record_decision(s, out.case_id, out.submission_id, decision=sent.decision,
                             certification_number=sent.certification_number, reason_codes=sent.reason_codes,
                             response_ref=sent.response_ref or sent.tracking_number, payload_key=sent.response_key,
                             source="payer_response", actor=actor)
    return True


def _record_refusal(engine: sa.Engine, out: Outgoing, channel: str, code: str, actor: Actor) -> None:
    with session_scope(engine) as s:
        updated = s.execute(
            sa.update(Submission).where(Submission.id == out.submission_id, Submission.status == "pending")
            .values(status="failed", last_error=code[:256])
            .execution_options(synchronize_session=False)
        ).rowcount
        if updated == 1:
            transition_many(s, [out.case_id], S.LETTER_RENDERED, from_statuses=[S.SUBMITTING], actor=actor,
                            details={out.case_id: {"submission_id": out.submission_id, "channel": channel,
                                                   "refused": code[:64]}})


# --- decisions ------------------------------------------------------------------------------------------


def record_outcome(engine: sa.Engine, case_id: int, *, approved: bool, auth_number: str | None = None,
                   reason_codes: Sequence[str] | None = None, actor: Actor = Actor()) -> str:
    """Record a decision a person learned (fax, portal, phone) for a submitted or in-review case.

    Approved: a PayerResponse, the Authorization with a code per case line (dates covering the service
    dates) so the next sweep sees the services covered, and the case -> approved. Denied: a
    PayerResponse and the case -> denied. Recording the same decision again changes nothing.
    Returns the case's status afterwards."""
    if approved and not auth_number:
        raise OutboxError(f"case {case_id}: an approval needs the authorization number")
    decision = APPROVED if approved else DENIED
    with session_scope(engine) as s:
        status = s.execute(sa.select(RetroCase.status).where(RetroCase.id == case_id)).scalar_one_or_none()
        if status is None:
            raise OutboxError(f"case {case_id} not found")
        sub_id = s.execute(sa.select(Submission.id).where(Submission.case_id == case_id, Submission.status == "sent")
                           .order_by(Submission.attempt.desc()).limit(1)).scalar_one_or_none()
        if sub_id is None:
            raise OutboxError(f"case {case_id}: no sent submission to record a decision for")
        target = S.APPROVED if approved else S.DENIED
        if status == target:
            return str(status)
        if status not in (S.SUBMITTED, S.IN_REVIEW):
            raise OutboxError(f"case {case_id}: cannot record a decision in state {status}")
        ref = f"manual-{decision}-{auth_number}" if approved else f"manual-{decision}"
        _record_decision(s, case_id, sub_id, decision=decision, certification_number=auth_number,
                         reason_codes=tuple(reason_codes or ()), response_ref=ref[:128], payload_key=None,
                         source="manual", actor=actor)
        return str(target)


def _record_decision(s: Session, case_id: int, submission_id: int, *, decision: str,
                     certification_number: str | None, reason_codes: Sequence[str], response_ref: str,
                     payload_key: str | None, source: str, actor: Actor) -> None:
    """In the caller's transaction: the response, the authorization written back, the case's move."""
    exists = s.execute(sa.select(PayerResponse.id).where(PayerResponse.submission_id == submission_id,
                                                         PayerResponse.response_ref == response_ref)).first()
    if not exists:
        s.add(PayerResponse(submission_id=submission_id, case_id=case_id, response_ref=response_ref,
                            decision=decision, certification_number=certification_number,
                            reason_codes=",".join(reason_codes)[:128] or None, payload_key=payload_key))
        s.flush()
    details = {"submission_id": submission_id, "decision": decision}
    if decision == APPROVED:
        auth_id = _write_authorization(s, case_id, certification_number or response_ref, source)
        details["authorization_id"] = auth_id
        to = S.APPROVED
    elif decision == DENIED:
        details["reason_codes"] = list(reason_codes)[:20]
        to = S.DENIED
    else:  # pended or anything else: the payer is looking at it
        to = S.IN_REVIEW
    transition_many(s, [case_id], to, from_statuses=[S.SUBMITTED, S.IN_REVIEW] if to != S.IN_REVIEW
                    else [S.SUBMITTED], actor=actor, details={case_id: details})


def _write_authorization(s: Session, case_id: int, auth_number: str, source: str) -> int:
    case = s.get(RetroCase, case_id)
    enc = s.get(Encounter, case.encounter_id)
    cov = s.get(Coverage, case.coverage_id) if case.coverage_id else None
    if cov is None:
        cov = s.execute(sa.select(Coverage).where(Coverage.patient_id == enc.patient_id,
                                                  Coverage.payer_id == case.payer_id)
                        .order_by(Coverage.priority, Coverage.effective_from.desc())).scalars().first()
    if cov is None:
        raise OutboxError(f"case {case_id}: no coverage to write the authorization against")
    lines = s.execute(sa.select(ServiceLine.code_system, ServiceLine.code, ServiceLine.service_date)
                      .join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
                      .where(CaseServiceLine.case_id == case_id)).all()
    if not lines:
        raise OutboxError(f"case {case_id}: no service lines to authorize")
    dates: list[date] = [ln.service_date for ln in lines]
    auth = s.execute(sa.select(Authorization).where(Authorization.payer_id == case.payer_id,
                                                    Authorization.auth_number == auth_number)).scalars().first()
    if auth is None:
        auth = Authorization(payer_id=case.payer_id, member_id=cov.member_id, patient_id=enc.patient_id,
                             provider_npi=None, auth_number=auth_number, starts_on=min(dates), ends_on=max(dates),
                             status="approved", source=source, case_id=case_id)
        s.add(auth)
        s.flush()
    elif auth.case_id not in (None, case_id):
        raise OutboxError(f"case {case_id}: authorization number already recorded for case {auth.case_id}")
    have = set(s.execute(sa.select(AuthorizationCode.code_system, AuthorizationCode.code)
                         .where(AuthorizationCode.authorization_id == auth.id)).all())
    for cs, code in sorted({(ln.code_system, ln.code) for ln in lines} - have):
        s.add(AuthorizationCode(authorization_id=auth.id, code_system=cs, code=code))
    s.flush()
    return auth.id


__all__ = [
    "EnqueueResult", "OutboxError", "SendSummary", "SendsIncomplete", "cases_to_enqueue", "default_channels",
    "enqueue", "idempotency_key", "pending_submissions", "record_outcome", "send_pending",
]

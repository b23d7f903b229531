"""The submission outbox: a case moves to ``submitting`` (an appeal: ``denied`` -> ``appealed``) together with
its Submission row, then a sender hands each pending row to its channel and records what came back, with the
case's move, in one transaction. ``poll_submissions`` asks the channel for the answer to a sent row later.

Exactly-once towards the payer rests on the idempotency key: it is written with the outbox row, and a
send that crashed before it was recorded is simply sent again with the same key, which the channel (or
the payer) recognises. Events and errors carry ids, channel names and codes only, never patient data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from retroauth import failpoints
from retroauth.cases import Actor, escalate, record_event, transition_many
from retroauth.channels import Answer, ChannelRefused, Outgoing, SendResult, SubmissionChannel
from retroauth.claims import unheld
from retroauth.db import session_scope
from retroauth.deadlines import due_after
from retroauth.models import (
    Appeal, Authorization, AuthorizationCode, CaseServiceLine, Coverage, Encounter, FollowUp, Letter, PayerResponse,
    RetroCase, ServiceLine, Submission, utcnow,
)
from retroauth.vocab import CaseStatus as S
from retroauth.vocab import Channel

MAX_KEY = 50  # X12 BHT03 / TRN02 hold at most 50 characters
APPROVED, DENIED, PENDED = "A1", "A3", "A4"


class OutboxError(Exception):
    """A step of the outbox that cannot go on; the message holds ids and codes only."""


class AuthorizationConflict(OutboxError):
    """An approval that cannot be written back as an authorization (``code`` says why)."""

    def __init__(self, case_id: int, code: str, detail: str):
        self.code = code
        super().__init__(f"case {case_id}: {detail} ({code})")


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


def enqueue(engine: sa.Engine, case_ids: Sequence[int], *, library: Any, actor: Actor = Actor()) -> EnqueueResult:
    """Move the letter_rendered cases of ``case_ids`` to submitting, each with a pending Submission row, in
    one transaction. A rerun finds them submitting already and does nothing."""
    ids = sorted(set(case_ids))
    if not ids:
        return EnqueueResult()
    with session_scope(engine) as s:
        rows = s.execute(sa.select(RetroCase.id, RetroCase.payer_id)
                         .where(RetroCase.id.in_(ids), RetroCase.status == S.LETTER_RENDERED)).all()
        channel_of = {cid: str(library[p].channel) for cid, p in rows if p in library}  # unknown payer: a person looks
        attempt = _next_attempts(s, channel_of)
        moved = transition_many(
            s, list(channel_of), S.SUBMITTING, from_statuses=[S.LETTER_RENDERED], actor=actor,
            details={cid: {"channel": channel_of[cid], "attempt": attempt[cid],
                           "idempotency_key": idempotency_key(cid, attempt[cid])} for cid in channel_of},
        )
        enqueued = _queue(s, moved, attempt, channel_of, "request")
    return EnqueueResult(enqueued, [cid for cid in ids if cid not in enqueued])


def appeal_channel(payer: Any) -> str:
    """How an appeal reaches the payer: X12 278 has no appeal transaction, so those payers get a packet
    (the appeal letter and the documents) to upload, fax or mail; PAS and packet payers their own channel."""
    return str(Channel.PACKET if payer.channel == Channel.X12_278 else payer.channel)


def appeals_to_file(engine: sa.Engine, limit: int | None = None) -> list[int]:
    """Denied cases whose open appeal has its letter rendered (ids only)."""
    with session_scope(engine) as s:
        q = _appeal_ready().with_only_columns(RetroCase.id).order_by(RetroCase.id)
        return list(s.execute(q.limit(limit) if limit else q).scalars())


def _appeal_ready() -> sa.Select:
    letter = sa.exists().where(Letter.case_id == RetroCase.id, Letter.kind == "appeal",
                               Letter.appeal_level == Appeal.level)
    return (sa.select(RetroCase.id, RetroCase.payer_id, Appeal.id.label("appeal_id"), Appeal.level)
            .join(Appeal, sa.and_(Appeal.case_id == RetroCase.id, Appeal.status == "open"))
            .where(RetroCase.status == S.DENIED, letter))


def enqueue_appeals(engine: sa.Engine, case_ids: Sequence[int], *, library: Any, actor: Actor = Actor()) -> EnqueueResult:
    """File the open appeals of ``case_ids`` whose letters are rendered: denied -> appealed with a pending
    appeal Submission, and the appeal marked filed, in one transaction. A rerun does nothing."""
    ids = sorted(set(case_ids))
    if not ids:
        return EnqueueResult()
    with session_scope(engine) as s:
        rows = s.execute(_appeal_ready().where(RetroCase.id.in_(ids))).all()
        rows = [r for r in rows if r.payer_id in library]
        channel_of = {r.id: appeal_channel(library[r.payer_id]) for r in rows}
        level_of = {r.id: r.level for r in rows}
        attempt = _next_attempts(s, channel_of)
        moved = transition_many(
            s, list(channel_of), S.APPEALED, from_statuses=[S.DENIED], actor=actor,
            details={cid: {"channel": channel_of[cid], "attempt": attempt[cid], "appeal_level": level_of[cid],
                           "idempotency_key": idempotency_key(cid, attempt[cid], "appeal")} for cid in channel_of},
        )
        if moved:
            now = utcnow()
            filed = [r.appeal_id for r in rows if r.id in set(moved)]
            s.execute(sa.update(Appeal).where(Appeal.id.in_(filed), Appeal.status == "open")
                      .values(status="filed", filed_at=now).execution_options(synchronize_session=False))
            s.execute(sa.update(FollowUp).where(FollowUp.case_id.in_(moved), FollowUp.kind == "appeal_deadline",
                                                FollowUp.done_at.is_(None))
                      .values(done_at=now, outcome="appeal_filed").execution_options(synchronize_session=False))
        enqueued = _queue(s, moved, attempt, channel_of, "appeal")
    return EnqueueResult(enqueued, [cid for cid in ids if cid not in enqueued])


def _next_attempts(s: Session, case_ids: Iterable[int]) -> dict[int, int]:
    ids = list(case_ids)
    last = dict(s.execute(sa.select(Submission.case_id, sa.func.max(Submission.attempt))
                          .where(Submission.case_id.in_(ids)).group_by(Submission.case_id)).all()) if ids else {}
    return {cid: (last.get(cid) or 0) + 1 for cid in ids}


def _queue(s: Session, moved: Sequence[int], attempt: Mapping[int, int], channel_of: Mapping[int, str],
           kind: str) -> dict[int, int]:
    """The pending outbox rows of the cases just moved (case id -> submission id)."""
    if not moved:
        return {}
    s.execute(sa.insert(Submission), [
        dict(case_id=cid, attempt=attempt[cid], kind=kind, channel=channel_of[cid],
             idempotency_key=idempotency_key(cid, attempt[cid], kind), status="pending", created_at=utcnow())
        for cid in moved
    ])
    got = s.execute(sa.select(Submission.case_id, Submission.id)
                    .where(Submission.case_id.in_(moved), Submission.status == "pending")).all()
    return {cid: sid for cid, sid in got}


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
    from retroauth.channels.x12_278 import X12Channel

    return {"packet": PacketChannel(), "fhir_pas": PasChannel(), "x12_278": X12Channel()}


def is_pending() -> sa.ColumnElement[bool]:
    """Outbox rows to send: pending ones (a transient failure leaves a row pending)."""
    return Submission.status == "pending"


def pending_submissions(engine: sa.Engine, case_ids: Sequence[int] | None = None, limit: int | None = None) -> list[int]:
    """Outbox rows not yet sent (of ``case_ids``, or all), oldest first; not those that a run holds a claim on
    right now (``retroauth.claims``: it is sending them)."""
    with session_scope(engine) as s:
        q = (sa.select(Submission.id)
             .where(is_pending(), unheld(Submission))
             .order_by(Submission.id))
        if case_ids is not None:
            q = q.where(Submission.case_id.in_(sorted(set(case_ids))))
        return list(s.execute(q.limit(limit) if limit else q).scalars())


def send_pending(engine: sa.Engine, storage: Any, library: Any, settings: Any, *, actor: Actor = Actor(),
                 submission_ids: Iterable[int] | None = None,
                 channels: Mapping[str, SubmissionChannel] | None = None) -> SendSummary:
    """Send each pending submission through its channel and record the result (one transaction each).

    A transient failure leaves the row pending (``SendSummary.failed``) and the others go on; a
    permanent refusal marks it failed with its code and moves the case back (to letter_rendered, or
    for an appeal to denied)."""
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
        failpoints.hit("submit.before_record")
        if _record_sent(engine, library, out, r.channel, sent, actor):
            failpoints.hit("submit.after_record")
            summary.sent.append(r.id)
            if sent.decision:
                summary.decided[r.case_id] = sent.decision
    return summary


def _record_sent(engine: sa.Engine, library: Any, out: Outgoing, channel: str, sent: SendResult,
                 actor: Actor) -> bool:
    """Mark the row sent, move the case submitting -> submitted (an appeal stays appealed: an event says it
    went), schedule the follow-ups, and record the payer's decision if it gave one at once."""
    with session_scope(engine) as s:
        now = utcnow()
        updated = s.execute(
            sa.update(Submission).where(Submission.id == out.submission_id, Submission.status == "pending")
            .values(status="sent", sent_at=now, tracking_number=sent.tracking_number, payload_key=sent.payload_key)
            .execution_options(synchronize_session=False)
        ).rowcount
        if updated != 1:
            return False  # another worker recorded it
        details = {"submission_id": out.submission_id, "channel": channel, "tracking_number": sent.tracking_number}
        if out.kind == "appeal":
            record_event(s, out.case_id, "appeal_sent", actor=actor, details=details)
        else:
            transition_many(s, [out.case_id], S.SUBMITTED, from_statuses=[S.SUBMITTING], actor=actor,
                            details={out.case_id: details})
        _schedule_follow_ups(s, out.case_id, library[out.payer_id], now)
        if sent.decision:
            _record_decision(s, out.case_id, out.submission_id, out.kind, Answer(
                decision=sent.decision, response_ref=sent.response_ref or sent.tracking_number,
                certification_number=sent.certification_number, reason_codes=sent.reason_codes,
                response_key=sent.response_key), source="payer_response", actor=actor)
    return True


def _schedule_follow_ups(s: Session, case_id: int, payer: Any, sent_at: datetime) -> None:
    """The first status inquiry (the payer's follow-up cadence) and the review SLA's end (standard: a retro
    request is about services already given, never an expedited pre-service decision)."""
    for kind, d in (("status_inquiry", payer.follow_up.first_after), ("sla_escalation", payer.review_sla.standard)):
        s.add(FollowUp(case_id=case_id, kind=kind,
                       due_at=due_after(sent_at, d.value, d.unit, payer.time_zone, payer.calendar())))
    s.flush()


def _record_refusal(engine: sa.Engine, out: Outgoing, channel: str, code: str, actor: Actor) -> None:
    with session_scope(engine) as s:
        updated = s.execute(
            sa.update(Submission).where(Submission.id == out.submission_id, Submission.status == "pending")
            .values(status="failed", last_error=code[:256])
            .execution_options(synchronize_session=False)
        ).rowcount
        if updated != 1:
            return
        details = {out.case_id: {"submission_id": out.submission_id, "channel": channel, "refused": code[:64]}}
        if out.kind == "appeal":  # the appeal is open again, to be fixed and filed before its deadline
            transition_many(s, [out.case_id], S.DENIED, from_statuses=[S.APPEALED], actor=actor, details=details)
            s.execute(sa.update(Appeal).where(Appeal.case_id == out.case_id, Appeal.status == "filed")
                      .values(status="open", filed_at=None).execution_options(synchronize_session=False))
        else:
            transition_many(s, [out.case_id], S.LETTER_RENDERED, from_statuses=[S.SUBMITTING], actor=actor,
                            details=details)


# --- asking for the answer ------------------------------------------------------------------------------


@dataclass
class PollSummary:
    decided: dict[int, str] = field(default_factory=dict)  # submission id -> A1 / A3 / A4
    unanswered: list[int] = field(default_factory=list)  # submission ids the payer has no answer for yet
    refused: dict[int, str] = field(default_factory=dict)  # submission id -> code (the channel cannot ask)
    failed: dict[int, str] = field(default_factory=dict)  # submission id -> transient error class


def poll_submissions(engine: sa.Engine, storage: Any, library: Any, settings: Any, submission_ids: Iterable[int], *,
                     actor: Actor = Actor(), channels: Mapping[str, SubmissionChannel] | None = None) -> PollSummary:
    """Ask each channel for the payer's answer to these sent submissions and record any answer with the
    case's move (one transaction each). Cases no longer waiting for that answer are left alone."""
    channels = dict(channels) if channels is not None else default_channels()
    summary = PollSummary()
    with session_scope(engine) as s:
        rows = s.execute(
            sa.select(Submission.id, Submission.case_id, Submission.attempt, Submission.kind, Submission.channel,
                      Submission.idempotency_key, Submission.tracking_number, RetroCase.payer_id)
            .join(RetroCase, RetroCase.id == Submission.case_id)
            .where(Submission.id.in_(sorted(set(submission_ids))), Submission.status == "sent",
                   RetroCase.status.in_([S.SUBMITTED, S.IN_REVIEW, S.APPEALED]))
            .order_by(Submission.id)).all()
    for r in rows:
        out = Outgoing(submission_id=r.id, case_id=r.case_id, payer_id=r.payer_id, attempt=r.attempt, kind=r.kind,
                       idempotency_key=r.idempotency_key)
        channel = channels.get(r.channel)
        try:
            if channel is None:
                raise ChannelRefused(f"no_channel:{r.channel}")
            answer = channel.poll(engine, storage, library, settings, out, r.tracking_number)
        except ChannelRefused as exc:
            summary.refused[r.id] = exc.code
            continue
        except Exception as exc:  # noqa: BLE001 - transient: asked again on the next run
            summary.failed[r.id] = type(exc).__name__
            continue
        if answer is None:
            summary.unanswered.append(r.id)
            continue
        with session_scope(engine) as s:
            _record_decision(s, r.case_id, r.id, r.kind, answer, source="payer_response", actor=actor)
        failpoints.hit("follow_up.after_inquiry")
        summary.decided[r.id] = answer.decision
    return summary


# --- decisions ------------------------------------------------------------------------------------------


def record_outcome(engine: sa.Engine, case_id: int, *, approved: bool, auth_number: str | None = None,
                   reason_codes: Sequence[str] | None = None, actor: Actor = Actor()) -> str:
    """Record a decision a person learned (fax, portal, phone) for a submitted, in-review or appealed case.

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
        sub = s.execute(sa.select(Submission.id, Submission.kind)
                        .where(Submission.case_id == case_id, Submission.status == "sent")
                        .order_by(Submission.attempt.desc()).limit(1)).first()
        if sub is None:
            raise OutboxError(f"case {case_id}: no sent submission to record a decision for")
        target = S.APPROVED if approved else S.DENIED
        if status == target:
            return str(target)
        if status not in (S.SUBMITTED, S.IN_REVIEW, S.APPEALED):
            raise OutboxError(f"case {case_id}: cannot record a decision in state {status}")
        ref = f"manual-{decision}-{auth_number}" if approved else f"manual-{decision}"
        _record_decision(s, case_id, sub.id, sub.kind, Answer(decision=decision, response_ref=ref[:128],
                                                             certification_number=auth_number,
                                                             reason_codes=tuple(reason_codes or ())),
                         source="manual", actor=actor)
        return str(target)


def _record_decision(s: Session, case_id: int, submission_id: int, kind: str, answer: Answer, *, source: str,
                     actor: Actor) -> None:
    """In the caller's transaction: the response, the authorization written back, the case's move, and the
    end of the follow-ups a final answer makes moot. The same answer recorded twice changes nothing."""
    exists = s.execute(sa.select(PayerResponse.id).where(PayerResponse.submission_id == submission_id,
                                                         PayerResponse.response_ref == answer.response_ref)).first()
    if exists:
        return
    s.add(PayerResponse(submission_id=submission_id, case_id=case_id, response_ref=answer.response_ref,
                        decision=answer.decision, certification_number=answer.certification_number,
                        reason_codes=",".join(answer.reason_codes)[:128] or None, payload_key=answer.response_key))
    s.flush()
    details: dict[str, Any] = {"submission_id": submission_id, "decision": answer.decision}
    waiting = [S.APPEALED] if kind == "appeal" else [S.SUBMITTED, S.IN_REVIEW]
    if answer.decision == APPROVED:
        try:
            details["authorization_id"] = _write_authorization(s, case_id, answer.certification_number
                                                               or answer.response_ref, source)
        except AuthorizationConflict as exc:
            if source == "manual":
                raise  # a person typing the number is told at once
            # The payer's approval is kept (the response above) but cannot be written back as it came (its
            # number is another case's, or the case has no coverage or lines): a person checks it. Raising
            # here would hold back every submission after it in the batch, and every retry the same way.
            escalate(s, [case_id], exc.code, utcnow(), actor)
            return
        to = S.APPROVED
    elif answer.decision == DENIED:
        details["reason_codes"] = list(answer.reason_codes)[:20]
        to = S.DENIED
    elif kind == "appeal":  # pended or anything else while appealed: still with the payer, say so
        record_event(s, case_id, "appeal_pended", actor=actor, details=details)
        return
    else:  # pended or anything else: the payer is looking at it
        transition_many(s, [case_id], S.IN_REVIEW, from_statuses=[S.SUBMITTED], actor=actor,
                        details={case_id: details})
        return
    moved = transition_many(s, [case_id], to, from_statuses=waiting, actor=actor, details={case_id: details})
    if not moved:
        return
    now = utcnow()
    if kind == "appeal":
        s.execute(sa.update(Appeal).where(Appeal.case_id == case_id, Appeal.status == "filed")
                  .values(status="overturned" if to == S.APPROVED else "upheld", decided_at=now)
                  .execution_options(synchronize_session=False))
    s.execute(sa.update(FollowUp).where(FollowUp.case_id == case_id, FollowUp.done_at.is_(None),
                                        FollowUp.kind.in_(["status_inquiry", "sla_escalation"]))
              .values(done_at=now, outcome=f"decided_{answer.decision}")
              .execution_options(synchronize_session=False))


def _write_authorization(s: Session, case_id: int, auth_number: str, source: str) -> int:
    case = s.get(RetroCase, case_id)
    enc = s.get(Encounter, case.encounter_id)
    cov = s.get(Coverage, case.coverage_id) if case.coverage_id else None
    if cov is None:
        cov = s.execute(sa.select(Coverage).where(Coverage.patient_id == enc.patient_id,
                                                  Coverage.payer_id == case.payer_id)
                        .order_by(Coverage.priority, Coverage.effective_from.desc())).scalars().first()
    if cov is None:
        raise AuthorizationConflict(case_id, "approval_without_coverage",
                                    "no coverage to write the authorization against")
    lines = s.execute(sa.select(ServiceLine.code_system, ServiceLine.code, ServiceLine.service_date)
                      .join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
                      .where(CaseServiceLine.case_id == case_id)).all()
    if not lines:
        raise AuthorizationConflict(case_id, "approval_without_lines", "no service lines to authorize")
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
        raise AuthorizationConflict(case_id, "auth_number_of_another_case",
                                    f"authorization number already recorded for case {auth.case_id}")
    have = set(s.execute(sa.select(AuthorizationCode.code_system, AuthorizationCode.code)
                         .where(AuthorizationCode.authorization_id == auth.id)).all())
    for cs, code in sorted({(ln.code_system, ln.code) for ln in lines} - have):
        s.add(AuthorizationCode(authorization_id=auth.id, code_system=cs, code=code))
    s.flush()
    return auth.id


__all__ = [
    "AuthorizationConflict", "EnqueueResult", "OutboxError", "PollSummary", "SendSummary", "SendsIncomplete",
    "appeal_channel", "appeals_to_file", "cases_to_enqueue", "default_channels", "enqueue", "enqueue_appeals",
    "idempotency_key", "is_pending", "pending_submissions", "poll_submissions", "record_outcome", "send_pending",
]

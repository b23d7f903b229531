"""Follow-ups: never lose track of a sent request until it is approved, appealed to the end, or expired.

A request (or appeal) that went out gets two follow-ups in the same transaction (``outbox``): a status
inquiry after the payer's ``follow_up.first_after`` and the end of its review SLA. From then on, every run
of the follow-up step, as of a given instant:

1. asks about each due inquiry (PAS ``$inquire``, X12 278 responses in the inbound location; a packet
   payer answers by fax or portal, so a person is asked to call instead) and records the answer; with no
   final answer it asks again ``follow_up.every`` later, up to ``max_inquiries``, then escalates;
2. lets an open appeal whose deadline passed lapse: the case expires;
3. opens an appeal for each denied case at its next level if the payer has one and its window is still
   open (counted from the denial), closes the case when no level is left, expires it when the window passed;
4. escalates each case still waiting past its review SLA (``retro_cases.escalated_at``, an audit event).

Rendering and filing the appeal letters is the letters and outbox steps' job. Each step reads the case
states, writes the changes with their audit events in one transaction, and finds nothing to do when run
again: reruns and retries are safe. Events carry ids and codes only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from retroauth.cases import WAITING, Actor, escalate, record_event, transition_many
from retroauth.channels import SubmissionChannel
from retroauth.db import session_scope
from retroauth.deadlines import due_after
from retroauth.models import (
    Appeal, CaseServiceLine, FollowUp, PayerResponse, RetroCase, ServiceLine, Submission, utcnow,
)
from retroauth.outbox import poll_submissions
from retroauth.vocab import Anchor
from retroauth.vocab import CaseStatus as S

INQUIRY, ESCALATION, APPEAL_DEADLINE = "status_inquiry", "sla_escalation", "appeal_deadline"


class FollowUpsIncomplete(Exception):
    """Some inquiries met a transient failure; their follow-ups stay due and a retry asks again."""

    def __init__(self, failed: Mapping[int, str]):
        self.failed = dict(failed)
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items())[:20])
        super().__init__(f"{len(self.failed)} inquiry(ies) still due: {shown}")


def _close(s: Session, ids: Sequence[int], outcome: str, now: datetime) -> None:
    if ids:
        s.execute(sa.update(FollowUp).where(FollowUp.id.in_(list(ids)), FollowUp.done_at.is_(None))
                  .values(done_at=now, outcome=outcome, attempts=FollowUp.attempts + 1)
                  .execution_options(synchronize_session=False))


# --- 1. status inquiries ---------------------------------------------------------------------------------


def due_inquiries(engine: sa.Engine, as_of: datetime, limit: int | None = None) -> list[int]:
    """Open status-inquiry follow-ups due by ``as_of`` (ids, oldest first)."""
    q = (sa.select(FollowUp.id).where(FollowUp.kind == INQUIRY, FollowUp.done_at.is_(None), FollowUp.due_at <= as_of)
         .order_by(FollowUp.due_at, FollowUp.id))
    with session_scope(engine) as s:
        return list(s.execute(q.limit(limit) if limit else q).scalars())


@dataclass
class InquirySummary:
    asked: int = 0
    decided: dict[int, str] = field(default_factory=dict)  # case id -> A1 / A3 / A4
    rescheduled: int = 0
    escalated: list[int] = field(default_factory=list)  # case ids: out of inquiries, or nobody can ask
    closed: int = 0  # follow-ups of cases that had moved on
    failed: dict[int, str] = field(default_factory=dict)  # case id -> transient error class

    def as_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "decided": {str(k): v for k, v in sorted(self.decided.items())},
                "rescheduled": self.rescheduled, "escalated": sorted(self.escalated), "closed": self.closed,
                "failed": {str(k): v for k, v in sorted(self.failed.items())}}


def run_inquiries(engine: sa.Engine, storage: Any, library: Any, settings: Any, follow_up_ids: Sequence[int],
                  as_of: datetime, *, actor: Actor = Actor(),
                  channels: Mapping[str, SubmissionChannel] | None = None) -> InquirySummary:
    """Ask about the cases of these due inquiries and schedule what comes next (see the module doc)."""
    summary = InquirySummary()
    with session_scope(engine) as s:
        latest = (sa.select(Submission.case_id, sa.func.max(Submission.attempt).label("attempt"))
                  .where(Submission.status == "sent").group_by(Submission.case_id).subquery())
        rows = s.execute(
            sa.select(FollowUp.id, FollowUp.case_id, RetroCase.status, RetroCase.payer_id, Submission.id.label("sub"))
            .join(RetroCase, RetroCase.id == FollowUp.case_id)
            .outerjoin(latest, latest.c.case_id == FollowUp.case_id)
            .outerjoin(Submission, sa.and_(Submission.case_id == latest.c.case_id,
                                           Submission.attempt == latest.c.attempt))
            .where(FollowUp.id.in_(list(follow_up_ids)), FollowUp.done_at.is_(None))).all()
        moved_on = [r.id for r in rows if r.status not in WAITING or r.sub is None]
        _close(s, moved_on, "case_moved", utcnow())
    summary.closed = len(moved_on)
    rows = [r for r in rows if r.status in WAITING and r.sub is not None]
    if not rows:
        return summary
    polled = poll_submissions(engine, storage, library, settings, [r.sub for r in rows], actor=actor,
                              channels=channels)
    summary.asked = len(rows)
    with session_scope(engine) as s:
        now = utcnow()
        asked_before = dict(s.execute(
            sa.select(FollowUp.case_id, sa.func.count()).where(FollowUp.case_id.in_([r.case_id for r in rows]),
                                                               FollowUp.kind == INQUIRY, FollowUp.done_at.is_not(None))
            .group_by(FollowUp.case_id)).all())
        status = dict(s.execute(sa.select(RetroCase.id, RetroCase.status)
                                .where(RetroCase.id.in_([r.case_id for r in rows]))).all())
        for r in rows:
            if r.sub in polled.failed:
                summary.failed[r.case_id] = polled.failed[r.sub]
                s.execute(sa.update(FollowUp).where(FollowUp.id == r.id).values(attempts=FollowUp.attempts + 1)
                          .execution_options(synchronize_session=False))
                continue
            decision = polled.decided.get(r.sub)
            if decision:
                summary.decided[r.case_id] = decision
            if status[r.case_id] not in WAITING:  # decided: its follow-ups were closed with the decision
                _close(s, [r.id], f"decided_{decision}", now)
                continue
            outcome = "refused:" + polled.refused[r.sub] if r.sub in polled.refused else (
                "pended" if decision else "no_answer")
            _close(s, [r.id], outcome[:64], now)
            cadence = library[r.payer_id].follow_up
            if r.sub in polled.refused or asked_before.get(r.case_id, 0) + 1 >= cadence.max_inquiries:
                why = "cannot_inquire" if r.sub in polled.refused else "max_inquiries"
                summary.escalated += escalate(s, [r.case_id], why, as_of, actor)
                continue
            payer = library[r.payer_id]
            s.add(FollowUp(case_id=r.case_id, kind=INQUIRY, due_at=due_after(
                as_of, cadence.every.value, cadence.every.unit, payer.time_zone, payer.calendar())))
            summary.rescheduled += 1
    return summary


# --- 2. appeal deadlines ---------------------------------------------------------------------------------


def lapse_appeals(engine: sa.Engine, as_of: datetime, *, actor: Actor = Actor()) -> list[int]:
    """Open (unfiled) appeals past their deadline lapse and their denied cases expire. Returns the case ids."""
    with session_scope(engine) as s:
        rows = s.execute(sa.select(Appeal.id, Appeal.case_id, Appeal.level)
                         .join(RetroCase, RetroCase.id == Appeal.case_id)
                         .where(Appeal.status == "open", Appeal.due_at <= as_of, RetroCase.status == S.DENIED)).all()
        level = {r.case_id: r.level for r in rows}
        moved = transition_many(s, list(level), S.EXPIRED, from_statuses=[S.DENIED], actor=actor,
                                details={cid: {"why": "appeal_deadline_passed", "appeal_level": level[cid]}
                                         for cid in level})
        if moved:
            s.execute(sa.update(Appeal).where(Appeal.id.in_([r.id for r in rows if r.case_id in set(moved)]))
                      .values(status="lapsed").execution_options(synchronize_session=False))
            due = s.execute(sa.select(FollowUp.id).where(FollowUp.case_id.in_(moved), FollowUp.done_at.is_(None),
                                                         FollowUp.kind == APPEAL_DEADLINE)).scalars().all()
            _close(s, due, "lapsed", utcnow())
        return moved


# --- 3. opening appeals ----------------------------------------------------------------------------------


@dataclass
class AppealSummary:
    opened: dict[int, int] = field(default_factory=dict)  # case id -> appeal level
    closed: list[int] = field(default_factory=list)  # no further level: the denial is final
    expired: list[int] = field(default_factory=list)  # the window for the next level has passed

    def as_dict(self) -> dict[str, Any]:
        return {"opened": {str(k): v for k, v in sorted(self.opened.items())}, "closed": sorted(self.closed),
                "expired": sorted(self.expired)}


def open_appeals(engine: sa.Engine, library: Any, as_of: datetime, *, actor: Actor = Actor(),
                 limit: int | None = None) -> AppealSummary:
    """For each denied case without an open appeal: its next appeal level, due within the payer's window."""
    summary = AppealSummary()
    with session_scope(engine) as s:
        pending = sa.exists().where(Appeal.case_id == RetroCase.id, Appeal.status.in_(["open", "filed"]))
        q = (sa.select(RetroCase.id, RetroCase.payer_id).where(RetroCase.status == S.DENIED, ~pending)
             .order_by(RetroCase.id))
        cases = dict(s.execute(q.limit(limit) if limit else q).all())
        if not cases:
            return summary
        ids = list(cases)
        levels_used = dict(s.execute(sa.select(Appeal.case_id, sa.func.max(Appeal.level))
                                     .where(Appeal.case_id.in_(ids)).group_by(Appeal.case_id)).all())
        denials: dict[int, tuple[datetime, str | None]] = {}  # the latest denial: when, and its codes
        for cid, at, codes in s.execute(
                sa.select(PayerResponse.case_id, PayerResponse.received_at, PayerResponse.reason_codes)
                .where(PayerResponse.case_id.in_(ids), PayerResponse.decision == "A3")
                .order_by(PayerResponse.received_at, PayerResponse.id)):
            denials[cid] = (at, codes)
        remitted = dict(s.execute(
            sa.select(CaseServiceLine.case_id, sa.func.max(ServiceLine.denied_on))
            .join(ServiceLine, ServiceLine.id == CaseServiceLine.service_line_id)
            .where(CaseServiceLine.case_id.in_(ids)).group_by(CaseServiceLine.case_id)).all())
        plans: dict[int, tuple[int, datetime, str | None]] = {}
        expired: dict[int, dict] = {}
        closed: dict[int, dict] = {}
        for cid, payer_id in cases.items():
            payer = library.get(payer_id)
            if payer is None:
                continue  # an unknown payer stays denied for a person to see
            level = (levels_used.get(cid) or 0) + 1
            rule = next((a for a in payer.appeals if a.level == level), None)
            if rule is None:
                closed[cid] = {"why": "no_further_appeal", "levels": len(payer.appeals)}
                continue
            denied_at, codes = denials.get(cid, (None, None))
            anchor = denied_at
            if (rule.anchor == Anchor.REMITTANCE or anchor is None) and remitted.get(cid):
                anchor = _day_start(remitted[cid])
            if anchor is None:
                continue  # denied with no date on record: nothing to count from, a person decides
            due = due_after(anchor, rule.within.value, rule.within.unit, payer.time_zone, payer.calendar())
            if due <= as_of:
                expired[cid] = {"why": "appeal_window_passed", "appeal_level": level}
            else:
                plans[cid] = (level, due, codes)
        summary.closed = transition_many(s, list(closed), S.CLOSED, from_statuses=[S.DENIED], actor=actor,
                                         details=closed)
        summary.expired = transition_many(s, list(expired), S.EXPIRED, from_statuses=[S.DENIED], actor=actor,
                                          details=expired)
        if plans:
            s.execute(sa.insert(Appeal), [dict(case_id=cid, level=lv, status="open", denial_codes=codes, due_at=due)
                                          for cid, (lv, due, codes) in plans.items()])
            s.execute(sa.insert(FollowUp), [dict(case_id=cid, kind=APPEAL_DEADLINE, due_at=due, attempts=0)
                                            for cid, (_, due, _) in plans.items()])
            for cid, (lv, due, _) in plans.items():
                record_event(s, cid, "appeal_opened", actor=actor,
                             details={"appeal_level": lv, "due_at": due.isoformat()})
            summary.opened = {cid: lv for cid, (lv, _, _) in plans.items()}
    return summary


def _day_start(d: date) -> datetime:
    return datetime.combine(d, time(0), UTC)


# --- 4. review SLA ----------------------------------------------------------------------------------------


def escalate_overdue(engine: sa.Engine, as_of: datetime, *, actor: Actor = Actor()) -> list[int]:
    """Cases still waiting for the payer at the end of its review SLA are flagged for a person (once)."""
    with session_scope(engine) as s:
        rows = s.execute(sa.select(FollowUp.id, FollowUp.case_id)
                         .where(FollowUp.kind == ESCALATION, FollowUp.done_at.is_(None),
                                FollowUp.due_at <= as_of)).all()
        if not rows:
            return []
        flagged = escalate(s, sorted({r.case_id for r in rows}), "review_sla_passed", as_of, actor)
        _close(s, [r.id for r in rows], "escalated", utcnow())
        return flagged


__all__ = [
    "APPEAL_DEADLINE", "AppealSummary", "ESCALATION", "FollowUpsIncomplete", "INQUIRY", "InquirySummary",
    "due_inquiries", "escalate_overdue", "lapse_appeals", "open_appeals", "run_inquiries",
]

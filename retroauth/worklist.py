"""Read-side queries for people: the deadline-ordered worklist and one case's full story."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from retroauth.models import (
    Appeal, CaseEvent, CaseServiceLine, Encounter, FollowUp, Letter, Packet, RetroCase, ServiceLine, Submission,
)


def worklist(
    engine: sa.Engine, *, states: Sequence[str] | None = None, payer_id: str | None = None, limit: int = 50,
    due_within_hours: float | None = None,
) -> list[sa.Row]:
    """Cases by deadline (none last), then priority: what to work on first."""
    from datetime import datetime, timedelta, timezone

    q = sa.select(
        RetroCase.id, RetroCase.status, RetroCase.payer_id, RetroCase.reason, RetroCase.due_at,
        RetroCase.amount_at_risk, RetroCase.priority, RetroCase.encounter_id, RetroCase.escalated_at,
    )
    if states:
        q = q.where(RetroCase.status.in_(list(states)))
    if payer_id:
        q = q.where(RetroCase.payer_id == payer_id)
    if due_within_hours is not None:
        q = q.where(RetroCase.due_at < datetime.now(timezone.utc) + timedelta(hours=due_within_hours))
    q = q.order_by(RetroCase.due_at.is_(None), RetroCase.due_at, RetroCase.priority.desc(), RetroCase.id).limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(q))


def status_counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RetroCase.status, sa.func.count()).group_by(RetroCase.status))
        return dict(sorted(rows.tuples().all()))


def encounter_of_case(engine: sa.Engine, case_id: int) -> int | None:
    """The encounter a case belongs to (None: no such case)."""
    with engine.connect() as conn:
        return conn.execute(sa.select(RetroCase.encounter_id).where(RetroCase.id == case_id)).scalar_one_or_none()


def encounter_exists(engine: sa.Engine, encounter_id: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(Encounter.id).where(Encounter.id == encounter_id)).first() is not None


def case_statuses(engine: sa.Engine, case_ids: Sequence[int]) -> dict[int, str]:
    """Each case's status, by case id (ids missing from the database are left out)."""
    if not case_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RetroCase.id, RetroCase.status).where(RetroCase.id.in_(sorted(set(case_ids)))))
        return {cid: str(status) for cid, status in rows}


def cases_of_encounter(engine: sa.Engine, encounter_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(RetroCase.id).where(RetroCase.encounter_id == encounter_id)
                                 .order_by(RetroCase.id)).scalars())


def submissions_by_payer(engine: sa.Engine, submission_ids: Sequence[int]) -> dict[str, list[int]]:
    """Outbox rows grouped by the payer they go to (for a per-payer limit on sends), ids only."""
    if not submission_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RetroCase.payer_id, Submission.id)
                            .join(RetroCase, RetroCase.id == Submission.case_id)
                            .where(Submission.id.in_(sorted(set(submission_ids))))
                            .order_by(RetroCase.payer_id, Submission.id))
        out: dict[str, list[int]] = {}
        for payer_id, sid in rows:
            out.setdefault(payer_id, []).append(sid)
        return out


def case_detail(engine: sa.Engine, case_id: int) -> dict[str, Any] | None:
    with Session(engine) as s:
        case = s.get(RetroCase, case_id)
        if case is None:
            return None
        lines = s.exec(
            select(ServiceLine, CaseServiceLine.rule_category)
            .join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
            .where(CaseServiceLine.case_id == case_id)
            .order_by(ServiceLine.service_date, ServiceLine.line_number)
        ).all()
        packet = s.exec(select(Packet).where(Packet.case_id == case_id)).first()
        letters = s.exec(select(Letter).where(Letter.case_id == case_id).order_by(Letter.id)).all()
        submissions = s.exec(select(Submission).where(Submission.case_id == case_id).order_by(Submission.id)).all()
        events = s.exec(select(CaseEvent).where(CaseEvent.case_id == case_id).order_by(CaseEvent.occurred_at, CaseEvent.id)).all()
        appeals = s.exec(select(Appeal).where(Appeal.case_id == case_id).order_by(Appeal.level)).all()
        follow_ups = s.exec(select(FollowUp).where(FollowUp.case_id == case_id)
                            .order_by(FollowUp.due_at, FollowUp.id)).all()
        return {
            "case": case.model_dump(),
            "service_lines": [
                {**ln.model_dump(include={"line_number", "code_system", "code", "service_date", "units", "charge"}),
                 "rule_category": cat}
                for ln, cat in lines
            ],
            "packet": None if packet is None else {
                "version": packet.version, "complete": packet.complete, "missing": packet.missing,
                "manifest_key": packet.manifest_key,
                "items": [{k: item.get(k) for k in ("type", "label", "status", "source", "storage_key", "sha256", "why")}
                          for item in (packet.manifest or {}).get("items", [])],
            },
            "letters": [ltr.model_dump(include={"id", "kind", "appeal_level", "version", "template_name", "pdf_key",
                                                "html_key", "created_at"}) for ltr in letters],
            "submissions": [sub.model_dump(include={"id", "attempt", "kind", "channel", "status", "idempotency_key",
                                                    "tracking_number", "sent_at", "last_error"}) for sub in submissions],
            "appeals": [a.model_dump(exclude={"case_id"}) for a in appeals],
            "follow_ups": [f.model_dump(exclude={"case_id"}) for f in follow_ups],
            "events": [e.model_dump(exclude={"case_id"}) for e in events],
        }


def sweep_report(engine: sa.Engine, case_ids: Sequence[int], as_of) -> dict[str, Any]:  # noqa: ANN001
    """The day's summary for operators, ids and codes only: by payer and reason, due soon, at risk, why not."""
    from datetime import timedelta

    ids = list(case_ids)
    if not ids:
        return {"by_payer_reason": [], "due": {}, "amount_at_risk": "0.00", "not_eligible": {}, "most_urgent": []}
    c = RetroCase
    in_batch = c.id.in_(ids)
    with engine.connect() as conn:
        by = conn.execute(
            sa.select(c.payer_id, c.reason, c.status, sa.func.count(), sa.func.sum(c.amount_at_risk))
            .where(in_batch).group_by(c.payer_id, c.reason, c.status).order_by(c.payer_id, c.reason, c.status)
        ).all()
        due = {
            label: conn.execute(sa.select(sa.func.count()).where(
                in_batch, c.status == "identified", c.due_at >= as_of, c.due_at < as_of + timedelta(hours=h))).scalar_one()
            for label, h in (("24h", 24), ("72h", 72), ("7d", 168))
        }
        at_risk = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.amount_at_risk), 0))
                               .where(in_batch, c.status == "identified")).scalar_one()
        why = dict(conn.execute(sa.select(c.not_eligible_why, sa.func.count())
                                .where(in_batch, c.status == "not_eligible").group_by(c.not_eligible_why)).tuples().all())
        urgent = conn.execute(
            sa.select(c.id, c.payer_id, c.reason, c.due_at, c.amount_at_risk, c.priority)
            .where(in_batch, c.status == "identified").order_by(c.priority.desc(), c.due_at, c.id).limit(20)
        ).all()
    return {
        "by_payer_reason": [dict(payer=p, reason=r, status=s, cases=n, amount_at_risk=f"{a or 0:.2f}")
                            for p, r, s, n, a in by],
        "due": due,
        "amount_at_risk": f"{at_risk:.2f}",
        "not_eligible": why,
        "most_urgent": [dict(case=u.id, payer=u.payer_id, reason=u.reason, due=u.due_at.isoformat() if u.due_at else None,
                             amount_at_risk=f"{u.amount_at_risk:.2f}", priority=u.priority) for u in urgent],
    }

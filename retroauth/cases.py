"""The case state machine: the one place where a retro-authorization case changes state.

Every change is a compare-and-set ``UPDATE ... WHERE status IN (allowed sources)`` plus its audit
event, flushed in the caller's transaction, so the state and its history commit or roll back together.
Moving a batch is one statement, not a loop; a case that is no longer in a source state (another
worker moved it, or a retried run finds the work done) is simply not moved, and the caller is told.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session

from retroauth.models import CaseEvent, RetroCase, utcnow
from retroauth.vocab import CaseStatus as S

# Which states each state may move to. Anything else is refused.
TRANSITIONS: Mapping[S, frozenset[S]] = {
    S.IDENTIFIED: frozenset({S.AWAITING_DOCUMENTATION, S.READY, S.NOT_ELIGIBLE, S.EXPIRED, S.WITHDRAWN}),
    S.AWAITING_DOCUMENTATION: frozenset({S.READY, S.NOT_ELIGIBLE, S.EXPIRED, S.WITHDRAWN}),
    # A packet whose inputs changed (a new note, a corrected code) goes back for another look.
    S.READY: frozenset({S.LETTER_RENDERED, S.AWAITING_DOCUMENTATION, S.EXPIRED, S.WITHDRAWN}),
    S.LETTER_RENDERED: frozenset({S.SUBMITTING, S.READY, S.AWAITING_DOCUMENTATION, S.EXPIRED, S.WITHDRAWN}),
    # submitting -> letter_rendered: the channel refused it before the payer took it (fix and resend).
    S.SUBMITTING: frozenset({S.SUBMITTED, S.LETTER_RENDERED}),
    S.SUBMITTED: frozenset({S.IN_REVIEW, S.APPROVED, S.DENIED, S.LETTER_RENDERED, S.WITHDRAWN}),
    S.IN_REVIEW: frozenset({S.APPROVED, S.DENIED, S.WITHDRAWN}),
    S.DENIED: frozenset({S.APPEALED, S.EXPIRED, S.CLOSED}),
    # An appeal ends approved, or denied again (the next level may then be appealed).
    S.APPEALED: frozenset({S.APPROVED, S.DENIED, S.WITHDRAWN}),
    S.APPROVED: frozenset({S.CLOSED}),
    # New facts (coverage found, a corrected reason) can make a case eligible again.
    S.NOT_ELIGIBLE: frozenset({S.IDENTIFIED, S.CLOSED}),
    S.EXPIRED: frozenset({S.CLOSED}),
    S.WITHDRAWN: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}

# States in which the work is still ours to do (the worklist, the deadline watch).
OPEN_STATES: frozenset[S] = frozenset(
    {S.IDENTIFIED, S.AWAITING_DOCUMENTATION, S.READY, S.LETTER_RENDERED, S.SUBMITTING, S.SUBMITTED,
     S.IN_REVIEW, S.DENIED, S.APPEALED}
)


class InvalidTransition(Exception):
    """A move the state machine does not allow; nothing was written."""

    def __init__(self, case_id: int | None, from_status: str, to_status: str):
        self.case_id, self.from_status, self.to_status = case_id, from_status, to_status
        allowed = ", ".join(sorted(TRANSITIONS.get(S(from_status), ()))) or "none"
        super().__init__(
            f"case {case_id}: cannot move from {from_status} to {to_status} (allowed: {allowed})"
        )


class StaleCase(Exception):
    """The case changed under us (another worker, a concurrent run); nothing was written."""

    def __init__(self, case_id: int, expected: str):
        super().__init__(f"case {case_id}: no longer in state {expected}")
        self.case_id = case_id


def sources_of(to_status: S) -> frozenset[S]:
    """Every state from which ``to_status`` can be reached."""
    return frozenset(src for src, targets in TRANSITIONS.items() if to_status in targets)


def check(from_status: str, to_status: str, case_id: int | None = None) -> None:
    """Raise ``InvalidTransition`` unless the state machine allows the move."""
    try:
        allowed = to_status in TRANSITIONS[S(from_status)]
    except ValueError:
        allowed = False
    if not allowed:
        raise InvalidTransition(case_id, from_status, to_status)


@dataclass(frozen=True)
class Actor:
    """Who moved a case: a flow run (its id), a CLI user, or the system."""

    run_id: str | None = None
    name: str = "system"


def transition(
    session: Session,
    case: RetroCase,
    to_status: S,
    *,
    actor: Actor = Actor(),
    details: dict | None = None,
    **changes: object,
) -> RetroCase:
    """Move one case (and set ``changes`` on it) with its audit event, in the caller's transaction.

    Raises ``InvalidTransition`` for a move the machine forbids and ``StaleCase`` if the row is no
    longer in the state the caller read; in both cases nothing is written.
    """
    from_status = case.status
    check(from_status, to_status, case.id)
    now = utcnow()
    result = session.execute(
        sa.update(RetroCase)
        .where(RetroCase.id == case.id, RetroCase.status == from_status, RetroCase.version == case.version)
        .values(status=to_status, version=RetroCase.version + 1, updated_at=now, **changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise StaleCase(case.id, from_status)
    session.add(_event(case.id, from_status, to_status, actor, details, now))
    session.flush()
    session.refresh(case)
    return case


def transition_many(
    session: Session,
    case_ids: Iterable[int],
    to_status: S,
    *,
    from_statuses: Iterable[S] | None = None,
    actor: Actor = Actor(),
    details: Mapping[int, dict] | None = None,
) -> list[int]:
    """Move a batch of cases in one statement; return the ids that moved.

    Only cases currently in ``from_statuses`` (default: every state that may reach ``to_status``)
    move; the others are left as they are, which is what makes a rerun a no-op. Asking for a source
    the machine forbids raises ``InvalidTransition`` before anything is written.
    """
    ids = sorted(set(case_ids))
    sources = frozenset(from_statuses) if from_statuses is not None else sources_of(to_status)
    for src in sources:
        check(src, to_status)
    if not ids or not sources:
        return []
    now = utcnow()
    moved: list[tuple[int, str]] = []
    for chunk in _chunks(ids, 500):  # stay well under every backend's bound-parameter limit
        before = session.execute(
            sa.select(RetroCase.id, RetroCase.status)
            .where(RetroCase.id.in_(chunk), RetroCase.status.in_([str(s) for s in sources]))
            .with_for_update()
        ).all()
        if not before:
            continue
        updated = session.execute(
            sa.update(RetroCase)
            .where(RetroCase.id.in_([row.id for row in before]),
                   RetroCase.status.in_([str(s) for s in sources]))
            .values(status=to_status, version=RetroCase.version + 1, updated_at=now)
            .returning(RetroCase.id)
            .execution_options(synchronize_session=False)
        ).scalars().all()
        prior = dict(before)
        moved.extend((cid, prior[cid]) for cid in updated)
    if moved:
        session.execute(
            sa.insert(CaseEvent),
            [_event_row(cid, src, to_status, actor, (details or {}).get(cid), now) for cid, src in moved],
        )
    session.expire_all()
    return sorted(cid for cid, _ in moved)


def record_event(
    session: Session, case_id: int, event: str, *, actor: Actor = Actor(), details: dict | None = None
) -> None:
    """An audit entry that is not a state change (a note, a document received, a follow-up made)."""
    session.add(CaseEvent(case_id=case_id, run_id=actor.run_id, actor=actor.name, event=event, details=details))


def record_events(session: Session, event: str, details: Mapping[int, dict | None], *, actor: Actor = Actor()) -> None:
    """``record_event`` for many cases (case id -> details) in one statement."""
    if details:
        now = utcnow()
        session.execute(sa.insert(CaseEvent), [dict(case_id=cid, occurred_at=now, run_id=actor.run_id, actor=actor.name,
                                                    event=event, details=d) for cid, d in details.items()])


WAITING = (S.SUBMITTED, S.IN_REVIEW, S.APPEALED)  # the payer has our request or appeal


def escalate(s: Session, case_ids: Sequence[int], why: str, as_of: datetime, actor: Actor) -> list[int]:
    """Flag the cases still waiting for the payer (once each) for a person (``escalated_at``, ``!`` on the
    worklist) with an audit event saying why (a code); returns those newly flagged."""
    ids = list(s.execute(sa.select(RetroCase.id).where(RetroCase.id.in_(list(case_ids)),
                                                       RetroCase.status.in_(WAITING),
                                                       RetroCase.escalated_at.is_(None))).scalars())
    if ids:
        s.execute(sa.update(RetroCase).where(RetroCase.id.in_(ids)).values(escalated_at=as_of)
                  .execution_options(synchronize_session=False))
        record_events(s, "escalated", dict.fromkeys(ids, {"why": why}), actor=actor)
    return ids


def _event_row(case_id: int, src: str, dst: str, actor: Actor, details: dict | None, now) -> dict:  # noqa: ANN001
    """The columns of a transition's audit event (a plain dict: building a ``CaseEvent`` per row for a
    set-based insert costs more than the insert, ~90 us a row)."""
    return dict(case_id=case_id, occurred_at=now, run_id=actor.run_id, actor=actor.name, event="transition",
                from_status=str(src), to_status=str(dst), details=details)


def _event(case_id: int, src: str, dst: str, actor: Actor, details: dict | None, now) -> CaseEvent:  # noqa: ANN001
    return CaseEvent(**_event_row(case_id, src, dst, actor, details, now))


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]

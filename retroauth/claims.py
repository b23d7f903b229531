"""Claims: several runs share one day's work, and each case is worked by one of them at a time.

A run takes a batch of one step's work with ``claim``: ONE statement that picks rows of the step that
nobody holds, most urgent first, and writes a lease on them: ``claimed_by`` (the run), ``claimed_until``
(when the lease runs out) and ``claim_round`` (``<step>:<round>``). ``release`` hands the batch back when
the run is done with it, whether it went well or not: the lease ends and the round key stays on the rows,
so the same round does not take them again (a case still waiting for a document, a submission the payer
did not take this time or a batch that failed waits for the next round: tomorrow's run, or a retry of
this one, which is a new round). A run that crashed never hands its batch back: its lease runs out
(``LEASE``) and any run may claim the rows again.

The statement, per backend:

- PostgreSQL::

      WITH picked AS (SELECT id FROM <table> WHERE <step> AND <free> ORDER BY ... LIMIT :n
                      FOR UPDATE OF <table> SKIP LOCKED)
      UPDATE <table> SET claimed_by = :owner, claimed_until = :until, claim_round = :key
      FROM picked WHERE <table>.id = picked.id AND <free> RETURNING <table>.id

  Concurrent claimers skip the rows another claim has locked instead of waiting for them, so they never
  get the same row, and a row whose lease another claim committed meanwhile fails the re-check that
  PostgreSQL makes of a locked row's new version (and ``<free>`` is checked again in the UPDATE).
- SQLite: the same statement without ``FOR UPDATE`` (SQLite has none, SQLAlchemy leaves it out): every
  transaction begins with BEGIN IMMEDIATE (``retroauth.db``), so claims are serialized by the write lock
  and the UPDATE ... FROM ... RETURNING is atomic.

``<free>``: no lease and not yet taken in this round, or a lease that ran out, or a lease of an earlier
attempt of the same run on the same step (a retried run takes back at once what its crashed attempt held).
The steps:

- ``assemble``: cases whose packet is kept up to date (``documents.needs_packet``), most urgent first
- ``render``: ready cases and denied ones with an open appeal (``letters.needs_letter``), most urgent first
- ``send``: pending submissions (``outbox.is_pending``), oldest first, one payer per batch: of the payers
  with the fewest rows held by runs right now (runs at once spread over the payers), the one with the
  oldest. A batch then takes one slot of one payer's limit (tasks/submit.py), not one per payer in it.

Claims only say who works on what: the work itself stays safe without them (compare-and-set state changes,
unique letters and packets, idempotency keys towards the payer), so a lease that runs out while its run is
still working costs time, never a duplicate. Ids and codes only, as everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from retroauth.db import session_scope
from retroauth.models import RetroCase, Submission, utcnow

# Long enough for a batch with its retries and its wait for a payer's slot; a crashed run's batch waits
# this long before another run takes it.
LEASE = timedelta(minutes=30)
MAX_CLAIM_TEXT = 64  # claimed_by, claim_round


class ClaimError(ValueError):
    """A claim that cannot be made as asked (an unknown step, a key too long); ids and codes only."""


@dataclass(frozen=True)
class Step:
    name: str
    table: Any  # the SQLModel class whose rows are claimed
    condition: Callable[[], sa.ColumnElement[bool]]  # the step's work, whoever holds it
    order: Callable[[], Sequence[Any]]
    # A batch keeps to one value of a column: (the FROM clause that has it, the column); None: any mix.
    group: Callable[[], tuple[Any, Any]] | None = None


def _steps() -> dict[str, Step]:
    from retroauth.documents import needs_packet
    from retroauth.letters import needs_letter
    from retroauth.outbox import is_pending

    def urgent_first() -> Sequence[Any]:
        return (RetroCase.priority.desc(), RetroCase.id)

    return {
        "assemble": Step("assemble", RetroCase, needs_packet, urgent_first),
        "render": Step("render", RetroCase, needs_letter, urgent_first),
        "send": Step("send", Submission, is_pending, lambda: (Submission.id,),
                     group=lambda: (sa.join(Submission, RetroCase, RetroCase.id == Submission.case_id),
                                    RetroCase.payer_id)),
    }


STEPS = ("assemble", "render", "send")


def step(name: str) -> Step:
    try:
        return _steps()[name]
    except KeyError:
        raise ClaimError(f"unknown step {name!r} (one of {', '.join(STEPS)})") from None


def round_key(step_name: str, round_id: str) -> str:
    """What ``claim_round`` holds: the step and the round, e.g. ``render:<flow run id>#1``."""
    key = f"{step_name}:{round_id}"
    if len(key) > MAX_CLAIM_TEXT:
        raise ClaimError(f"round key longer than {MAX_CLAIM_TEXT} characters for step {step_name}")
    return key


def unheld(t: Any, now: datetime | None = None) -> sa.ColumnElement[bool]:
    """Rows no run holds right now: never leased, handed back, or their lease ran out."""
    return sa.or_(t.claimed_until.is_(None), t.claimed_until < (now or utcnow()))


def _free(t: Any, key: str, owner: str, now: datetime) -> sa.ColumnElement[bool]:
    """Nobody holds it and this round has not taken it, or its lease ran out, or it is held by an earlier
    attempt of this same run for this step (a crashed attempt never handed it back; its retry is a new round
    and must not wait out the lease)."""
    return sa.or_(sa.and_(t.claimed_until.is_(None), t.claim_round.is_distinct_from(key)),
                  t.claimed_until < now,
                  sa.and_(t.claimed_by == owner, t.claim_round.startswith(key.split(":", 1)[0] + ":"),
                          t.claim_round != key))


def claim(engine: sa.Engine, step_name: str, *, owner: str, round_id: str, limit: int,
          lease: timedelta = LEASE, now: datetime | None = None, handing_back: Iterable[int] = ()) -> list[int]:
    """Take up to ``limit`` rows of the step's work that nobody holds, in one statement; return their ids
    (an empty list: nothing is left for this round, or everything left is held by other runs).
    ``handing_back``: a batch this owner is done with, released in the same transaction first."""
    st = step(step_name)
    if limit < 1:
        raise ClaimError("limit must be at least 1")
    if not owner or len(owner) > MAX_CLAIM_TEXT:
        raise ClaimError(f"owner must be 1 to {MAX_CLAIM_TEXT} characters")
    t = st.table
    key = round_key(st.name, round_id)
    now = now or utcnow()
    rows = sa.select(t.id).where(st.condition(), _free(t, key, owner, now))
    if st.group is not None:
        source, column = st.group()
        rows = rows.select_from(source).where(column == _next_group(st, source, column, key, owner, now))
    picked = (rows.order_by(*st.order()).limit(limit)
              .with_for_update(of=t.__table__, skip_locked=True)
              .cte("picked"))
    stmt = (sa.update(t).where(t.id == picked.c.id, _free(t, key, owner, now))
            .values(claimed_by=owner, claimed_until=now + lease, claim_round=key)
            .returning(t.id)
            .execution_options(synchronize_session=False))
    with session_scope(engine) as s:
        _release(s, t, handing_back, owner)
        return sorted(s.execute(stmt).scalars().all())


def _next_group(st: Step, source: Any, column: Any, key: str, owner: str, now: datetime) -> sa.ScalarSelect:
    """The group the next batch keeps to: the group of the first free row, taking first the groups with the
    fewest rows held by runs right now (runs at once spread over the groups), then the oldest work. That row
    is locked with SKIP LOCKED like the batch's, so that two claimers at once on PostgreSQL never end up with
    a group whose free rows the other is taking (an empty claim would end a run's step too early)."""
    t = st.table
    held = (sa.select(column.label("g"), sa.func.count().label("n")).select_from(source)
            .where(st.condition(), sa.not_(unheld(t, now))).group_by(column).subquery("held_groups"))
    first = (sa.select(column.label("g")).select_from(source.outerjoin(held, held.c.g == column))
             .where(st.condition(), _free(t, key, owner, now))
             .order_by(sa.func.coalesce(held.c.n, 0), *st.order()).limit(1)
             .with_for_update(of=t.__table__, skip_locked=True)
             .cte("next_group"))
    return sa.select(first.c.g).scalar_subquery()


def release(engine: sa.Engine, step_name: str, ids: Iterable[int], *, owner: str) -> int:
    """Hand back rows this owner holds: the lease ends, the round key stays. Returns how many were held
    (a row whose lease ran out and that another run took since is not ours to hand back)."""
    with session_scope(engine) as s:
        return _release(s, step(step_name).table, ids, owner)


def _release(s: Session, t: Any, ids: Iterable[int], owner: str) -> int:
    ids = sorted(set(ids))
    released = 0
    for i in range(0, len(ids), 500):
        released += s.execute(
            sa.update(t).where(t.id.in_(ids[i:i + 500]), t.claimed_by == owner, t.claimed_until.is_not(None))
            .values(claimed_until=None).execution_options(synchronize_session=False)
        ).rowcount
    return released


__all__ = ["LEASE", "STEPS", "ClaimError", "Step", "claim", "release", "round_key", "step", "unheld"]

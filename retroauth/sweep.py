"""The daily sweep: which services needed authorization and have none, why, by when, and how urgent.

``sweep`` walks the lookback window in batches of encounters (keyset pages, one transaction each,
flat memory). Per batch: one query finds the uncovered service lines (``retroauth.matching``);
cases are upserted per (encounter, payer) and their lines linked; each case's reason, deadline,
eligibility and priority are evaluated and written only where they changed. A rerun for the same
day, or an overlapping window, creates nothing and rewrites nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlmodel import Session

from retroauth import failpoints
from retroauth.cases import Actor, record_event, transition_many
from retroauth.db import refresh_statistics, session_scope
from retroauth.deadlines import Deadline, start_of_day, window_due
from retroauth.ingest.upsert import upsert
from retroauth.matching import uncovered_lines
from retroauth.models import (
    CaseEvent, CaseServiceLine, Coverage, Encounter, PayerAuthPartner, PayerAuthRule, PayerOutage, RetroCase, ServiceLine,
    utcnow,
)
from retroauth.rules import PayerRules, RuleLibrary, code_family
from retroauth.vocab import DELAY_REASON_CODES, AdmissionType, Anchor, CaseStatus, CoverageDiscovery, EncounterClass
from retroauth.vocab import MissReason as R

# Cases the sweep may still (re)evaluate or withdraw: nothing has gone to the payer yet.
PRE_SUBMISSION = (CaseStatus.IDENTIFIED, CaseStatus.AWAITING_DOCUMENTATION, CaseStatus.READY,
                  CaseStatus.LETTER_RENDERED)
# When several reasons apply, this is the order they are argued in if none is accepted.
REASON_PRECEDENCE = (R.RETROACTIVE_ELIGIBILITY, R.DELAYED_INSURANCE_VERIFICATION, R.EMERGENCY, R.SYSTEM_ISSUE,
                     R.ADMINISTRATIVE_ERROR)


class NotEligible:
    """Machine-readable reasons a case cannot be asked for."""

    PAYER_ACCEPTS_NO_RETRO = "payer_accepts_no_retro"
    REASON_NOT_ACCEPTED = "reason_not_accepted"
    DEADLINE_PASSED = "deadline_passed"
    UNKNOWN_PAYER = "unknown_payer"


@dataclass
class SweepResult:
    since: datetime
    until: datetime
    encounters_scanned: int = 0
    lines_uncovered: int = 0
    cases_created: int = 0
    cases_reevaluated: int = 0
    not_eligible: int = 0
    withdrawn: int = 0
    expired: int = 0
    case_ids: list[int] = field(default_factory=list)  # every case the sweep touched or found

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["case_ids"] = len(self.case_ids)
        return d


# --- rules into the database --------------------------------------------------------------------------


def load_rules(session: Session, library: RuleLibrary) -> int:
    """Replace the flattened rule rows with the library's (the YAML files are the source)."""
    session.execute(sa.delete(PayerAuthPartner))
    session.execute(sa.delete(PayerAuthRule))
    rules, partners = [], []
    for payer in library.values():
        for i, rule in enumerate(payer.authorization_required):
            places = rule.places_of_service or [None]
            classes = [c.value for c in rule.encounter_classes] if rule.encounter_classes else [None]
            for family, lo, hi in rule.match_rows():
                for pos in places:
                    for cls in classes:
                        rules.append(dict(
                            payer_id=payer.id, rule_index=i, category=rule.category, code_system=family,
                            code_lo=lo, code_hi=hi, code_len=len(lo), place_of_service=pos, encounter_class=cls,
                            effective_from=rule.effective_from, effective_to=rule.effective_to,
                            provider_specific=rule.provider_specific, requires_partner=rule.only_with is not None,
                        ))
            if rule.only_with is not None:
                partners += [
                    dict(payer_id=payer.id, rule_index=i, code_system=code_family(rule.only_with.code_system),
                         code_lo=lo, code_hi=hi, code_len=len(lo))
                    for lo, hi in rule.only_with.ranges()
                ]
    if rules:
        session.execute(sa.insert(PayerAuthRule), rules)
    if partners:
        session.execute(sa.insert(PayerAuthPartner), partners)
    return len(rules)


# --- the sweep ------------------------------------------------------------------------------------------


def sweep(
    engine: sa.Engine,
    library: RuleLibrary,
    *,
    as_of: datetime,
    lookback_days: int,
    actor: Actor = Actor(),
    encounter_ids: Sequence[int] | None = None,
    payer_ids: Sequence[str] | None = None,
    batch_size: int = 2000,
    progress=None,  # noqa: ANN001 - optional callable(encounters_done)
) -> SweepResult:
    """Find and evaluate cases for encounters admitted in [as_of - lookback_days, as_of).

    ``encounter_ids`` limits the sweep to those encounters whatever their date (an urgent case): it
    then touches only their cases, expiring included, and skips the planner statistics (a lookup by
    primary key needs none); ``payer_ids`` limits it to those payers. The whole rule library is loaded
    either way, so that sweeps running at the same time never see each other's partial rules.
    """
    payers = list(payer_ids) if payer_ids else list(library)
    for p in payers:
        library[p]  # an unknown payer id fails here, naming the known ones
    if encounter_ids is None:
        refresh_statistics(engine)
    until = as_of
    since = as_of - timedelta(days=lookback_days)
    window = [Encounter.admitted_at >= since, Encounter.admitted_at < until]
    if encounter_ids is not None:
        window = [Encounter.id.in_(list(encounter_ids))]
    result = SweepResult(since=since, until=until)
    with session_scope(engine) as s:
        load_rules(s, library)
    last_id = 0
    while True:
        with session_scope(engine) as s:
            page = s.execute(
                sa.select(Encounter.id)
                .where(Encounter.id > last_id, *window)
                .order_by(Encounter.id)
                .limit(batch_size)
            ).scalars().all()
            if not page:
                break
            _sweep_batch(s, library, payers, list(page), as_of, actor, result, only_payers=bool(payer_ids))
        failpoints.hit("sweep.after_page")
        last_id = page[-1]
        result.encounters_scanned += len(page)
        if progress:
            progress(result.encounters_scanned)
    with session_scope(engine) as s:
        result.expired = len(expire_overdue(s, as_of, actor, encounter_ids))
    return result


def _sweep_batch(s: Session, library: RuleLibrary, payers: list[str], encounter_ids: list[int], as_of: datetime,
                 actor: Actor, result: SweepResult, only_payers: bool) -> None:
    # (A payer filter only when asked: it tempts SQLite's planner to start from coverages.)
    rows = s.execute(uncovered_lines(encounter_ids, payers if only_payers else None)).all()
    result.lines_uncovered += len({r.service_line_id for r in rows})
    groups: dict[tuple[int, str], list] = {}
    for r in rows:
        groups.setdefault((r.encounter_id, r.payer_id), []).append(r)

    cases = upsert(
        s, RetroCase,
        [dict(encounter_id=e, payer_id=p, coverage_id=g[0].coverage_id) for (e, p), g in groups.items()],
        key=("encounter_id", "payer_id"), update=False,
    )
    result.cases_created += len(cases.inserted)
    upsert(
        s, CaseServiceLine,
        [dict(case_id=cases[k], service_line_id=r.service_line_id, rule_category=r.category)
         for k, g in groups.items() for r in g],
        key=("case_id", "service_line_id"), update=False,
    )
    for key in cases.inserted:
        record_event(s, cases[key], "identified", actor=actor,
                     details={"lines": sorted({r.service_line_id for r in groups[key]}),
                              "categories": sorted({r.category for r in groups[key]})})

    # Pre-submission cases of these encounters with no uncovered line left: an authorization turned up.
    still_needed = set(cases.values())
    gone = s.execute(
        sa.select(RetroCase.id).where(RetroCase.encounter_id.in_(encounter_ids),
                                      RetroCase.payer_id.in_(payers),
                                      RetroCase.status.in_(PRE_SUBMISSION),
                                      RetroCase.id.not_in(still_needed) if still_needed else sa.true())
    ).scalars().all()
    result.withdrawn += len(transition_many(s, gone, CaseStatus.WITHDRAWN, from_statuses=PRE_SUBMISSION, actor=actor,
                                            details={c: {"why": "authorization_on_file"} for c in gone}))

    evaluated = evaluate_cases(s, library, sorted(still_needed), as_of, actor)
    result.cases_reevaluated += evaluated.changed
    result.not_eligible += evaluated.not_eligible
    result.case_ids.extend(sorted(still_needed))


# --- why, by when, how urgent -------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFacts:
    """What the evaluation of one case reads: ids, codes, instants and amounts; no patient data."""

    case_id: int
    status: str
    payer_id: str
    encounter_class: str
    admission_type: str | None
    admitted_at: datetime
    discharged_at: datetime | None
    system_issue_reference: str | None
    coverage_discovered_at: datetime | None
    discovery_method: str | None
    outage: bool
    first_service_date: object
    first_denied_on: object
    amount: Decimal
    current: tuple  # (reason, delay code, due_at, deadline_rule, not_eligible_why, priority, amount_at_risk)


@dataclass(frozen=True)
class Evaluation:
    reason: R
    deadline: Deadline | None
    rule_text: str
    not_eligible_why: str | None
    priority: int


@dataclass
class EvaluateResult:
    changed: int = 0
    not_eligible: int = 0


def applicable_reasons(f: CaseFacts) -> list[R]:
    """Every reason the facts support, in precedence order; administrative error always applies."""
    reasons = []
    if f.discovery_method == CoverageDiscovery.RETROACTIVE_ELIGIBILITY:
        reasons.append(R.RETROACTIVE_ELIGIBILITY)
    if f.coverage_discovered_at is not None and f.coverage_discovered_at > f.admitted_at:
        reasons.append(R.DELAYED_INSURANCE_VERIFICATION)
    if f.encounter_class == EncounterClass.EMERGENCY or f.admission_type == AdmissionType.EMERGENCY:
        reasons.append(R.EMERGENCY)
    if f.system_issue_reference or f.outage:
        reasons.append(R.SYSTEM_ISSUE)
    reasons.append(R.ADMINISTRATIVE_ERROR)
    return reasons


def _anchor_instant(anchor: Anchor, f: CaseFacts, tz: str) -> datetime | None:
    match anchor:
        case Anchor.SERVICE_DATE:
            return start_of_day(f.first_service_date, tz)
        case Anchor.ADMISSION:
            return f.admitted_at
        case Anchor.DISCHARGE:
            return f.discharged_at or f.admitted_at  # still in house: count from admission, the safe side
        case Anchor.COVERAGE_DISCOVERY:
            return f.coverage_discovered_at or f.admitted_at
        case Anchor.REMITTANCE:
            return start_of_day(f.first_denied_on, tz) if f.first_denied_on else None
    return None


def evaluate(f: CaseFacts, payer: PayerRules | None, as_of: datetime) -> Evaluation:
    """Choose the reason the payer accepts with the latest deadline still ahead; else say why not."""
    reasons = applicable_reasons(f)
    primary = reasons[0]
    if payer is None:
        return Evaluation(primary, None, "payer not in the rule library", NotEligible.UNKNOWN_PAYER, 0)
    if not payer.retro.accepted:
        return Evaluation(primary, None, "payer accepts no retro requests", NotEligible.PAYER_ACCEPTS_NO_RETRO, 0)
    options: list[tuple[R, Deadline | None, str]] = []
    for reason in reasons:
        window = payer.retro.window_for(reason)
        if window is None:
            continue
        rule = f"{payer.id} retro window for {reason.value}"
        anchor_at = _anchor_instant(window.anchor, f, payer.time_zone)
        if anchor_at is None:  # e.g. counts from the remittance and none has come yet
            options.append((reason, None, f"{rule}: {window.describe()} (not started: no remittance yet)"))
            continue
        deadline = window_due(
            anchor_at, window.within.value, window.within.unit, payer.time_zone,
            cutoff=window.cutoff_local_time, calendar=payer.calendar(),
            roll_to_business_day=window.roll_to_business_day, anchor=window.anchor, rule=rule,
        )
        options.append((reason, deadline, deadline.rule))
    if not options:
        return Evaluation(primary, None, "no retro window for " + ", ".join(r.value for r in reasons),
                          NotEligible.REASON_NOT_ACCEPTED, 0)
    open_options = [o for o in options if o[1] is None or o[1].due_utc > as_of]
    if not open_options:
        reason, deadline, rule = max(options, key=lambda o: o[1].due_utc)
        return Evaluation(reason, deadline, rule, NotEligible.DEADLINE_PASSED, 0)
    # An open-ended window (not started) is the most generous; otherwise the latest due instant.
    reason, deadline, rule = max(open_options, key=lambda o: (o[1] is None, o[1].due_utc if o[1] else 0))
    return Evaluation(reason, deadline, rule, None, priority(deadline, f.amount, as_of))


def priority(deadline: Deadline | None, amount: Decimal, as_of: datetime) -> int:
    """0-150: urgency by hours left (0-100) plus dollars at risk on a log scale (0-50)."""
    if deadline is None:
        urgency = 10
    else:
        hours = (deadline.due_utc - as_of).total_seconds() / 3600
        urgency = next((score for limit, score in ((24, 100), (72, 85), (168, 70), (720, 45))
                        if hours <= limit), 20)
    dollars = min(50, int(10 * math.log10(float(amount) + 1)))
    return urgency + dollars


def evaluate_cases(s: Session, library: RuleLibrary, case_ids: Iterable[int], as_of: datetime,
                   actor: Actor) -> EvaluateResult:
    """Evaluate identified / not-eligible cases and write what changed, with audit events: the new
    values in one executemany, the state moves in one statement per direction, the events in one insert."""
    out = EvaluateResult()
    values_by_case: dict[int, dict] = {}
    details: dict[int, dict] = {}
    moves: dict[tuple[str, str], list[int]] = {}
    for f in case_facts(s, list(case_ids)):
        if f.status not in (CaseStatus.IDENTIFIED, CaseStatus.NOT_ELIGIBLE):
            continue
        ev = evaluate(f, library.get(f.payer_id), as_of)
        if ev.not_eligible_why == NotEligible.DEADLINE_PASSED and f.status == CaseStatus.IDENTIFIED and f.current[2]:
            continue  # it was eligible and we let the deadline pass: that is 'expired', not 'not eligible'
        values = dict(
            reason=ev.reason.value, delay_reason_code=DELAY_REASON_CODES[ev.reason],
            due_at=ev.deadline.due_utc if ev.deadline else None, deadline_rule=ev.rule_text[:256],
            not_eligible_why=ev.not_eligible_why, priority=ev.priority, amount_at_risk=f.amount,
        )
        if tuple(values.values()) == f.current:
            continue  # nothing changed: write nothing
        values_by_case[f.case_id] = values
        details[f.case_id] = {"reason": ev.reason.value, "not_eligible_why": ev.not_eligible_why,
                              "due_at": values["due_at"].isoformat() if values["due_at"] else None}
        target = CaseStatus.NOT_ELIGIBLE if ev.not_eligible_why else CaseStatus.IDENTIFIED
        out.not_eligible += target == CaseStatus.NOT_ELIGIBLE
        if target != f.status:
            moves.setdefault((f.status, target), []).append(f.case_id)
    if not values_by_case:
        return out
    out.changed = len(values_by_case)
    ids = list(values_by_case)
    now = utcnow()  # audit times are real times, whatever day the sweep runs "as of"
    s.execute(sa.update(RetroCase), [dict(id=cid, updated_at=now, **v) for cid, v in values_by_case.items()])
    s.execute(sa.update(RetroCase).where(RetroCase.id.in_(ids)).values(version=RetroCase.version + 1)
              .execution_options(synchronize_session=False))
    moved: set[int] = set()
    for (source, target), cids in moves.items():
        moved |= set(transition_many(s, cids, target, from_statuses=[source], actor=actor, details=details))
    stayed = [cid for cid in ids if cid not in moved]
    if stayed:
        s.execute(sa.insert(CaseEvent), [
            dict(case_id=cid, occurred_at=now, run_id=actor.run_id, actor=actor.name, event="evaluated",
                 details=details[cid]) for cid in stayed])
    return out


def case_facts(s: Session, case_ids: list[int]) -> list[CaseFacts]:
    """One query for the facts of a batch of cases."""
    if not case_ids:
        return []
    lines = (
        sa.select(CaseServiceLine.case_id,
                  sa.func.min(ServiceLine.service_date).label("first_service_date"),
                  sa.func.min(ServiceLine.denied_on).label("first_denied_on"),
                  sa.func.sum(ServiceLine.charge * ServiceLine.units).label("amount"))
        .join(ServiceLine, ServiceLine.id == CaseServiceLine.service_line_id)
        .where(CaseServiceLine.case_id.in_(case_ids))
        .group_by(CaseServiceLine.case_id)
        .subquery()
    )
    outage = sa.exists().where(
        PayerOutage.payer_id == RetroCase.payer_id,
        PayerOutage.starts_at <= sa.func.coalesce(Encounter.discharged_at, Encounter.admitted_at),
        sa.or_(PayerOutage.ends_at.is_(None), PayerOutage.ends_at >= Encounter.admitted_at),
    )
    q = (
        sa.select(
            RetroCase.id, RetroCase.status, RetroCase.payer_id, Encounter.encounter_class, Encounter.admission_type,
            Encounter.admitted_at, Encounter.discharged_at, Encounter.system_issue_reference,
            Coverage.discovered_at, Coverage.discovery_method, outage.label("outage"),
            lines.c.first_service_date, lines.c.first_denied_on, lines.c.amount,
            RetroCase.reason, RetroCase.delay_reason_code, RetroCase.due_at, RetroCase.deadline_rule,
            RetroCase.not_eligible_why, RetroCase.priority, RetroCase.amount_at_risk,
        )
        .join(Encounter, Encounter.id == RetroCase.encounter_id)
        .join(lines, lines.c.case_id == RetroCase.id)
        .outerjoin(Coverage, Coverage.id == RetroCase.coverage_id)
        .where(RetroCase.id.in_(case_ids))
        .order_by(RetroCase.id)
    )
    facts = []
    for r in s.execute(q):
        amount = Decimal(r.amount or 0).quantize(Decimal("0.01"))
        facts.append(CaseFacts(
            case_id=r.id, status=r.status, payer_id=r.payer_id, encounter_class=r.encounter_class,
            admission_type=r.admission_type, admitted_at=r.admitted_at, discharged_at=r.discharged_at,
            system_issue_reference=r.system_issue_reference, coverage_discovered_at=r.discovered_at,
            discovery_method=r.discovery_method, outage=bool(r.outage), first_service_date=r.first_service_date,
            first_denied_on=r.first_denied_on, amount=amount,
            current=(r.reason, r.delay_reason_code, r.due_at, r.deadline_rule, r.not_eligible_why, r.priority,
                     r.amount_at_risk),
        ))
    return facts


def expire_overdue(s: Session, as_of: datetime, actor: Actor,
                   encounter_ids: Sequence[int] | None = None) -> list[int]:
    """Cases not yet sent whose deadline has passed (of ``encounter_ids``, or all): expired, in one statement."""
    q = sa.select(RetroCase.id).where(RetroCase.status.in_(PRE_SUBMISSION), RetroCase.due_at < as_of)
    if encounter_ids is not None:
        q = q.where(RetroCase.encounter_id.in_(list(encounter_ids)))
    overdue = s.execute(q).scalars().all()
    return transition_many(s, overdue, CaseStatus.EXPIRED, from_statuses=PRE_SUBMISSION, actor=actor,
                           details={c: {"why": "deadline_passed"} for c in overdue})

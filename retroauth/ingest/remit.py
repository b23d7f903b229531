"""Import X12 835 remittance advice (005010X221A1): mark service lines denied for missing or invalid
authorization, the second way a retro-authorization or appeal case is born.

What is read, per transaction set (ST..SE):
- the remittance date: BPR16 (check issue / EFT effective date), else the production date DTM*405;
- per claim (loop 2100): CLP01 patient control number, CLP02 status, claim-level CAS adjustments,
  claim remarks (MOA03-07, MIA05 and MIA20-23), the statement period DTM*232/233;
- per service (loop 2110): SVC01 (qualifier HC = CPT/HCPCS, NU = revenue code; the code; up to 4
  modifiers), or SVC06 when the payer changed the code (SVC06 is what was billed, so it is what is
  matched); DTM*472 service date (or DTM*150/151 for a period); line CAS (group code CO/PR/OA/PI, then
  up to 6 triplets reason/amount/quantity per segment); LQ*HE remark codes (RARC).

What marks a service line as denied for authorization (``AUTH_CARCS``, ``AUTH_RARCS``): a CARC 197,
198, 15 or 39, or a RARC M62 or N54, on the line or on its claim. The line gets
``denial_carc`` (the authorization CARC; for a line marked by a remark alone, the CARC of the line's
largest non-patient-responsibility adjustment), ``denial_rarc`` (the authorization RARC, else the
line's first remark) and ``denied_on`` = the remittance date. A claim-level denial marks the claim's
lines (those its SVCs matched); a claim without SVC loops marks every line of its encounter in the
statement period (DTM*232..233; no period: all lines of the encounter).

Matching (documented convention): the patient control number the provider sent in the 837 (CLM01,
echoed in CLP01) is the encounter's ``source_id``. ``source_system`` narrows the lookup: one source
system for the whole file, or a mapping from the payee id (N1*PE N104, e.g. the billing NPI; ``"*"``
for any other payee) to a source system; without it (or for a payee the mapping does not name)
every source system is searched, and a patient control number found in several is a problem. A service matches the encounter's line with the same
code (HC: code system CPT or HCPCS alike; NU: REV) whose service date is the line's DTM*472 (or falls
in its DTM*150..151 period, or else in the claim's DTM*232..233); among several, one with the same
modifiers, then the first by line number not already matched by another service of the claim.

Rules:
- Each claim goes in whole or not at all: an unmatched claim, an unmatched service or an unreadable
  segment in it becomes an ``ImportProblem`` (file, segment number, ``"CLP <CLP01>"``, field,
  message) and nothing of that claim is written.
- Reversals (CLP02 22) and predeterminations (CLP02 25) are skipped: they deny nothing.
- A denial never clears: a later payment of the line does not unmark it (the denial is history a case
  may already point at). Between two denials of one line, the later remittance date wins, whatever
  the order the files are imported in.
- Set-based: claims are processed in batches of ``batch_size``; per batch one query finds the
  encounters, one finds their service lines, and the changes go in as ``UPDATE ... WHERE id IN (...)``
  grouped by the values written, in one transaction. Only lines whose values differ are written, so
  importing the same 835 again writes no row.
- Envelope errors (a truncated file, a wrong SE01 count, mismatched control numbers, segments outside
  ST..SE) become problems naming file, segment number and segment id (``retroauth.x12.parse``); the
  intact transaction sets of the same file are still imported. So do transaction-set errors (no
  remittance date; a claim segment such as SVC or CAS with no CLP before it): that transaction set
  is not imported, the others are.

Counts in the summary: ``Claim`` (read, updated: some line marked, unchanged, skipped, errors),
``ServiceLine`` (read: SVC loops, updated: rows written, unchanged: matched and already right or not
denied, errors: unmatched), ``Transaction`` (read: intact 835 transaction sets, errors: envelope and
header problems); transaction sets other than 835 are counted in ``ignored``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlmodel import Session

from retroauth.db import session_scope
from retroauth.ingest.errors import MAX_PROBLEMS, ImportProblem, ImportSummary, IngestError
from retroauth.models import Encounter, ServiceLine
from retroauth.vocab import CodeSystem
from retroauth.x12.parse import Segment, Transaction, X12Error, read_transactions

logger = logging.getLogger(__name__)

__all__ = ["AUTH_CARCS", "AUTH_RARCS", "Progress", "import_remit"]

# CARC: 197 precertification/authorization/notification absent, 198 authorization exceeded,
# 15 authorization number missing/invalid/not for this service or provider, 39 denied at the time
# authorization was requested. RARC: M62 missing/incomplete/invalid treatment authorization code,
# N54 claim inconsistent with authorized services.
AUTH_CARCS = frozenset({"197", "198", "15", "39"})
AUTH_RARCS = frozenset({"M62", "N54"})

VERSION_PREFIX = "005010X221"  # 005010X221A1 (GS08; ST03 is not used in the 835)
_SKIP_STATUS = {"22": "reversal", "25": "predetermination"}
_CLAIM_SEGMENTS = frozenset({"SVC", "CAS", "LQ", "MOA", "MIA"})  # only inside a claim (loops 2100/2110)
_QUALIFIER_SYSTEMS: dict[str, tuple[str, ...]] = {
    "HC": (CodeSystem.CPT, CodeSystem.HCPCS),
    "NU": (CodeSystem.REVENUE,),
}
_REASON = re.compile(r"^[A-Z0-9]{1,5}$")  # CARC (1-3) and RARC (2-5) shapes
_D8 = re.compile(r"^\d{8}$")
_IN_CHUNK = 1000


class Progress(Protocol):
    """Called after each batch with the claims read so far (same shape as the FHIR importer's)."""

    def __call__(self, resource_type: str, lines_done: int) -> None: ...


# --- what an 835 says ----------------------------------------------------------------------------


@dataclass
class _Adjustment:
    group: str
    reason: str
    amount: Decimal


@dataclass
class _Service:
    number: int  # segment number of the SVC
    qualifier: str
    code: str
    modifiers: frozenset[str]
    date_from: date | None = None
    date_to: date | None = None
    adjustments: list[_Adjustment] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)


@dataclass
class _Claim:
    file: str
    number: int  # segment number of the CLP
    pcn: str
    status: str
    remit_date: date
    payee: str
    adjustments: list[_Adjustment] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)
    date_from: date | None = None
    date_to: date | None = None
    services: list[_Service] = field(default_factory=list)
    error: tuple[int, str, str] | None = None  # the first unreadable element: (segment, field, message)

    @property
    def resource(self) -> str:
        return f"CLP {self.pcn}" if self.pcn else "CLP"

    def fail(self, seg: Segment, element: str, message: str) -> None:
        if self.error is None:
            self.error = (seg.number, element, message)


class _TransactionError(Exception):
    def __init__(self, seg: Segment, element: str, message: str):
        super().__init__(message)
        self.seg, self.element, self.message = seg, element, message


def _d8(value: str) -> date | None:
    if not _D8.match(value):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def _claims(tx: Transaction) -> Iterator[_Claim]:
    """The claims of one 835 transaction set, in file order."""
    payment_date: date | None = None
    production_date: date | None = None
    bpr: Segment | None = None
    payee = ""
    claim: _Claim | None = None
    svc: _Service | None = None
    for seg in tx.body:
        sid = seg.id
        if sid == "CLP":
            if claim is not None:
                yield claim
            remit_date = payment_date or production_date
            if remit_date is None:
                where = bpr if bpr is not None else seg
                raise _TransactionError(where, "BPR16", "no valid payment date (BPR16, CCYYMMDD) nor production "
                                                        "date (DTM*405): the remittance date is unknown")  # fmt: skip
            pcn = seg[1].strip()[:38]
            claim = _Claim(tx.file, seg.number, pcn if "\x00" not in pcn else "", seg[2].strip(), remit_date, payee)
            svc = None
            if "\x00" in pcn:  # no database text can hold it (PostgreSQL refuses it even in a lookup)
                claim.fail(seg, "CLP01", "patient control number contains a NUL character")
            elif not claim.pcn:
                claim.fail(seg, "CLP01", "patient control number missing")
            elif not claim.status:
                claim.fail(seg, "CLP02", "claim status missing")
        elif sid in ("LX", "PLB"):  # a new header-number group, or the footer: the claim has ended
            if claim is not None:
                yield claim
            claim = svc = None
        elif claim is None:
            if sid == "BPR":
                bpr = seg
                payment_date = _d8(seg[16])
            elif sid == "DTM" and seg[1] == "405":
                production_date = _d8(seg[2])
            elif sid == "N1" and seg[1] == "PE":
                payee = seg[4].strip()
            elif sid in _CLAIM_SEGMENTS:  # its CLP is missing: a denial in it would be lost without a word
                raise _TransactionError(seg, "CLP", f"{sid} outside a claim: no CLP (claim payment) before it")
        elif sid == "SVC":
            svc = _service(claim, seg)
            if svc is not None:
                claim.services.append(svc)
        elif sid == "CAS":
            _cas(claim, seg, svc.adjustments if svc is not None else claim.adjustments)
        elif sid == "DTM":
            _dtm(claim, svc, seg)
        elif sid == "LQ" and svc is not None:
            if seg[1] == "HE":
                _remark(claim, seg, "LQ02", seg[2], svc.remarks)
        elif sid == "MOA" and svc is None:
            for pos in range(3, 8):
                _remark(claim, seg, f"MOA{pos:02d}", seg[pos], claim.remarks)
        elif sid == "MIA" and svc is None:
            for pos in (5, 20, 21, 22, 23):
                _remark(claim, seg, f"MIA{pos:02d}", seg[pos], claim.remarks)
    if claim is not None:
        yield claim


def _service(claim: _Claim, seg: Segment) -> _Service | None:
    # SVC06 is the procedure as submitted when the payer adjudicated a different one (SVC01).
    position = 6 if seg[6] else 1
    parts = [p.strip().upper() for p in seg.components(position)]
    element = f"SVC{position:02d}"
    if len(parts) < 2 or not parts[0] or not parts[1]:
        claim.fail(seg, element, "composite procedure identifier without qualifier and code")
        return None
    return _Service(seg.number, parts[0], parts[1], frozenset(m for m in parts[2:6] if m))


def _cas(claim: _Claim, seg: Segment, into: list[_Adjustment]) -> None:
    group = seg[1].strip()
    if group not in ("CO", "PR", "OA", "PI"):
        claim.fail(seg, "CAS01", "claim adjustment group code is not CO, PR, OA or PI")
        return
    for n in range(6):
        pos = 2 + 3 * n
        reason = seg[pos].strip().upper()
        if not reason:
            continue
        if not _REASON.match(reason):
            claim.fail(seg, f"CAS{pos:02d}", "not an adjustment reason code")
            continue
        try:
            amount = Decimal(seg[pos + 1].strip())
        except InvalidOperation:
            amount = Decimal("NaN")
        if not amount.is_finite():  # Decimal also reads NaN and Infinity, which cannot be compared
            claim.fail(seg, f"CAS{pos + 1:02d}", "adjustment amount is not a number")
            continue
        into.append(_Adjustment(group, reason, amount))


def _dtm(claim: _Claim, svc: _Service | None, seg: Segment) -> None:
    qualifier = seg[1]
    wanted = ("472", "150", "151") if svc is not None else ("232", "233")
    if qualifier not in wanted:
        return
    value = _d8(seg[2])
    if value is None:
        claim.fail(seg, "DTM02", "not a date (CCYYMMDD)")
        return
    if svc is not None:
        if qualifier in ("472", "150"):
            svc.date_from = value
        if qualifier in ("472", "151"):
            svc.date_to = value
    elif qualifier == "232":
        claim.date_from = value
    else:
        claim.date_to = value


def _remark(claim: _Claim, seg: Segment, element: str, value: str, into: list[str]) -> None:
    value = value.strip().upper()
    if not value:
        return
    if not _REASON.match(value):
        claim.fail(seg, element, "not a remark code")
        return
    into.append(value)


def _first(values: Iterable[str]) -> str | None:
    return next(iter(values), None)


def _main_carc(adjustments: list[_Adjustment]) -> str | None:
    """The reason of the largest adjustment, patient responsibility (PR) last."""
    if not adjustments:
        return None
    ranked = sorted(adjustments, key=lambda a: (a.group != "PR", a.amount), reverse=True)
    return ranked[0].reason


def _denial(svc: _Service | None, claim: _Claim) -> tuple[str | None, str | None] | None:
    """(CARC, RARC) when the service (or its claim) was denied for authorization, else None."""
    line_adj = svc.adjustments if svc is not None else []
    line_rem = svc.remarks if svc is not None else []
    carc = _first(a.reason for a in line_adj if a.reason in AUTH_CARCS) or _first(
        a.reason for a in claim.adjustments if a.reason in AUTH_CARCS
    )
    rarc = _first(r for r in line_rem if r in AUTH_RARCS) or _first(r for r in claim.remarks if r in AUTH_RARCS)
    if carc is None and rarc is None:
        return None
    carc = carc or _main_carc(line_adj) or _main_carc(claim.adjustments)
    rarc = rarc or _first(line_rem) or _first(claim.remarks)
    return carc, rarc


# --- what the database has -----------------------------------------------------------------------


Mark = tuple[str | None, str | None, date | None]  # denial_carc, denial_rarc, denied_on


@dataclass
class _Line:
    id: int
    line_number: int
    code_system: str
    code: str
    modifiers: frozenset[str]
    service_date: date
    stored: Mark
    planned: Mark

    def mark(self, carc: str | None, rarc: str | None, on: date) -> bool:
        """Plan the denial; False when the line already says so or a later remittance marked it."""
        new: Mark = (carc, rarc, on)
        if self.planned == new:
            return False
        current_on = self.planned[2]
        if current_on is not None and current_on > on:
            return False
        self.planned = new
        return True


def _modifiers(value: str | None) -> frozenset[str]:
    return frozenset(m.strip().upper() for m in (value or "").split(",") if m.strip())


# --- the import ----------------------------------------------------------------------------------


def import_remit(
    engine: sa.Engine,
    path: str | Path,
    *,
    progress: Progress | None = None,
    source_system: str | Mapping[str, str] | None = None,
    batch_size: int = 500,
) -> ImportSummary:
    """Import the 835 file ``path`` (or every file in the directory ``path``, in name order).

    See the module docstring for what is read, matched and written. Raises ``IngestError`` when
    ``path`` does not exist; everything wrong inside the files becomes a problem in the summary.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        names = [p.relative_to(root).as_posix() for p in files]
    elif root.is_file():
        files, names = [root], [root.name]
    else:
        raise IngestError(f"{root}: no such file or directory")
    if batch_size < 1:
        raise IngestError("batch_size must be at least 1")
    run = _RemitImport(engine, progress, source_system, batch_size)
    for file, name in zip(files, names):
        run.import_file(file, name)
    run.flush()
    return run.summary


class _RemitImport:
    def __init__(
        self,
        engine: sa.Engine,
        progress: Progress | None,
        source_system: str | Mapping[str, str] | None,
        batch_size: int,
    ):
        self.engine = engine
        self.progress = progress
        self.source_system = source_system
        self.batch_size = batch_size
        self.summary = ImportSummary()
        self.pending: list[_Claim] = []

    # -- problems ----------------------------------------------------------------------------------

    def _problem(self, counts_key: str, problem: ImportProblem) -> None:
        # Not ImportSummary.add_problem: it takes the count key from a "Type/id" resource, and an
        # 835 problem's resource is "CLP <id>" or a segment id.
        logger.warning("remit import problem: %s", problem)
        self.summary.of(counts_key).errors += 1
        if len(self.summary.problems) < MAX_PROBLEMS:
            self.summary.problems.append(problem)
        else:
            self.summary.problems_not_kept += 1

    def _envelope_problem(self, error: X12Error) -> None:
        self._problem("Transaction", ImportProblem(
            error.file, error.segment_number or 0, error.segment_id or "(file)", error.element or "(envelope)",
            error.message,
        ))  # fmt: skip

    def _claim_problem(self, claim: _Claim, line: int, field_: str, message: str, counts_key: str = "Claim") -> None:
        self._problem(counts_key, ImportProblem(claim.file, line, claim.resource, field_, message))

    # -- reading -----------------------------------------------------------------------------------

    def import_file(self, path: Path, name: str) -> None:
        try:
            for tx in read_transactions(path, file=name, on_error=self._envelope_problem):
                self._transaction(tx)
        except OSError as e:  # the file vanished or is unreadable: say so, go on with the others
            why = f"could not be read ({e.strerror or type(e).__name__})"
            self._problem("Transaction", ImportProblem(name, 0, "(file)", "(file)", why))

    def _transaction(self, tx: Transaction) -> None:
        if tx.set_id != "835" or tx.functional_id != "HP":
            key = f"ST*{tx.set_id}" if tx.set_id.isalnum() else "ST"
            self.summary.ignored[key] = self.summary.ignored.get(key, 0) + 1
            return
        if not tx.gs[8].startswith(VERSION_PREFIX):
            why = "not an 005010X221A1 (835 version 5010) functional group"
            self._problem("Transaction", ImportProblem(tx.file, tx.gs.number, "GS", "GS08", why))
            return
        counts = self.summary.of("Transaction")
        claims: list[_Claim] = []
        try:
            claims.extend(_claims(tx))
        except _TransactionError as e:
            self._problem("Transaction", ImportProblem(tx.file, e.seg.number, e.seg.id, e.element, e.message))
            return
        counts.read += 1
        for claim in claims:
            self.summary.of("Claim").read += 1
            self.summary.of("ServiceLine").read += len(claim.services)
            self.pending.append(claim)
            if len(self.pending) >= self.batch_size:
                self.flush()

    # -- matching and writing ----------------------------------------------------------------------

    def flush(self) -> None:
        claims, self.pending = self.pending, []
        if not claims:
            return
        with session_scope(self.engine) as session:
            encounters = self._encounters(session, {c.pcn for c in claims if c.error is None and c.pcn})
            lines = self._lines(session, {eid for found in encounters.values() for eid, _ in found})
            for claim in claims:
                self._claim(claim, encounters, lines)
            written = self._write(session, [line for found in lines.values() for line in found])
        self.summary.of("ServiceLine").updated += written
        if self.progress is not None:
            self.progress("Claim", self.summary.of("Claim").read)

    def _system_for(self, payee: str) -> str | None:
        if self.source_system is None or isinstance(self.source_system, str):
            return self.source_system
        return self.source_system.get(payee) or self.source_system.get("*")

    def _encounters(self, session: Session, pcns: set[str]) -> dict[str, list[tuple[int, str]]]:
        """``{source_id: [(encounter id, source system), ...]}`` for the patient control numbers."""
        table = Encounter.__table__  # type: ignore[attr-defined]
        found: dict[str, list[tuple[int, str]]] = {}
        ids = sorted(pcns)
        systems = None
        if isinstance(self.source_system, str):
            systems = [self.source_system]
        for start in range(0, len(ids), _IN_CHUNK):
            stmt = sa.select(table.c.source_id, table.c.id, table.c.source_system).where(
                table.c.source_id.in_(ids[start : start + _IN_CHUNK])
            )
            if systems is not None:
                stmt = stmt.where(table.c.source_system.in_(systems))
            for source_id, eid, system in session.execute(stmt):
                found.setdefault(source_id, []).append((eid, system))
        return found

    def _lines(self, session: Session, encounter_ids: set[int]) -> dict[int, list[_Line]]:
        table = ServiceLine.__table__  # type: ignore[attr-defined]
        out: dict[int, list[_Line]] = {}
        ids = sorted(encounter_ids)
        for start in range(0, len(ids), _IN_CHUNK):
            stmt = (
                sa.select(table.c.id, table.c.encounter_id, table.c.line_number, table.c.code_system, table.c.code,
                          table.c.modifiers, table.c.service_date, table.c.denial_carc, table.c.denial_rarc,
                          table.c.denied_on)  # fmt: skip
                .where(table.c.encounter_id.in_(ids[start : start + _IN_CHUNK]))
                .order_by(table.c.encounter_id, table.c.line_number)
            )
            for r in session.execute(stmt):
                stored: Mark = (r.denial_carc, r.denial_rarc, r.denied_on)
                out.setdefault(r.encounter_id, []).append(_Line(
                    r.id, r.line_number, r.code_system, (r.code or "").strip().upper(), _modifiers(r.modifiers),
                    r.service_date, stored, stored,
                ))  # fmt: skip
        return out

    def _claim(
        self,
        claim: _Claim,
        encounters: dict[str, list[tuple[int, str]]],
        lines: dict[int, list[_Line]],
    ) -> None:
        counts = self.summary.of("Claim")
        if claim.status in _SKIP_STATUS:
            counts.skipped += 1
            return
        if claim.error is not None:
            self._claim_problem(claim, *claim.error)
            return
        encounter_id = self._encounter(claim, encounters)
        if encounter_id is None:
            return
        enc_lines = lines.get(encounter_id, [])
        # Match every service before planning anything: the claim goes in whole or not at all.
        matched: list[tuple[_Service | None, _Line]] = []
        used: set[int] = set()
        failed = False
        for svc in claim.services:
            line, why = _match(svc, claim, enc_lines, used)
            if line is None:
                self._claim_problem(claim, svc.number, why[0], why[1], counts_key="ServiceLine")
                failed = True
            else:
                matched.append((svc, line))
        if failed:
            counts.errors += 1
            return
        if not claim.services and _denial(None, claim) is not None:
            lo, hi = claim.date_from or claim.date_to, claim.date_to or claim.date_from
            matched = [(None, ln) for ln in enc_lines if lo is None or lo <= ln.service_date <= (hi or lo)]
            if not matched:
                self._claim_problem(claim, claim.number, "CLP01",
                                    "claim-level authorization denial, but the encounter has no service line "
                                    "in the claim's statement period")  # fmt: skip
                return
        changed = False
        line_counts = self.summary.of("ServiceLine")
        for svc, line in matched:
            denial = _denial(svc, claim)
            if denial is not None and line.mark(denial[0], denial[1], claim.remit_date):
                changed = True
            elif svc is not None:
                line_counts.unchanged += 1
        if changed:
            counts.updated += 1
        else:
            counts.unchanged += 1

    def _encounter(self, claim: _Claim, encounters: dict[str, list[tuple[int, str]]]) -> int | None:
        found = encounters.get(claim.pcn, [])
        system = self._system_for(claim.payee)
        if system is not None:
            found = [f for f in found if f[1] == system]
        if len(found) == 1:
            return found[0][0]
        if not found:
            where = f" of source system {system}" if system is not None else ""
            message = f"no encounter{where} has this patient control number as its source id"
        else:
            message = (f"{len(found)} encounters (in different source systems) have this patient control "
                       "number as their source id: pass source_system")  # fmt: skip
        self._claim_problem(claim, claim.number, "CLP01", message)
        return None

    def _write(self, session: Session, lines: list[_Line]) -> int:
        """The planned marks that differ from the stored ones, as few UPDATEs as there are distinct
        values; returns the rows written."""
        groups: dict[Mark, list[int]] = {}
        for line in lines:
            if line.planned != line.stored:
                groups.setdefault(line.planned, []).append(line.id)
        table = ServiceLine.__table__  # type: ignore[attr-defined]
        written = 0
        for (carc, rarc, on), ids in groups.items():
            for start in range(0, len(ids), _IN_CHUNK):
                stmt = (
                    sa.update(table)
                    .where(
                        table.c.id.in_(ids[start : start + _IN_CHUNK]),
                        # the same guards as in memory, so a concurrent import cannot be undone
                        sa.or_(table.c.denied_on.is_(None), table.c.denied_on <= on),
                        sa.or_(table.c.denial_carc.is_distinct_from(carc), table.c.denial_rarc.is_distinct_from(rarc),
                               table.c.denied_on.is_distinct_from(on)),  # fmt: skip
                    )
                    .values(denial_carc=carc, denial_rarc=rarc, denied_on=on)
                )
                written += session.execute(stmt).rowcount
        return written


def _match(
    svc: _Service, claim: _Claim, lines: list[_Line], used: set[int]
) -> tuple[_Line | None, tuple[str, str]]:
    """The encounter's line for one SVC, or None and (field, why)."""
    systems = _QUALIFIER_SYSTEMS.get(svc.qualifier)
    if systems is None:
        return None, ("SVC01-01", f"procedure qualifier {svc.qualifier[:3]} is not matched (only HC and NU are)")
    if svc.date_from or svc.date_to:
        lo, hi = svc.date_from or svc.date_to, svc.date_to or svc.date_from
    else:
        lo, hi = claim.date_from or claim.date_to, claim.date_to or claim.date_from
    if lo is None or hi is None:
        return None, ("DTM*472", "no service date: neither DTM*472 on the service nor DTM*232/233 on the claim")
    candidates = [
        ln for ln in lines if ln.code_system in systems and ln.code == svc.code and lo <= ln.service_date <= hi
    ]
    if not candidates:
        return None, ("SVC01", "no service line of the encounter has this procedure code on this service date")
    same_modifiers = [ln for ln in candidates if ln.modifiers == svc.modifiers]
    candidates = same_modifiers or candidates
    line = next((ln for ln in candidates if ln.id not in used), candidates[0])
    used.add(line.id)
    return line, ("", "")


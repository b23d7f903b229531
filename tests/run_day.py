"""A whole day of retroauth in one process, for the fault tests:
``python -m tests.run_day DB_URL STORAGE_ROOT SIM_URL AS_OF [FOLLOW_UP_AS_OF]``.

The domain functions in the order of the flows, with small batches: sweep -> packets -> letters ->
enqueue + send -> follow-ups (inquiries, lapsed appeals, open appeals, appeal letters, file appeals, send,
escalations). ``Day(attempts=N)`` calls a batch again while it raises or reports failures, up to N calls,
the way Prefect retries a task; with ``attempts=1`` (the command line) any failure ends the process.
With ``RETROAUTH_FAILPOINTS=<place>=kill@N`` the process dies by SIGKILL at the N-th pass; running it again
is what a retry of the flow run does.

The rest is shared by tests/test_fault_matrix.py and tests/test_transient_faults.py: the day's data
(``build_day``: 12 encounters whose cases reach ``ready``, one not eligible, one awaiting a note, one that
needs no authorization), the PAS payer the simulator plays (``sim_config``: approve, deny then appeal
approved, pend then approve, pend then deny then appeal approved, by member id), a normalized snapshot
of the database (``snapshot``: business content per encounter, no ids or timestamps) and the checks that
nothing is half-written (``check_integrity``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import sqlalchemy as sa

from config import PAYERS_DIR
from config.settings import load_settings
from retroauth import failpoints, followups, outbox
from retroauth.cases import Actor
from retroauth.channels.fhir_pas import PasChannel
from retroauth.channels.pas import PasClient
from retroauth.db import make_engine, session_scope
from retroauth.documents import assemble, cases_needing_packets
from retroauth.letters import LetterRequest, cases_to_render, cases_with_open_appeals, load_letter_data, render_letters
from retroauth.models import (
    Appeal, Authorization, AuthorizationCode, CaseEvent, ClinicalDocument, Coverage, Diagnosis, Encounter, FollowUp,
    Letter, Packet, Patient, PayerResponse, RetroCase, ServiceLine, Submission,
)
from retroauth.rules import RuleLibrary, load_rule_library
from retroauth.storage import LocalStorage, key, sha256_hex
from retroauth.sweep import sweep

# Imported lazily by the PAS client (httpx's transport) and by FHIR validation on a day's first request:
# imported here once, so that each day forked from the fork server (``run_in_child``) does not redo it.
for _module in ("_strptime", "encodings.idna", "h11", "httpcore", *(f"fhir.resources.R4B.{m}" for m in (
        "attachment", "claim", "claimresponse", "codeableconcept", "coding", "contactpoint", "coverage",
        "documentreference", "domainresource", "extension", "humanname", "identifier", "meta", "money",
        "organization", "patient", "period", "practitioner", "quantity", "reference"))):
    importlib.import_module(_module)

CHI = ZoneInfo("America/Chicago")
AS_OF = datetime(2026, 11, 20, 6, tzinfo=CHI)  # the daily run, 06:00 at the facility
PAYER = "priority-health"  # takes PAS requests at the simulator (``pas_library``)
TOKEN = "sim-token"
BATCH = 4  # 15 encounters: 4 sweep pages; 13 packet cases: 4 batches; 12 letters: 3 batches
FOLLOW_UP_BATCH = 2  # 6 inquiries: 3 batches
ACTOR = Actor(run_id="fault-test", name="fault-test")

# What the payer does with each of the 12 requests, three encounters each.
OUTCOMES = ("approve", "deny", "pend_approve", "pend_deny")
# Final states of a fault-free day: every request ends approved (directly, after an inquiry, or on appeal).
FINAL = {"approve": "approved", "deny": "approved", "pend_approve": "approved", "pend_deny": "approved",
         "not_eligible": "not_eligible", "awaiting": "awaiting_documentation"}
NOTE_TYPES = ("34117-2", "18748-4", "11488-4")  # H&P, imaging, consult: what Priority Health asks for imaging
PLACES = ("sweep.after_page", "assemble.after_batch", "render.after_batch", "submit.before_record",
          "submit.after_record", "follow_up.after_inquiry")


# --- the day's data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    n: int
    kind: str  # an OUTCOMES entry, or not_eligible / awaiting / covered

    @property
    def source_id(self) -> str:
        return f"day-{self.n:02d}-{self.kind}"

    @property
    def member_id(self) -> str:
        return f"FM{self.n:04d}"


def plan() -> list[Planned]:
    kinds = [OUTCOMES[i % 4] for i in range(12)] + ["not_eligible", "awaiting", "covered"]
    return [Planned(n, k) for n, k in enumerate(kinds, 1)]


def build_day(engine: sa.Engine, storage: LocalStorage) -> None:
    """The encounters of the day with their coverage, services, diagnoses and notes (content in ``storage``)."""
    for p in plan():
        admitted = datetime(2026, 11, 9, 8, tzinfo=CHI) + timedelta(hours=7 * p.n)
        late = p.kind != "not_eligible"  # coverage found after the visit: delayed insurance verification
        with session_scope(engine) as s:
            patient = Patient(source_system="day", source_id=f"pt-{p.n}", family_name=f"Tester{p.n}",
                              given_name="Pat", birth_date=date(1960, 1, p.n), sex="female", mrn=f"DAY{p.n}")
            s.add(patient)
            s.flush()
            s.add(Coverage(patient_id=patient.id, payer_id=PAYER, member_id=p.member_id, group_number="G-1",
                           effective_from=date(2026, 1, 1),
                           discovered_at=(admitted + timedelta(days=4)) if late else datetime(2026, 1, 2, tzinfo=UTC),
                           discovery_method="eligibility_check" if late else "on_file"))
            enc = Encounter(source_system="day", source_id=p.source_id, patient_id=patient.id,
                            encounter_class="outpatient", admitted_at=admitted,
                            discharged_at=admitted + timedelta(hours=3), timezone="America/Chicago",
                            place_of_service="22")
            s.add(enc)
            s.flush()
            code = "99213" if p.kind == "covered" else "70551"  # an office visit needs no authorization
            s.add(ServiceLine(encounter_id=enc.id, line_number=1, code_system="CPT", code=code,
                              description="MRI brain without contrast", units=Decimal("1"),
                              charge=Decimal(1000 + 10 * p.n), service_date=admitted.date(),
                              rendering_npi="1234567893"))
            s.add(Diagnosis(encounter_id=enc.id, code_system="ICD10CM", code="R51.9", description="Headache", rank=1))
            s.flush()
            for loinc in NOTE_TYPES[:2] if p.kind == "awaiting" else NOTE_TYPES:
                data = f"Note {loinc} for visit {p.n}.\nAssessment: headache.\nPlan: MRI brain.\n".encode()
                source_id = f"doc-{p.n}-{loinc}"
                stored = storage.put(key("documents", patient.id, f"{source_id}.txt"), data,
                                     content_type="text/plain; charset=utf-8")
                s.add(ClinicalDocument(source_system="day", source_id=source_id, patient_id=patient.id,
                                       encounter_id=enc.id, loinc_type=loinc, title=f"Note {loinc}",
                                       authored_at=admitted + timedelta(hours=1),
                                       content_type="text/plain; charset=utf-8", storage_key=stored.key,
                                       sha256=stored.sha256, size_bytes=len(data)))


def sim_config(faults: Callable[[Planned], dict] | None = None) -> dict:
    """The payer: one rule per member, by the outcome planned for it (``faults`` adds fault lists)."""
    actions = {
        "approve": {"action": "approve"},
        "deny": {"action": "deny", "reasons": ["T1"], "appeal": "approve"},
        "pend_approve": {"action": "pend", "inquiries": 1, "then": "approve"},
        "pend_deny": {"action": "pend", "inquiries": 1, "then": "deny", "then_reasons": ["T2"], "appeal": "approve"},
    }
    rules = [{"match": {"member_id": p.member_id}, **actions[p.kind], **(faults(p) if faults else {})}
             for p in plan() if p.kind in actions]
    return {"token": TOKEN, "auth_prefix": "SIM", "default": {"action": "reject", "errors": ["15"]}, "rules": rules}


def pas_library(url: str) -> RuleLibrary:
    """The rule library in which Priority Health takes Da Vinci PAS requests at ``url`` (as tests/test_outbox)."""
    from retroauth.vocab import Channel

    lib = load_rule_library(PAYERS_DIR)
    payers = {pid: lib[pid] for pid in lib}
    ph = payers[PAYER]
    payers[PAYER] = ph.model_copy(update={
        "channel": Channel.FHIR_PAS, "contact": ph.contact.model_copy(update={"api_base_url": url})})
    return RuleLibrary(payers, {pid: lib.file_of(pid) for pid in lib})


def pas_channels(*, timeout: float = 10.0, max_attempts: int = 2, sleep: Callable[[float], None] | None = None):
    """The PAS channel with a client that does not wait between attempts (``sleep`` records the waits) and
    speaks plain HTTP to the simulator (an HTTPS-ready transport loads the CA bundle for every client)."""
    return {"fhir_pas": PasChannel(token=TOKEN, client_factory=lambda url, token: PasClient(
        base_url=url, token=token, timeout=timeout, max_attempts=max_attempts, backoff=0.01,
        sleep=sleep or (lambda s: None), transport=httpx.HTTPTransport(verify=False)))}


# --- the day --------------------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step still failed after its attempts: the step's name and error codes only."""


def _batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@dataclass
class Day:
    engine: sa.Engine
    storage: Any
    library: RuleLibrary
    channels: dict
    as_of: datetime = AS_OF
    follow_up_as_of: datetime | None = None  # default: 15 days after now (the first inquiry is due after 14)
    batch_size: int = BATCH
    attempts: int = 1  # calls per batch: 1 = no retry
    settings: Any = field(default_factory=load_settings)
    calls: Counter = field(default_factory=Counter)  # step -> calls made
    errors: Counter = field(default_factory=Counter)  # step -> failed calls (raised or reported failures)
    refused: dict = field(default_factory=dict)  # submission id -> code
    needed: Counter = field(default_factory=Counter)  # step -> the most calls one batch needed

    def step(self, name: str, fn: Callable[[], Any], failed: Callable[[Any], Any] = lambda r: None) -> Any:
        """Call ``fn`` until it neither raises nor reports failures, at most ``attempts`` times."""
        for attempt in range(1, self.attempts + 1):
            self.calls[name] += 1
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - what a task retry catches
                self.errors[name] += 1
                if attempt == self.attempts:
                    raise StepFailed(f"{name}: {type(exc).__name__} after {attempt} call(s)") from exc
                continue
            bad = failed(result)
            if not bad:
                self.needed[name] = max(self.needed[name], attempt)
                return result
            self.errors[name] += 1
            if attempt == self.attempts:
                raise StepFailed(f"{name}: {sorted(set(map(str, bad.values())))} after {attempt} call(s)")
        raise AssertionError("unreachable")

    def run(self) -> dict:
        e, st, lib, s = self.engine, self.storage, self.library, self.settings
        b, act = self.batch_size, ACTOR
        fu_as_of = self.follow_up_as_of or datetime.now(UTC) + timedelta(days=15)

        self.step("sweep", lambda: sweep(e, lib, as_of=self.as_of, lookback_days=30, batch_size=b, actor=act))
        for batch in _batches(self.step("find_packets", lambda: cases_needing_packets(e)), b):
            self.step("assemble", lambda: assemble(e, st, lib, batch, actor=act, as_of=self.as_of),
                      lambda r: r.failed)
        for batch in _batches(self.step("find_letters", lambda: cases_to_render(e)), b):
            self.step("render", lambda: render_letters(e, st, s, lib, batch, as_of=self.as_of, actor=act),
                      lambda r: r.failed)
        for batch in _batches(self.step("find_enqueue", lambda: outbox.cases_to_enqueue(e)), b):
            self.step("enqueue", lambda: outbox.enqueue(e, batch, library=lib, actor=act))
        self._send("send")

        for batch in _batches(self.step("find_inquiries", lambda: followups.due_inquiries(e, fu_as_of)),
                              FOLLOW_UP_BATCH):
            self.step("inquire", lambda: followups.run_inquiries(e, st, lib, s, batch, fu_as_of, actor=act,
                                                                 channels=self.channels), lambda r: r.failed)
        self.step("lapse_appeals", lambda: followups.lapse_appeals(e, fu_as_of, actor=act))
        self.step("open_appeals", lambda: followups.open_appeals(e, lib, fu_as_of, actor=act))
        for batch in _batches(self.step("find_appeal_letters", lambda: cases_with_open_appeals(e)), b):
            self.step("render_appeals", lambda: render_letters(e, st, s, lib, batch, as_of=fu_as_of, actor=act),
                      lambda r: r.failed)
        for batch in _batches(self.step("find_appeals", lambda: outbox.appeals_to_file(e)), b):
            self.step("file_appeals", lambda: outbox.enqueue_appeals(e, batch, library=lib, actor=act))
        self._send("send_appeals")
        self.step("escalate", lambda: followups.escalate_overdue(e, fu_as_of, actor=act))
        return {"calls": dict(self.calls), "errors": dict(self.errors), "needed": dict(self.needed),
                "refused": self.refused}

    def _send(self, name: str) -> None:
        e = self.engine
        for batch in _batches(self.step("find_pending", lambda: outbox.pending_submissions(e)), self.batch_size):
            summary = self.step(name, lambda: outbox.send_pending(
                e, self.storage, self.library, self.settings, actor=ACTOR, submission_ids=batch,
                channels=self.channels), lambda r: r.failed)
            self.refused.update(summary.refused)


def main(argv: list[str]) -> dict:
    db_url, storage_root, sim_url, as_of = argv[:4]
    engine = make_engine(db_url)
    day = Day(engine, LocalStorage(storage_root), pas_library(sim_url), pas_channels(),
              as_of=datetime.fromisoformat(as_of),
              follow_up_as_of=datetime.fromisoformat(argv[4]) if len(argv) > 4 else None)
    report = day.run()
    engine.dispose()
    return report


def _child(argv: list[str], failpoints_spec: str) -> None:
    """The day in a process forked from a warm fork server (``run_in_child``)."""
    os.environ[failpoints.ENV] = failpoints_spec
    failpoints.reset()
    main(argv)


_forkserver: Any = None


def run_in_child(argv: list[str], failpoints_spec: str, timeout: float = 180) -> int:
    """Run the day as its own process with ``RETROAUTH_FAILPOINTS=failpoints_spec``; its exit code
    (``-SIGKILL`` when a failpoint killed it). Same as ``python -m tests.run_day`` (see ``main``), minus
    the 2 s of imports: the process is forked from a fork server that has imported this module once."""
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(["tests.run_day"])
    proc = _forkserver.Process(target=_child, args=(list(argv), failpoints_spec), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"the day did not end within {timeout} s")
    return proc.exitcode


# --- a day's data once, copied for each run -----------------------------------------------------------------


class DayTemplate:
    """The day's data built once per backend (SQLite: a file; PostgreSQL: a template database) with its
    documents, copied for each run: a file copy, or ``CREATE DATABASE ... TEMPLATE``, and hard links
    (the local store replaces files, it never writes into one)."""

    def __init__(self, root: Path, request: Any):
        self.root, self.request = root, request
        self.built: dict[str, tuple[str, Path]] = {}
        self.count = itertools.count()

    def _build(self, backend: str) -> tuple[str, Path]:
        if backend not in self.built:
            docs = self.root / f"{backend}-documents"
            if backend == "sqlite":
                path = self.root / "day-template.db"
                shutil.copyfile(self.request.getfixturevalue("sqlite_template"), path)
                url, ref = f"sqlite:///{path}", str(path)
            else:
                ref = f"day_tpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
                self.request.getfixturevalue("pg_cluster").execute(f"CREATE DATABASE {ref} TEMPLATE retroauth_template")
                url = self.request.getfixturevalue("pg_cluster").url(ref)
            engine = make_engine(url)
            build_day(engine, LocalStorage(docs))
            engine.dispose()  # a PostgreSQL template must have no connections
            if backend == "sqlite":  # everything into the one file that copies copy
                with contextlib.closing(sqlite3.connect(ref)) as conn:
                    conn.execute("PRAGMA journal_mode=DELETE")
            self.built[backend] = (ref, docs)
        return self.built[backend]

    def clone(self, backend: str, dest: Path) -> tuple[str, Path]:
        """A fresh copy of the day: (database URL, storage root)."""
        ref, docs = self._build(backend)
        dest.mkdir(parents=True, exist_ok=True)
        if backend == "sqlite":
            path = dest / "day.db"
            shutil.copyfile(ref, path)
            url = f"sqlite:///{path}"
        else:
            cluster = self.request.getfixturevalue("pg_cluster")
            name = f"day_{os.getpid()}_{next(self.count)}_{uuid.uuid4().hex[:6]}"
            cluster.execute(f"CREATE DATABASE {name} TEMPLATE {ref}")
            url = cluster.url(name)
        storage = dest / "storage"
        shutil.copytree(docs, storage, copy_function=os.link)
        return url, storage


# --- what the day left behind -----------------------------------------------------------------------------


def _norm_letter_hash(data: Any, encounter: str) -> str:
    """The letter's data hash with the ids that depend on insertion order replaced by the encounter."""
    d = data.model_dump(mode="json")
    d["case_id"] = encounter
    if d.get("appeal"):
        d["appeal"]["request_tracking_number"] = "<tracking>"
        d["appeal"]["denial"]["reference"] = "<reference>"
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def snapshot(engine: sa.Engine, library: RuleLibrary, *, exact: bool = True) -> dict:
    """Business content per encounter (source id): the case's state and values, its packet, letters,
    submissions, answers, appeals, authorizations, follow-ups and audit events; no timestamps, no run ids.
    ``exact``: also the values that embed database ids (case ids, data hashes, idempotency keys, auth
    numbers), which are equal when the rows were inserted in the same order (a fault-free run, SQLite)."""
    settings = load_settings()
    out: dict[str, dict] = {}
    with session_scope(engine) as s:
        enc_of = dict(s.execute(sa.select(RetroCase.id, Encounter.source_id)
                                .join(Encounter, Encounter.id == RetroCase.encounter_id)).all())
        per: dict[int, dict] = {cid: defaultdict(list) for cid in enc_of}
        for c in s.execute(sa.select(RetroCase)).scalars():
            per[c.id]["case"] = {
                "status": c.status, "payer": c.payer_id, "reason": c.reason, "delay": c.delay_reason_code,
                "due_at": c.due_at.astimezone(UTC).isoformat() if c.due_at else None, "rule": c.deadline_rule,
                "not_eligible_why": c.not_eligible_why, "priority": c.priority,
                "amount": str(Decimal(c.amount_at_risk).quantize(Decimal("0.01"))),
                "escalated": c.escalated_at is not None, **({"id": c.id} if exact else {})}
        for p in s.execute(sa.select(Packet)).scalars():
            per[p.case_id]["packet"] = {
                "version": p.version, "complete": p.complete, "missing": p.missing,
                "items": [(i["type"], i.get("status"), i.get("source")) for i in (p.manifest or {}).get("items", [])],
                **({"input_hash": p.input_hash} if exact else {})}
        letters = list(s.execute(sa.select(Letter).order_by(Letter.id)).scalars())
        data, failed = load_letter_data(s, settings, library, [LetterRequest(lt.case_id, lt.kind, lt.appeal_level)
                                                               for lt in letters])
        for lt in letters:
            req = LetterRequest(lt.case_id, lt.kind, lt.appeal_level)
            current = data.get(req)
            per[lt.case_id]["letters"].append({
                "kind": lt.kind, "level": lt.appeal_level, "version": lt.version, "template": lt.template_name,
                # the letter on file is the one its case's data calls for now (nothing half-updated)
                "data_is_current": current is not None and current.data_hash() == lt.data_hash,
                "data": _norm_letter_hash(current, enc_of[lt.case_id]) if current else failed.get(lt.case_id),
                # (an appeal's data names the payer's answer, whose reference hashes the time it was given)
                **({"data_hash": lt.data_hash, "pdf_sha256": lt.pdf_sha256} if exact and lt.kind == "request"
                   else {})})
        for sub in s.execute(sa.select(Submission).order_by(Submission.case_id, Submission.attempt)).scalars():
            per[sub.case_id]["submissions"].append({
                "kind": sub.kind, "attempt": sub.attempt, "channel": sub.channel, "status": sub.status,
                "tracked": sub.tracking_number is not None, "payload": sub.payload_key is not None,
                "error": sub.last_error, **({"key": sub.idempotency_key} if exact else {})})
        for r in s.execute(sa.select(PayerResponse, Submission.attempt)
                           .join(Submission, Submission.id == PayerResponse.submission_id)
                           .order_by(PayerResponse.id)).all():
            resp, attempt = r
            per[resp.case_id]["responses"].append({
                "attempt": attempt, "decision": resp.decision, "codes": resp.reason_codes,
                "certified": resp.certification_number is not None})
        for a in s.execute(sa.select(Appeal).order_by(Appeal.case_id, Appeal.level)).scalars():
            per[a.case_id]["appeals"].append({"level": a.level, "status": a.status, "codes": a.denial_codes,
                                              "filed": a.filed_at is not None, "decided": a.decided_at is not None})
        codes = defaultdict(list)
        for auth_id, cs, code in s.execute(sa.select(AuthorizationCode.authorization_id, AuthorizationCode.code_system,
                                                     AuthorizationCode.code)):
            codes[auth_id].append((cs, code))
        for a in s.execute(sa.select(Authorization).where(Authorization.case_id.is_not(None))
                           .order_by(Authorization.id)).scalars():
            per[a.case_id]["authorizations"].append({
                "status": a.status, "source": a.source, "starts": str(a.starts_on), "ends": str(a.ends_on),
                "codes": sorted(codes[a.id]), **({"number": a.auth_number} if exact else {})})
        for f in s.execute(sa.select(FollowUp).order_by(FollowUp.case_id, FollowUp.kind, FollowUp.id)).scalars():
            per[f.case_id]["follow_ups"].append({"kind": f.kind, "done": f.done_at is not None,
                                                 "outcome": f.outcome})
        for ev in s.execute(sa.select(CaseEvent).order_by(CaseEvent.id)).scalars():
            per[ev.case_id]["events"].append((ev.event, ev.from_status, ev.to_status))
    for cid, d in per.items():
        d["transitions"] = [(f, t) for e, f, t in d["events"] if e == "transition"]
        out[enc_of[cid]] = {k: (sorted(v, key=json.dumps) if k in ("letters", "follow_ups", "responses") else v)
                            for k, v in d.items()}
    return out


def check_integrity(engine: sa.Engine, storage: Any) -> list[str]:
    """What a half-written state would show: rows pointing at nothing, states without their audit event,
    work left pending. Returns the problems (codes and ids only); empty when consistent."""
    problems: list[str] = []

    def stored(k: str | None, sha: str | None = None) -> bool:
        try:
            data = storage.get(k)
        except Exception:  # noqa: BLE001 - missing or unreadable: reported
            return False
        return sha is None or sha256_hex(data) == sha

    with session_scope(engine) as s:
        for c in s.execute(sa.select(RetroCase)).scalars():
            events = list(s.execute(sa.select(CaseEvent.event, CaseEvent.from_status, CaseEvent.to_status)
                                    .where(CaseEvent.case_id == c.id).order_by(CaseEvent.id)).all())
            moves = [(f, t) for e, f, t in events if e == "transition"]
            chain = [moves[0][0]] + [t for _, t in moves] if moves else ["identified"]
            if any(a[1] != b[0] for a, b in zip(moves, moves[1:])):
                problems.append(f"case {c.id}: audit transitions do not chain")
            if chain[-1] != c.status:
                problems.append(f"case {c.id}: status {c.status} but the audit trail ends at {chain[-1]}")
            if len(set(moves)) != len(moves):
                problems.append(f"case {c.id}: a transition recorded twice")
        for lt in s.execute(sa.select(Letter)).scalars():
            if not stored(lt.pdf_key, lt.pdf_sha256) or not stored(lt.html_key):
                problems.append(f"letter {lt.id}: objects missing or different")
        for p in s.execute(sa.select(Packet)).scalars():
            if not stored(p.manifest_key):
                problems.append(f"packet {p.id}: manifest missing")
            for item in (p.manifest or {}).get("items", []):
                if item.get("storage_key") and not stored(item["storage_key"], item.get("sha256")):
                    problems.append(f"packet {p.id}: item {item.get('type')} missing or different")
        for sub in s.execute(sa.select(Submission)).scalars():
            if sub.status != "sent":
                problems.append(f"submission {sub.id}: {sub.status}")
            elif not stored(sub.payload_key):
                problems.append(f"submission {sub.id}: payload missing")
        approved = set(s.execute(sa.select(RetroCase.id).where(RetroCase.status == "approved")).scalars())
        authorized = set(s.execute(sa.select(Authorization.case_id)).scalars())
        if approved != authorized:
            problems.append(f"approved cases {sorted(approved)} but authorizations for {sorted(authorized)}")
        keys = [k for k, in s.execute(sa.select(Submission.idempotency_key))]
        if len(keys) != len(set(keys)):
            problems.append("an idempotency key used twice")
    return problems


def referenced_letter_objects(engine: sa.Engine) -> set[str]:
    with session_scope(engine) as s:
        return {k for lt in s.execute(sa.select(Letter)).scalars() for k in (lt.html_key, lt.pdf_key)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), sort_keys=True))

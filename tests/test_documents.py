"""Documentation packets: the right notes on the real Synthea export, generated evidence per reason,
missing documents that arrive later, reruns that write nothing, a flaky store, and the flow on a real
Prefect server. Every database test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import Session, select

from config import PAYERS_DIR
from retroauth.cases import Actor
from retroauth.db import make_engine, session_scope
from retroauth.documents import (
    DOCUMENT_WINDOW_AFTER, DOCUMENT_WINDOW_BEFORE, DocInfo, PacketsIncomplete, assemble, cases_needing_packets,
    document_window, manifest_bytes, match_document, relevant_sections,
)
from retroauth.ingest.fhir import import_fhir
from retroauth.models import (
    CaseEvent, CaseServiceLine, ClinicalDocument, Coverage, Diagnosis, Encounter, Packet, PayerOutage, RetroCase,
    ServiceLine,
)
from retroauth.rules import Documents, RuleLibrary, load_rule_library
from retroauth.storage import LocalStorage, Storage, key, sha256_hex
from retroauth.sweep import sweep
from retroauth.vocab import DELAY_REASON_CODES, MissReason
from tests.conftest import DATA, ROOT, SYNTHEA, table_counts
from tests.factories import CHI, add_encounter
from tests.faults import CountingStorage, FlakyStorage

AS_OF = datetime(2023, 3, 23, 6, tzinfo=CHI)
COVERAGE = ROOT / "examples" / "synthea-coverage.csv"
ACTOR = Actor(run_id=None, name="test")


# --- the Synthea export, imported and swept once per backend --------------------------------------------


@dataclass
class Synthea:
    url: str
    engine: sa.Engine
    storage: LocalStorage
    library: RuleLibrary


class _Templates:
    """One import + sweep per backend, cloned for each test (a file copy, or CREATE DATABASE ... TEMPLATE)."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, tuple[str, Path]] = {}  # backend -> (sqlite path or pg database, documents dir)

    def template(self, backend: str, request: pytest.FixtureRequest) -> tuple[str, Path]:
        if backend not in self.built:
            docs = self.root / f"{backend}-storage"
            if backend == "sqlite":
                path = self.root / "synthea.db"
                path.write_bytes(request.getfixturevalue("sqlite_template").read_bytes())
                url, ref = f"sqlite:///{path}", str(path)
            else:
                cluster = request.getfixturevalue("pg_cluster")
                cluster.execute("CREATE DATABASE synthea_docs_tpl TEMPLATE retroauth_template")
                url, ref = cluster.url("synthea_docs_tpl"), "synthea_docs_tpl"
            engine = make_engine(url)
            summary = import_fhir(engine, LocalStorage(docs), SYNTHEA, default_payer="synthea-demo-health",
                                  coverage_csv=COVERAGE)
            assert summary.error_count == 0
            sweep(engine, load_rule_library(PAYERS_DIR), as_of=AS_OF, lookback_days=20_000)
            engine.dispose()  # a PostgreSQL template must have no connections
            if backend == "sqlite":  # everything into the one file that clones copy
                with contextlib.closing(sqlite3.connect(ref)) as conn:
                    conn.execute("PRAGMA journal_mode=DELETE")
            self.built[backend] = (ref, docs)
        return self.built[backend]

    def clone(self, url: str, request: pytest.FixtureRequest, storage_dir: Path) -> None:
        """Make the (fresh, unopened) database at ``url`` and ``storage_dir`` a copy of the template."""
        parsed = make_url(url)
        backend = "sqlite" if parsed.get_backend_name() == "sqlite" else "postgres"
        ref, docs = self.template(backend, request)
        if backend == "sqlite":
            shutil.copyfile(ref, parsed.database)
        else:
            cluster = request.getfixturevalue("pg_cluster")
            cluster.execute(f"DROP DATABASE IF EXISTS {parsed.database}")
            cluster.execute(f"CREATE DATABASE {parsed.database} TEMPLATE {ref}")
        # Hard links: the store replaces files (write to temp, rename), so the template is never changed.
        shutil.copytree(docs, storage_dir, copy_function=os.link, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def synthea_templates(tmp_path_factory) -> _Templates:
    return _Templates(tmp_path_factory.mktemp("synthea-docs"))


@pytest.fixture
def synthea(db_url, synthea_templates, request, tmp_path) -> Synthea:
    """The swept Synthea export in this test's database (``db_url``) and in ``tmp_path/storage``,
    the same places ``app_env`` points the flows at."""
    synthea_templates.clone(db_url, request, tmp_path / "storage")
    engine = make_engine(db_url)
    yield Synthea(db_url, engine, LocalStorage(tmp_path / "storage"), wanting_evaluation_notes(load_rule_library(PAYERS_DIR)))
    engine.dispose()


def another_clone(synthea_templates: _Templates, request, db_url: str, tmp_path: Path) -> Synthea:
    """A second copy of the Synthea database beside the test's own."""
    parsed = make_url(db_url)
    if parsed.get_backend_name() == "sqlite":
        url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        name = f"other_{uuid.uuid4().hex[:12]}"
        request.getfixturevalue("pg_cluster").execute("CREATE DATABASE " + name + " TEMPLATE retroauth_template")
        url = str(parsed.set(database=name).render_as_string(hide_password=False))
    synthea_templates.clone(url, request, tmp_path / "other-storage")
    return Synthea(url, make_engine(url), LocalStorage(tmp_path / "other-storage"), load_rule_library(PAYERS_DIR))


def identified_ids(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(RetroCase.id).where(RetroCase.status == "identified")
                                 .order_by(RetroCase.id)).scalars())


def packets(engine: sa.Engine) -> dict[int, Packet]:
    with Session(engine) as s:
        return {p.case_id: p for p in s.exec(select(Packet))}


def events(engine: sa.Engine, case_id: int | None = None) -> list[CaseEvent]:
    with Session(engine) as s:
        q = select(CaseEvent).order_by(CaseEvent.id)
        if case_id is not None:
            q = q.where(CaseEvent.case_id == case_id)
        return list(s.exec(q))


def case_of(engine: sa.Engine, case_id: int) -> RetroCase:
    with Session(engine) as s:
        return s.get(RetroCase, case_id)


def included(manifest: dict, item_type: str) -> list[dict]:
    return [i for i in manifest["items"] if i["type"] == item_type and i["status"] == "included"]


def check_packet_integrity(engine: sa.Engine, storage: Storage, packet: Packet) -> None:
    """Every enclosed item's bytes match its sha256; the stored manifest is the row's, checksum recorded."""
    types = [i["type"] for i in packet.manifest["items"]]
    assert len(types) == len(set(types))  # one item per enclosure
    for item in packet.manifest["items"]:
        if item["status"] == "included":
            for obj in (item, item.get("data")):
                if obj:
                    assert len(storage.get(obj["storage_key"], sha256=obj["sha256"])) == obj["size"]
    stored = storage.get(packet.manifest_key)
    assert stored == manifest_bytes(packet.manifest)
    built = [e for e in events(engine, packet.case_id) if (e.details or {}).get("packet_version") == packet.version
             and "manifest_sha256" in e.details]
    assert built and built[-1].details["manifest_sha256"] == sha256_hex(stored)


def add_note(engine: sa.Engine, storage: Storage, encounter_id: int, loinc: str, text: str, *,
             authored: datetime | None = None, title: str | None = None, linked: bool = True) -> int:
    """A clinical document as an importer writes it: content first, then the row."""
    data = text.encode()
    source_id = uuid.uuid4().hex
    with session_scope(engine) as s:
        enc = s.get(Encounter, encounter_id)
        k = key("documents", enc.patient_id, f"{source_id}.txt")
        storage.put(k, data, content_type="text/plain; charset=utf-8")
        doc = ClinicalDocument(source_system="test", source_id=source_id, patient_id=enc.patient_id,
                               encounter_id=encounter_id if linked else None, loinc_type=loinc, title=title,
                               authored_at=authored or enc.admitted_at + timedelta(hours=1),
                               content_type="text/plain; charset=utf-8", storage_key=k, sha256=sha256_hex(data),
                               size_bytes=len(data))
        s.add(doc)
        s.flush()
        return doc.id


# --- pure matching rules ---------------------------------------------------------------------------------


def _doc(i: int, loinc: str, authored: datetime, encounter_id: int | None = None, title: str | None = None) -> DocInfo:
    return DocInfo(i, 1, encounter_id, loinc, title, authored, "text/plain", f"documents/1/{i}.txt", "0" * 64, 1)


def test_matching_prefers_the_encounters_own_note_then_the_latest_in_the_window():
    admitted = datetime(2026, 11, 13, 16, tzinfo=timezone.utc)
    discharged = admitted + timedelta(days=2)
    w = document_window(admitted, discharged, encounter_id=7)
    as_of = admitted + timedelta(days=60)
    hp = "34117-2"
    assert DOCUMENT_WINDOW_BEFORE == timedelta(days=3) and DOCUMENT_WINDOW_AFTER == timedelta(days=14)

    too_early = _doc(1, hp, admitted - timedelta(days=3, minutes=1), encounter_id=5)
    too_late = _doc(2, hp, discharged + timedelta(days=14, minutes=1))
    next_visit = _doc(7, hp, discharged + timedelta(days=2), encounter_id=8)  # about that visit, not this one
    assert match_document([too_early, too_late, next_visit], hp, w, as_of) is None
    pre_admission = _doc(3, hp, admitted - timedelta(days=2), encounter_id=5)  # the ED visit before
    late_signed = _doc(4, hp, discharged + timedelta(days=13))  # linked to no encounter
    assert match_document([pre_admission, too_late, next_visit], hp, w, as_of) == pre_admission
    assert match_document([pre_admission, late_signed, too_late], hp, w, as_of) == late_signed
    own_old = _doc(5, hp, admitted - timedelta(days=40), encounter_id=7)  # linked: any date
    assert match_document([pre_admission, late_signed, own_old], hp, w, as_of) == own_old
    own_new = _doc(6, hp, admitted + timedelta(hours=3), encounter_id=7)
    assert match_document([own_old, own_new, late_signed], hp, w, as_of) == own_new
    # Not written yet as of the run; another type; ties broken by id, not row order.
    assert match_document([own_new], hp, w, admitted) is None
    assert match_document([own_new], "34111-5", w, as_of) is None
    twin = _doc(9, hp, own_new.authored_at, encounter_id=7)
    assert match_document([twin, own_new], hp, w, as_of) == match_document([own_new, twin], hp, w, as_of) == twin
    # Evidence documents: open-ended after the stay, but the title must name them.
    notice = _doc(10, "51851-4", discharged + timedelta(days=50), title="Retroactive eligibility notice")
    consent = _doc(11, "51851-4", discharged + timedelta(days=55), title="Consent form")
    words = ("eligibility",)
    assert match_document([notice, consent], "51851-4", w, as_of, title_words=words, open_ended=True) == notice
    assert match_document([notice], "51851-4", w, as_of, title_words=words) is None


def test_relevant_sections_pick_assessment_plan_and_lines_naming_the_condition():
    markdown = ("2023-03-22\n\n# Chief Complaint\nNo complaints.\n\n# Social History\nPatient is married.\n"
                "Smokes daily, worried about headache at night.\n\n# Medications\nibuprofen 400 mg\n\n"
                "# Assessment and Plan\n\n## Plan\n\nThe following procedures were conducted:\n- MRI brain\n")
    got = relevant_sections(markdown, {"headache"})
    assert [s["heading"] for s in got] == ["Chief Complaint", "Social History", "Plan"]
    assert got[1]["text"] == "Smokes daily, worried about headache at night."
    assert "MRI brain" in got[2]["text"]
    plain = (ROOT / "examples" / "csv" / "documents" / "D5001.txt").read_text()
    got = relevant_sections(plain, {"stroke", "aphasia"})
    assert {"heading": "Assessment", "text": "acute ischemic stroke suspected. Admitted to the stroke unit.\n"
            "There was no time to request prior authorization before emergency care."} in got
    assert relevant_sections(plain, set()) == relevant_sections(plain, set())  # deterministic


# --- the real Synthea export ----------------------------------------------------------------------------------


def wanting_evaluation_notes(library: RuleLibrary) -> RuleLibrary:
    """The demo payer asking also for an evaluation + plan note (51847-2) for every service: Synthea
    codes its notes 51847-2 only as a second coding, which the importer does not keep, so every case
    waits for one - which is what these tests need to exercise the waiting and the note arriving."""
    payer = library["synthea-demo-health"]
    docs = Documents(**{**payer.documents.model_dump(),
                        "by_category": {c: ["51847-2"] for c in payer.categories()}})
    return RuleLibrary({**library, payer.id: payer.model_copy(update={"documents": docs})},
                       {pid: library.file_of(pid) for pid in library})


def test_synthea_packets_enclose_the_encounters_notes_and_list_the_case_services(synthea):
    ids = identified_ids(synthea.engine)
    assert len(ids) == 4 and cases_needing_packets(synthea.engine) == ids  # the others are not eligible

    result = assemble(synthea.engine, synthea.storage, synthea.library, ids, actor=ACTOR, as_of=AS_OF)
    assert (result.built, result.unchanged, result.failed, result.stale) == (4, 0, {}, 0)
    rows = packets(synthea.engine)
    assert sorted(rows) == ids

    for cid in ids:
        # (One short session at a time: on SQLite every transaction takes the write lock.)
        with Session(synthea.engine) as s:
            case = s.get(RetroCase, cid)
            hp = s.exec(select(ClinicalDocument).where(ClinicalDocument.encounter_id == case.encounter_id,
                                                       ClinicalDocument.loinc_type == "34117-2")).one()
            codes = s.exec(select(ServiceLine.code).join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
                           .where(CaseServiceLine.case_id == cid)).all()
        p = rows[cid]
        check_packet_integrity(synthea.engine, synthea.storage, p)
        # The H&P enclosed is the one of the case's own encounter (not a neighbour's in the window).
        [item] = included(p.manifest, "34117-2")
        assert (item["source"], item["sha256"], item["storage_key"]) == (hp.id, hp.sha256, hp.storage_key)
        assert sha256_hex(synthea.storage.get(hp.storage_key)) == hp.sha256
        # The summary lists exactly the case's services.
        summary = json.loads(synthea.storage.get(included(p.manifest, "case_summary")[0]["data"]["storage_key"]))
        assert sorted(x["code"] for x in summary["services"]) == sorted(codes)
        assert summary["coverage"]["member_id"] and summary["patient"]["family_name"]  # PHI lives here
        # The Synthea notes carry 51847-2 only as a second coding, which the importer does not keep.
        assert p.missing[0] == "51847-2" and not p.complete
        assert case.status == "awaiting_documentation" and result.missing[cid] == p.missing
        if case.reason == "delayed_insurance_verification":
            [timeline] = included(p.manifest, "coverage_discovery_timeline")
            timeline = json.loads(synthea.storage.get(timeline["data"]["storage_key"]))
            assert timeline["discovery_method"] == "eligibility_check"

    # The emergency delivery: its H&P is enclosed, the ED note is missing (none within the window:
    # the patient's ED-typed notes belong to prenatal visits 7 days and more before).
    [emergency] = [cid for cid in ids if case_of(synthea.engine, cid).reason == "emergency"]
    p = rows[emergency]
    assert p.missing == ["51847-2", "34111-5"]
    statement = synthea.storage.get(included(p.manifest, "medical_necessity")[0]["storage_key"]).decode()
    assert "cesarean section" in statement.lower() and "emergency care" in statement
    [ev] = [e for e in events(synthea.engine, emergency) if e.event == "transition"]
    assert (ev.from_status, ev.to_status, ev.details["missing"]) == ("identified", "awaiting_documentation",
                                                                     ["51847-2", "34111-5"])


def test_a_note_imported_later_makes_the_case_ready_and_rule_changes_reopen_it(synthea):
    ids = identified_ids(synthea.engine)
    assemble(synthea.engine, synthea.storage, synthea.library, ids, actor=ACTOR, as_of=AS_OF)
    cid = min(c for c in ids if packets(synthea.engine)[c].missing == ["51847-2"])
    case = case_of(synthea.engine, cid)
    assert case.status == "awaiting_documentation"

    # The evaluation + plan note arrives (an import, not a person touching the case).
    add_note(synthea.engine, synthea.storage, case.encounter_id, "51847-2",
             "Evaluation and plan\n\nAssessment: obstructive sleep apnea suspected, loud snoring.\n"
             "Plan: attended polysomnography.\n", title="Evaluation + Plan note")
    result = assemble(synthea.engine, synthea.storage, synthea.library, cases_needing_packets(synthea.engine),
                      actor=ACTOR, as_of=AS_OF)
    assert (result.built, result.unchanged, result.ready) == (1, 3, 1) and cid not in result.missing
    p = packets(synthea.engine)[cid]
    assert (p.version, p.complete, p.missing) == (2, True, [])
    assert case_of(synthea.engine, cid).status == "ready"
    check_packet_integrity(synthea.engine, synthea.storage, p)
    statement = synthea.storage.get(f"packets/{cid}/v2/medical_necessity.txt").decode()
    assert "obstructive sleep apnea suspected" in statement
    assert [(e.from_status, e.to_status) for e in events(synthea.engine, cid) if e.event == "transition"][-1] == \
        ("awaiting_documentation", "ready")

    # The payer now also wants a discharge summary: the ready case goes back to wait for it.
    payer = synthea.library["synthea-demo-health"]
    stricter = payer.model_copy(update={"documents": Documents(
        **{**payer.documents.model_dump(), "always": ["34117-2", "18842-5"]})})
    library = RuleLibrary({**synthea.library, "synthea-demo-health": stricter},
                          {pid: synthea.library.file_of(pid) for pid in synthea.library})
    result = assemble(synthea.engine, synthea.storage, library, [cid], actor=ACTOR, as_of=AS_OF)
    assert result.awaiting == 1 and result.missing == {cid: ["18842-5"]}
    assert case_of(synthea.engine, cid).status == "awaiting_documentation"
    # Back to the shipped rules: ready again, a new version (v1-v4 all kept in storage).
    assemble(synthea.engine, synthea.storage, synthea.library, [cid], actor=ACTOR, as_of=AS_OF)
    assert case_of(synthea.engine, cid).status == "ready" and packets(synthea.engine)[cid].version == 4


def test_rerun_with_unchanged_inputs_writes_nothing(synthea):
    ids = identified_ids(synthea.engine)
    assemble(synthea.engine, synthea.storage, synthea.library, ids, actor=ACTOR, as_of=AS_OF)
    counting = CountingStorage(synthea.storage)
    before = (table_counts(synthea.engine), {c: p.model_dump() for c, p in packets(synthea.engine).items()},
              [e.model_dump() for e in events(synthea.engine)])
    files = sorted(p for p in (synthea.storage.root / "packets").rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]

    again = assemble(synthea.engine, counting, synthea.library, cases_needing_packets(synthea.engine), actor=ACTOR,
                     as_of=AS_OF + timedelta(days=1))
    assert (again.built, again.unchanged, again.awaiting) == (0, 4, 4)
    assert counting.calls == {}  # not a put, not even a read of a note
    after = (table_counts(synthea.engine), {c: p.model_dump() for c, p in packets(synthea.engine).items()},
             [e.model_dump() for e in events(synthea.engine)])
    assert after == before
    assert sorted((synthea.storage.root / "packets").rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes


# --- evidence per reason, PHI, storage backends ---------------------------------------------------------------

# test-commercial with a documents section: a note per type, evidence per reason.
TEST_DOCUMENTS = Documents(
    always=["34117-2"],
    by_category={"advanced-imaging": ["18748-4"]},
    by_reason={
        MissReason.EMERGENCY: ["34111-5"],
        MissReason.SYSTEM_ISSUE: ["outage_record"],
        MissReason.ADMINISTRATIVE_ERROR: ["late_request_explanation"],
        MissReason.DELAYED_INSURANCE_VERIFICATION: ["coverage_discovery_timeline"],
        MissReason.RETROACTIVE_ELIGIBILITY: ["eligibility_notice"],
    },
)
T_AS_OF = datetime(2026, 11, 20, 6, tzinfo=CHI)
NOTE = ("Patient Jane Doe, 56 years old.\n\nHistory of present illness: worst headache of her life since this "
        "morning.\nAssessment: thunderclap headache, rule out mass.\nPlan: MRI brain with and without contrast.\n")


def commercial_library() -> RuleLibrary:
    lib = load_rule_library(DATA / "payers")
    payers = {pid: lib[pid] for pid in lib}
    payers["test-commercial"] = payers["test-commercial"].model_copy(update={"documents": TEST_DOCUMENTS})
    return RuleLibrary(payers, {pid: lib.file_of(pid) for pid in lib})


def make_case(engine: sa.Engine, storage: Storage, reason: MissReason, *, cls: str = "outpatient",
              notes: tuple[str, ...] = ("34117-2", "18748-4"), system_issue: str | None = None) -> int:
    """An encounter (MRI brain, a headache) with a case for ``reason`` and the notes of ``notes``."""
    eid = add_encounter(engine, cls=cls, pos="23" if cls == "emergency" else "22", system_issue=system_issue,
                        discovered=datetime(2026, 11, 16, 15, tzinfo=timezone.utc),
                        discovery="retroactive_eligibility" if reason == MissReason.RETROACTIVE_ELIGIBILITY
                        else "eligibility_check")
    with session_scope(engine) as s:
        enc = s.get(Encounter, eid)
        cov = s.exec(select(Coverage).where(Coverage.patient_id == enc.patient_id)).one()
        case = RetroCase(encounter_id=eid, payer_id="test-commercial", coverage_id=cov.id, reason=reason.value,
                         delay_reason_code=DELAY_REASON_CODES[reason], deadline_rule="test-commercial retro window")
        s.add(case)
        s.add(Diagnosis(encounter_id=eid, code_system="ICD10CM", code="R51.9", description="Headache, unspecified"))
        s.flush()
        for line in s.exec(select(ServiceLine).where(ServiceLine.encounter_id == eid)):
            s.add(CaseServiceLine(case_id=case.id, service_line_id=line.id, rule_category="advanced-imaging"))
        case_id = case.id
    for loinc in notes:
        add_note(engine, storage, eid, loinc, NOTE)
    return case_id


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    from retroauth.s3 import S3Storage

    return S3Storage(request.getfixturevalue("s3_bucket"), "retroauth",
                     endpoint_url=request.getfixturevalue("s3_server"))


def test_evidence_per_reason_and_documents_that_arrive_later(engine, any_storage, caplog):
    lib, store = commercial_library(), any_storage
    R = MissReason
    emergency = make_case(engine, store, R.EMERGENCY, cls="emergency", notes=("34117-2", "18748-4", "34111-5"))
    ticket = make_case(engine, store, R.SYSTEM_ISSUE, system_issue="INC-4711")
    outage = make_case(engine, store, R.SYSTEM_ISSUE)
    no_outage_payer = make_case(engine, store, R.SYSTEM_ISSUE)
    admin = make_case(engine, store, R.ADMINISTRATIVE_ERROR)
    discovered = make_case(engine, store, R.DELAYED_INSURANCE_VERIFICATION)
    retro = make_case(engine, store, R.RETROACTIVE_ELIGIBILITY)
    no_hp = make_case(engine, store, R.ADMINISTRATIVE_ERROR, notes=("18748-4",))
    with session_scope(engine) as s:
        s.add(PayerOutage(payer_id="test-commercial", reference="PORTAL-2026-11", description="provider portal down",
                          starts_at=datetime(2026, 11, 12, tzinfo=timezone.utc),
                          ends_at=datetime(2026, 11, 14, tzinfo=timezone.utc)))
        # The outage is the payer's: it covers every case of that payer whose stay it overlaps,
        # so the 'no outage' case is moved to a payer-free period.
        enc_id = s.get(RetroCase, no_outage_payer).encounter_id
        s.get(Encounter, enc_id).admitted_at = datetime(2026, 10, 1, 15, tzinfo=timezone.utc)
        # An administrative note that is not an eligibility notice must not count as one.
        retro_enc = s.get(RetroCase, retro).encounter_id
    add_note(engine, store, retro_enc, "51851-4", "Consent for MRI.", title="Consent form",
             authored=datetime(2026, 11, 14, tzinfo=timezone.utc))

    ids = [emergency, ticket, outage, no_outage_payer, admin, discovered, retro, no_hp]
    result = assemble(engine, store, lib, ids, actor=ACTOR, as_of=T_AS_OF)
    assert result.failed == {} and result.built == 8
    assert result.missing == {no_outage_payer: ["outage_record"], retro: ["eligibility_notice"], no_hp: ["34117-2"]}
    rows = packets(engine)
    for cid in ids:
        check_packet_integrity(engine, store, rows[cid])
    assert [i["type"] for i in rows[emergency].manifest["items"] if i["source"] != "generated"] == \
        ["34117-2", "18748-4", "34111-5"]

    def text(cid: int, item: str) -> str:
        return store.get(f"packets/{cid}/v{rows[cid].version}/{item}.txt").decode()

    assert "INC-4711" in text(ticket, "outage_record")
    assert "PORTAL-2026-11" in text(outage, "outage_record") and "INC-4711" not in text(outage, "outage_record")
    assert "delay reason 10" in text(admin, "late_request_explanation")
    assert "eligibility check" in text(discovered, "coverage_discovery_timeline")
    assert "thunderclap headache" in text(emergency, "medical_necessity")
    assert "R51.9" in text(emergency, "case_summary") and "70551" in text(emergency, "case_summary")

    # The eligibility notice comes weeks later; the next run finds it, nobody touches the case.
    add_note(engine, store, retro_enc, "51851-4", "Your enrollment is effective retroactively.",
             title="Retroactive eligibility notice", authored=datetime(2026, 11, 19, tzinfo=timezone.utc),
             linked=False)
    again = assemble(engine, store, lib, cases_needing_packets(engine), actor=ACTOR, as_of=T_AS_OF)
    assert (again.built, again.unchanged) == (1, 7)
    assert case_of(engine, retro).status == "ready" and packets(engine)[retro].version == 2
    assert [i["type"] for i in packets(engine)[retro].manifest["items"] if i["source"] not in ("generated", None)] \
        == ["34117-2", "18748-4", "eligibility_notice"]

    # PHI stays in storage: events, results, exceptions and logs carry ids, codes and keys only.
    with Session(engine) as s:
        member_ids = [c.member_id for c in s.exec(select(Coverage))]
    assert "Jane" in text(emergency, "case_summary") and member_ids[0] in text(emergency, "case_summary")
    audit = json.dumps([e.model_dump(mode="json") for e in events(engine)])
    said = " ".join([audit, json.dumps(result.as_dict()), json.dumps(again.as_dict()),
                     str(PacketsIncomplete({ticket: "StorageError"})), caplog.text])
    for phi in ("Doe", "Jane", "headache", "1970", *member_ids):
        assert not re.search(rf"\b{re.escape(phi)}\b", said), phi


class _Down:
    """A store that is down: every call fails, naming the key as S3Storage does."""

    def __getattr__(self, name: str):
        def fail(k: str = "", *a: object, **kw: object) -> None:
            from retroauth.storage import StorageError

            raise StorageError(f"S3 {name} of {k} failed: ServiceUnavailable")
        return fail


def test_storage_down_fails_the_cases_without_patient_data_and_writes_no_rows(engine, tmp_path):
    store = LocalStorage(tmp_path / "storage")
    ids = [make_case(engine, store, MissReason.EMERGENCY, cls="emergency") for _ in range(2)]
    before = table_counts(engine)
    result = assemble(engine, _Down(), commercial_library(), ids, actor=ACTOR, as_of=T_AS_OF)
    assert result.failed == {ids[0]: "StorageError", ids[1]: "StorageError"} and result.built == 0
    assert table_counts(engine) == before  # no packet row points at nothing
    message = str(PacketsIncomplete(result.failed))
    assert message == f"packets not built for 2 case(s): {ids[0]} (StorageError), {ids[1]} (StorageError); safe to retry"


class _MovedWhileWriting(CountingStorage):
    """On the first put, someone else re-evaluates the case (as the sweep does: a new version)."""

    def __init__(self, inner: Storage, engine: sa.Engine, case_id: int):
        super().__init__(inner)
        self.engine, self.case_id = engine, case_id

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        if not self.calls["put"]:
            with session_scope(self.engine) as s:
                s.execute(sa.update(RetroCase).where(RetroCase.id == self.case_id)
                          .values(version=RetroCase.version + 1, deadline_rule="re-evaluated"))
        return super().put(key, data, content_type)


def test_a_case_changed_while_its_packet_was_written_is_left_for_the_next_run(engine, tmp_path):
    store = LocalStorage(tmp_path / "storage")
    cid = make_case(engine, store, MissReason.ADMINISTRATIVE_ERROR)
    result = assemble(engine, _MovedWhileWriting(store, engine, cid), commercial_library(), [cid], actor=ACTOR,
                      as_of=T_AS_OF)
    assert (result.stale, result.built) == (1, 0) and packets(engine) == {}
    assert case_of(engine, cid).status == "identified"
    again = assemble(engine, store, commercial_library(), [cid], actor=ACTOR, as_of=T_AS_OF)
    assert again.built == again.ready == 1
    assert "re-evaluated" in store.get(f"packets/{cid}/v1/late_request_explanation.txt").decode()


def test_a_flaky_store_ends_with_every_packet_complete_once_and_intact(engine, tmp_path):
    store = LocalStorage(tmp_path / "storage")
    lib = commercial_library()
    reasons = [MissReason.EMERGENCY, MissReason.ADMINISTRATIVE_ERROR, MissReason.DELAYED_INSURANCE_VERIFICATION]
    ids = [make_case(engine, store, reasons[i % 3], cls="emergency" if i % 3 == 0 else "outpatient",
                     notes=("34117-2", "18748-4", "34111-5"))
           for i in range(12)]
    flaky = FlakyStorage(store, rate=0.2, seed=20261127)
    attempts, results = 0, []
    pending = list(ids)
    while pending:
        attempts += 1
        assert attempts <= 40, "never converged"
        r = assemble(engine, flaky, lib, pending, actor=ACTOR, as_of=T_AS_OF)  # what the task retry does
        results.append(r)
        pending = sorted(r.failed)
    assert attempts > 1 and set(flaky.faults) == {"503", "reset", "slow", "lost_ack"}  # the faults did happen
    assert sum(r.built for r in results) == 12  # each packet built once: a failed case wrote no row

    rows = packets(engine)
    assert sorted(rows) == ids
    for cid in ids:
        p = rows[cid]
        assert (p.version, p.complete, p.missing) == (1, True, [])
        assert case_of(engine, cid).status == "ready"
        check_packet_integrity(engine, store, p)  # read through the plain store: nothing corrupt
        assert [(e.from_status, e.to_status) for e in events(engine, cid) if e.event == "transition"] == \
            [("identified", "ready")]
    expected = {k for p in rows.values() for i in p.manifest["items"] if i["source"] == "generated"
                for k in (i["storage_key"], i["data"]["storage_key"])} | {p.manifest_key for p in rows.values()}
    assert set(store.list("packets")) == expected  # one version per case, no strays

    # Once done, a rerun through the flaky store is a no-op that never even calls it.
    counting = CountingStorage(flaky)
    assert assemble(engine, counting, lib, ids, actor=ACTOR, as_of=T_AS_OF).unchanged == 12
    assert counting.calls == {}


def test_the_task_retries_with_backoff_and_jitter():
    from tasks.documents import assemble_batch

    assert assemble_batch.retries >= 3 and assemble_batch.retry_jitter_factor
    delays = assemble_batch.retry_delay_seconds
    assert delays == sorted(delays) and delays[0] < delays[-1]


# --- the flow on a real Prefect server ----------------------------------------------------------------------------


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.mark.usefixtures("prefect_server", "app_env")
def test_the_flow_in_small_batches_gives_the_direct_result(synthea, synthea_templates, request, db_url, tmp_path):
    from flows.assemble import assemble_documentation

    state = assemble_documentation(batch_size=3, as_of=AS_OF, return_state=True)
    summary = state.result()
    assert (summary["built"], summary["awaiting"], summary["failed"]) == (4, 1, {})  # with the shipped rules only the emergency delivery waits (for its ED note)

    direct_db = another_clone(synthea_templates, request, db_url, tmp_path)
    try:
        assemble(direct_db.engine, direct_db.storage, direct_db.library, identified_ids(direct_db.engine),
                 actor=ACTOR, as_of=AS_OF)

        def essence(engine: sa.Engine) -> dict:
            return {c: (p.version, p.input_hash, p.manifest, p.manifest_key, p.complete, p.missing)
                    for c, p in packets(engine).items()}

        assert essence(synthea.engine) == essence(direct_db.engine)
        assert sorted(p.relative_to(tmp_path / "storage") for p in (tmp_path / "storage" / "packets").rglob("*")) == \
            sorted(p.relative_to(tmp_path / "other-storage") for p in (tmp_path / "other-storage" / "packets").rglob("*"))
    finally:
        direct_db.engine.dispose()

    run_id = str(state.state_details.flow_run_id)
    assert {e.run_id for e in events(synthea.engine) if e.event == "transition" and e.to_status ==
            "awaiting_documentation"} == {run_id}
    [artifact] = [a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))
                  if a.key == "documentation-packets"]
    assert "34111-5" in artifact.data  # the emergency delivery still lacks its ED note
    with Session(synthea.engine) as s:
        member_ids = set(s.exec(select(Coverage.member_id)))
    assert not any(m in artifact.data for m in member_ids)

    # A second run changes nothing.
    before = table_counts(synthea.engine)
    assert assemble_documentation(batch_size=3, as_of=AS_OF)["unchanged"] == 4
    assert table_counts(synthea.engine) == before

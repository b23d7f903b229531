"""The FHIR bulk import: the real Synthea export, re-imports, bad lines, coverage sources, upsert.

Every test runs on SQLite and on the real PostgreSQL the suite starts (the ``engine`` fixture).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import base64
import copy
import hashlib
import json
import logging
import time
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from retroauth.db import session_scope
from retroauth.ingest import ImportSummary, IngestError, import_fhir, upsert
from retroauth.ingest.fhir import demo_member_id, parse_ref
from retroauth.models import ClinicalDocument, Coverage, Encounter, Patient
from retroauth.storage import LocalStorage, StoredObject
from tests.conftest import DATA, SYNTHEA, table_counts

BAD = DATA / "fhir" / "bad"
SYNTHEA_TABLES = ("patients", "coverages", "encounters", "service_lines", "diagnoses", "clinical_documents")


class CountingStorage:
    """LocalStorage that counts writes: a re-import must not write a document again."""

    def __init__(self, root: Path):
        self.inner = LocalStorage(root)
        self.puts = 0

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        self.puts += 1
        return self.inner.put(key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(engine: sa.Engine, tables: tuple[str, ...] = SYNTHEA_TABLES) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            name: [tuple(r) for r in conn.execute(sa.select(t).order_by(t.c.id))]
            for name, t in SQLModel.metadata.tables.items()
            if name in tables
            for t in [t]
        }


def assert_clean(summary: ImportSummary) -> None:
    assert summary.problems == [], [str(p) for p in summary.problems]


# --- the real export ----------------------------------------------------------------------------


def test_synthea_import_then_reimport_changes_nothing(engine, tmp_path):
    storage = CountingStorage(tmp_path / "objects")
    started = time.perf_counter()
    summary = import_fhir(engine, storage, SYNTHEA, default_payer="synthea-demo-health")
    first_seconds = time.perf_counter() - started
    assert_clean(summary)

    counts = table_counts(engine)
    assert counts["patients"] == 13
    assert counts["encounters"] == 1215
    assert counts["service_lines"] == 2056  # every Procedure has an encounter
    assert counts["diagnoses"] == 555  # every Condition has an encounter, no code repeats on one
    assert counts["clinical_documents"] == 1215
    assert counts["coverages"] == 13
    assert summary.counts["Encounter"].inserted == 1215
    assert summary.ignored["MedicationRequest"] > 0 and "log" not in summary.ignored
    assert storage.puts == summary.documents_written == 1215

    with engine.connect() as conn:
        def one(sql: str) -> Any:
            return conn.execute(sa.text(sql)).scalar()

        def grouped(sql: str) -> dict[Any, int]:
            return dict(conn.execute(sa.text(sql)).all())

        classes = grouped("SELECT encounter_class, count(*) FROM encounters GROUP BY encounter_class")
        assert classes == {"outpatient": 1133, "inpatient": 49, "emergency": 23, "home_health": 9, "virtual": 1}
        pos = grouped("SELECT place_of_service, count(*) FROM encounters GROUP BY place_of_service")
        assert pos == {"11": 1133, "21": 49, "23": 23, "12": 9, "02": 1}
        assert one("SELECT count(*) FROM encounters WHERE admission_type = 'emergency'") == 23
        assert one("SELECT count(*) FROM encounters WHERE facility_name IS NULL") == 0
        assert grouped("SELECT timezone, count(*) FROM encounters GROUP BY timezone") == {"America/Chicago": 1215}
        # Conditional references resolved: Practitioner?identifier=...us-npi|... on every encounter.
        assert one("SELECT count(*) FROM service_lines WHERE rendering_npi IS NULL") == 0
        assert one("SELECT count(*) FROM clinical_documents WHERE author IS NULL") == 0
        # Line numbers are 1..n within each encounter.
        assert one("SELECT count(*) FROM (SELECT encounter_id FROM service_lines GROUP BY encounter_id "
                   "HAVING min(line_number) <> 1 OR max(line_number) <> count(*)) g") == 0  # fmt: skip
        assert grouped("SELECT code_system, count(*) FROM service_lines GROUP BY code_system") == {"SNOMED": 2056}

    # The service date is the local date of the procedure's start in the encounter's time zone.
    procedure = next(p for p in lines(SYNTHEA / "Procedure.000.ndjson") if p["performedPeriod"]["start"][11:13] == "23")
    with engine.connect() as conn:
        service_date = conn.execute(sa.text("SELECT service_date FROM service_lines WHERE source_id = :s"),
                                    {"s": procedure["id"]}).scalar_one()  # fmt: skip
    start = datetime.fromisoformat(procedure["performedPeriod"]["start"])  # 23:xx at -04:00/-05:00
    assert str(service_date) == str(start.date())  # Eastern 23:xx is Central 22:xx: same day

    # Every document's bytes are in storage, with the checksum of the decoded attachment.
    expected = {
        d["id"]: hashlib.sha256(base64.b64decode(d["content"][0]["attachment"]["data"])).hexdigest()
        for d in lines(SYNTHEA / "DocumentReference.000.ndjson")
    }
    with engine.connect() as conn:
        docs = conn.execute(sa.select(ClinicalDocument.__table__)).mappings().all()
    assert {d["source_id"]: d["sha256"] for d in docs} == expected
    for d in docs[:50]:
        data = storage.get(d["storage_key"], sha256=d["sha256"])
        assert len(data) == d["size_bytes"]
        assert d["storage_key"].startswith(f"documents/{d['patient_id']}/")
        assert d["source_id"] not in d["storage_key"]
    assert {d["loinc_type"] for d in docs} == {"34117-2", "34111-5"}
    assert all(d["encounter_id"] is not None for d in docs)

    # Again, in other batch sizes: nothing inserted, nothing updated, nothing written to storage.
    before, before_counts = snapshot(engine), table_counts(engine)
    started = time.perf_counter()
    again = import_fhir(engine, storage, SYNTHEA, default_payer="synthea-demo-health", batch_size=97)
    second_seconds = time.perf_counter() - started
    assert_clean(again)
    assert table_counts(engine) == before_counts
    assert snapshot(engine) == before
    assert storage.puts == 1215 and again.documents_written == 0 and again.documents_unchanged == 1215
    for name, c in again.counts.items():
        assert c.inserted == 0 and c.updated == 0, name
    assert again.counts["Procedure"].unchanged == 2056
    print(f"\n[{engine.dialect.name}] synthea-10 import {first_seconds:.2f}s, re-import {second_seconds:.2f}s")


# --- bad lines ----------------------------------------------------------------------------------


def test_bad_lines_are_reported_and_the_rest_imported(engine, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="retroauth.ingest")
    summary = import_fhir(engine, LocalStorage(tmp_path / "objects"), BAD)

    found = {(p.file, p.line, p.resource.split("/")[0], p.field) for p in summary.problems}
    assert found == {
        ("Patient.000.ndjson", 2, "Patient", "(json)"),
        ("Encounter.000.ndjson", 2, "Encounter", "period"),
        ("Encounter.000.ndjson", 4, "Encounter", "period.start"),
        ("Procedure.000.ndjson", 4, "Procedure", "encounter"),
        ("Procedure.000.ndjson", 5, "Procedure", "code.coding.code"),
        ("Condition.000.ndjson", 2, "Condition", "encounter"),
        ("DocumentReference.000.ndjson", 2, "DocumentReference", "content[0].attachment.data"),
    }
    by_file = {p.file: p for p in summary.problems if p.line != 5}
    assert by_file["Procedure.000.ndjson"].resource == "Procedure/bad-procedure-1"
    assert "not found" in by_file["Procedure.000.ndjson"].message
    assert "base64" in by_file["DocumentReference.000.ndjson"].message

    counts = table_counts(engine)
    assert (counts["patients"], counts["encounters"], counts["service_lines"]) == (1, 2, 3)
    assert (counts["diagnoses"], counts["clinical_documents"], counts["coverages"]) == (1, 1, 0)
    assert summary.counts["Encounter"].errors == 2 and summary.counts["Encounter"].inserted == 2
    assert summary.counts["Procedure"].errors == 2 and summary.counts["Procedure"].inserted == 3
    assert summary.error_count == 7
    assert len([r for r in caplog.records if "import problem" in r.getMessage()]) == 7
    assert "check digit" in next(p for p in summary.problems if p.line == 5 and p.file.startswith("Proc")).message

    # The same bad export again: the same problems, and nothing else changes.
    before = snapshot(engine)
    again = import_fhir(engine, LocalStorage(tmp_path / "objects"), BAD)
    assert {(p.file, p.line, p.field) for p in again.problems} == {(f, n, fld) for f, n, _, fld in found}
    assert snapshot(engine) == before


def test_problems_and_logs_carry_no_patient_data(engine, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    summary = import_fhir(engine, LocalStorage(tmp_path / "objects"), BAD)
    assert summary.problems
    patient = json.loads((BAD / "Patient.000.ndjson").read_text().splitlines()[0])
    name = patient["name"][0]
    note = base64.b64decode(lines(BAD / "DocumentReference.000.ndjson")[0]["content"][0]["attachment"]["data"]).decode()
    secrets = [name["family"], *name["given"], patient["birthDate"], patient["telecom"][0]["value"],
               patient["address"][0]["line"][0], note.strip().splitlines()[0]]  # fmt: skip
    text = "\n".join(str(p) for p in summary.problems) + "\n" + caplog.text + json.dumps(summary.as_dict())
    for secret in secrets:
        assert secret not in text


def test_missing_directory_and_bad_options_raise_ingest_error(engine, tmp_path):
    with pytest.raises(IngestError):
        import_fhir(engine, LocalStorage(tmp_path / "o"), tmp_path / "nope")
    with pytest.raises(IngestError):
        import_fhir(engine, LocalStorage(tmp_path / "o"), BAD, default_timezone="Mars/Olympus")
    with pytest.raises(IngestError):
        import_fhir(engine, LocalStorage(tmp_path / "o"), BAD, coverage_csv=tmp_path / "missing.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("patient,payer\np1,x\n")
    with pytest.raises(IngestError, match="missing columns"):
        import_fhir(engine, LocalStorage(tmp_path / "o"), BAD, coverage_csv=wrong)
    assert sum(table_counts(engine).values()) == 0  # refused before anything was imported


# --- coverage, claims, time zones: a small export built from fixture lines -----------------------

PAYERS = {"https://example.org/payers|EHP": "example-health"}


def first_line(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text().splitlines()[0])


def write_export(directory: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    directory.mkdir(exist_ok=True)
    for rtype, resources in files.items():
        (directory / f"{rtype}.000.ndjson").write_text("".join(json.dumps(r) + "\n" for r in resources))


def small_export() -> dict[str, list[dict[str, Any]]]:
    """One Synthea patient, one visit with two procedures and a note, plus what Synthea leaves out:
    a payer Organization, a Coverage, a Claim with charges, a Location with a time zone and a type."""
    encounter = first_line(BAD / "Encounter.000.ndjson")
    encounter["class"]["code"] = "AMB"  # an ambulatory visit at a hospital location
    encounter["location"] = [{"location": {"reference": "Location?identifier=https://example.org/locations|L1"}}]
    patient = first_line(BAD / "Patient.000.ndjson")
    procedures = [p for p in lines(BAD / "Procedure.000.ndjson")
                  if p["encounter"]["reference"] == f"Encounter/{encounter['id']}" and not p["id"].startswith("bad-")]  # fmt: skip
    location = {
        "resourceType": "Location", "id": "loc-1", "name": "GENERAL HOSPITAL",
        "identifier": [{"system": "https://example.org/locations", "value": "L1"}],
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "HOSP"}]}],
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/timezone", "valueCode": "America/Denver"}],
    }  # fmt: skip
    payer = {"resourceType": "Organization", "id": "payer-1", "name": "Example Health Plan",
             "identifier": [{"system": "https://example.org/payers", "value": "EHP"}]}  # fmt: skip
    coverage = {
        "resourceType": "Coverage", "id": "cov-1", "status": "active",
        "subscriberId": "EHP123456", "beneficiary": {"reference": f"Patient/{patient['id']}"},
        "period": {"start": "2020-01-01"}, "payor": [{"reference": "Organization/payer-1"}],
        "class": [{"type": {"coding": [{"code": "plan"}]}, "value": "GOLD", "name": "Gold PPO"},
                  {"type": {"coding": [{"code": "group"}]}, "value": "G-77"}],
    }  # fmt: skip
    claim = {
        "resourceType": "Claim", "id": "claim-1", "status": "active", "use": "claim",
        "patient": {"reference": f"Patient/{patient['id']}"},
        "procedure": [{"sequence": i + 1, "procedureReference": {"reference": f"Procedure/{p['id']}"}}
                      for i, p in enumerate(procedures)],
        "item": [{"sequence": 1, "productOrService": {"text": "visit"}, "net": {"value": 120.0}}]
        + [{"sequence": i + 2, "procedureSequence": [i + 1], "net": {"value": 250.5 + i}}
           for i in range(len(procedures))],
    }  # fmt: skip
    return {
        "Patient": [patient], "Encounter": [encounter], "Procedure": procedures, "Location": [location],
        "Organization": [payer], "Coverage": [coverage], "Claim": [claim],
        "DocumentReference": [first_line(BAD / "DocumentReference.000.ndjson")],
    }  # fmt: skip


def test_coverage_claim_location_timezone(engine, tmp_path):
    files = small_export()
    write_export(tmp_path / "export", files)
    storage = CountingStorage(tmp_path / "objects")
    summary = import_fhir(engine, storage, tmp_path / "export", payer_map=PAYERS)
    assert_clean(summary)
    with engine.connect() as conn:
        cov = conn.execute(sa.select(Coverage.__table__)).mappings().one()
        enc = conn.execute(sa.select(Encounter.__table__)).mappings().one()
        charges = dict(conn.execute(sa.text("SELECT source_id, charge FROM service_lines")).all())
    assert (cov["payer_id"], cov["member_id"]) == ("example-health", "EHP123456")
    assert (cov["plan_name"], cov["group_number"]) == ("Gold PPO", "G-77")
    assert cov["effective_from"] == date(2020, 1, 1) and cov["discovery_method"] == "on_file"
    assert enc["timezone"] == "America/Denver"  # from the Location's extension
    assert enc["place_of_service"] == "22"  # ambulatory at a hospital location: outpatient hospital
    start = datetime.fromisoformat(files["Encounter"][0]["period"]["start"])
    assert enc["admitted_at"] == start.astimezone(timezone.utc)
    assert {Decimal(str(v)) for v in charges.values()} == {Decimal("250.50"), Decimal("251.50")}
    assert summary.counts["Claim"].updated == 1

    before = snapshot(engine)
    again = import_fhir(engine, storage, tmp_path / "export", payer_map=PAYERS)
    assert_clean(again)
    assert snapshot(engine) == before  # the Procedure upsert leaves the Claim's charges alone
    assert again.counts["Claim"].unchanged == 1 and again.counts["Coverage"].unchanged == 1

    # Without a mapping for the payor, the Coverage is a problem naming the field, not a guess.
    unmapped = import_fhir(engine, storage, tmp_path / "export")
    assert [(p.resource, p.field) for p in unmapped.problems] == [("Coverage/cov-1", "payor[0]")]


def test_a_later_export_appends_lines_and_replaces_changed_content(engine, tmp_path):
    files = small_export()
    write_export(tmp_path / "export", files)
    storage = CountingStorage(tmp_path / "objects")
    import_fhir(engine, storage, tmp_path / "export", payer_map=PAYERS)
    with engine.connect() as conn:
        numbers = dict(conn.execute(sa.text("SELECT source_id, line_number FROM service_lines")).all())
    assert sorted(numbers.values()) == [1, 2]

    # A procedure performed before the others arrives later; a note is amended.
    early = copy.deepcopy(files["Procedure"][0])
    early["id"] = "late-arrival"
    early["performedPeriod"]["start"] = files["Encounter"][0]["period"]["start"]
    files["Procedure"].append(early)
    files["DocumentReference"][0]["content"][0]["attachment"]["data"] = base64.b64encode(b"amended note").decode()
    write_export(tmp_path / "export", files)
    puts = storage.puts
    summary = import_fhir(engine, storage, tmp_path / "export", payer_map=PAYERS)
    assert_clean(summary)
    with engine.connect() as conn:
        after = dict(conn.execute(sa.text("SELECT source_id, line_number FROM service_lines")).all())
        doc = conn.execute(sa.select(ClinicalDocument.__table__)).mappings().one()
    assert after == {**numbers, "late-arrival": 3}  # numbers already given are never moved
    assert summary.counts["DocumentReference"].updated == 1 and storage.puts == puts + 1
    assert storage.get(doc["storage_key"], sha256=doc["sha256"]) == b"amended note"
    assert doc["size_bytes"] == len(b"amended note")


def test_a_row_the_database_rejects_does_not_stop_its_batch(engine, tmp_path, monkeypatch):
    import retroauth.ingest.fhir as fhir

    real_upsert = fhir.upsert

    def picky_upsert(session, model, rows, *args, **kwargs):  # noqa: ANN001, ANN202
        if model is Encounter and any(r["source_id"] == lines(BAD / "Encounter.000.ndjson")[2]["id"] for r in rows):
            raise sa.exc.IntegrityError("INSERT ...", {}, Exception("simulated"))
        return real_upsert(session, model, rows, *args, **kwargs)

    monkeypatch.setattr(fhir, "upsert", picky_upsert)
    summary = import_fhir(engine, LocalStorage(tmp_path / "objects"), BAD)
    rejected = [p for p in summary.problems if p.field == "(row)"]
    assert [(p.file, p.line) for p in rejected] == [("Encounter.000.ndjson", 3)]
    assert "simulated" not in rejected[0].message
    assert table_counts(engine)["encounters"] == 1  # the other valid encounter of the batch


def test_coverage_csv_and_default_payer(engine, tmp_path):
    files = small_export()
    del files["Coverage"], files["Claim"]
    write_export(tmp_path / "export", files)
    pid = files["Patient"][0]["id"]
    csv_path = tmp_path / "coverage.csv"
    csv_path.write_text(
        "patient_source_id,payer_id,member_id,plan_name,effective_from,effective_to,discovered_at,discovery_method\n"
        f"{pid},priority-health,MEM0001,Silver,2024-01-01,,2024-03-05T10:00:00-06:00,eligibility_check\n"
        f"{pid},priority-health,MEM0001,Silver,2023-01-01,2023-12-31,,\n"
        "no-such-patient,priority-health,MEM0002,,2024-01-01,,,\n"
        f"{pid},priority-health,MEM0003,,2024-02-30,,,\n"
        f"{pid},priority-health,MEM0004,,2024-01-01,,,guessed\n"
    )
    summary = import_fhir(engine, LocalStorage(tmp_path / "objects"), tmp_path / "export",
                          coverage_csv=csv_path, default_payer="synthea-demo-health")  # fmt: skip
    problems = {(p.file, p.line, p.field) for p in summary.problems}
    assert problems == {
        ("coverage.csv", 4, "patient_source_id"),
        ("coverage.csv", 5, "effective_from"),
        ("coverage.csv", 6, "discovery_method"),
    }
    assert all("MEM000" not in str(p) for p in summary.problems)
    table = Coverage.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).order_by(table.c.effective_from)).mappings().all()
    assert [(r["payer_id"], r["effective_from"]) for r in rows] == [
        ("priority-health", date(2023, 1, 1)),
        ("priority-health", date(2024, 1, 1)),
    ]
    assert rows[1]["discovered_at"] == datetime(2024, 3, 5, 16, 0, tzinfo=timezone.utc)
    assert rows[1]["discovery_method"] == "eligibility_check"
    # No discovered_at: the patient's first encounter.
    first_visit = datetime.fromisoformat(files["Encounter"][0]["period"]["start"])
    assert rows[0]["discovered_at"] == first_visit.astimezone(timezone.utc)
    assert summary.counts["default_coverage"].skipped == 1  # the CSV's coverage wins over the default


def test_default_payer_gives_deterministic_coverage(engine, tmp_path):
    files = small_export()
    del files["Coverage"]
    write_export(tmp_path / "export", files)
    calls: list[tuple[str, int]] = []
    summary = import_fhir(engine, LocalStorage(tmp_path / "o"), tmp_path / "export",
                          default_payer="synthea-demo-health",
                          progress=lambda rtype, done: calls.append((rtype, done)))  # fmt: skip
    assert_clean(summary)
    with engine.connect() as conn:
        cov = conn.execute(sa.select(Coverage.__table__)).mappings().one()
    assert cov["member_id"] == demo_member_id(files["Patient"][0]["id"]) and cov["member_id"].startswith("DEMO")
    first_visit = datetime.fromisoformat(files["Encounter"][0]["period"]["start"])
    # covered from the first visit's local date (America/Chicago by default)
    assert cov["effective_from"] == first_visit.astimezone(ZoneInfo("America/Chicago")).date()
    assert cov["effective_to"] is None
    assert cov["discovered_at"] == first_visit.astimezone(timezone.utc)
    assert ("Patient", 1) in calls and ("Encounter", 1) in calls and ("default_coverage", 1) in calls


# --- references and upsert ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ({"reference": "Patient/123"}, ("Patient", "123", None, None)),
        ({"reference": "https://ehr.example/fhir/Encounter/9/_history/2"}, ("Encounter", "9", None, None)),
        ({"reference": "urn:uuid:abc-1"}, (None, "abc-1", None, None)),
        ({"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999974493"},
         ("Practitioner", None, "http://hl7.org/fhir/sid/us-npi", "9999974493")),
        ({"reference": "Organization?identifier=https%3A%2F%2Fx.org%7C42"},
         ("Organization", None, "https://x.org", "42")),
        ({"reference": "Location?identifier=L7"}, ("Location", None, None, "L7")),
        ({"type": "Organization", "identifier": {"system": "s", "value": "v"}}, ("Organization", None, "s", "v")),
        ({"reference": "#contained"}, None),
        ("Patient/1", None),
    ],
)  # fmt: skip
def test_parse_ref(reference, expected):
    assert parse_ref(reference) == (expected and tuple(expected))


def test_upsert_inserts_updates_and_leaves_equal_rows_alone(engine):
    def patient(source_id: str, family: str, **extra: Any) -> dict[str, Any]:
        return {"source_system": "t", "source_id": source_id, "family_name": family, "given_name": "A", **extra}

    with session_scope(engine) as s:
        first = upsert(s, Patient, [patient("1", "X"), patient("2", "Y"), patient("2", "Z")])
    assert len(first) == 2 and first.inserted == {("t", "1"), ("t", "2")}
    with session_scope(engine) as s:
        second = upsert(s, Patient, [patient("1", "X"), patient("2", "W"), patient("3", "V")])
    assert second.unchanged == {("t", "1")} and second.updated == {("t", "2")} and second.inserted == {("t", "3")}
    assert second[("t", "1")] == first[("t", "1")]
    with session_scope(engine) as s:
        third = upsert(s, Patient, [patient("2", "Q")], update=False)
        kept = upsert(s, Patient, [patient("3", "V", mrn="M1")], update=["mrn"])
    assert third.unchanged == {("t", "2")} and kept.updated == {("t", "3")}
    with engine.connect() as conn:
        names = dict(conn.execute(sa.text("SELECT source_id, family_name FROM patients")).all())
    assert names == {"1": "X", "2": "W", "3": "V"}
    with session_scope(engine) as s, pytest.raises(ValueError):
        upsert(s, Patient, [patient("4", "U"), {"source_system": "t", "source_id": "5"}])

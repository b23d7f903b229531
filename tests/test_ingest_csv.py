"""The CSV import: the shipped example, re-imports, bad rows and bad headers, no patient data in problems.

Every test that touches the database runs on SQLite and on the real PostgreSQL the suite starts.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from retroauth.ingest import ImportSummary, IngestError
from retroauth.ingest.csvfiles import FILES, import_csv
from retroauth.ingest.errors import record_import
from retroauth.models import Encounter, ImportErrorRecord
from retroauth.rules import load_rule_library
from retroauth.storage import LocalStorage, StoredObject, sha256_hex
from retroauth.sweep import sweep
from tests.conftest import DATA, ROOT, table_counts

EXAMPLE = ROOT / "examples" / "csv"
BAD_ROWS = DATA / "csv" / "bad_rows"
BAD_HEADERS = DATA / "csv" / "bad_headers"
TABLES = ("patients", "coverages", "encounters", "service_lines", "diagnoses", "authorizations",
          "authorization_codes", "clinical_documents", "payer_outages")  # fmt: skip


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


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            name: [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.id))]
            for name, table in SQLModel.metadata.tables.items()
            if name in TABLES
        }


def assert_clean(summary: ImportSummary) -> None:
    assert summary.problems == [], [str(p) for p in summary.problems]


def counts(summary: ImportSummary, field: str) -> dict[str, int]:
    return {record: getattr(c, field) for record, c in summary.counts.items()}


# --- the shipped example ----------------------------------------------------------------------


EXAMPLE_ROWS = {"Patient": 5, "Coverage": 6, "Encounter": 6, "ServiceLine": 10, "Diagnosis": 10, "Authorization": 2,
                "ClinicalDocument": 6, "PayerOutage": 2}  # fmt: skip


def test_example_imports_and_a_second_import_changes_nothing(engine, tmp_path):
    storage = CountingStorage(tmp_path / "objects")
    started = time.perf_counter()
    summary = import_csv(engine, storage, EXAMPLE)
    first_seconds = time.perf_counter() - started
    assert_clean(summary)
    assert counts(summary, "read") == EXAMPLE_ROWS
    assert counts(summary, "inserted") == EXAMPLE_ROWS
    assert summary.error_count == 0 and summary.ignored == {}

    tables = table_counts(engine)
    assert {t: tables[t] for t in TABLES} == {
        "patients": 5, "coverages": 6, "encounters": 6, "service_lines": 10, "diagnoses": 10, "authorizations": 2,
        "authorization_codes": 3, "clinical_documents": 6, "payer_outages": 2,
    }  # fmt: skip
    assert storage.puts == summary.documents_written == 6

    with engine.connect() as conn:
        encounters = Encounter.__table__
        enc = conn.execute(sa.select(encounters).where(encounters.c.source_id == "E1001")).mappings().one()
        assert (enc["source_system"], enc["encounter_class"], enc["admission_type"]) == ("csv", "inpatient", "emergency")
        assert (enc["timezone"], enc["place_of_service"], enc["type_of_bill"]) == ("America/Detroit", "21", "0111")
        assert enc["admitted_at"] == datetime(2026, 11, 15, 3, 47, tzinfo=timezone.utc)  # 22:47 at -05:00
        e1004 = conn.execute(sa.text("SELECT system_issue_reference FROM encounters WHERE source_id = 'E1004'")).scalar()
        assert e1004 == "EHR-INC-20261124-017"
        mri = conn.execute(sa.text("SELECT * FROM service_lines WHERE code = '70551'")).mappings().one()
        assert (mri["code_system"], mri["modifiers"], Decimal(str(mri["charge"])), str(mri["service_date"])) == (
            "CPT", "26", Decimal("2150.00"), "2026-11-15")
        room = conn.execute(sa.text("SELECT code_system, units FROM service_lines WHERE code = '0120'")).one()
        assert (room[0], Decimal(str(room[1]))) == ("REV", Decimal("3.00"))
        auth_codes = conn.execute(sa.text(
            "SELECT a.auth_number, c.code_system, c.code FROM authorization_codes c "
            "JOIN authorizations a ON a.id = c.authorization_id ORDER BY a.auth_number, c.code"
        )).all()  # fmt: skip
        assert [tuple(r) for r in auth_codes] == [
            ("HTH-PA-2026-0093", "CPT", "95810"), ("UHC-A26-0417-DEMO", "CPT", "70552"),
            ("UHC-A26-0417-DEMO", "CPT", "70553"),
        ]  # fmt: skip
        assert set(conn.execute(sa.text("SELECT DISTINCT source FROM authorizations")).scalars()) == {"import"}
        late = conn.execute(sa.text("SELECT discovery_method FROM coverages WHERE payer_id = 'emblemhealth'")).scalar()
        assert late == "eligibility_check"
        docs = conn.execute(sa.text("SELECT * FROM clinical_documents ORDER BY source_id")).mappings().all()
    for doc in docs:
        content = (EXAMPLE / "documents" / f"{doc['source_id']}.txt").read_bytes()
        assert (doc["sha256"], doc["size_bytes"]) == (sha256_hex(content), len(content))
        assert storage.get(doc["storage_key"], sha256=doc["sha256"]) == content
        assert doc["storage_key"].startswith(f"documents/{doc['patient_id']}/") and doc["storage_key"].endswith(".txt")
        assert doc["source_id"] not in doc["storage_key"]

    # Again, in batches of 2: nothing inserted, nothing updated, nothing written to storage.
    before, before_counts = snapshot(engine), table_counts(engine)
    started = time.perf_counter()
    again = import_csv(engine, storage, EXAMPLE, batch_size=2)
    second_seconds = time.perf_counter() - started
    assert_clean(again)
    assert table_counts(engine) == before_counts
    assert snapshot(engine) == before
    assert counts(again, "unchanged") == EXAMPLE_ROWS
    assert all(c.inserted == c.updated == 0 for c in again.counts.values())
    assert storage.puts == 6 and again.documents_written == 0 and again.documents_unchanged == 6
    print(f"\n[{engine.dialect.name}] example import {first_seconds:.3f}s, re-import {second_seconds:.3f}s")


def test_example_feeds_the_sweep_with_every_reason(engine, tmp_path):
    """The example is realistic enough for the product: each encounter lands where it should."""
    import_csv(engine, LocalStorage(tmp_path / "objects"), EXAMPLE)
    result = sweep(engine, load_rule_library(ROOT / "config" / "payers"),
                   as_of=datetime(2026, 11, 27, 12, tzinfo=timezone.utc), lookback_days=30)  # fmt: skip
    assert result.encounters_scanned == 6
    with engine.connect() as conn:
        found = {
            r.source_id: (r.payer_id, r.reason, r.not_eligible_why)
            for r in conn.execute(sa.text(
                "SELECT e.source_id, c.payer_id, c.reason, c.not_eligible_why FROM retro_cases c "
                "JOIN encounters e ON e.id = c.encounter_id"
            ))
        }  # fmt: skip
    assert found == {
        "E1001": ("priority-health", "emergency", None),  # emergency admission: room and board, MRI on the stay
        "E1003": ("emblemhealth", "delayed_insurance_verification", None),  # coverage found 5 days later
        "E1004": ("hometown-health", "system_issue", None),  # EHR incident and a payer portal outage
        "E1005": ("medicare-ffs-opd", "administrative_error", "payer_accepts_no_retro"),
    }  # E1002 (the MRI with an authorization on file) and E1006 (an office visit) need nothing


def test_changed_rows_are_updated_and_absent_optional_columns_kept(engine, tmp_path):
    storage = CountingStorage(tmp_path / "objects")
    import_csv(engine, storage, EXAMPLE)
    changed = tmp_path / "export"
    shutil.copytree(EXAMPLE, changed)
    # One encounter's facility renamed, an authorization's codes changed, one note's text changed.
    path = changed / "encounters.csv"
    path.write_text(path.read_text().replace("Prairie Demo Imaging Center", "Prairie Demo Imaging Center North"))
    path = changed / "authorizations.csv"
    path.write_text(path.read_text().replace("CPT:70553;CPT:70552", "CPT:70553;CPT:70551"))
    (changed / "documents" / "D5003.txt").write_text("DISCHARGE SUMMARY (fictional), amended.\n")
    # service_lines.csv without its charge column: the charges already imported stay.
    rows = list(csv.DictReader((changed / "service_lines.csv").read_text().splitlines()))
    with (changed / "service_lines.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, [c for c in rows[0] if c != "charge"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "charge"} for r in rows)

    summary = import_csv(engine, storage, changed)
    assert_clean(summary)
    assert counts(summary, "updated") == {**{k: 0 for k in EXAMPLE_ROWS}, "Encounter": 1, "Authorization": 1,
                                          "ClinicalDocument": 1}  # fmt: skip
    assert summary.counts["ServiceLine"].unchanged == 10
    assert summary.documents_written == 1 and storage.puts == 7
    with engine.connect() as conn:
        codes = conn.execute(sa.text(
            "SELECT c.code FROM authorization_codes c JOIN authorizations a ON a.id = c.authorization_id "
            "WHERE a.auth_number = 'UHC-A26-0417-DEMO' ORDER BY c.code"
        )).scalars().all()  # fmt: skip
        assert codes == ["70551", "70553"]
        total = conn.execute(sa.text("SELECT sum(charge) FROM service_lines")).scalar()
        assert Decimal(str(total)) == Decimal("22400.00")


# --- bad input --------------------------------------------------------------------------------


# (file, line, record, column, words the message contains)
BAD_ROW_PROBLEMS = {
    ("patients.csv", 3, "Patient/B2", "birth_date", "not a valid date"),
    ("patients.csv", 4, "Patient/B3", "(row)", "7 fields, the header has 6"),
    ("coverages.csv", 3, "Coverage", "discovery_method", "not one of"),
    ("encounters.csv", 3, "Encounter/EB2", "admitted_at", "no UTC offset"),
    ("encounters.csv", 4, "Encounter/EB3", "encounter_class", "not one of emergency, inpatient"),
    ("encounters.csv", 5, "Encounter/EB4", "patient_id", "no patient with that id"),
    ("encounters.csv", 6, "Encounter/EB5", "facility_npi", "check digit"),
    ("encounters.csv", 7, "Encounter/EB6", "patient_id", "patient was rejected"),
    ("service_lines.csv", 3, "ServiceLine", "code", "not a well-formed CPT code"),
    ("service_lines.csv", 4, "ServiceLine", "encounter_id", "encounter was rejected"),
    ("service_lines.csv", 6, "ServiceLine", "charge", "not a decimal number"),
    ("diagnoses.csv", 3, "Diagnosis", "code", "not a well-formed ICD10CM code"),
    ("diagnoses.csv", 4, "Diagnosis", "code_system", "not one of ICD10CM, SNOMED"),
    ("authorizations.csv", 3, "Authorization", "codes", "entry 2 is not SYSTEM:CODE"),
    ("documents.csv", 3, "ClinicalDocument/DB2", "file", "inside the import directory"),
    ("documents.csv", 4, "ClinicalDocument/DB3", "loinc_type", "check digit"),
    ("documents.csv", 5, "ClinicalDocument/DB4", "encounter_id", "another patient's"),
    ("payer_outages.csv", 3, "PayerOutage", "ends_at", "before starts_at"),
}


def test_bad_rows_are_reported_and_the_good_rows_imported(engine, tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    summary = import_csv(engine, storage, BAD_ROWS, batch_size=3)

    found = {(p.file, p.line, p.resource, p.field) for p in summary.problems}
    assert found == {expected[:4] for expected in BAD_ROW_PROBLEMS}
    by_place = {(p.file, p.line): p for p in summary.problems}
    for file, line, _, _, words in BAD_ROW_PROBLEMS:
        assert words in by_place[(file, line)].message, (file, line, by_place[(file, line)].message)

    tables = table_counts(engine)
    assert {t: tables[t] for t in TABLES} == {
        "patients": 2, "coverages": 1, "encounters": 2, "service_lines": 2, "diagnoses": 1, "authorizations": 1,
        "authorization_codes": 2, "clinical_documents": 1, "payer_outages": 1,
    }  # fmt: skip
    assert counts(summary, "errors") == {"Patient": 2, "Coverage": 1, "Encounter": 5, "ServiceLine": 3,
                                         "Diagnosis": 2, "Authorization": 1, "ClinicalDocument": 3,
                                         "PayerOutage": 1}  # fmt: skip
    assert summary.counts["Encounter"].read == 7 and summary.counts["Encounter"].inserted == 2
    assert summary.documents_written == 1

    # The same bad files again: the same problems, nothing else changes; the run can be recorded.
    before = snapshot(engine)
    again = import_csv(engine, storage, BAD_ROWS)
    assert {(p.file, p.line, p.resource, p.field) for p in again.problems} == found
    assert snapshot(engine) == before
    run_id = record_import(engine, "csv", str(BAD_ROWS), again, datetime.now(timezone.utc))
    with engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(ImportErrorRecord.__table__)
                            .where(ImportErrorRecord.__table__.c.import_run_id == run_id)).scalar()  # fmt: skip
    assert kept == len(BAD_ROW_PROBLEMS)


def test_bad_headers_fail_their_file_only(engine, tmp_path):
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), BAD_HEADERS)
    assert {(p.file, p.line, p.field, p.message) for p in summary.problems} == {
        ("coverages.csv", 1, "member_id", "required column missing from the header"),
        ("encounters.csv", 1, "attending_name", "unknown column (not in the format)"),
    }
    assert summary.counts["Coverage"].read == summary.counts["Encounter"].read == 0
    assert summary.ignored == {"Patients_extra.csv": 1}
    tables = table_counts(engine)
    assert (tables["patients"], tables["coverages"], tables["encounters"]) == (1, 0, 0)


def test_problems_and_logs_carry_no_patient_data(engine, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), BAD_ROWS)
    assert summary.problems
    text = "\n".join(str(p) for p in summary.problems) + caplog.text + json.dumps(summary.as_dict())
    # The rejected patients' names, birth date, phone and extra value; a rejected encounter's
    # wall time; the bad member ids and codes are not patient data but are not quoted either.
    for value in ("Unlikelyname", "Zebediah", "1980-02-30", "555-0199-02", "Extrafield", "surplus",
                  "2026-11-10T09:00:00", "UHCBAD0004", "found_it", "urgent_care", "7O551", "1234567890",
                  "bad_headers", "Chest pain"):  # fmt: skip
        assert value not in text, value


def test_patient_field_checks(engine, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "patients.csv").write_text(
        "patient_id,family_name,given_name,birth_date,sex,state,postal_code\n"
        "Q1,Quux,Ada,2999-01-01,,,\n"
        "Q2,Quux,Ada,,,ZZ,\n"
        "Q3,Quux,Ada,,,,4950\n"
        "Q4,,Ada,,,,\n"
        "Q5,Quux,Ada,,X,,\n"
        "Q6,Quux,Ada,1970-01-01,u,mi,49503\n"
    )
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), export)
    found = {(p.line, p.resource, p.field): p.message for p in summary.problems}
    expected = {
        (2, "Patient/Q1", "birth_date"): "in the future",
        (3, "Patient/Q2", "state"): "US state",
        (4, "Patient/Q3", "postal_code"): "ZIP code",
        (5, "Patient/Q4", "family_name"): "missing",
        (6, "Patient/Q5", "sex"): "not one of female, male, other, unknown",
    }
    assert set(found) == set(expected)
    for place, words in expected.items():
        assert words in found[place], place
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT source_id, sex, state FROM patients")).all() == [("Q6", "unknown", "MI")]


def test_field_parsing_accepts_the_documented_variants(engine, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    # Header in another case and order, a BOM, CRLF line ends, Z and +HHMM offsets, lower-case code
    # systems, ZIP+4 without its dash, a quoted value with a line break in it.
    (export / "patients.csv").write_bytes(
        "\ufeffGiven_Name,Family_Name,Patient_ID,Postal_Code,Sex\r\nAda,Quux,Q1,495031234,F\r\n".encode()
    )
    (export / "encounters.csv").write_text(
        "encounter_id,patient_id,encounter_class,admitted_at,discharged_at,timezone\n"
        "QE1,Q1,Outpatient,2026-11-10T14:00:00Z,2026-11-10 09:30-0500,America/Chicago\n"
    )
    (export / "service_lines.csv").write_text(
        "encounter_id,line_number,code_system,code,description,units,service_date\n"
        'QE1,1,hcpcs,j0585,"botulinum toxin\nper unit",100,2026-11-10\n'
        "QE1,2,icd10pcs,0DTJ4ZZ,appendectomy,,2026-11-10\n"
    )
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), export)
    assert_clean(summary)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT postal_code, sex FROM patients")).one() == ("49503-1234", "female")
        assert conn.execute(sa.text("SELECT encounter_class FROM encounters")).scalar() == "outpatient"
        lines = conn.execute(sa.text("SELECT code_system, code, units, charge FROM service_lines ORDER BY line_number")).all()
    assert [(s, c, Decimal(str(u)), Decimal(str(ch))) for s, c, u, ch in lines] == [
        ("HCPCS", "J0585", Decimal("100"), Decimal("0")), ("ICD10PCS", "0DTJ4ZZ", Decimal("1"), Decimal("0")),
    ]


def test_a_broken_line_stops_the_file_after_the_rows_before_it(engine, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "patients.csv").write_bytes(
        b"patient_id,family_name,given_name\nQ1,Quux,Ada\nQ2,Qu\xe9ux,Bo\nQ3,Quux,Cy\n"  # Latin-1, not UTF-8
    )
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), export, batch_size=1)
    assert [(p.file, p.line, p.field) for p in summary.problems] == [("patients.csv", 3, "(file)")]
    assert "not UTF-8" in summary.problems[0].message
    assert table_counts(engine)["patients"] == 1


def test_progress_and_repeated_keys(engine, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "patients.csv").write_text(
        "patient_id,family_name,given_name\n" + "".join(f"Q{i},Quux,Ada\n" for i in range(7)) + "Q6,Quux,Bea\n"
    )
    calls: list[tuple[str, int]] = []
    summary = import_csv(engine, LocalStorage(tmp_path / "objects"), export, batch_size=4,
                         progress=lambda record, done: calls.append((record, done)))  # fmt: skip
    assert calls == [("Patient", 4), ("Patient", 8)]
    c = summary.counts["Patient"]
    assert (c.read, c.inserted, c.skipped) == (8, 7, 1)  # Q6 twice in one batch: the last row won
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT given_name FROM patients WHERE source_id = 'Q6'")).scalar() == "Bea"


def test_nothing_to_import_raises_ingest_error(engine, tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    with pytest.raises(IngestError):
        import_csv(engine, storage, tmp_path / "nope")
    with pytest.raises(IngestError):
        import_csv(engine, storage, tmp_path)  # no file of the format
    with pytest.raises(IngestError):
        import_csv(engine, storage, EXAMPLE, batch_size=0)


def test_every_column_is_documented():
    """examples/csv/README.md names every file and column the importer knows."""
    readme = (EXAMPLE / "README.md").read_text()
    for spec in FILES:
        assert f"`{spec.name}`" in readme, spec.name
        for column in spec.columns:
            assert f"| `{column}`" in readme, (spec.name, column)

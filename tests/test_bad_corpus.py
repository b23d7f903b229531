"""The bad-input corpus: every file under tests/data/bad through the real entry point of its format.

``tests/data/bad/MANIFEST.yaml`` says, file by file, what must be reported (file, line or segment, field,
words of the message) and what must still go in. For each file this module checks:

- the problems: exactly the expected ones, each naming the exact file name, the line and the field;
- importers (FHIR, CSV, 835), on a fresh database: the valid rest went in (counts and rows), no other
  table changed, the rejected records left no row, and nothing is half-written (an authorization
  without its codes, a document row without its content, a row pointing at a missing parent, part of
  a remittance claim);
- no message, log line or summary carries the patient data the file holds (``phi``).

The importer cases run on SQLite, and also on PostgreSQL when the manifest marks them ``postgres``
(a NUL character, say, which only PostgreSQL refuses); ``RETROAUTH_CORPUS_BACKENDS=sqlite,postgres`` runs
them all on both (the importers' own tests already run every code path on both: the corpus adds
inputs, not SQL, and the suite has a time budget).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from config import PAYERS_DIR
from config.settings import load_settings
from retroauth.channels.pas import PasResponseError, parse_pas_response
from retroauth.db import session_scope
from retroauth.ingest.csvfiles import FILES, import_csv
from retroauth.ingest.fhir import import_fhir
from retroauth.ingest.remit import import_remit
from retroauth.letters import TEMPLATES_DIR, check_templates
from retroauth.rules import PayerRuleError, load_rule_library
from retroauth.storage import LocalStorage
from retroauth.x12.parse import X12Error
from retroauth.x12.x278 import read_278_response
from tests.conftest import DATA, ROOT, table_counts
from tests.factories import encounter_with_lines

BAD = DATA / "bad"
MANIFEST: dict[str, dict[str, Any]] = yaml.safe_load((BAD / "MANIFEST.yaml").read_text())
FORMATS = ("fhir", "fhir-coverage", "csv", "x835", "x278", "pas", "payers", "templates")
FHIR_BASE = DATA / "fhir" / "base"
REFERENCE_TYPES = ("Organization", "Location", "Practitioner")  # FHIR types only resolved, never stored
CSV_BASE = ROOT / "examples" / "csv"
PAYER_MAP = {"https://example.org/payers|EHP": "example-health"}
SETTINGS = load_settings()
BACKENDS = [b.strip() for b in os.environ.get("RETROAUTH_CORPUS_BACKENDS", "sqlite").split(",") if b.strip()]
KEY_COLUMN = {"authorizations": "auth_number"}  # the id a manifest "absent" names; else source_id


def cases(fmt: str) -> list[Any]:
    return [pytest.param(name, id=name) for name in MANIFEST if name.split("/")[0] == fmt]


def importer_cases(fmt: str) -> list[Any]:
    """(file, backend) for an importer: SQLite (or RETROAUTH_CORPUS_BACKENDS), plus PostgreSQL for the
    files the manifest marks ``postgres`` (they break PostgreSQL in their own way)."""
    out = []
    for name in MANIFEST:
        if name.split("/")[0] != fmt:
            continue
        for backend in dict.fromkeys([*BACKENDS, *(["postgres"] if MANIFEST[name].get("postgres") else [])]):
            marks = [pytest.mark.postgres] if backend == "postgres" else []
            out.append(pytest.param(name, backend, id=f"{name}-{backend}", marks=marks))
    return out


# --- the manifest itself ---------------------------------------------------------------------------


def test_the_manifest_lists_every_file_and_at_least_60():
    on_disk = {p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file()} - {"MANIFEST.yaml"}
    listed = set(MANIFEST) | {w for entry in MANIFEST.values() for w in entry.get("with", [])}
    assert sorted(on_disk - listed) == [], "files the manifest does not describe"
    assert sorted(listed - on_disk) == [], "manifest entries without a file"
    assert len(on_disk) >= 60 and len(MANIFEST) >= 60
    for name, entry in MANIFEST.items():
        assert name.split("/")[0] in FORMATS, name
        assert entry.get("why") and isinstance(entry.get("errors"), list), name
        for secret in entry.get("phi", []):  # the privacy check below must not be vacuous
            data = (BAD / name).read_bytes()
            assert secret.encode() in data or secret.encode("latin-1") in data, (name, secret)


# --- shared checks ---------------------------------------------------------------------------------


def match_problems(name: str, expected: list[dict[str, Any]], found: list[dict[str, Any]]) -> None:
    """``found``: one dict per reported problem with line, field, (record,) message and text (the whole
    message as shown to a person). Exactly the expected problems, in any order."""
    file = Path(name).name
    shown = [f["text"] for f in found]
    assert len(found) == len(expected), f"{name}: expected {len(expected)} problem(s), got {shown}"
    unmatched = list(found)
    for want in expected:
        hit = next((f for f in unmatched if all(f.get(k) == want[k] for k in ("line", "field", "record") if k in want)
                    and want.get("says", "") in f["message"]), None)  # fmt: skip
        assert hit is not None, f"{name}: no problem like {want} in {shown}"
        unmatched.remove(hit)
    for f in found:
        assert file in f["text"], f"{name}: the message does not name the file: {f['text']}"


def assert_no_phi(name: str, texts: list[str]) -> None:
    blob = "\n".join(texts)
    for secret in MANIFEST[name].get("phi", []):
        assert secret not in blob, f"{name}: {secret!r} appears in a message or log line"


def assert_rows(name: str, engine: sa.Engine, before: dict[str, int]) -> None:
    entry = MANIFEST[name]
    after = table_counts(engine)
    added = {t: after[t] - before[t] for t in after if after[t] != before[t]}
    expected = {t: n for t, n in entry.get("rows", {}).items() if n}
    assert added == expected, f"{name}: rows added {added}, expected {expected}"
    with engine.connect() as conn:
        for table, key in entry.get("absent", []):
            column = KEY_COLUMN.get(table, "source_id")
            n = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {column} = :k"), {"k": key}).scalar()
            assert n == 0, f"{name}: the rejected {table} {key} has a row"


def assert_whole(engine: sa.Engine, storage: LocalStorage) -> None:
    """Nothing half-written: every row's parent exists, every authorization has its codes, every
    document row its content."""
    def orphan(child: str, parent: str, column: str) -> str:
        return f"SELECT count(*) FROM {child} c LEFT JOIN {parent} p ON p.id = c.{column} WHERE p.id IS NULL"

    orphans = {
        "service_lines": orphan("service_lines", "encounters", "encounter_id"),
        "diagnoses": orphan("diagnoses", "encounters", "encounter_id"),
        "encounters": orphan("encounters", "patients", "patient_id"),
        "coverages": orphan("coverages", "patients", "patient_id"),
        "authorizations without codes": "SELECT count(*) FROM authorizations a WHERE NOT EXISTS "
                                        "(SELECT 1 FROM authorization_codes c WHERE c.authorization_id = a.id)",
    }  # fmt: skip
    with engine.connect() as conn:
        for what, sql in orphans.items():
            assert conn.execute(sa.text(sql)).scalar() == 0, what
        docs = conn.execute(sa.text("SELECT storage_key, sha256 FROM clinical_documents")).all()
    for storage_key, sha256 in docs:
        storage.get(storage_key, sha256=sha256)  # raises when the content is missing or differs


# --- FHIR ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "db_url"), importer_cases("fhir"), indirect=["db_url"])
def test_fhir(name, engine, tmp_path, caplog):
    entry = MANIFEST[name]
    file = Path(name).name
    storage = LocalStorage(tmp_path / "objects")
    base = import_fhir(engine, storage, FHIR_BASE, payer_map=PAYER_MAP)
    assert base.problems == [], [str(p) for p in base.problems]
    before = table_counts(engine)
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(BAD / name, export / file)
    caplog.set_level(logging.DEBUG)

    summary = import_fhir(engine, storage, export, payer_map=PAYER_MAP)

    match_problems(name, entry["errors"], [
        {"line": p.line, "field": p.field, "message": p.message, "text": str(p)}
        for p in summary.problems
    ])  # fmt: skip
    assert all(p.file == file for p in summary.problems)
    rtype = file.split(".")[0]
    counts = summary.counts.get(rtype)
    if counts is None:
        went_in = 0
    elif rtype in REFERENCE_TYPES:  # kept in memory for the run, not written: read and not rejected
        went_in = counts.read - counts.errors - counts.skipped
    else:
        went_in = counts.inserted + counts.updated + counts.unchanged
    assert went_in == entry["valid"], f"{name}: {went_in} records went in, expected {entry['valid']}"
    assert_rows(name, engine, before)
    assert_whole(engine, storage)
    assert_no_phi(name, [str(p) for p in summary.problems] + [caplog.text] + [json.dumps(summary.as_dict())])


@pytest.mark.parametrize(("name", "db_url"), importer_cases("fhir-coverage"), indirect=["db_url"])
def test_fhir_coverage_csv(name, engine, tmp_path, caplog):
    entry = MANIFEST[name]
    storage = LocalStorage(tmp_path / "objects")
    assert import_fhir(engine, storage, FHIR_BASE, payer_map=PAYER_MAP).problems == []
    before = table_counts(engine)
    export = tmp_path / "export"  # nothing but the coverages
    export.mkdir()
    caplog.set_level(logging.DEBUG)

    summary = import_fhir(engine, storage, export, coverage_csv=BAD / name)

    match_problems(name, entry["errors"], [
        {"line": p.line, "field": p.field, "message": p.message, "text": str(p)} for p in summary.problems
    ])  # fmt: skip
    counts = summary.counts["coverage_csv"]
    assert counts.inserted + counts.updated + counts.unchanged == entry["valid"]
    assert_rows(name, engine, before)
    assert_whole(engine, storage)
    assert_no_phi(name, [str(p) for p in summary.problems] + [caplog.text, json.dumps(summary.as_dict())])


# --- CSV -------------------------------------------------------------------------------------------

CSV_RECORDS = {spec.name: spec.record for spec in FILES}


@pytest.mark.parametrize(("name", "db_url"), importer_cases("csv"), indirect=["db_url"])
def test_csv(name, engine, tmp_path, caplog):
    entry = MANIFEST[name]
    file = Path(name).name
    storage = LocalStorage(tmp_path / "objects")
    base = import_csv(engine, storage, CSV_BASE)
    assert base.problems == [], [str(p) for p in base.problems]
    before = table_counts(engine)
    export = tmp_path / "export"
    shutil.copytree(CSV_BASE / "documents", export / "documents")  # what a documents.csv may point at
    shutil.copy(BAD / name, export / file)
    caplog.set_level(logging.DEBUG)

    summary = import_csv(engine, storage, export)

    match_problems(name, entry["errors"], [
        {"line": p.line, "field": p.field, "message": p.message, "text": str(p)} for p in summary.problems
    ])  # fmt: skip
    assert all(p.file == file for p in summary.problems)
    counts = summary.counts.get(CSV_RECORDS[file])
    went_in = counts.inserted + counts.updated + counts.unchanged if counts else 0
    assert went_in == entry["valid"], f"{name}: {went_in} records went in, expected {entry['valid']}"
    assert_rows(name, engine, before)
    assert_whole(engine, storage)
    assert_no_phi(name, [str(p) for p in summary.problems] + [caplog.text] + [json.dumps(summary.as_dict())])


# --- X12 835 ---------------------------------------------------------------------------------------


def denied_encounters(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text(
            "SELECT DISTINCT e.source_id FROM service_lines s JOIN encounters e ON e.id = s.encounter_id "
            "WHERE s.denial_carc IS NOT NULL OR s.denial_rarc IS NOT NULL OR s.denied_on IS NOT NULL"
        )).scalars())  # fmt: skip


@pytest.mark.parametrize(("name", "db_url"), importer_cases("x835"), indirect=["db_url"])
def test_x835(name, engine, caplog):
    entry = MANIFEST[name]
    with session_scope(engine) as s:
        for n in (1, 2, 3):  # e1, e2, e3: CPT 70551 on 2026-11-13
            encounter_with_lines(s, n)
    before = table_counts(engine)
    caplog.set_level(logging.DEBUG)

    summary = import_remit(engine, BAD / name)

    match_problems(name, entry["errors"], [
        {"line": p.line, "field": p.field, "record": p.resource, "message": p.message, "text": str(p)}
        for p in summary.problems
    ])  # fmt: skip
    assert denied_encounters(engine) == set(entry["denied"])
    assert table_counts(engine) == before  # an 835 only marks lines that exist
    assert_no_phi(name, [str(p) for p in summary.problems] + [caplog.text] + [json.dumps(summary.as_dict())])


# --- X12 278 responses -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", cases("x278"))
def test_x278(name, caplog):
    entry = MANIFEST[name]
    file = Path(name).name
    text = (BAD / name).read_bytes().decode("latin-1")  # what the 278 channel does with a file
    caplog.set_level(logging.DEBUG)
    with pytest.raises(X12Error) as info:
        read_278_response(text, file=file)
    e = info.value
    assert e.file == file
    match_problems(name, entry["errors"], [
        {"line": e.segment_number, "record": e.segment_id, "field": e.element, "message": e.message, "text": str(e)}
    ])  # fmt: skip
    assert_no_phi(name, [str(e), repr(e)] + [caplog.text])


# --- PAS responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", cases("pas"))
def test_pas(name, caplog):
    entry = MANIFEST[name]
    file = Path(name).name
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PasResponseError) as info:
        parse_pas_response((BAD / name).read_bytes(), source=file)
    text = str(info.value)
    [want] = entry["errors"]
    assert text.startswith(f"{file}: "), text
    if want["field"] is not None:
        assert want["field"] in text, text
    assert want["says"] in text, text
    assert_no_phi(name, [text] + [caplog.text])


# --- payer rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", cases("payers"))
def test_payer_rules(name, tmp_path):
    entry = MANIFEST[name]
    folder = tmp_path / "payers"
    folder.mkdir()
    for part in [name, *entry.get("with", [])]:
        shutil.copy(BAD / part, folder / Path(part).name)
    with pytest.raises(PayerRuleError) as info:
        load_rule_library(folder)
    match_problems(name, entry["errors"], [
        {"line": p.line, "field": p.path, "message": p.message, "text": str(p)}
        for p in info.value.problems
    ])  # fmt: skip
    assert all(Path(p.file).name == Path(name).name for p in info.value.problems)
    assert Path(name).name in str(info.value)


# --- letter templates ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", cases("templates"))
def test_templates(name, tmp_path):
    entry = MANIFEST[name]
    relative = name.split("/", 2)[2]  # where the file goes in the templates folder
    folder = tmp_path / "templates"
    # The shipped templates; a payer's own folder only for a case about one (each payer folder doubles
    # the letters check_templates renders, and the suite has a time budget).
    shutil.copytree(TEMPLATES_DIR, folder, ignore=None if relative.startswith("payers/") else
                    lambda d, names: ["payers"] if Path(d) == TEMPLATES_DIR else [])  # fmt: skip
    shutil.copy(BAD / name, folder / relative)

    problems = check_templates(folder, SETTINGS, PAYERS_DIR)

    found = []
    for p in problems:
        field = next((w["field"] for w in entry["errors"] if w["field"] and w["field"] in str(p)), None)
        found.append({"line": p.line, "field": field, "message": str(p), "text": str(p)})
    match_problems(name, entry["errors"], found)
    assert all(p.template == relative for p in problems), [str(p) for p in problems]

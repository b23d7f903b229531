"""Property tests for every parser: whatever the input, nothing escapes but the parser's own error type.

Inputs are arbitrary text and bytes, and structured mutations of valid samples: segments dropped,
duplicated, swapped, separators flipped, elements replaced, files cut at random points, random JSON
values put into FHIR and PAS elements, CSV cells, headers and row widths changed, YAML lines edited.
Known inputs that once escaped are pinned with ``@example``.

What each entry point may raise (anything else, or an exception from an importer, fails the test):

| parser                                        | may raise                                   |
|-----------------------------------------------|---------------------------------------------|
| ``import_fhir`` (one file)                    | nothing: every bad line is an ImportProblem |
| ``import_fhir`` (``coverage_csv``)            | ``IngestError`` for an unusable header only |
| ``import_csv`` (one file)                     | nothing: every bad row is an ImportProblem  |
| ``import_remit`` (835)                        | nothing: every bad segment is an ImportProblem |
| ``read_transactions`` / ``read_segments``     | ``X12Error`` (none with ``on_error``)       |
| ``check_278``                                 | nothing: problems are returned              |
| ``read_278_response``                         | ``X12Error``                                |
| ``parse_pas_response``                        | ``PasResponseError``                        |
| ``load_rule_library`` (payer YAML)            | ``PayerRuleError``                          |

The default profile is derandomized (the same examples on every run, no example database), so CI is
deterministic; ``RETROAUTH_FUZZ=dev`` draws fresh examples, ten times as many.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retroauth.channels.pas import PasResponseError, parse_pas_response
from retroauth.db import make_engine, session_scope
from retroauth.ingest.csvfiles import FILES, import_csv
from retroauth.ingest.errors import ImportSummary, IngestError
from retroauth.ingest.fhir import import_fhir
from retroauth.ingest.remit import import_remit
from retroauth.rules import PayerRuleError, load_rule_library
from retroauth.storage import LocalStorage
from retroauth.x12.check import check_278
from retroauth.x12.parse import X12Error, check_envelopes, read_segments, read_transactions
from retroauth.x12.x278 import read_278_response
from tests.conftest import DATA, PAS, ROOT
from tests.factories import encounter_with_lines

settings.register_profile("retroauth-fuzz-ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
settings.register_profile("retroauth-fuzz-dev", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
DEV = os.environ.get("RETROAUTH_FUZZ") == "dev"
PROFILE = settings.get_profile("retroauth-fuzz-dev" if DEV else "retroauth-fuzz-ci")


def fuzz(examples: int) -> settings:
    return settings(PROFILE, max_examples=examples * (10 if DEV else 1))


# --- strategies --------------------------------------------------------------------------------------

# Characters and values that broke (or could break) a parser: separators, digits str.isdigit() takes
# and int() refuses, numbers Decimal reads but cannot compare, dates at the ends of datetime's range.
TRICKY = ["", " ", "*", ":", "^", "~", "|", "\n", "\r", "\t", "\x00", "\x07", "\xa0", "\u00b2", "\u00b5", "\u0663",
          "\ufeff", "\udcff", "NaN", "sNaN", "Infinity", "-1", "0", "1e999", "9" * 30, "1_000", "2026-02-30",
          "0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00", "9999-12-31", "America/" + "x" * 300, "\u00e9"]
atoms = st.one_of(st.sampled_from(TRICKY), st.text(max_size=6))
fragments = st.lists(atoms, max_size=4).map("".join)
any_text = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates too: JSON can escape them
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text | st.sampled_from(TRICKY),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def cut(draw: Callable[..., Any], data: bytes) -> bytes:
    """``data``, or (one time in four) ``data`` cut at a random point."""
    return data[: draw(st.integers(0, len(data)))] if draw(st.integers(0, 3)) == 0 else data


def json_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: Callable[..., Any], sample: Any) -> Any:
    """``sample`` with 1-4 elements replaced by random JSON values or removed."""
    doc = copy.deepcopy(sample)
    for _ in range(draw(st.integers(1, 4))):
        paths = json_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    return doc


def x12_segments(text: str) -> list[str]:
    return [s.strip("\r\n") for s in text.split("~") if s.strip("\r\n")]


@st.composite
def mutated_x12(draw: Callable[..., Any], samples: list[str]) -> str:
    """A sample with segments dropped, duplicated, swapped or inserted, elements replaced, separators
    flipped; then maybe cut."""
    segs = x12_segments(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(segs) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap", "element", "element", "separator", "insert"]))
        if op == "drop" and len(segs) > 1:
            del segs[i]
        elif op == "dup":
            segs.insert(i, segs[i])
        elif op == "swap":
            j = draw(st.integers(0, len(segs) - 1))
            segs[i], segs[j] = segs[j], segs[i]
        elif op == "element":
            elements = segs[i].split("*")
            k = draw(st.integers(0, len(elements)))
            elements[k:k + 1] = [draw(fragments)]
            segs[i] = "*".join(elements)
        elif op == "separator":
            old, new = draw(st.sampled_from("*:^~")), draw(st.sampled_from("*:^~|\n A"))
            if draw(st.booleans()):
                segs[i] = segs[i].replace(old, new)
            else:
                segs = "~".join(segs).replace(old, new).split("~") or [""]
        elif op == "insert":
            segs.insert(i, draw(fragments))
    text = "~\n".join(segs) + "~\n"
    return cut(draw, text.encode("latin-1", "replace")).decode("latin-1")


def read(path: Path) -> str:
    return path.read_bytes().decode("latin-1")


def swap(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced: a pinned example must really carry the change."""
    assert old in text, old
    return text.replace(old, new)


X12_278 = [read(p) for p in sorted((DATA / "x12" / "278").rglob("*.278"))]
X12_278_RESPONSES = [read(p) for p in sorted((DATA / "x12" / "278" / "responses").glob("*.278"))]
X12_835 = [read(p) for p in sorted((DATA / "x12").rglob("*.835"))]
x12_text = st.one_of(mutated_x12(X12_278 + X12_835), st.text(max_size=300),
                     st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                     st.sampled_from(X12_278 + X12_835).map(lambda t: t[: len(t) // 2]))


# --- X12: the generic reader, the 278 checker, the 278 response reader -----------------------------

GOOD_835 = read(DATA / "x12" / "good" / "two-transactions.835")
SUPERSCRIPT_COUNT = swap(GOOD_835, "SE*17*0001", "SE*\u00b2*0001")  # str.isdigit() yes, int() no


@fuzz(300)
@given(x12_text)
@example(SUPERSCRIPT_COUNT)
@example("ISA*00*" + "\u00b2" * 200)
def test_x12_reader_raises_only_x12_errors(text):
    errors: list[X12Error] = []
    for tx in read_transactions(io.StringIO(text), file="f.x12", on_error=errors.append):
        assert tx.st.id == "ST" and tx.se.id == "SE"
    assert all(e.file == "f.x12" for e in errors)
    try:
        for seg in read_segments(io.StringIO(text), file="f.x12"):
            seg.components(1), seg.repeats(1), repr(seg)
    except X12Error as e:
        assert e.file == "f.x12"
    for e in check_envelopes(text, file="f.x12"):
        assert e.file == "f.x12"
        str(e)


@fuzz(200)
@given(x12_text)
@example(swap(X12_278_RESPONSES[0], "HL*5*4*SS*0", "HL*\u00b9*4*SS*0"))
def test_278_checker_never_raises(text):
    for problem in check_278(text, file="c.278"):
        assert isinstance(problem, X12Error) and problem.file == "c.278"
        str(problem)


@fuzz(300)
@given(st.one_of(mutated_x12(X12_278_RESPONSES), x12_text))
@example(swap(X12_278_RESPONSES[0], "HCR*A1", "HCR*ZZ"))
@example(swap(X12_278_RESPONSES[0], "HL*5*4*SS*0", "HL*\u00b9*4*SS*0"))
@example(swap(X12_278_RESPONSES[0], "HL*5*4*SS*0", "HL*5*\u00b2*SS*0"))
@example(swap(X12_278_RESPONSES[0], "TRN*2*RA-000101-1-1*1123456789~\n", ""))
def test_278_response_reader_raises_only_x12_errors(text):
    try:
        decisions = read_278_response(text, file="r.278")
    except X12Error as e:
        assert e.file == "r.278"
        str(e)
        return
    for d in decisions:
        assert d.level in ("20", "21", "22", "23", "EV", "SS")
        assert d.action is None or d.action in ("A1", "A2", "A3", "A4", "A6", "C", "CT", "NA")
        if d.level in ("EV", "SS"):
            assert d.trace_number


# --- PAS responses ----------------------------------------------------------------------------------

PAS_SAMPLES = [json.loads((PAS / name).read_text()) for name in
               ("valid_pa_response_bundle.json", "valid_pa_response_bundle_denial.json")]  # fmt: skip
PAS_SAMPLES += [
    PAS_SAMPLES[0]["entry"][0]["resource"],
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "required",
                                                     "details": {"coding": [{"code": "15"}]}}]},
    {"resourceType": "Parameters", "parameter": [{"name": "return", "resource": PAS_SAMPLES[1]}]},
]  # fmt: skip


@st.composite
def pas_bodies(draw: Callable[..., Any]) -> Any:
    body = draw(mutated_json(draw(st.sampled_from(PAS_SAMPLES))))
    form = draw(st.sampled_from(["dict", "str", "bytes"]))
    if form == "dict":
        return body
    text = json.dumps(body)
    return cut(draw, text.encode()) if form == "bytes" else text


@fuzz(250)
@given(st.one_of(pas_bodies(), json_values, st.text(max_size=100), st.binary(max_size=100)))
@example(b"[" * 5000)
@example({"resourceType": "Bundle", "type": "collection",
          "entry": [{"resource": {"resourceType": "ClaimResponse"}}] * 2})
def test_pas_response_parser_raises_only_pas_response_errors(body):
    try:
        decision = parse_pas_response(body, idempotency_key="k-1", source="resp.json")
    except PasResponseError as e:
        assert str(e).startswith("resp.json: ")
        return
    assert decision.kind in ("response", "error", "not_found")
    assert decision.decision in ("A1", "A2", "A3", "A4", "A6", "C", "CT", "NA", "ERROR", "NOT_FOUND")


# --- payer YAML ---------------------------------------------------------------------------------------

PAYER_SAMPLES = [p.read_text() for p in sorted((ROOT / "config" / "payers").glob("*.yaml"))[:3]]
PAYER_SAMPLES += [p.read_text() for p in sorted((DATA / "payers").glob("*.yaml"))]
YAML_ATOMS = [": ", "- ", "[", "]", "{", "}", "&a ", "*a", "!!binary ", "!!python/object:os.system ", "? ", "|",
              "\t", "\x07", "\x85", "\ufeff", "'", '"', "#", "~", "null", "true", "2026-13-01", "25:00", "0x1F",
              "America/" + "x" * 300, "[" * 800]  # fmt: skip


@st.composite
def payer_files(draw: Callable[..., Any]) -> bytes:
    lines = draw(st.sampled_from(PAYER_SAMPLES)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["replace", "insert", "drop", "dup", "indent", "end"]))
        extra = "".join(draw(st.lists(st.one_of(st.sampled_from(YAML_ATOMS), st.text(max_size=4)), max_size=3)))
        if op == "replace":
            k = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:k] + extra
        elif op == "insert":
            lines.insert(i, extra)
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "      ", "\t"])) + lines[i].lstrip()
        else:
            lines = lines[:i]
        lines = lines or [""]
    return cut(draw, "\n".join(lines).encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def fresh_dir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


@fuzz(80)
@given(st.one_of(payer_files(), st.binary(max_size=200)))
@example(b"name: Broken\x07Payer\n")
@example(b"name: " + b"[" * 800 + b"]" * 800 + b"\n")
@example(swap(PAYER_SAMPLES[0], "time_zone: America/", "time_zone: America/" + "x" * 300).encode())
def test_payer_rule_loader_raises_only_payer_rule_errors(scratch, data):
    folder = fresh_dir(scratch)
    (folder / "payer.yaml").write_bytes(data)
    try:
        load_rule_library(folder)
    except PayerRuleError as e:
        assert e.problems and all(Path(p.file).name == "payer.yaml" for p in e.problems)
        str(e)
    finally:
        shutil.rmtree(folder)


# --- importers: a module-wide SQLite database -------------------------------------------------------


def assert_problems_name_the_file(summary: ImportSummary, file: str, lines: int) -> None:
    """Every problem names the file, a line (or segment) it has, and a field."""
    for p in summary.problems:
        assert p.file == file, str(p)
        assert 0 <= p.line <= lines + 1, str(p)
        assert p.field, str(p)
        str(p)
    json.dumps(summary.as_dict())


@pytest.fixture(scope="module")
def fuzz_db(sqlite_template, tmp_path_factory):
    """One database for every example of the module (the properties do not depend on its content)."""
    root = tmp_path_factory.mktemp("fuzz-db")
    path = root / "fuzz.db"
    path.write_bytes(sqlite_template.read_bytes())
    engine = make_engine(f"sqlite:///{path}")
    storage = LocalStorage(root / "objects")
    yield engine, storage, root
    engine.dispose()


@pytest.fixture(scope="module")
def fhir_db(fuzz_db):
    engine, storage, root = fuzz_db
    summary = import_fhir(engine, storage, DATA / "fhir" / "base", payer_map=FHIR_PAYERS)
    assert summary.problems == []
    return fuzz_db


FHIR_PAYERS = {"https://example.org/payers|EHP": "example-health"}
FHIR_SAMPLES = [
    (path.name.split(".")[0], json.loads(line))
    for path in sorted((DATA / "fhir" / "base").glob("*.ndjson"))
    for line in path.read_text().splitlines()
] + [
    (path.name.split(".")[0], json.loads(line))
    for path in sorted((DATA / "bad" / "fhir").glob("*.ndjson"))
    for line in path.read_bytes().splitlines()[:1] if line.strip()
]  # fmt: skip


@st.composite
def fhir_files(draw: Callable[..., Any]) -> tuple[str, bytes]:
    """(resource type, file content): mutated lines of a sample; one time in eight gzipped and cut."""
    rtype, sample = draw(st.sampled_from(FHIR_SAMPLES))
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.binary(max_size=80)).replace(b"\n", b" "))
        else:
            resource = draw(mutated_json(sample)) if kind > 2 else sample
            lines.append(cut(draw, json.dumps(resource).encode()))
    content = b"\n".join(lines) + b"\n"
    if draw(st.integers(0, 7)) == 0:
        return rtype + ".gz", cut(draw, gzip.compress(content, mtime=0))
    return rtype, content


@fuzz(150)
@given(fhir_files())
@example(("Claim", json.dumps({"resourceType": "Claim", "id": "c", "status": "active", "use": "claim",
                               "procedure": [{"sequence": 1, "procedureReference": {"reference": "Procedure/proc-1"}}],
                               "item": [{"sequence": 1, "procedureSequence": [1], "unitPrice": {"value": 5},
                                         "quantity": {"value": "x"}}]}).encode()))  # fmt: skip
@example(("Encounter", json.dumps({"resourceType": "Encounter", "id": "e", "status": "finished",
                                   "class": {"code": "EMER"}, "subject": {"reference": "Patient/pt-1"},
                                   "period": {"start": "9999-12-31T23:00:00-05:00"}}).encode()))  # fmt: skip
@example(("Location", b'{"resourceType":"Location","id":"l","extension":[{"url":'
                      b'"http://hl7.org/fhir/StructureDefinition/timezone","valueCode":"' + b"x" * 300 + b'"}]}'))
@example(("Patient", b"[" * 5000))
@example(("Patient", b'{"resourceType": "Patient", "id": "p", "name": [{"family": "A\\ud800"}]}'))
@example(("Encounter", b'{"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/pt-1\\u0000"}}'))
@example(("Patient.gz", gzip.compress(b'{"resourceType": "Patient", "id": "p"}\n' * 50, mtime=0)[:60]))
def test_fhir_import_of_one_file_never_raises(fhir_db, data):
    engine, storage, root = fhir_db
    rtype, content = data
    folder = fresh_dir(root)
    gz = rtype.endswith(".gz")
    name = f"{rtype.removesuffix('.gz')}.fuzz.ndjson" + (".gz" if gz else "")
    (folder / name).write_bytes(content)
    try:
        summary = import_fhir(engine, storage, folder, payer_map=FHIR_PAYERS)
    finally:
        shutil.rmtree(folder)
    assert_problems_name_the_file(summary, name, 1 << 20 if gz else content.count(b"\n"))


CSV_EXAMPLE = ROOT / "examples" / "csv"
CSV_ROWS = {spec.name: list(csv.reader((CSV_EXAMPLE / spec.name).read_text().splitlines())) for spec in FILES}


@pytest.fixture(scope="module")
def csv_db(fuzz_db):
    engine, storage, root = fuzz_db
    assert import_csv(engine, storage, CSV_EXAMPLE).problems == []
    return fuzz_db


@st.composite
def csv_files(draw: Callable[..., Any]) -> tuple[str, bytes]:
    spec = draw(st.sampled_from(FILES))
    return spec.name, draw(mutated_csv(CSV_ROWS[spec.name]))


@st.composite
def mutated_csv(draw: Callable[..., Any], sample: list[list[str]]) -> bytes:
    """The rows of ``sample`` with cells, header names and row widths changed, rows dropped or
    repeated, maybe a stray quote; written as CSV, then maybe cut."""
    rows = [list(r) for r in sample]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(rows) - 1))
        op = draw(st.sampled_from(["cell", "cell", "cell", "header", "drop", "dup", "wider", "narrower"]))
        if op in ("cell", "header") and rows[i]:
            row = rows[0] if op == "header" else rows[i]
            row[draw(st.integers(0, len(row) - 1))] = draw(fragments)
        elif op == "drop" and len(rows) > 1:
            del rows[i]
        elif op == "dup":
            rows.insert(i, list(rows[i]))
        elif op == "wider":
            rows[i].append(draw(fragments))
        elif op == "narrower" and rows[i]:
            rows[i].pop()
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    data = buffer.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:  # a stray quote somewhere
        k = draw(st.integers(0, len(data)))
        data = data[:k] + b'"' + data[k:]
    return cut(draw, data)


@fuzz(150)
@given(st.one_of(csv_files(), st.tuples(st.sampled_from([s.name for s in FILES]), st.binary(max_size=200))))
@example(("encounters.csv", b"encounter_id,patient_id,encounter_class,admitted_at,timezone\n"
                            b"F1,P1001,outpatient,9999-12-31T23:00:00-05:00,America/Chicago\n"))
@example(("encounters.csv", b"encounter_id,patient_id,encounter_class,admitted_at,timezone\n"
                            b"F1,P1001,outpatient,2026-11-13T10:00:00-05:00,America/" + b"x" * 300 + b"\n"))
@example(("documents.csv", b"document_id,patient_id,loinc_type,authored_at,file\n"
                          b"F1,P1001,34111-5,2026-11-15T01:00:00-05:00,documents/D5001.txt\x00\n"))
@example(("documents.csv", b"document_id,patient_id,loinc_type,authored_at,file\n"
                          b"F1,P1001,34111-5,2026-11-15T01:00:00-05:00,documents/" + b"x" * 300 + b"\n"))
def test_csv_import_of_one_file_never_raises(csv_db, data):
    engine, storage, root = csv_db
    name, content = data
    folder = fresh_dir(root)
    shutil.copytree(CSV_EXAMPLE / "documents", folder / "documents")
    (folder / name).write_bytes(content)
    try:
        summary = import_csv(engine, storage, folder)
    finally:
        shutil.rmtree(folder)
    assert_problems_name_the_file(summary, name, content.count(b"\n"))


COVERAGE_ROWS = [
    ["patient_source_id", "payer_id", "member_id", "plan_name", "effective_from", "effective_to", "discovered_at",
     "discovery_method", "priority"],
    ["pt-1", "example-health", "CVR-1", "Gold", "2026-01-01", "", "2026-01-05T09:00:00-06:00", "eligibility_check",
     "1"],
    ["pt-2", "example-health", "CVR-2", "", "2025-01-01", "2025-12-31", "", "", ""],
]  # fmt: skip


@fuzz(100)
@given(st.one_of(mutated_csv(COVERAGE_ROWS), st.binary(max_size=200)))
@example(b"patient_source_id,payer_id,member_id,effective_from,priority\npt-1,p,M1,2026-01-01,\xb2\n")
@example("patient_source_id,payer_id,member_id,effective_from,priority\npt-1,p,M1,2026-01-01,\u00b2\n".encode())
@example(b"patient_source_id,payer_id,member_id,effective_from\npt-1,p,M\xe91,2026-01-01\n")
def test_fhir_coverage_csv_raises_only_ingest_errors(fhir_db, data):
    engine, storage, root = fhir_db
    folder = fresh_dir(root)
    (folder / "export").mkdir()
    (folder / "coverage.csv").write_bytes(data)
    try:
        summary = import_fhir(engine, storage, folder / "export", coverage_csv=folder / "coverage.csv")
    except IngestError as e:  # a header the import cannot use: refused before anything is imported
        assert "coverage.csv" in str(e)
        return
    finally:
        shutil.rmtree(folder)
    assert_problems_name_the_file(summary, "coverage.csv", data.count(b"\n"))


@pytest.fixture(scope="module")
def remit_db(fuzz_db):
    engine, _, root = fuzz_db
    with session_scope(engine) as s:
        for n in (101, 102):  # encounters e101, e102, whose lines the samples below deny
            encounter_with_lines(s, n)
    return engine, root


REMIT_SAMPLES = [t.replace("CLP*e1*", "CLP*e101*").replace("CLP*e2*", "CLP*e102*") for t in X12_835]
GOOD_REMIT = swap(swap(GOOD_835, "CLP*e1*", "CLP*e101*"), "CLP*e2*", "CLP*e102*")
NAN_AMOUNT = swap(GOOD_REMIT, "CAS*CO*197*1850~\nLQ*HE*M62", "CAS*CO*45*NaN**253*1~\nLQ*HE*M62")


@fuzz(150)
@given(st.one_of(mutated_x12(REMIT_SAMPLES), x12_text))
@example(NAN_AMOUNT)
@example(SUPERSCRIPT_COUNT)
@example(swap(GOOD_REMIT, "CLP*e101*4*1850*0*0*12*PCN0001*11*1~\n", ""))
@example(swap(GOOD_REMIT, "CLP*e102*", "CLP*e\x00102*"))
def test_835_import_never_raises(remit_db, text):
    engine, root = remit_db
    folder = fresh_dir(root)
    path = folder / "remit.835"
    try:
        path.write_bytes(text.encode("latin-1"))  # byte for byte what the reader decodes
    except UnicodeEncodeError:
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        summary = import_remit(engine, path)
    finally:
        shutil.rmtree(folder)
    assert_problems_name_the_file(summary, "remit.835", len(text))  # segment numbers: any character can end one

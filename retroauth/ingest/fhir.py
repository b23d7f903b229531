"""Import a FHIR R4 bulk export (NDJSON, one resource per line) into the database and object storage.

How it works:
- Files are named ``<ResourceType>.ndjson`` or ``<ResourceType>.<anything>.ndjson`` (``.gz`` too) and
  are read in dependency order: Organization, Location and Practitioner first (kept in small
  in-memory indexes, they are only needed to resolve references), then Patient, Coverage,
  Encounter, then Procedure, Condition, DocumentReference and Claim. Other types are counted, not read.
- Files are streamed line by line in batches (``batch_size`` lines, or fewer when the lines are big):
  memory stays flat whatever the export's size. References to patients and encounters are resolved
  per batch with one query against the database, which also finds resources imported by an earlier
  (incremental) export; the in-memory state is the reference indexes plus one NPI per encounter.
- Each batch is written with one set-based upsert per table (``retroauth.ingest.upsert``), in one
  transaction. Importing the same export again changes nothing: no new rows, no updated rows, no
  document written again.
- A bad line (invalid JSON, a required field missing, a reference that resolves to nothing, a bad
  date, undecodable content, a string no database text can hold: a NUL or half a surrogate pair)
  becomes an ``ImportProblem`` naming file, line, resource and field, and the rest of the batch goes
  through. Each resource is one row, so it goes in whole or not at all. A ``.gz`` file cut short
  ends with a problem at the line it stops on; the lines before it go in.

Mapping decisions (also in the report of the change that added this module):
- place of service from the encounter class: EMER 23, IMP/ACUTE 21, OBSENC 22, HH 12, VR 02; AMB is
  22 (outpatient hospital) when its Location is typed as a hospital (v3 RoleCode HOSP, HU, ER, ...),
  else 11 (office), since an ambulatory visit is most often an office visit.
- time zone of an encounter: the timezone extension of its Location, of the Location's managing
  Organization, of its serviceProvider Organization, else ``default_timezone``.
- a service line's rendering NPI: the Procedure's performer, else the encounter's primary performer;
  a conditional reference ``Practitioner?identifier=<us-npi>|<npi>`` gives the NPI even when the
  Practitioner itself is not in the export.
- line numbers are append-only per encounter: a Procedure already imported keeps its number (matched
  by its id), new ones get the next numbers in (performed, id) order. So re-imports and later
  exports never renumber a line that a case may already point at.
- diagnosis rank: ``Encounter.diagnosis.rank`` where the export has it; else append-only like line
  numbers, in (encounter-diagnosis before other categories, recorded, id) order.
- documents: stored under ``documents/<patient db id>/<hash of source system and FHIR id>.<ext>``:
  from ids only, stable across re-imports, never from content.
- Coverage.payor -> payer id through ``payer_map`` (keys: ``system|value`` or value of the payor's
  identifiers, or its name); an unmapped payor is a problem, a self-pay (Patient) payor is skipped.
"""

from __future__ import annotations

import base64
import binascii
import csv
import gzip
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Generic, NamedTuple, Protocol, TypeVar
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from retroauth.ingest.errors import FieldError, ImportProblem, ImportSummary, IngestError
from retroauth.ingest.upsert import UpsertResult, too_long, upsert, write_batch
from retroauth.models import ClinicalDocument, Coverage, Diagnosis, Encounter, Patient, ServiceLine
from retroauth.rules import code_problem
from retroauth.storage import Storage, StorageError, key, sha256_hex
from retroauth.vocab import (
    CODE_SYSTEM_URIS,
    FHIR_ENCOUNTER_CLASSES,
    AdmissionType,
    CodeSystem,
    CoverageDiscovery,
)

logger = logging.getLogger(__name__)

RESOURCE_ORDER = (
    "Organization", "Location", "Practitioner",
    "Patient", "Coverage", "Encounter",
    "Procedure", "Condition", "DocumentReference", "Claim",
)  # fmt: skip

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
LOINC = "http://loinc.org"
TIMEZONE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/timezone"
DEFAULT_COVERAGE_FROM = date(2000, 1, 1)

_FILE_NAME = re.compile(r"^([A-Z][A-Za-z]*)(?:\.[A-Za-z0-9_-]+)*\.ndjson(?:\.gz)?$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")
_PARTIAL_DATE = re.compile(r"^\d{4}(-\d{2})?$")
# A JSON escape of NUL or of half a surrogate pair: only lines with one are searched for bad strings.
_MAYBE_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89abAB][0-9a-fA-F]{2})")
# What reading a file can raise once it is open: a .gz cut short (EOFError), not gzip (BadGzipFile, an
# OSError), corrupt deflate data (zlib.error), a failing disk.
_UNREADABLE = (OSError, EOFError, zlib.error)
_BATCH_BYTES = 32 * 1024 * 1024  # a batch of big documents is cut short to keep memory flat
_PUT_THREADS = 8

# Billing code systems first: a CPT code on a Procedure is what payer rules are written in.
_PROCEDURE_PREFERENCE = (CodeSystem.CPT, CodeSystem.HCPCS, CodeSystem.ICD10PCS, CodeSystem.SNOMED)
_DIAGNOSIS_PREFERENCE = (CodeSystem.ICD10CM, CodeSystem.SNOMED)
_POS_BY_CLASS = {"EMER": "23", "IMP": "21", "ACUTE": "21", "OBSENC": "22", "HH": "12", "VR": "02"}
_PRIMARY_PERFORMER = {"PPRF", "ATND", "PRF"}  # v3 ParticipationType
_HOSPITAL_LOCATION_TYPES = {"HOSP", "HU", "ER", "ETU", "GACH", "ICU"}  # v3 RoleCode
_PRIORITY = {  # v3 ActPriority
    "EM": AdmissionType.EMERGENCY, "S": AdmissionType.EMERGENCY, "CS": AdmissionType.EMERGENCY,
    "UR": AdmissionType.URGENT, "A": AdmissionType.URGENT,
    "EL": AdmissionType.ELECTIVE, "R": AdmissionType.ELECTIVE,
}  # fmt: skip
_SKIP_STATUS = {
    "Encounter": {"planned", "cancelled", "entered-in-error"},
    "Procedure": {"not-done", "entered-in-error"},
    "DocumentReference": {"entered-in-error"},
    "Coverage": {"entered-in-error"},
    "Claim": {"entered-in-error"},
}
_EXTENSIONS = {"text/plain": "txt", "text/html": "html", "application/pdf": "pdf", "text/rtf": "rtf",
               "application/rtf": "rtf", "text/xml": "xml", "application/xml": "xml", "application/json": "json"}
_STATES = dict(zip(
    "alabama alaska arizona arkansas california colorado connecticut delaware district_of_columbia florida georgia "
    "hawaii idaho illinois indiana iowa kansas kentucky louisiana maine maryland massachusetts michigan minnesota "
    "mississippi missouri montana nebraska nevada new_hampshire new_jersey new_mexico new_york north_carolina "
    "north_dakota ohio oklahoma oregon pennsylvania puerto_rico rhode_island south_carolina south_dakota tennessee "
    "texas utah vermont virginia washington west_virginia wisconsin wyoming".split(),
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC ND OH OK "
    "OR PA PR RI SC SD TN TX UT VT VA WA WV WI WY".split(),
))  # fmt: skip
CSV_REQUIRED = ("patient_source_id", "payer_id", "member_id", "effective_from")


class Progress(Protocol):
    """Called after each batch with the lines (or rows) of that resource type done so far."""

    def __call__(self, resource_type: str, lines_done: int) -> None: ...


def import_fhir(
    engine: sa.Engine,
    storage: Storage,
    directory: str | Path,
    *,
    source_system: str = "fhir",
    coverage_csv: str | Path | None = None,
    default_payer: str | None = None,
    default_timezone: str = "America/Chicago",
    progress: Progress | None = None,
    batch_size: int = 500,
    payer_map: Mapping[str, str] | None = None,
) -> ImportSummary:
    """Import the bulk export in ``directory``; see the module docstring.

    - ``coverage_csv``: coverages for exports without Coverage resources (columns
      ``patient_source_id, payer_id, member_id, plan_name, effective_from, effective_to, discovered_at,
      discovery_method``; ``patient_source_id`` is the FHIR Patient id).
    - ``default_payer``: every patient of ``source_system`` still without a coverage gets one with
      this payer: member id ``DEMO`` + a hash of the patient id, effective from the first encounter (or 2000-01-01 without one), discovered
      at the patient's first encounter, on file.
    - ``payer_map``: Coverage.payor identifier (``system|value`` or value) or name -> payer id.

    Raises ``IngestError`` only when the import cannot run at all; bad lines are in the summary.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IngestError(f"not a directory: {directory}")
    if batch_size < 1:
        raise IngestError("batch_size must be at least 1")
    if _zone(default_timezone) is None:
        raise IngestError(f"unknown time zone {default_timezone!r}")
    if coverage_csv is not None:
        if not Path(coverage_csv).is_file():
            raise IngestError(f"coverage CSV not found: {coverage_csv}")
        _csv_columns(Path(coverage_csv))  # a wrong file fails before anything is imported

    files: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and (m := _FILE_NAME.match(path.name)):
            files.setdefault(m.group(1), []).append(path)

    run = _Import(engine, storage, source_system, default_timezone, progress, batch_size, payer_map or {})
    for resource_type in RESOURCE_ORDER:
        for path in files.pop(resource_type, []):
            run.import_file(resource_type, path)
    for resource_type, paths in files.items():  # not needed for retro-authorization: count only
        run.summary.ignored[resource_type] = sum(_count_lines(p) for p in paths)
    if coverage_csv is not None:
        run.import_coverage_csv(Path(coverage_csv))
    if default_payer:
        run.default_coverages(default_payer)
    return run.summary


# --- small pure helpers --------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _clip(value: Any, length: int) -> str | None:
    """Free text cut to its column (a too-long title must not reject a whole note)."""
    text = _text(value)
    return text[:length] if text else None


def _codings(concept: Any) -> Iterator[dict[str, Any]]:
    """The codings of a CodeableConcept, or of a list of them. A coding whose system or code is not a
    string is no coding at all (and would break the sets and lookups the codes go into)."""
    for cc in concept if isinstance(concept, list) else [concept]:
        yield from (c for c in _as_list(_as_dict(cc).get("coding"))
                    if isinstance(c, dict) and all(isinstance(c.get(k, ""), str) for k in ("system", "code")))


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file name
        return None


def parse_instant(value: Any, tz: str, field: str) -> datetime:
    """A FHIR dateTime/instant as an aware datetime: its own offset when it has one, else the wall
    time in ``tz`` (a date alone is its local midnight). Partial dates cannot be placed in time."""
    if not isinstance(value, str) or not _DATETIME.match(value):
        raise FieldError(field, "not a FHIR dateTime with at least a full date")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FieldError(field, "not a valid date or time") from None
    # Year 1, or a time in year 9999, leaves datetime's range once moved to UTC or another zone; a date
    # alone may be 9999-12-31 (an open end).
    if parsed.year == 1 or (parsed.year == 9999 and "T" in value):
        raise FieldError(field, "out of range (year 0001, or a time in year 9999)")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=_zone(tz))


def parse_date(value: Any, field: str, *, partial_ok: bool = False) -> date | None:
    if partial_ok and isinstance(value, str) and _PARTIAL_DATE.match(value):
        return None  # a year or year-month (allowed for birthDate): not a date we can store
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}$", value):
        raise FieldError(field, "not a date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise FieldError(field, "not a valid date") from None


def _unstorable(value: Any) -> str | None:
    """The path (``name[0].family``) of the first string no database text column can hold: one with a
    NUL (PostgreSQL refuses it) or half of a surrogate pair (it cannot be encoded as UTF-8)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:  # iterative: the JSON may be nested as deep as the decoder allowed
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item or any("\ud800" <= c <= "\udfff" for c in item):
                return path or "(json)"
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items())
                         if str(k).isprintable())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def _npi(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) == 10 and value.isascii() and value.isdigit() else None


def _code_element(r: Mapping[str, Any], name: str) -> str | None:
    """A ``code`` element such as ``status``: a string, or missing."""
    value = r.get(name)
    if value is not None and not isinstance(value, str):
        raise FieldError(name, "not a code (a JSON string)")
    return value


def _identifiers(resource: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    out = []
    for ident in _as_list(resource.get("identifier")):
        value = _as_dict(ident).get("value")
        if isinstance(value, str) and value:
            out.append((_text(ident.get("system")), value))
    return out


def _timezone_extension(resource: Mapping[str, Any]) -> str | None:
    for ext in _as_list(resource.get("extension")):
        if _as_dict(ext).get("url") == TIMEZONE_EXTENSION:
            name = ext.get("valueCode")
            if not isinstance(name, str) or _zone(name) is None:
                raise FieldError("extension[timezone]", "not an IANA time zone")
            return name
    return None


def _person_name(resource: Mapping[str, Any]) -> tuple[str, str]:
    """(family, given) of the official name, else the first one in use."""
    names = [n for n in _as_list(resource.get("name")) if isinstance(n, dict)]
    name = next((n for n in names if n.get("use") == "official"), None) or next(
        (n for n in names if n.get("use") not in ("old", "maiden")), {}
    )
    family = _text(name.get("family")) or ""
    given = " ".join(g for g in _as_list(name.get("given")) if isinstance(g, str))
    if not family and not given:
        family = _text(name.get("text")) or ""
    return family, given


def _pick_code(concept: Any, preference: Sequence[CodeSystem], field: str) -> tuple[CodeSystem, str, str | None]:
    """(code system, code, display) of the preferred coding in a known code system."""
    found: dict[CodeSystem, dict[str, Any]] = {}
    for coding in _codings(concept):
        system = CODE_SYSTEM_URIS.get(coding.get("system", ""))
        if system is not None and _text(coding.get("code")) and system not in found:
            found[system] = coding
    for system in preference:
        if system in found:
            coding = found[system]
            code = coding["code"].strip()
            if problem := code_problem(system, code):
                raise FieldError(f"{field}.coding.code", problem)
            display = coding.get("display") or _as_dict(concept).get("text")
            return system, code, _clip(display, 512)
    raise FieldError(f"{field}.coding", "no code in a supported code system")


def _check_lengths(model: type[SQLModel], row: Mapping[str, Any], fields: Mapping[str, str]) -> None:
    """Identifiers too long for their column are an error (cutting them would make a wrong id)."""
    for column in too_long(model, row):
        raise FieldError(fields.get(column, column), "longer than its database column allows")


def _money(value: Any) -> Decimal | None:
    amount = _as_dict(value).get("value")
    if amount is None or isinstance(amount, bool):
        return None
    try:
        money = Decimal(str(amount)).quantize(Decimal("0.01"))
    except InvalidOperation:
        return None
    return money if money.is_finite() else None  # JSON as Python reads it has NaN and Infinity


def _count_lines(path: Path) -> int:
    """Lines of a file not imported: counted at C speed, not parsed (in a .gz cut short, those before the cut)."""
    lines = 0
    with _open(path) as fh:
        try:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                lines += chunk.count(b"\n")
        except _UNREADABLE:
            pass
    return lines


def _csv_lines(fh: IO[bytes]) -> Iterator[str]:
    """A CSV file's lines decoded one at a time: a bad byte is reported at its own line, after the rows
    before it (a text stream decodes ahead in chunks and would fail early)."""
    for i, raw in enumerate(fh):
        yield raw.decode("utf-8-sig" if i == 0 else "utf-8")


def _csv_columns(path: Path) -> list[str]:
    try:
        with path.open("rb") as fh:
            header = next(csv.reader(_csv_lines(fh), strict=True), [])
    except (UnicodeDecodeError, csv.Error):
        raise IngestError(f"{path.name}: the header (line 1) is not UTF-8 CSV") from None
    if missing := [c for c in CSV_REQUIRED if c not in header]:
        raise IngestError(f"{path.name}: missing columns {', '.join(missing)}")
    return header


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def demo_member_id(patient_source_id: str) -> str:
    """The member id ``default_payer`` gives a patient: deterministic, and no patient data in it."""
    return "DEMO" + hashlib.sha256(patient_source_id.encode()).hexdigest()[:10].upper()


# --- references ----------------------------------------------------------------------------------


class Ref(NamedTuple):
    type: str | None  # None for urn:uuid references
    id: str | None = None  # literal references
    system: str | None = None  # conditional (identifier) references
    value: str | None = None


def parse_ref(obj: Any) -> Ref | None:
    """``Type/id`` (also absolute, with ``_history``), ``urn:uuid:id``, ``Type?identifier=sys|value``,
    or a logical reference (``Reference.identifier``). Contained (``#x``) references are not followed."""
    ref_obj = _as_dict(obj)
    ref = ref_obj.get("reference")
    declared = _text(ref_obj.get("type"))
    if isinstance(ref, str) and ref:
        if ref.startswith("urn:uuid:"):
            return Ref(declared, ref[len("urn:uuid:") :])
        if ref.startswith("#"):
            return None
        path, _, query = ref.partition("?")
        if query:
            rtype = path.rstrip("/").rsplit("/", 1)[-1]
            for part in query.split("&"):
                name, _, raw = part.partition("=")
                if name == "identifier" and raw:
                    system, bar, value = unquote(raw).rpartition("|")
                    return Ref(rtype, None, (system or None) if bar else None, value)
            return None
        segments = path.split("/")
        if "_history" in segments:
            segments = segments[: segments.index("_history")]
        return Ref(segments[-2], segments[-1]) if len(segments) >= 2 and segments[-1] else None
    ident = _as_dict(ref_obj.get("identifier"))
    if isinstance(ident.get("value"), str) and ident["value"]:
        return Ref(declared, None, _text(ident.get("system")), ident["value"])
    return None


T = TypeVar("T")


class _Index(Generic[T]):
    """Resources of one type by FHIR id and by identifier, for resolving literal and conditional refs."""

    def __init__(self, resource_type: str):
        self.resource_type = resource_type
        self.by_id: dict[str, T] = {}
        self.by_identifier: dict[tuple[str | None, str], str] = {}

    def add(self, fhir_id: str, identifiers: list[tuple[str | None, str]], info: T) -> None:
        self.by_id[fhir_id] = info
        for system, value in identifiers:
            self.by_identifier[(system, value)] = fhir_id
            self.by_identifier.setdefault((None, value), fhir_id)  # ``identifier=value`` (any system)

    def get(self, ref: Ref | None) -> T | None:
        if ref is None or ref.type not in (None, self.resource_type):
            return None
        if ref.id is not None:
            return self.by_id.get(ref.id)
        fhir_id = self.by_identifier.get((ref.system, ref.value or ""))
        return self.by_id.get(fhir_id) if fhir_id is not None else None


class _Org(NamedTuple):
    name: str | None
    npi: str | None
    timezone: str | None
    identifiers: tuple[str, ...]  # "system|value" and value, for payer_map


class _Location(NamedTuple):
    name: str | None
    timezone: str | None
    hospital: bool
    organization: Ref | None


class _Practitioner(NamedTuple):
    npi: str | None
    name: str | None


@dataclass(frozen=True)
class _Src:
    """Where a row came from: what a problem names."""

    file: str
    line: int
    resource: str


@dataclass
class _Line:
    row: dict[str, Any]
    order: tuple[Any, ...]


@dataclass
class _Dx:
    row: dict[str, Any]
    explicit_rank: bool
    order: tuple[Any, ...]


@dataclass
class _Doc:
    row: dict[str, Any]
    data: bytes


_EPOCH = datetime.fromisoformat("0001-01-01T00:00:00+00:00")


# --- the import run ------------------------------------------------------------------------------


class _Import:
    def __init__(
        self,
        engine: sa.Engine,
        storage: Storage,
        source_system: str,
        default_timezone: str,
        progress: Progress | None,
        batch_size: int,
        payer_map: Mapping[str, str],
    ):
        self.engine = engine
        self.storage = storage
        self.source_system = source_system
        self.tz = default_timezone
        self.progress = progress
        self.batch_size = batch_size
        self.payer_map = payer_map
        self.summary = ImportSummary()
        self.organizations: _Index[_Org] = _Index("Organization")
        self.locations: _Index[_Location] = _Index("Location")
        self.practitioners: _Index[_Practitioner] = _Index("Practitioner")
        # Per encounter, only what the table has no column for: its primary performer's NPI.
        self.encounter_npi: dict[str, str] = {}
        self.skipped_encounters: set[str] = set()  # cancelled etc.: their procedures are skipped too
        self.condition_ranks: dict[str, int] = {}  # from Encounter.diagnosis.rank

    # -- reading -----------------------------------------------------------------------------------

    def import_file(self, resource_type: str, path: Path) -> None:
        counts = self.summary.of(resource_type)
        batch: list[tuple[int, dict[str, Any]]] = []
        size = 0
        lineno = 0
        with _open(path) as fh:
            try:
                for lineno, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    counts.read += 1
                    resource = self._parse_line(path.name, lineno, resource_type, raw)
                    if resource is None:
                        continue
                    batch.append((lineno, resource))
                    size += len(raw)
                    if len(batch) >= self.batch_size or size >= _BATCH_BYTES:
                        self._flush(resource_type, path.name, batch)
                        batch, size = [], 0
            except _UNREADABLE as e:  # a .gz cut short or corrupt: the lines before go in
                why = "the compressed data is cut short or corrupt" if path.name.endswith(".gz") else (
                    f"could not be read ({type(e).__name__})")
                self._problem(_Src(path.name, lineno + 1, resource_type), "(file)",
                              f"{why}: this line and the rest of the file were not read")  # fmt: skip
        if batch:
            self._flush(resource_type, path.name, batch)

    def _parse_line(self, fname: str, lineno: int, resource_type: str, raw: bytes) -> dict[str, Any] | None:
        try:
            resource = json.loads(raw.strip())
        except json.JSONDecodeError as e:  # e.msg and the column only: the text may be patient data
            self._problem(_Src(fname, lineno, resource_type), "(json)", f"invalid JSON: {e.msg} at column {e.colno}")
            return None
        except UnicodeDecodeError:
            self._problem(_Src(fname, lineno, resource_type), "(json)", "not UTF-8 text")
            return None
        except (ValueError, RecursionError):  # an integer of thousands of digits; arrays nested too deep
            self._problem(_Src(fname, lineno, resource_type), "(json)", "invalid JSON: a number too long "
                                                                        "or nesting too deep")  # fmt: skip
            return None
        if not isinstance(resource, dict):
            self._problem(_Src(fname, lineno, resource_type), "(json)", "not a JSON object")
            return None
        if _MAYBE_UNSTORABLE.search(raw) and (path := _unstorable(resource)) is not None:
            rid = resource.get("id")
            named = f"{resource_type}/{rid}" if path != "id" and isinstance(rid, str) and rid.strip() else resource_type
            self._problem(_Src(fname, lineno, named), path, "contains a NUL or an unpaired surrogate: "
                                                            "no database text can hold it")  # fmt: skip
            return None
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid.strip():
            why = "missing" if rid is None else "not a non-empty string"
            self._problem(_Src(fname, lineno, resource_type), "id", why)
            return None
        if resource.get("resourceType") != resource_type:
            self._problem(_Src(fname, lineno, f"{resource_type}/{rid}"), "resourceType",
                          f"not {resource_type} as the file name says")  # fmt: skip
            return None
        return resource

    def _flush(self, resource_type: str, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        getattr(self, f"_batch_{resource_type.lower()}")(fname, batch)
        if self.progress is not None:
            self.progress(resource_type, self.summary.of(resource_type).read)

    def _problem(self, src: _Src, field: str, message: str) -> None:
        problem = ImportProblem(src.file, src.line, src.resource, field, message)
        logger.warning("import problem: %s", problem)
        self.summary.add_problem(problem)

    def _map(
        self,
        fname: str,
        resource_type: str,
        batch: list[tuple[int, dict[str, Any]]],
        convert: Callable[[dict[str, Any]], T | None],
    ) -> list[tuple[_Src, T]]:
        """Each resource through ``convert``; a problem for those it rejects, a skip for ``None``."""
        out = []
        for lineno, resource in batch:
            src = _Src(fname, lineno, f"{resource_type}/{resource['id']}")
            try:
                value = convert(resource)
            except FieldError as e:
                self._problem(src, e.field, e.message)
                continue
            except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
                # A shape FHIR does not allow (a string where an object belongs): name the type only.
                self._problem(src, "(structure)", f"unexpected structure ({type(e).__name__})")
                continue
            if value is None:
                self.summary.of(resource_type).skipped += 1
            else:
                out.append((src, value))
        return out

    # -- writing -----------------------------------------------------------------------------------

    def _write(
        self,
        counts_key: str,
        items: list[tuple[_Src, T]],
        write: Callable[[Session, list[tuple[_Src, T]]], UpsertResult],
    ) -> None:
        write_batch(self.engine, items, write, counted=lambda result, done: self._count(counts_key, result, len(done)),
                    rejected=lambda src: self._problem(src, "(row)", "the database rejected the row (constraint or type)"))

    def _count(self, counts_key: str, result: UpsertResult, n_items: int) -> None:
        counts = self.summary.of(counts_key)
        counts.inserted += len(result.inserted)
        counts.updated += len(result.updated)
        counts.unchanged += len(result.unchanged)
        counts.skipped += n_items - len(result)  # repeated within the batch

    def _lookup(self, model: type[SQLModel], fhir_ids: set[str], *extra: Any) -> dict[str, sa.Row[Any]]:
        """Rows of ``model`` from this source system by FHIR id: ``{fhir id: (source_id, id, *extra)}``."""
        found: dict[str, sa.Row[Any]] = {}
        ids = sorted(fhir_ids)
        if not ids:
            return found
        table = model.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 1000):
                stmt = sa.select(table.c.source_id, table.c.id, *extra).where(
                    table.c.source_system == self.source_system, table.c.source_id.in_(ids[start : start + 1000])
                )
                found.update({row.source_id: row for row in conn.execute(stmt)})
        return found

    def _encounters(self, fhir_ids: set[str]) -> dict[str, sa.Row[Any]]:
        table = Encounter.__table__  # type: ignore[attr-defined]
        return self._lookup(Encounter, fhir_ids, table.c.timezone, table.c.admitted_at)

    @staticmethod
    def _ref_ids(batch: list[tuple[int, dict[str, Any]]], get: Callable[[dict[str, Any]], Any], rtype: str) -> set[str]:
        ids = set()
        for _, resource in batch:
            try:
                ref = parse_ref(get(resource))
            except (TypeError, AttributeError, KeyError, IndexError):
                continue  # the mapping step reports it
            if ref is not None and ref.id and ref.type in (None, rtype):
                ids.add(ref.id)
        return ids

    def _resolve(self, obj: Any, rtype: str, found: Mapping[str, T], field: str) -> T:
        """The row a required literal reference points at, or a problem naming the field."""
        if obj is None:
            raise FieldError(field, "missing")
        ref = parse_ref(obj)
        if ref is None:
            raise FieldError(field, "not a reference that can be followed")
        if ref.type not in (None, rtype):
            raise FieldError(field, f"must reference a {rtype}")
        if ref.id is None:
            raise FieldError(field, f"conditional references to {rtype} are not supported")
        row = found.get(ref.id)
        if row is None:
            raise FieldError(field, f"{rtype} not found (not in this export nor imported before)")
        return row

    def _practitioner(self, obj: Any) -> tuple[str | None, str | None]:
        """(NPI, name) of a Practitioner reference: from the index, or the NPI in a conditional ref."""
        ref = parse_ref(obj)
        info = self.practitioners.get(ref)
        if info is not None:
            return info.npi, info.name
        npi = _npi(ref.value) if ref is not None and ref.system == NPI_SYSTEM else None
        return npi, None

    # -- reference data: kept in memory only ------------------------------------------------------

    def _batch_organization(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        def convert(r: dict[str, Any]) -> _Org:
            idents = _identifiers(r)
            npi = next((_npi(v) for s, v in idents if s == NPI_SYSTEM and _npi(v)), None)
            keys = tuple(k for s, v in idents for k in (f"{s}|{v}" if s else v, v))
            org = _Org(_clip(r.get("name"), 256), npi, _timezone_extension(r), keys)
            self.organizations.add(r["id"], idents, org)
            return org

        self._map(fname, "Organization", batch, convert)

    def _batch_location(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        def convert(r: dict[str, Any]) -> _Location:
            codes = {c.get("code") for c in _codings(r.get("type"))}
            loc = _Location(_clip(r.get("name"), 256), _timezone_extension(r), bool(codes & _HOSPITAL_LOCATION_TYPES),
                            parse_ref(r.get("managingOrganization")))  # fmt: skip
            self.locations.add(r["id"], _identifiers(r), loc)
            return loc

        self._map(fname, "Location", batch, convert)

    def _batch_practitioner(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        def convert(r: dict[str, Any]) -> _Practitioner:
            idents = _identifiers(r)
            npi = next((_npi(v) for s, v in idents if s == NPI_SYSTEM and _npi(v)), None)
            names = [n for n in _as_list(r.get("name")) if isinstance(n, dict)]
            name = None
            if names:
                n = names[0]
                parts = [*_as_list(n.get("prefix")), *_as_list(n.get("given")), n.get("family")]
                name = _clip(" ".join(p for p in parts if isinstance(p, str)) or n.get("text"), 256)
            info = _Practitioner(npi, name)
            self.practitioners.add(r["id"], idents, info)
            return info

        self._map(fname, "Practitioner", batch, convert)

    # -- patients ----------------------------------------------------------------------------------

    def _batch_patient(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        items = self._map(fname, "Patient", batch, self._patient_row)
        self._write("Patient", items, lambda s, it: upsert(s, Patient, [row for _, row in it]))

    def _patient_row(self, r: dict[str, Any]) -> dict[str, Any]:
        family, given = _person_name(r)
        birth = parse_date(r["birthDate"], "birthDate", partial_ok=True) if "birthDate" in r else None
        addresses = [a for a in _as_list(r.get("address")) if isinstance(a, dict)]
        addr = next((a for a in addresses if a.get("use") == "home"), addresses[0] if addresses else {})
        phones = [t for t in _as_list(r.get("telecom"))
                  if _as_dict(t).get("system") == "phone" and _text(t.get("value"))]  # fmt: skip
        phone = next((t for t in phones if t.get("use") in ("home", "mobile")), phones[0] if phones else {})
        mrn = next(
            (i["value"] for i in _as_list(r.get("identifier"))
             if any(c.get("code") == "MR" for c in _codings(_as_dict(i).get("type"))) and _text(i.get("value"))),
            None,
        )  # fmt: skip
        row = {
            "source_system": self.source_system,
            "source_id": r["id"],
            "mrn": mrn,
            "family_name": family[:128],
            "given_name": given[:128],
            "birth_date": birth,
            "sex": _clip(r.get("gender"), 16),
            "address_line": _clip(", ".join(x for x in _as_list(addr.get("line")) if isinstance(x, str)), 256),
            "city": _clip(addr.get("city"), 128),
            "state": _state(addr.get("state")),
            "postal_code": _postal_code(addr.get("postalCode")),
            "phone": _clip(phone.get("value"), 32),
        }
        _check_lengths(Patient, row, {"source_id": "id", "mrn": "identifier[MR].value"})
        return row

    # -- coverage ----------------------------------------------------------------------------------

    def _batch_coverage(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        patients = self._lookup(Patient, self._ref_ids(batch, lambda r: r.get("beneficiary"), "Patient"))
        items = self._map(fname, "Coverage", batch, lambda r: self._coverage_row(r, patients))
        self._write("Coverage", items, self._write_coverages)

    def _coverage_row(self, r: dict[str, Any], patients: Mapping[str, sa.Row[Any]]) -> dict[str, Any] | None:
        if _code_element(r, "status") in _SKIP_STATUS["Coverage"]:
            return None
        patient = self._resolve(r.get("beneficiary"), "Patient", patients, "beneficiary")
        payors = _as_list(r.get("payor"))
        if not payors:
            raise FieldError("payor", "missing")
        payor_ref = parse_ref(payors[0])
        if payor_ref is not None and payor_ref.type in ("Patient", "RelatedPerson"):
            return None  # self-pay: not an insurance that authorizes anything
        payer_id = self._payer_id(payors[0], payor_ref)
        member = _text(r.get("subscriberId")) or next(
            (i["value"] for i in _as_list(r.get("identifier"))
             if any(c.get("code") == "MB" for c in _codings(_as_dict(i).get("type"))) and _text(i.get("value"))),
            None,
        ) or next((v for _, v in _identifiers(r)), None)  # fmt: skip
        if member is None:
            raise FieldError("subscriberId", "missing (no member id)")
        period = _as_dict(r.get("period"))
        if "start" not in period:
            raise FieldError("period.start", "missing")
        zone = _zone(self.tz)
        starts = parse_instant(period["start"], self.tz, "period.start")
        ends = parse_instant(period["end"], self.tz, "period.end") if "end" in period else None
        classes = {c.get("code"): cls for cls in _as_list(r.get("class")) for c in _codings(_as_dict(cls).get("type"))}
        plan, group = _as_dict(classes.get("plan")), _as_dict(classes.get("group"))
        order = r.get("order")
        row = {
            "patient_id": patient.id,
            "payer_id": payer_id,
            "member_id": member,
            "plan_name": _clip(plan.get("name") or plan.get("value") or _as_dict(r.get("type")).get("text"), 128),
            "group_number": _text(group.get("value")),
            "priority": order if isinstance(order, int) and order > 0 else 1,
            "effective_from": starts.astimezone(zone).date(),
            "effective_to": ends.astimezone(zone).date() if ends else None,
            "discovered_at": starts,  # on file from its start: the export is the provider's own record
            "discovery_method": CoverageDiscovery.ON_FILE.value,
        }
        _check_lengths(Coverage, row, {"member_id": "subscriberId", "payer_id": "payor[0]", "group_number": "class"})
        return row

    def _payer_id(self, payor: Any, ref: Ref | None) -> str:
        org = self.organizations.get(ref)
        candidates: list[str] = []
        if ref is not None and ref.value:
            candidates += [f"{ref.system}|{ref.value}" if ref.system else ref.value, ref.value]
        if org is not None:
            candidates += [*org.identifiers, *([org.name] if org.name else [])]
        if display := _text(_as_dict(payor).get("display")):
            candidates.append(display)
        for candidate in candidates:
            if candidate in self.payer_map:
                return self.payer_map[candidate]
        folded = {k.casefold(): v for k, v in self.payer_map.items()}
        for candidate in candidates:
            if candidate.casefold() in folded:
                return folded[candidate.casefold()]
        raise FieldError("payor[0]", "payer not in the payer map (map its identifier or name to a payer id)")

    # -- encounters --------------------------------------------------------------------------------

    def _batch_encounter(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        patients = self._lookup(Patient, self._ref_ids(batch, lambda r: r.get("subject"), "Patient"))
        items = self._map(fname, "Encounter", batch, lambda r: self._encounter_row(r, patients))
        self._write("Encounter", items, lambda s, it: upsert(s, Encounter, [row for _, row in it]))

    def _encounter_row(self, r: dict[str, Any], patients: Mapping[str, sa.Row[Any]]) -> dict[str, Any] | None:
        if _code_element(r, "status") in _SKIP_STATUS["Encounter"]:
            self.skipped_encounters.add(r["id"])
            return None
        patient = self._resolve(r.get("subject"), "Patient", patients, "subject")
        klass = r.get("class")  # R4: a Coding; R5: a list of CodeableConcept
        code = klass.get("code") if isinstance(klass, dict) else next((c.get("code") for c in _codings(klass)), None)
        if code is None:
            raise FieldError("class", "missing")
        if not isinstance(code, str) or code not in FHIR_ENCOUNTER_CLASSES:
            raise FieldError("class", "not a supported encounter class")

        places = (self.locations.get(parse_ref(_as_dict(e).get("location"))) for e in _as_list(r.get("location")))
        location = next((loc for loc in places if loc is not None), None)
        provider_ref = parse_ref(r.get("serviceProvider"))
        provider = self.organizations.get(provider_ref)
        location_org = self.organizations.get(location.organization) if location else None
        zones = [place.timezone for place in (location, location_org, provider) if place is not None]
        tz = next((z for z in zones if z), self.tz)

        period = r.get("period")
        if not isinstance(period, dict):
            raise FieldError("period", "missing")
        if "start" not in period:
            raise FieldError("period.start", "missing")
        admitted = parse_instant(period["start"], tz, "period.start")
        discharged = parse_instant(period["end"], tz, "period.end") if "end" in period else None
        if discharged is not None and discharged < admitted:
            raise FieldError("period.end", "before period.start")

        if code == "AMB":
            pos = "22" if location and location.hospital else "11"
        else:
            pos = _POS_BY_CLASS.get(code)
        facility_npi = provider.npi if provider else None
        if facility_npi is None and provider_ref is not None and provider_ref.system == NPI_SYSTEM:
            facility_npi = _npi(provider_ref.value)
        row = {
            "source_system": self.source_system,
            "source_id": r["id"],
            "patient_id": patient.id,
            "encounter_class": FHIR_ENCOUNTER_CLASSES[code].value,
            "admission_type": _admission_type(r, code),
            "admitted_at": admitted,
            "discharged_at": discharged,
            "timezone": tz,
            "facility_name": (provider and provider.name)
            or _clip(_as_dict(r.get("serviceProvider")).get("display"), 256),
            "facility_npi": facility_npi,
            "place_of_service": pos,
        }
        _check_lengths(Encounter, row, {"source_id": "id"})
        if npi := self._primary_performer_npi(r):
            self.encounter_npi[r["id"]] = npi
        for i, dx in enumerate(_as_list(r.get("diagnosis"))):
            cond = parse_ref(_as_dict(dx).get("condition"))
            if cond is not None and cond.id:
                rank = dx.get("rank")
                self.condition_ranks[cond.id] = rank if isinstance(rank, int) and rank > 0 else i + 1
        return row

    def _primary_performer_npi(self, r: dict[str, Any]) -> str | None:
        participants = [p for p in _as_list(r.get("participant")) if isinstance(p, dict) and p.get("individual")]
        primary = [p for p in participants if {c.get("code") for c in _codings(p.get("type"))} & _PRIMARY_PERFORMER]
        for p in primary + participants:
            npi, _ = self._practitioner(p["individual"])
            if npi:
                return npi
        return None

    # -- procedures -> service lines ----------------------------------------------------------------

    def _batch_procedure(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        encounters = self._encounters(self._ref_ids(batch, lambda r: r.get("encounter"), "Encounter"))
        items = self._map(fname, "Procedure", batch, lambda r: self._service_line(r, encounters))
        self._write("Procedure", items, self._write_service_lines)

    def _encounter_of(self, r: dict[str, Any], encounters: Mapping[str, sa.Row[Any]], field: str) -> sa.Row[Any] | None:
        """The encounter a clinical resource belongs to; ``None`` (skip) when it has none or that
        encounter was deliberately not imported."""
        obj = _context_encounter(r) if field == "context.encounter" else r.get(field)
        if obj is None:
            return None
        ref = parse_ref(obj)
        if ref is not None and ref.id in self.skipped_encounters:
            return None
        return self._resolve(obj, "Encounter", encounters, field)

    def _service_line(self, r: dict[str, Any], encounters: Mapping[str, sa.Row[Any]]) -> _Line | None:
        if _code_element(r, "status") in _SKIP_STATUS["Procedure"]:
            return None
        encounter = self._encounter_of(r, encounters, "encounter")
        if encounter is None:
            return None  # not part of a visit: nothing billed on an encounter
        system, code, display = _pick_code(r.get("code"), _PROCEDURE_PREFERENCE, "code")
        if "performedPeriod" in r and "start" in _as_dict(r["performedPeriod"]):
            performed = parse_instant(r["performedPeriod"]["start"], encounter.timezone, "performedPeriod.start")
        elif "performedDateTime" in r:
            performed = parse_instant(r["performedDateTime"], encounter.timezone, "performedDateTime")
        else:
            performed = encounter.admitted_at
        rendering = None
        for performer in _as_list(r.get("performer")):
            rendering, _ = self._practitioner(_as_dict(performer).get("actor"))
            if rendering:
                break
        if rendering is None:
            rendering = self.encounter_npi.get(encounter.source_id)
        row = {
            "encounter_id": encounter.id,
            "source_id": r["id"],
            "code_system": system.value,
            "code": code,
            "description": display,
            "service_date": performed.astimezone(_zone(encounter.timezone)).date(),
            "rendering_npi": rendering,
        }
        _check_lengths(ServiceLine, row, {"source_id": "id", "code": "code.coding.code"})
        return _Line(row, (performed, r["id"]))

    @staticmethod
    def _write_service_lines(session: Session, items: list[tuple[_Src, _Line]]) -> UpsertResult:
        """Line numbers: a procedure seen before keeps its number, new ones follow the highest."""
        table = ServiceLine.__table__  # type: ignore[attr-defined]
        encounter_ids = {line.row["encounter_id"] for _, line in items}
        known: dict[tuple[int, str | None], int] = {}
        top: dict[int, int] = {}
        for enc_id, source_id, number in session.execute(
            sa.select(table.c.encounter_id, table.c.source_id, table.c.line_number)
            .where(table.c.encounter_id.in_(encounter_ids))
        ):
            known[(enc_id, source_id)] = number
            top[enc_id] = max(top.get(enc_id, 0), number)
        rows = []
        seen = set()
        for _, line in sorted(items, key=lambda item: (item[1].row["encounter_id"], item[1].order)):
            enc_id, source_id = line.row["encounter_id"], line.row["source_id"]
            if (enc_id, source_id) in seen:
                continue  # the same Procedure twice in the batch
            seen.add((enc_id, source_id))
            number = known.get((enc_id, source_id))
            if number is None:
                number = top[enc_id] = top.get(enc_id, 0) + 1
            rows.append({**line.row, "line_number": number})
        # charge and units are not in the rows: a Claim or a remittance sets them and they stay.
        return upsert(session, ServiceLine, rows, key=("encounter_id", "line_number"))

    # -- conditions -> diagnoses ------------------------------------------------------------------

    def _batch_condition(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        encounters = self._encounters(self._ref_ids(batch, lambda r: r.get("encounter"), "Encounter"))
        items = self._map(fname, "Condition", batch, lambda r: self._diagnosis(r, encounters))
        self._write("Condition", items, self._write_diagnoses)

    def _diagnosis(self, r: dict[str, Any], encounters: Mapping[str, sa.Row[Any]]) -> _Dx | None:
        status = {c.get("code") for c in _codings(r.get("verificationStatus"))}
        if status & {"entered-in-error", "refuted"}:
            return None
        encounter = self._encounter_of(r, encounters, "encounter")
        if encounter is None:
            return None  # a problem-list entry, not a diagnosis of a visit
        system, code, display = _pick_code(r.get("code"), _DIAGNOSIS_PREFERENCE, "code")
        categories = {c.get("code") for c in _codings(r.get("category"))}
        recorded_raw = r.get("recordedDate") or r.get("onsetDateTime")
        try:
            recorded = parse_instant(recorded_raw, encounter.timezone, "recordedDate")
        except FieldError:
            recorded = None  # only orders the ranks: not worth rejecting a diagnosis over
        explicit = self.condition_ranks.get(r["id"])
        row = {
            "encounter_id": encounter.id,
            "code_system": system.value,
            "code": code,
            "description": display,
            "rank": explicit or 0,
        }
        _check_lengths(Diagnosis, row, {"code": "code.coding.code"})
        order = (0 if "encounter-diagnosis" in categories else 1, recorded or _EPOCH, r["id"])
        return _Dx(row, explicit is not None, order)

    @staticmethod
    def _write_diagnoses(session: Session, items: list[tuple[_Src, _Dx]]) -> UpsertResult:
        table = Diagnosis.__table__  # type: ignore[attr-defined]
        encounter_ids = {dx.row["encounter_id"] for _, dx in items}
        known: set[tuple[int, str, str]] = set()
        top: dict[int, int] = {}
        for enc_id, system, code, rank in session.execute(
            sa.select(table.c.encounter_id, table.c.code_system, table.c.code, table.c.rank).where(
                table.c.encounter_id.in_(encounter_ids)
            )
        ):
            known.add((enc_id, system, code))
            top[enc_id] = max(top.get(enc_id, 0), rank)
        explicit, implicit, seen = [], [], set()
        for _, dx in sorted(items, key=lambda item: (item[1].row["encounter_id"], item[1].order)):
            k = (dx.row["encounter_id"], dx.row["code_system"], dx.row["code"])
            if k in seen:
                continue  # two Conditions with one code on one encounter: one diagnosis
            seen.add(k)
            if dx.explicit_rank:
                explicit.append(dx.row)
            elif k in known:
                implicit.append(dx.row)  # keeps its rank (not updated below)
            else:
                top[k[0]] = top.get(k[0], 0) + 1
                implicit.append({**dx.row, "rank": top[k[0]]})
        key = ("encounter_id", "code_system", "code")
        result = upsert(session, Diagnosis, explicit, key=key)
        more = upsert(session, Diagnosis, implicit, key=key, update=["description"])
        result.update(more)
        result.inserted |= more.inserted
        result.updated |= more.updated
        result.unchanged |= more.unchanged
        return result

    # -- documents -------------------------------------------------------------------------------

    def _batch_documentreference(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        patients = self._lookup(Patient, self._ref_ids(batch, lambda r: r.get("subject"), "Patient"))
        encounters = self._encounters(self._ref_ids(batch, _context_encounter, "Encounter"))
        items = self._map(fname, "DocumentReference", batch, lambda r: self._document(r, patients, encounters))

        # Content already stored with the same bytes under the same key is not written again.
        table = ClinicalDocument.__table__  # type: ignore[attr-defined]
        source_ids = [doc.row["source_id"] for _, doc in items]
        stored: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(source_ids), 1000):
                stmt = sa.select(table.c.source_id, table.c.sha256, table.c.storage_key).where(
                    table.c.source_system == self.source_system, table.c.source_id.in_(source_ids[start : start + 1000])
                )
                stored.update({sid: (sha, k) for sid, sha, k in conn.execute(stmt)})
        to_put = [doc for _, doc in items
                  if stored.get(doc.row["source_id"]) != (doc.row["sha256"], doc.row["storage_key"])]  # fmt: skip
        self.summary.documents_unchanged += len(items) - len(to_put)
        # Content before rows, so a row never points at content that is not there. Writes are I/O
        # (fsync, or an HTTP round trip to S3): a few threads overlap them.
        with ThreadPoolExecutor(max_workers=_PUT_THREADS) as pool:
            failures = dict(zip((id(d) for d in to_put), pool.map(self._put, to_put)))
        rows: list[tuple[_Src, dict[str, Any]]] = []
        for src, doc in items:
            doc.data = b""  # let the batch's bytes go
            if failure := failures.get(id(doc)):
                self._problem(src, "content[0].attachment", f"storing the content failed ({failure})")
                continue
            rows.append((src, doc.row))
        self.summary.documents_written += len(to_put) - sum(1 for f in failures.values() if f)
        self._write("DocumentReference", rows, lambda s, it: upsert(s, ClinicalDocument, [row for _, row in it]))

    def _put(self, doc: _Doc) -> str | None:
        """Store one document's content; the error's type name if that failed (never its message)."""
        try:
            self.storage.put(doc.row["storage_key"], doc.data, content_type=doc.row["content_type"])
        except (StorageError, OSError) as e:
            return type(e).__name__
        return None

    def _document(
        self, r: dict[str, Any], patients: Mapping[str, sa.Row[Any]], encounters: Mapping[str, sa.Row[Any]]
    ) -> _Doc | None:
        if _code_element(r, "status") in _SKIP_STATUS["DocumentReference"]:
            return None
        patient = self._resolve(r.get("subject"), "Patient", patients, "subject")
        encounter = self._encounter_of(r, encounters, "context.encounter")
        loinc = next((c for c in _codings(r.get("type")) if c.get("system") == LOINC and _text(c.get("code"))), None)
        if loinc is None:
            raise FieldError("type.coding", "no LOINC code")
        if "date" in r:
            authored = parse_instant(r["date"], self.tz, "date")
        elif "start" in _as_dict(_as_dict(r.get("context")).get("period")):
            authored = parse_instant(r["context"]["period"]["start"], self.tz, "context.period.start")
        else:
            raise FieldError("date", "missing")
        contents = _as_list(r.get("content"))
        if not contents:
            raise FieldError("content", "missing")
        attachment = _as_dict(_as_dict(contents[0]).get("attachment"))
        encoded = attachment.get("data")
        if not isinstance(encoded, str):
            raise FieldError("content[0].attachment.data", "missing (only inline content is imported)")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError("content[0].attachment.data", "not valid base64") from None
        content_type = _text(attachment.get("contentType")) or "application/octet-stream"
        if len(content_type) > 64:
            content_type = content_type.split(";")[0][:64]
        author = None
        for a in _as_list(r.get("author")):
            _, name = self._practitioner(a)
            author = name or _clip(_as_dict(a).get("display"), 256)
            if author:
                break
        name = hashlib.sha256(f"{self.source_system}\x00{r['id']}".encode()).hexdigest()[:32]
        extension = _EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")
        row = {
            "source_system": self.source_system,
            "source_id": r["id"],
            "patient_id": patient.id,
            "encounter_id": encounter.id if encounter is not None else None,
            "loinc_type": loinc["code"].strip(),
            "title": _clip(attachment.get("title") or r.get("description") or _as_dict(r.get("type")).get("text")
                           or loinc.get("display"), 256),  # fmt: skip
            "author": author,
            "authored_at": authored,
            "content_type": content_type,
            "storage_key": key("documents", patient.id, f"{name}.{extension}"),
            "sha256": sha256_hex(data),
            "size_bytes": len(data),
        }
        _check_lengths(ClinicalDocument, row, {"source_id": "id", "loinc_type": "type.coding.code"})
        return _Doc(row, data)

    # -- claims -> charges of service lines -------------------------------------------------------

    def _batch_claim(self, fname: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        items = self._map(fname, "Claim", batch, self._claim_charges)
        lines = ServiceLine.__table__  # type: ignore[attr-defined]
        encounters = Encounter.__table__  # type: ignore[attr-defined]
        procedure_ids = sorted({pid for _, charges in items for pid in charges})
        found: dict[str, list[tuple[int, Decimal]]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(procedure_ids), 1000):
                stmt = (
                    sa.select(lines.c.source_id, lines.c.id, lines.c.charge)
                    .join(encounters, encounters.c.id == lines.c.encounter_id)
                    .where(encounters.c.source_system == self.source_system,
                           lines.c.source_id.in_(procedure_ids[start : start + 1000]))
                )  # fmt: skip
                for sid, line_id, charge in conn.execute(stmt):
                    found.setdefault(sid, []).append((line_id, charge))
        ready: list[tuple[_Src, list[dict[str, Any]]]] = []
        for src, charges in items:
            if missing := [pid for pid in charges if pid not in found]:
                self._problem(src, "procedure.procedureReference", f"{len(missing)} Procedure(s) not imported")
                continue
            ready.append((src, [
                {"line_id": line_id, "charge": amount}
                for pid, amount in charges.items() for line_id, charge in found[pid] if charge != amount
            ]))  # fmt: skip

        def write(session: Session, batch_items: list[tuple[_Src, list[dict[str, Any]]]]) -> UpsertResult:
            result = UpsertResult()
            updates = [u for _, us in batch_items for u in us]
            if updates:
                session.execute(
                    sa.update(lines).where(lines.c.id == sa.bindparam("line_id")).values(charge=sa.bindparam("charge")),
                    updates,
                )
            for src, us in batch_items:
                result[(src.resource,)] = 0
                (result.updated if us else result.unchanged).add((src.resource,))
            return result

        self._write("Claim", ready, write)

    def _claim_charges(self, r: dict[str, Any]) -> dict[str, Decimal] | None:
        """Procedure FHIR id -> charge, from the items that point at a procedure."""
        if _code_element(r, "status") in _SKIP_STATUS["Claim"] or _code_element(r, "use") in (
            "preauthorization", "predetermination"
        ):
            return None
        procedures: dict[int, str] = {}
        for p in _as_list(r.get("procedure")):
            ref = parse_ref(_as_dict(p).get("procedureReference"))
            if ref is not None and ref.id and ref.type in (None, "Procedure") and _whole(p.get("sequence")):
                procedures[p["sequence"]] = ref.id
        charges: dict[str, Decimal] = {}
        for i, item in enumerate(_as_list(r.get("item"))):
            sequences = _as_list(_as_dict(item).get("procedureSequence"))
            if not sequences:
                continue  # the visit itself, a drug, ...: no service line to price
            amount = _money(item.get("net"))
            if amount is None and (unit := _money(item.get("unitPrice"))) is not None:
                quantity = _as_dict(item.get("quantity")).get("value", 1)
                try:
                    amount = (unit * Decimal(str(quantity))).quantize(Decimal("0.01"))
                except InvalidOperation:
                    amount = None
                if amount is None or not amount.is_finite():
                    raise FieldError(f"item[{i}].quantity.value", "not a number")
            if amount is None:
                raise FieldError(f"item[{i}].net", "missing or not a number")
            procedure_id = procedures.get(sequences[0]) if _whole(sequences[0]) else None
            if procedure_id is None:
                raise FieldError(f"item[{i}].procedureSequence", "no procedure with that sequence")
            charges[procedure_id] = charges.get(procedure_id, Decimal("0")) + amount
        return charges or None

    # -- coverage from a CSV, or a default payer --------------------------------------------------

    def import_coverage_csv(self, path: Path) -> None:
        counts = self.summary.of("coverage_csv")
        with path.open("rb") as fh:
            reader = csv.DictReader(_csv_lines(fh), fieldnames=_csv_columns(path), strict=True)
            batch: list[tuple[int, dict[str, str]]] = []
            try:
                next(reader, None)  # the header
                for record in reader:
                    counts.read += 1
                    if (column := next((k for k, v in record.items() if isinstance(v, str) and "\x00" in v), None)):
                        self._problem(_Src(path.name, reader.line_num, "coverage_csv"), str(column),
                                      "contains a NUL character: no database text can hold it")  # fmt: skip
                        continue
                    batch.append((reader.line_num, record))
                    if len(batch) >= self.batch_size:
                        self._coverage_csv_batch(path.name, batch)
                        batch = []
            except UnicodeDecodeError:  # the rows before it still go in; the line itself is never quoted
                self._problem(_Src(path.name, reader.reader.line_num + 1, "coverage_csv"), "(file)",
                              "not UTF-8 text: this line and the rest of the file were not read")  # fmt: skip
            except csv.Error:  # a quote left open: named at the line its record starts on
                self._problem(_Src(path.name, reader.line_num + 1, "coverage_csv"), "(file)",
                              "not readable as CSV: the record starting on this line and the rest of the file "
                              "were not read")  # fmt: skip
            if batch:
                self._coverage_csv_batch(path.name, batch)

    def _coverage_csv_batch(self, fname: str, batch: list[tuple[int, dict[str, str]]]) -> None:
        patients = self._lookup(Patient, {(rec.get("patient_source_id") or "").strip() for _, rec in batch})
        firsts = self._first_encounters([p.id for p in patients.values()])
        items = []
        for line, rec in batch:
            src = _Src(fname, line, "coverage_csv")
            try:
                items.append((src, self._coverage_csv_row(rec, patients, firsts)))
            except FieldError as e:
                self._problem(src, e.field, e.message)
        self._write("coverage_csv", items, self._write_coverages)
        if self.progress is not None:
            self.progress("coverage_csv", self.summary.of("coverage_csv").read)

    def _coverage_csv_row(
        self, rec: dict[str, str], patients: Mapping[str, sa.Row[Any]], firsts: Mapping[int, datetime]
    ) -> dict[str, Any]:
        def value(column: str) -> str | None:
            return _text(rec.get(column))

        patient = patients.get(value("patient_source_id") or "")
        if patient is None:
            raise FieldError("patient_source_id", "no patient with that id in this source system")
        for column in ("payer_id", "member_id", "effective_from"):
            if value(column) is None:
                raise FieldError(column, "missing")
        effective_from = parse_date(value("effective_from"), "effective_from")
        effective_to = parse_date(value("effective_to"), "effective_to") if value("effective_to") else None
        if effective_to is not None and effective_from is not None and effective_to < effective_from:
            raise FieldError("effective_to", "before effective_from")
        if value("discovered_at"):
            discovered = parse_instant(value("discovered_at"), self.tz, "discovered_at")
        else:
            discovered = firsts.get(patient.id) or datetime.combine(effective_from, datetime.min.time(), _zone(self.tz))
        method = value("discovery_method") or CoverageDiscovery.ON_FILE.value
        if method not in {m.value for m in CoverageDiscovery}:
            raise FieldError("discovery_method", "not one of " + ", ".join(m.value for m in CoverageDiscovery))
        priority = value("priority")
        if priority is not None and not (priority.isascii() and priority.isdigit() and len(priority) <= 9):
            raise FieldError("priority", "not a whole number")  # isdigit() alone takes '²', which int() refuses
        row = {
            "patient_id": patient.id,
            "payer_id": value("payer_id"),
            "member_id": value("member_id"),
            "plan_name": _clip(value("plan_name"), 128),
            "group_number": value("group_number"),
            "priority": int(priority) if priority else 1,
            "effective_from": effective_from,
            "effective_to": effective_to,
            "discovered_at": discovered,
            "discovery_method": method,
        }
        _check_lengths(Coverage, row, {})
        return row

    @staticmethod
    def _write_coverages(session: Session, items: list[tuple[_Src, dict[str, Any]]]) -> UpsertResult:
        return upsert(session, Coverage, [row for _, row in items], key=_COVERAGE_KEY)

    def _first_encounters(self, patient_ids: Sequence[int]) -> dict[int, datetime]:
        if not patient_ids:
            return {}
        table = Encounter.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            stmt = (
                sa.select(table.c.patient_id, sa.func.min(table.c.admitted_at))
                .where(table.c.patient_id.in_(patient_ids))
                .group_by(table.c.patient_id)
            )
            return {pid: first for pid, first in conn.execute(stmt)}

    def default_coverages(self, payer_id: str) -> None:
        """Every patient of this source system without another coverage gets one with ``payer_id``."""
        counts = self.summary.of("default_coverage")
        patients = Patient.__table__  # type: ignore[attr-defined]
        coverages = Coverage.__table__  # type: ignore[attr-defined]
        start_of_default = datetime.combine(DEFAULT_COVERAGE_FROM, datetime.min.time(), _zone(self.tz))
        last_id = 0
        while True:  # keyset pages: flat memory whatever the number of patients
            with self.engine.connect() as conn:
                page = conn.execute(
                    sa.select(patients.c.id, patients.c.source_id)
                    .where(patients.c.source_system == self.source_system, patients.c.id > last_id)
                    .order_by(patients.c.id)
                    .limit(self.batch_size)
                ).all()
                if not page:
                    break
                last_id = page[-1].id
                source_of = {p.id: p.source_id for p in page}
                has_other = {
                    pid
                    for pid, payer, member in conn.execute(
                        sa.select(coverages.c.patient_id, coverages.c.payer_id, coverages.c.member_id).where(
                            coverages.c.patient_id.in_([p.id for p in page])
                        )
                    )
                    if (payer, member) != (payer_id, demo_member_id(source_of[pid]))
                }
            firsts = self._first_encounters([p.id for p in page])
            items = []
            for p in page:
                counts.read += 1
                first = firsts.get(p.id) or start_of_default
                if p.id in has_other:
                    counts.skipped += 1  # coverage from the export or the CSV wins
                    continue
                row = {
                    "patient_id": p.id,
                    "payer_id": payer_id,
                    "member_id": demo_member_id(p.source_id),
                    "plan_name": None,
                    "group_number": None,
                    "priority": 1,
                    # covered since the first visit: the demo's stand-in for an enrolment date
                    "effective_from": first.astimezone(_zone(self.tz)).date(),
                    "effective_to": None,
                    "discovered_at": first,
                    "discovery_method": CoverageDiscovery.ON_FILE.value,
                }
                items.append((_Src("(default payer)", 0, f"default_coverage/{p.source_id}"), row))
            self._write("default_coverage", items, self._write_coverages)
            if self.progress is not None:
                self.progress("default_coverage", counts.read)


_COVERAGE_KEY = ("patient_id", "payer_id", "member_id", "effective_from")


def _whole(value: Any) -> bool:
    """A FHIR positiveInt/integer as JSON gives it (not a bool, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _context_encounter(r: dict[str, Any]) -> Any:
    """DocumentReference.context.encounter: a list in R4 (the first one is the visit)."""
    encounters = _as_dict(r.get("context")).get("encounter")
    return next(iter(encounters), None) if isinstance(encounters, list) else encounters


def _admission_type(r: dict[str, Any], klass: str) -> str | None:
    if klass == "EMER":
        return AdmissionType.EMERGENCY.value
    admit_sources = {c.get("code") for c in _codings(_as_dict(r.get("hospitalization")).get("admitSource"))}
    if "emd" in admit_sources:  # admitted from the emergency department
        return AdmissionType.EMERGENCY.value
    for coding in _codings(r.get("priority")):
        if coding.get("code") in _PRIORITY:
            return _PRIORITY[coding["code"]].value
    return None


def _state(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    if len(text) == 2 and text.isalpha():
        return text.upper()
    return _STATES.get(text.lower().replace(" ", "_"))


def _postal_code(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    if len(text) == 9 and text.isdigit():  # ZIP+4 without its dash
        return f"{text[:5]}-{text[5:]}"
    return text[:10]

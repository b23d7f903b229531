"""Import a directory of CSV files: the format a practice-management export is mapped to.

The format, file by file and column by column, is documented in ``examples/csv/README.md``. In short:

- Up to eight files, each optional, read in dependency order (``FILES``): ``patients.csv``,
  ``coverages.csv``, ``encounters.csv``, ``service_lines.csv``, ``diagnoses.csv``,
  ``authorizations.csv``, ``documents.csv``, ``payer_outages.csv``. Other ``*.csv`` files are counted
  in ``summary.ignored``, not read.
- UTF-8 (a byte-order mark is allowed), comma-separated, double quotes around values that contain
  commas, quotes or line breaks; a header row names the columns, in any order, case-insensitively.
- A required column must be in the header and have a value on every row. An optional column may be
  left empty, or left out of the header altogether: then the import does not write it, so the
  database keeps what it has (a new row gets the column's default).
- ``patient_id``, ``encounter_id`` and ``document_id`` are the export's own ids, kept as source ids
  under ``source_system``; rows point at each other with them. A reference resolves to a row of this
  import or of an earlier one with the same ``source_system``.

How it works:

- Each file is streamed with ``csv.DictReader`` in batches of ``batch_size`` rows. Per batch: one
  query finds the patients or encounters the rows point at, each row is validated field by field,
  and one set-based upsert per table (``retroauth.ingest.upsert``) writes the good rows, in one
  transaction. Memory stays flat: across batches only the ids of rows rejected in this run are kept.
- A header that lacks a required column, names an unknown column or repeats one fails the file: one
  problem per column (line 1), and none of its rows is read. A row with the wrong number of fields,
  or a field that does not validate, becomes an ``ImportProblem`` naming the file, line, record and
  column; the other rows go through. A record goes in whole or not at all, and so do the records that
  depend on it: a service line whose encounter was rejected in this run is rejected too, and says so.
  A value with a NUL character is a problem for its column (no database text can hold one). Text
  that is not UTF-8, or not CSV (a quote left open, text after a closing quote: the reader is
  strict, so an open quote cannot swallow the rows after it), ends the file at that line with one
  problem; the rows before it go in.
- Importing the same directory again changes nothing: a row is only rewritten where a value differs,
  and a document whose bytes are already stored under its key is not written again.
- Nothing is deleted: a service line missing from a later export stays. The exception is the code
  list of an authorization, which is what its ``codes`` column says.
- Problems and log lines carry the file, the line, the record's id and the column, never a value.

Decisions:

- A problem's record is ``Patient/<patient_id>``, ``Encounter/<encounter_id>`` or
  ``ClinicalDocument/<document_id>`` (the export's own ids, as the FHIR importer names resources),
  otherwise the record type alone: coverages and authorizations are keyed by member ids.
- The line is the physical line the row ends on (its only line unless a quoted value spans lines).
- One problem per rejected row: the first column that fails. Fix it and the next one shows, if any.
- Free text (names, descriptions, titles) longer than its column is cut; identifiers and codes that
  are too long are an error, since a cut id would be a wrong id.
- A key repeated within one batch: the last row wins, the others count as skipped (as in FHIR).
- Documents go to ``documents/<patient db id>/<hash of source system and document_id>.<ext>``: from
  ids only, stable across imports, known before the row is written (content goes in first, so a row
  never points at content that is not there).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from retroauth.identifiers import npi_is_valid
from retroauth.ingest.errors import FieldError, ImportProblem, ImportSummary, IngestError
from retroauth.ingest.fhir import Progress
from retroauth.ingest.upsert import UpsertResult, too_long, upsert, write_batch
from retroauth.models import (
    Authorization, AuthorizationCode, ClinicalDocument, Coverage, Diagnosis, Encounter, Patient, PayerOutage,
    ServiceLine,
)  # fmt: skip
from retroauth.rules import code_problem
from retroauth.storage import Storage, StorageError, key, sha256_hex
from retroauth.vocab import AdmissionType, CodeSystem, CoverageDiscovery, EncounterClass

logger = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True)
class FileSpec:
    """One file of the format: its record type (the summary's counts key) and its columns."""

    name: str
    record: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    id_column: str | None = None  # the row's own id, named in its problems

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


FILES: tuple[FileSpec, ...] = (
    FileSpec("patients.csv", "Patient", ("patient_id", "family_name", "given_name"),
             ("mrn", "birth_date", "sex", "address_line", "city", "state", "postal_code", "phone"), "patient_id"),
    FileSpec("coverages.csv", "Coverage",
             ("patient_id", "payer_id", "member_id", "effective_from", "discovered_at", "discovery_method"),
             ("plan_name", "group_number", "priority", "effective_to")),
    FileSpec("encounters.csv", "Encounter",
             ("encounter_id", "patient_id", "encounter_class", "admitted_at", "timezone"),
             ("admission_type", "discharged_at", "facility_name", "facility_npi", "place_of_service",
              "type_of_bill", "system_issue_reference"), "encounter_id"),
    FileSpec("service_lines.csv", "ServiceLine",
             ("encounter_id", "line_number", "code_system", "code", "service_date"),
             ("description", "modifiers", "units", "charge", "rendering_npi", "ordering_npi")),
    FileSpec("diagnoses.csv", "Diagnosis", ("encounter_id", "code_system", "code", "rank"), ("description",)),
    FileSpec("authorizations.csv", "Authorization",
             ("payer_id", "member_id", "auth_number", "starts_on", "ends_on", "status", "codes"),
             ("patient_id", "provider_npi")),
    FileSpec("documents.csv", "ClinicalDocument",
             ("document_id", "patient_id", "loinc_type", "authored_at", "file"),
             ("encounter_id", "title", "author", "content_type"), "document_id"),
    FileSpec("payer_outages.csv", "PayerOutage", ("payer_id", "starts_at", "reference"), ("ends_at", "description")),
)  # fmt: skip

# Code systems by what they code: a diagnosis in CPT is a mapping mistake, not a code.
SERVICE_CODE_SYSTEMS = (CodeSystem.CPT, CodeSystem.HCPCS, CodeSystem.REVENUE, CodeSystem.ICD10PCS, CodeSystem.SNOMED)
DIAGNOSIS_CODE_SYSTEMS = (CodeSystem.ICD10CM, CodeSystem.SNOMED)
AUTHORIZATION_STATUSES = ("approved", "pending", "denied", "cancelled")  # models.Authorization.status
_AUTH_STATUSES = {s: s for s in AUTHORIZATION_STATUSES}

_SEXES = {"female": "female", "f": "female", "male": "male", "m": "male", "other": "other", "o": "other",
          "unknown": "unknown", "u": "unknown"}  # fmt: skip
_STATE = re.compile(
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|"
    "OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR|VI|GU|AS|MP|AA|AE|AP"
)  # USPS codes: states, DC, territories, military
# re.ASCII: ``\d`` would otherwise take any script's digits, which int() and Decimal() accept too.
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?", re.ASCII)
_OFFSET = re.compile(r"Z|[+-]\d{2}:?\d{2}", re.ASCII)
_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # a payer id: the id of a file in config/payers
_PAYER_ID = "a payer id (lower-case words and dashes, e.g. uhc-commercial)"
_POSTAL = re.compile(r"\d{5}(?:-?\d{4})?", re.ASCII)
_PHONE = re.compile(r"[0-9+(). -]{7,32}")
_POS = re.compile(r"\d{2}", re.ASCII)
_TYPE_OF_BILL = re.compile(r"0?\d{3}", re.ASCII)
_INTEGER = re.compile(r"\d{1,9}", re.ASCII)
_MODIFIER = re.compile(r"[A-Z0-9]{2}")
_COLUMN_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)
_CONTENT_TYPE = re.compile(r"[a-z]+/[a-z0-9.+-]+(?:;.*)?")
_EXTENSIONS = {"text/plain": "txt", "text/html": "html", "application/pdf": "pdf", "text/rtf": "rtf",
               "application/rtf": "rtf", "text/xml": "xml", "application/xml": "xml", "application/json": "json",
               "image/tiff": "tiff", "image/jpeg": "jpg", "image/png": "png"}  # fmt: skip
_EARLIEST = date(1880, 1, 1)  # before this a date is a typo, not a birth or a service


def import_csv(
    engine: sa.Engine,
    storage: Storage,
    directory: str | Path,
    *,
    source_system: str = "csv",
    batch_size: int = 1000,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import the CSV files in ``directory``; see the module docstring and ``examples/csv/README.md``.

    ``progress(record_type, rows_done)`` is called after each batch. Raises ``IngestError`` only when
    the import cannot run at all (no such directory, none of the files, a bad option); bad headers and
    bad rows are problems in the summary.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IngestError(f"not a directory: {directory}")
    if batch_size < 1:
        raise IngestError("batch_size must be at least 1")
    if not 1 <= len(source_system) <= 64:
        raise IngestError("source_system must be 1 to 64 characters")
    present = [spec for spec in FILES if (directory / spec.name).is_file()]
    if not present:
        raise IngestError(f"none of {', '.join(s.name for s in FILES)} in {directory}")

    run = _Import(engine, storage, directory, source_system, batch_size, progress)
    for spec in present:
        run.import_file(spec)
    known = {spec.name for spec in FILES}
    for path in sorted(directory.glob("*.csv")):
        if path.name not in known:  # a misspelt name would otherwise vanish without a word
            run.summary.ignored[path.name] = _count_rows(path)
            logger.warning("csv import: %s is not a file of the format; not read", path.name)
    return run.summary


# --- one row's fields ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file name
        return None


class Fields:
    """The values of one row by column, stripped, empty as missing. Every getter checks one column
    and raises ``FieldError`` naming it, with a message that never quotes the value."""

    def __init__(self, values: Mapping[str, str | None], required: frozenset[str]):
        self.values = values
        self.required = required

    def text(self, column: str, clip: int | None = None) -> str | None:
        value = (self.values.get(column) or "").strip()
        if not value:
            if column in self.required:
                raise FieldError(column, "missing (a value is required)")
            return None
        return value[:clip] if clip else value

    def match(self, column: str, pattern: re.Pattern[str], shape: str, *, upper: bool = False) -> str | None:
        value = self.text(column)
        if value is None:
            return None
        if upper:
            value = value.upper()
        if not pattern.fullmatch(value):
            raise FieldError(column, f"not {shape}")
        return value

    def choice(self, column: str, choices: Mapping[str, str]) -> str | None:
        """One of ``choices`` (lower-case spelling -> value stored), matched case-insensitively."""
        value = self.text(column)
        if value is None:
            return None
        chosen = choices.get(value.lower())
        if chosen is None:
            raise FieldError(column, "not one of " + ", ".join(dict.fromkeys(choices.values())))
        return chosen

    def enum(self, column: str, enum: type[E], *, only: tuple[E, ...] | None = None) -> E | None:
        """A member of ``enum`` (or of ``only``), matched case-insensitively."""
        value = self.choice(column, _choices(only or tuple(enum)))
        return enum(value) if value is not None else None

    def date(self, column: str) -> date | None:
        value = self.text(column)
        if value is None:
            return None
        if not _DATE.fullmatch(value):
            raise FieldError(column, "not a date (YYYY-MM-DD)")
        try:
            parsed = date.fromisoformat(value)
        except ValueError:
            raise FieldError(column, "not a valid date (YYYY-MM-DD)") from None
        if parsed < _EARLIEST:
            raise FieldError(column, f"before {_EARLIEST.year}")
        return parsed

    def instant(self, column: str) -> datetime | None:
        """ISO 8601 date and time with its UTC offset: a wall time alone cannot be placed in time."""
        value = self.text(column)
        if value is None:
            return None
        m = _INSTANT.match(value)
        if m is None:
            raise FieldError(column, "not a date and time (YYYY-MM-DDTHH:MM:SS+HH:MM)")
        if not _OFFSET.fullmatch(value[m.end() :]):
            raise FieldError(column, "no UTC offset: write e.g. 2026-11-13T09:30:00-05:00 or ...Z")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(column, "not a valid date and time") from None
        if parsed.date() < _EARLIEST:
            raise FieldError(column, f"before {_EARLIEST.year}")
        try:
            parsed.astimezone(timezone.utc)  # it is stored in UTC: late on 9999-12-31 west of UTC is not
        except OverflowError:
            raise FieldError(column, "out of range (after 9999-12-31 in UTC)") from None
        return parsed

    def integer(self, column: str, low: int, high: int, *, default: int | None = None) -> int | None:
        value = self.text(column)
        if value is None:
            return default
        if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
            raise FieldError(column, f"not a whole number from {low} to {high}")
        return int(value)

    def decimal(self, column: str, digits: int, *, positive: bool, default: Decimal) -> Decimal:
        """A plain decimal (``1850.00``): no sign, no thousands separator, at most 2 decimals."""
        value = self.text(column)
        if value is None:
            return default
        if not re.fullmatch(rf"\d{{1,{digits}}}(?:\.\d{{1,2}})?", value, re.ASCII):
            raise FieldError(column, f"not a decimal number (at most {digits} digits before the point, 2 after)")
        number = Decimal(value).quantize(Decimal("0.01"))
        if positive and number <= 0:
            raise FieldError(column, "must be more than 0")
        return number

    def npi(self, column: str) -> str | None:
        value = self.text(column)
        if value is not None and not (value.isascii() and npi_is_valid(value)):
            raise FieldError(column, "not an NPI (10 digits with a valid check digit)")
        return value

    def code(self, column: str, system: CodeSystem) -> str | None:
        value = self.text(column)
        if value is None:
            return None
        problem = code_problem(system, value.upper()) if value.isascii() else f"not a well-formed {system.value} code"
        if problem:
            raise FieldError(column, problem)
        return value.upper()


@lru_cache(maxsize=32)
def _choices(members: tuple[StrEnum, ...]) -> dict[str, str]:
    return {m.value.lower(): m.value for m in members}


def _decoded(fh: IO[bytes]) -> Iterator[str]:
    """The file's lines as text, decoded one at a time: a bad byte is reported at its own line, and
    the rows before it go in (a text stream decodes ahead in chunks and would fail early)."""
    for i, raw in enumerate(fh):
        yield raw.decode("utf-8-sig" if i == 0 else "utf-8")


def _resource(spec: FileSpec, own_id: str | None) -> str:
    """What a problem names: ``Encounter/<encounter_id>``, or the record type alone."""
    return f"{spec.record}/{own_id}" if own_id and len(own_id) <= 128 and "\x00" not in own_id else spec.record


def _count_rows(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return max(sum(1 for _ in csv.reader(_decoded(fh))) - 1, 0)
    except (UnicodeDecodeError, csv.Error):
        return 0


# --- the import run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Src:
    """Where a row came from: what its problem names."""

    file: str
    line: int
    resource: str
    own_id: str | None = None


@dataclass
class _Doc:
    row: dict[str, Any]
    path: Path
    content_type: str  # also when the column is left out (the row then does not carry it)


@dataclass
class _Auth:
    row: dict[str, Any]
    codes: list[tuple[str, str]] = field(default_factory=list)


Batch = list[tuple[int, dict[str, str | None]]]
Refs = Mapping[str, sa.Row[Any]]
_Writer = Callable[[Session, list[tuple[_Src, dict[str, Any]]]], UpsertResult]


class _Import:
    def __init__(
        self,
        engine: sa.Engine,
        storage: Storage,
        directory: Path,
        source_system: str,
        batch_size: int,
        progress: Progress | None,
    ):
        self.engine = engine
        self.storage = storage
        self.directory = directory.resolve()
        self.source_system = source_system
        self.batch_size = batch_size
        self.progress = progress
        self.summary = ImportSummary()
        # Ids of patients and encounters rejected in this run: their dependents are rejected too, even
        # when an earlier import left a row with that id in the database (all or nothing).
        self.rejected: dict[str, set[str]] = {"Patient": set(), "Encounter": set()}

    # -- reading -----------------------------------------------------------------------------------

    def import_file(self, spec: FileSpec) -> None:
        counts = self.summary.of(spec.record)
        with (self.directory / spec.name).open("rb") as fh:
            # strict: a quote left open would otherwise swallow every row after it into one value
            reader = csv.DictReader(_decoded(fh), strict=True)
            batch: Batch = []
            try:
                header = self._header(spec, reader)
                if header is None:
                    return
                for record in reader:
                    counts.read += 1
                    if None in record or None in record.values():
                        self._wrong_width(spec, reader.line_num, len(header), record)
                        continue
                    if (column := next((k for k, v in record.items() if v and "\x00" in v), None)) is not None:
                        self._nul(spec, reader.line_num, column, record)
                        continue
                    batch.append((reader.line_num, record))
                    if len(batch) >= self.batch_size:
                        self._flush(spec, header, batch)
                        batch = []
            except UnicodeDecodeError:  # the physical line that failed to decode: the lines read so far + 1
                self._problem(_Src(spec.name, reader.reader.line_num + 1, spec.record), "(file)",
                              "not UTF-8 text: this line and the rest of the file were not read")  # fmt: skip
            except csv.Error:  # an unclosed quote, a field too large: its message can quote the line
                # DictReader.line_num is the last line of the last good record: this record starts after it
                self._problem(_Src(spec.name, reader.line_num + 1, spec.record), "(file)",
                              "not readable as CSV (a quote left open, text after a closing quote, a value over "
                              "128 KiB): the record starting on this line and the rest of the file were not "
                              "read")  # fmt: skip
            if batch:  # the rows read before a broken line still go in
                self._flush(spec, header, batch)

    def _wrong_width(self, spec: FileSpec, line: int, width: int, record: dict[Any, Any]) -> None:
        # DictReader files extra fields under the key None and gives missing ones the value None.
        n = width + len(record.get(None) or []) - sum(v is None for v in record.values())
        own_id = (record.get(spec.id_column) or "").strip() or None if spec.id_column else None
        self._problem(_Src(spec.name, line, _resource(spec, own_id), own_id), "(row)",
                      f"has {n} fields, the header has {width}")  # fmt: skip

    def _nul(self, spec: FileSpec, line: int, column: str, record: dict[str, str]) -> None:
        """A NUL in a value: no database text can hold it (PostgreSQL refuses it even in a lookup)."""
        own_id = (record.get(spec.id_column) or "").strip() or None if spec.id_column else None
        self._problem(_Src(spec.name, line, _resource(spec, own_id), own_id), column,
                      "contains a NUL character: no database text can hold it")  # fmt: skip

    def _header(self, spec: FileSpec, reader: csv.DictReader[str]) -> list[str] | None:
        """The normalized column names, or None (and a problem per column) when the file cannot be read."""
        src = _Src(spec.name, 1, spec.record)
        raw = reader.fieldnames
        if not raw:
            self._problem(src, "(header)", "empty file: no header row")
            return None
        names = [name.strip().lower() for name in raw]
        if not set(names) & set(spec.columns):  # a first row of data, not a header: never repeat its values
            self._problem(src, "(header)", "none of the file's columns in the first line: is the header row missing?")
            return None
        bad = False
        for i, name in enumerate(names):
            if name not in spec.columns:  # named when it looks like a column name (a typo), else by position
                shown = name if _COLUMN_NAME.fullmatch(name) else f"(column {i + 1})"
                self._problem(src, shown, "unknown column (not in the format)")
                bad = True
            elif names.index(name) != i:
                self._problem(src, name, "column appears more than once")
                bad = True
        for name in spec.required:
            if name not in names:
                self._problem(src, name, "required column missing from the header")
                bad = True
        if bad:
            return None
        reader.fieldnames = names
        return names

    def _flush(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        getattr(self, "_batch_" + spec.name.removesuffix(".csv"))(spec, header, batch)
        if self.progress is not None:
            self.progress(spec.record, self.summary.of(spec.record).read)

    def _problem(self, src: _Src, column: str, message: str) -> None:
        problem = ImportProblem(src.file, src.line, src.resource, column, message)
        logger.warning("import problem: %s", problem)
        self.summary.add_problem(problem)
        if src.own_id is not None and src.resource.split("/", 1)[0] in self.rejected:
            self.rejected[src.resource.split("/", 1)[0]].add(src.own_id)

    def _map(
        self, spec: FileSpec, header: list[str], batch: Batch, convert: Callable[[Fields], T]
    ) -> list[tuple[_Src, T]]:
        """Each row through ``convert``; a problem for each one it rejects."""
        out = []
        required = frozenset(spec.required)
        for line, record in batch:
            own_id = (record.get(spec.id_column) or "").strip() or None if spec.id_column else None
            src = _Src(spec.name, line, _resource(spec, own_id), own_id)
            try:
                value = convert(Fields(record, required))
            except FieldError as e:
                self._problem(src, e.field, e.message)
                continue
            row = value.row if isinstance(value, (_Doc, _Auth)) else value
            for column in spec.optional:  # left out of the header: not written, the database keeps its value
                if column not in header:
                    row.pop(column, None)  # type: ignore[union-attr]
            out.append((src, value))
        return out

    # -- references --------------------------------------------------------------------------------

    def _lookup(self, model: type[SQLModel], ids: set[str], *extra: Any) -> dict[str, sa.Row[Any]]:
        """Rows of ``model`` from this source system by source id: ``{source id: (source_id, id, *extra)}``."""
        found: dict[str, sa.Row[Any]] = {}
        wanted = sorted(i for i in ids if i)
        table = model.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 1000):
                stmt = sa.select(table.c.source_id, table.c.id, *extra).where(
                    table.c.source_system == self.source_system, table.c.source_id.in_(wanted[start : start + 1000])
                )
                found.update({row.source_id: row for row in conn.execute(stmt)})
        return found

    def _patients(self, batch: Batch) -> dict[str, sa.Row[Any]]:
        return self._lookup(Patient, {(rec.get("patient_id") or "").strip() for _, rec in batch})

    def _encounters(self, batch: Batch) -> dict[str, sa.Row[Any]]:
        table = Encounter.__table__  # type: ignore[attr-defined]
        return self._lookup(Encounter, {(rec.get("encounter_id") or "").strip() for _, rec in batch},
                            table.c.patient_id)  # fmt: skip

    def _resolve(self, f: Fields, column: str, record_type: str, found: Refs) -> sa.Row[Any] | None:
        """The row a reference column points at; a problem naming the column when there is none."""
        value = f.text(column)
        if value is None:
            return None
        if value in self.rejected[record_type]:
            raise FieldError(column, f"its {record_type.lower()} was rejected in this import (see that row's problem)")
        row = found.get(value)
        if row is None:
            raise FieldError(column, f"no {record_type.lower()} with that id in this import or the database")
        return row

    # -- writing -----------------------------------------------------------------------------------

    def _write(
        self,
        record: str,
        items: list[tuple[_Src, T]],
        write: Callable[[Session, list[tuple[_Src, T]]], UpsertResult],
    ) -> None:
        write_batch(self.engine, items, write, counted=lambda result, done: self._count(record, result, done),
                    rejected=lambda src: self._problem(src, "(row)", "the database rejected the row (constraint or type)"))

    def _count(self, record: str, result: UpsertResult, items: list[tuple[_Src, Any]]) -> None:
        counts = self.summary.of(record)
        counts.inserted += len(result.inserted)
        counts.updated += len(result.updated)
        counts.unchanged += len(result.unchanged)
        counts.skipped += len(items) - len(result)  # a key repeated within the batch: the last row won
        if record in self.rejected:
            self.rejected[record].difference_update(src.own_id for src, _ in items if src.own_id)

    @staticmethod
    def _rows(model: type[SQLModel], key: Sequence[str] = ("source_system", "source_id")) -> _Writer:
        """A writer upserting the rows of a batch into ``model`` on its natural ``key``."""
        return lambda session, items: upsert(session, model, [row for _, row in items], key=key)

    # -- the files ---------------------------------------------------------------------------------

    def _batch_patients(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        def convert(f: Fields) -> dict[str, Any]:
            birth = f.date("birth_date")
            if birth is not None and birth > date.today():
                raise FieldError("birth_date", "in the future")
            postal = f.match("postal_code", _POSTAL, "a ZIP code (12345 or 12345-6789)")
            row = {
                "source_system": self.source_system,
                "source_id": f.text("patient_id"),
                "mrn": f.text("mrn"),
                "family_name": f.text("family_name", clip=128),
                "given_name": f.text("given_name", clip=128),
                "birth_date": birth,
                "sex": f.choice("sex", _SEXES),
                "address_line": f.text("address_line", clip=256),
                "city": f.text("city", clip=128),
                "state": f.match("state", _STATE, "a US state or territory code (2 letters, e.g. MI)", upper=True),
                "postal_code": f"{postal[:5]}-{postal[-4:]}" if postal and len(postal) == 9 else postal,
                "phone": f.match("phone", _PHONE, "a phone number (digits, spaces, + ( ) . -)"),
            }
            _check_lengths(Patient, row, {"source_id": "patient_id"})
            return row

        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(Patient))

    def _batch_coverages(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        patients = self._patients(batch)

        def convert(f: Fields) -> dict[str, Any]:
            patient = self._resolve(f, "patient_id", "Patient", patients)
            effective_from = f.date("effective_from")
            effective_to = f.date("effective_to")
            if effective_to is not None and effective_from is not None and effective_to < effective_from:
                raise FieldError("effective_to", "before effective_from")
            row = {
                "patient_id": patient.id if patient else None,
                "payer_id": f.match("payer_id", _SLUG, _PAYER_ID),
                "member_id": f.text("member_id"),
                "plan_name": f.text("plan_name", clip=128),
                "group_number": f.text("group_number"),
                "priority": f.integer("priority", 1, 9, default=1),
                "effective_from": effective_from,
                "effective_to": effective_to,
                "discovered_at": f.instant("discovered_at"),
                "discovery_method": _value(f.enum("discovery_method", CoverageDiscovery)),
            }
            _check_lengths(Coverage, row, {})
            return row

        key = ("patient_id", "payer_id", "member_id", "effective_from")
        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(Coverage, key))

    def _batch_encounters(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        patients = self._patients(batch)

        def convert(f: Fields) -> dict[str, Any]:
            patient = self._resolve(f, "patient_id", "Patient", patients)
            admitted = f.instant("admitted_at")
            discharged = f.instant("discharged_at")
            if discharged is not None and admitted is not None and discharged < admitted:
                raise FieldError("discharged_at", "before admitted_at")
            tz = f.text("timezone")
            if tz is not None and _zone(tz) is None:
                raise FieldError("timezone", "not an IANA time zone (e.g. America/Chicago)")
            row = {
                "source_system": self.source_system,
                "source_id": f.text("encounter_id"),
                "patient_id": patient.id if patient else None,
                "encounter_class": _value(f.enum("encounter_class", EncounterClass)),
                "admission_type": _value(f.enum("admission_type", AdmissionType)),
                "admitted_at": admitted,
                "discharged_at": discharged,
                "timezone": tz,
                "facility_name": f.text("facility_name", clip=256),
                "facility_npi": f.npi("facility_npi"),
                "place_of_service": f.match("place_of_service", _POS, "a place of service code (2 digits)"),
                "type_of_bill": f.match("type_of_bill", _TYPE_OF_BILL, "a type of bill (3 digits, or 4 with a leading 0)"),
                "system_issue_reference": f.text("system_issue_reference"),
            }
            _check_lengths(Encounter, row, {"source_id": "encounter_id"})
            return row

        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(Encounter))

    def _batch_service_lines(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        encounters = self._encounters(batch)

        def convert(f: Fields) -> dict[str, Any]:
            encounter = self._resolve(f, "encounter_id", "Encounter", encounters)
            system = f.enum("code_system", CodeSystem, only=SERVICE_CODE_SYSTEMS)
            row = {
                "encounter_id": encounter.id if encounter else None,
                "line_number": f.integer("line_number", 1, 9999),
                "code_system": _value(system),
                "code": f.code("code", system) if system else None,
                "description": f.text("description", clip=512),
                "modifiers": _modifiers(f),
                "units": f.decimal("units", 7, positive=True, default=Decimal("1")),
                "charge": f.decimal("charge", 10, positive=False, default=Decimal("0")),
                "service_date": f.date("service_date"),
                "rendering_npi": f.npi("rendering_npi"),
                "ordering_npi": f.npi("ordering_npi"),
            }
            _check_lengths(ServiceLine, row, {})
            return row

        key = ("encounter_id", "line_number")
        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(ServiceLine, key))

    def _batch_diagnoses(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        encounters = self._encounters(batch)

        def convert(f: Fields) -> dict[str, Any]:
            encounter = self._resolve(f, "encounter_id", "Encounter", encounters)
            system = f.enum("code_system", CodeSystem, only=DIAGNOSIS_CODE_SYSTEMS)
            row = {
                "encounter_id": encounter.id if encounter else None,
                "code_system": _value(system),
                "code": f.code("code", system) if system else None,
                "description": f.text("description", clip=512),
                "rank": f.integer("rank", 1, 99),
            }
            _check_lengths(Diagnosis, row, {})
            return row

        key = ("encounter_id", "code_system", "code")
        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(Diagnosis, key))

    def _batch_authorizations(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        patients = self._patients(batch)

        def convert(f: Fields) -> _Auth:
            patient = self._resolve(f, "patient_id", "Patient", patients)
            starts_on, ends_on = f.date("starts_on"), f.date("ends_on")
            if starts_on is not None and ends_on is not None and ends_on < starts_on:
                raise FieldError("ends_on", "before starts_on")
            row = {
                "payer_id": f.match("payer_id", _SLUG, _PAYER_ID),
                "member_id": f.text("member_id"),
                "auth_number": f.text("auth_number"),
                "patient_id": patient.id if patient else None,
                "provider_npi": f.npi("provider_npi"),
                "starts_on": starts_on,
                "ends_on": ends_on,
                "status": f.choice("status", _AUTH_STATUSES),
                "source": "import",
            }
            _check_lengths(Authorization, row, {})
            return _Auth(row, _authorization_codes(f))

        self._write(spec.record, self._map(spec, header, batch, convert), _write_authorizations)

    def _batch_documents(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        patients = self._patients(batch)
        encounters = self._encounters(batch)

        def convert(f: Fields) -> _Doc:
            patient = self._resolve(f, "patient_id", "Patient", patients)
            assert patient is not None  # patient_id is required: text() raised if it were empty
            encounter = self._resolve(f, "encounter_id", "Encounter", encounters)
            if encounter is not None and encounter.patient_id != patient.id:
                raise FieldError("encounter_id", "the encounter is another patient's")
            loinc = f.text("loinc_type")
            if loinc is not None and (problem := code_problem(CodeSystem.LOINC, loinc)):
                raise FieldError("loinc_type", problem)
            content_type = f.match("content_type", _CONTENT_TYPE, "a media type (e.g. text/plain)") or "text/plain"
            authored = f.instant("authored_at")
            path = self._document_path(f)
            document_id = f.text("document_id") or ""
            digest, size = _file_digest(path)
            name = hashlib.sha256(f"{self.source_system}\x00{document_id}".encode()).hexdigest()[:32]
            extension = _EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")
            row = {
                "source_system": self.source_system,
                "source_id": document_id,
                "patient_id": patient.id,
                "encounter_id": encounter.id if encounter else None,
                "loinc_type": loinc,
                "title": f.text("title", clip=256),
                "author": f.text("author", clip=256),
                "authored_at": authored,
                "content_type": content_type,
                "storage_key": key("documents", patient.id, f"{name}.{extension}"),
                "sha256": digest,
                "size_bytes": size,
            }
            _check_lengths(ClinicalDocument, row, {"source_id": "document_id"})
            return _Doc(row, path, content_type)

        items = self._map(spec, header, batch, convert)
        rows = self._store_documents(items)
        self._write(spec.record, rows, self._rows(ClinicalDocument))

    def _document_path(self, f: Fields) -> Path:
        """The ``file`` column: a path inside the import directory, never outside it (no absolute
        paths, no ``..``, no symbolic link that leads out)."""
        value = f.text("file") or ""
        relative = PurePosixPath(value.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            raise FieldError("file", "must be a relative path inside the import directory")
        try:
            path = (self.directory / relative).resolve()
            if not path.is_relative_to(self.directory):
                raise FieldError("file", "must be a relative path inside the import directory")
            if not path.is_file():
                raise FieldError("file", "no such file in the import directory")
        except (OSError, ValueError):  # a NUL byte, a name too long: the OS's message would quote the path
            raise FieldError("file", "not a usable file path (a NUL byte, or a name too long)") from None
        return path

    def _store_documents(self, items: list[tuple[_Src, _Doc]]) -> list[tuple[_Src, dict[str, Any]]]:
        """Content first, then rows: a row never points at content that is not there. Content already
        stored with the same checksum under the same key is not written again."""
        table = ClinicalDocument.__table__  # type: ignore[attr-defined]
        source_ids = [doc.row["source_id"] for _, doc in items]
        stored: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(source_ids), 1000):
                stmt = sa.select(table.c.source_id, table.c.sha256, table.c.storage_key).where(
                    table.c.source_system == self.source_system, table.c.source_id.in_(source_ids[start : start + 1000])
                )
                stored.update({sid: (sha, k) for sid, sha, k in conn.execute(stmt)})
        rows = []
        for src, doc in items:
            row = doc.row
            if stored.get(row["source_id"]) == (row["sha256"], row["storage_key"]):
                self.summary.documents_unchanged += 1
                rows.append((src, row))
                continue
            try:  # one document in memory at a time
                data = doc.path.read_bytes()
                if sha256_hex(data) != row["sha256"]:
                    self._problem(src, "file", "the file changed while it was being imported")
                    continue
                self.storage.put(row["storage_key"], data, content_type=doc.content_type)
            except (StorageError, OSError) as e:
                self._problem(src, "file", f"storing the content failed ({type(e).__name__})")
                continue
            self.summary.documents_written += 1
            rows.append((src, row))
        return rows

    def _batch_payer_outages(self, spec: FileSpec, header: list[str], batch: Batch) -> None:
        def convert(f: Fields) -> dict[str, Any]:
            starts_at, ends_at = f.instant("starts_at"), f.instant("ends_at")
            if starts_at is not None and ends_at is not None and ends_at < starts_at:
                raise FieldError("ends_at", "before starts_at")
            row = {
                "payer_id": f.match("payer_id", _SLUG, _PAYER_ID),
                "starts_at": starts_at,
                "ends_at": ends_at,
                "reference": f.text("reference"),
                "description": f.text("description", clip=512),
            }
            _check_lengths(PayerOutage, row, {})
            return row

        key = ("payer_id", "starts_at")
        self._write(spec.record, self._map(spec, header, batch, convert), self._rows(PayerOutage, key))


# --- small helpers ---------------------------------------------------------------------------------


def _value(member: StrEnum | None) -> str | None:
    return member.value if member is not None else None


def _check_lengths(model: type[SQLModel], row: Mapping[str, Any], columns: Mapping[str, str]) -> None:
    """Identifiers too long for their column are an error (cutting one would make a wrong id)."""
    for name in too_long(model, row):
        raise FieldError(columns.get(name, name), "longer than the database column allows")


def _modifiers(f: Fields) -> str | None:
    """``RT,59``: up to four two-character modifiers, comma-separated."""
    value = f.text("modifiers")
    if value is None:
        return None
    parts = [p.strip().upper() for p in value.split(",")]
    if len(parts) > 4 or not all(_MODIFIER.fullmatch(p) for p in parts):
        raise FieldError("modifiers", "not up to 4 two-character modifiers separated by commas (e.g. RT,59)")
    return ",".join(parts)


def _authorization_codes(f: Fields) -> list[tuple[str, str]]:
    """``CPT:70551;CPT:70552``: the codes an authorization covers, each ``SYSTEM:CODE``."""
    value = f.text("codes") or ""
    codes: dict[tuple[str, str], None] = {}
    for i, entry in enumerate(value.split(";"), start=1):
        system_text, colon, code = entry.strip().partition(":")
        if not colon:
            raise FieldError("codes", f"entry {i} is not SYSTEM:CODE (e.g. CPT:70551;CPT:70552)")
        system = next((s for s in SERVICE_CODE_SYSTEMS if s.value == system_text.strip().upper()), None)
        if system is None:
            raise FieldError("codes", f"entry {i}: code system not one of " + ", ".join(SERVICE_CODE_SYSTEMS))
        code = code.strip().upper()
        if problem := code_problem(system, code):
            raise FieldError("codes", f"entry {i}: {problem}")
        codes[(system.value, code)] = None
    return list(codes)


def _file_digest(path: Path) -> tuple[str, int]:
    """sha256 and size, read in chunks: a large scan never sits in memory whole."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise FieldError("file", f"cannot be read ({type(e).__name__})") from None
    return digest.hexdigest(), size


def _write_authorizations(session: Session, items: list[tuple[_Src, _Auth]]) -> UpsertResult:
    """The authorizations, then their codes: what ``codes`` lists is inserted, what it no longer lists
    is deleted. An authorization whose codes changed counts as updated."""
    by_key = {(auth.row["payer_id"], auth.row["auth_number"]): auth for _, auth in items}  # the last row wins
    # source and case_id are not updated: an authorization retroauth obtained keeps saying so.
    update = [c for c in next(iter(by_key.values())).row if c not in ("payer_id", "auth_number", "source")]
    result = upsert(session, Authorization, [a.row for a in by_key.values()], key=("payer_id", "auth_number"),
                    update=update)  # fmt: skip
    table = AuthorizationCode.__table__  # type: ignore[attr-defined]
    wanted = {(result[k], system, code): k for k, auth in by_key.items() for system, code in auth.codes}
    have = {
        (auth_id, system, code): code_id
        for code_id, auth_id, system, code in session.execute(
            sa.select(table.c.id, table.c.authorization_id, table.c.code_system, table.c.code).where(
                table.c.authorization_id.in_([result[k] for k in by_key])
            )
        )
    }
    key_of_id = {result[k]: k for k in by_key}
    gone = {code: code_id for code, code_id in have.items() if code not in wanted}
    if gone:
        session.execute(sa.delete(table).where(table.c.id.in_(list(gone.values()))))
    new = [code for code in wanted if code not in have]
    if new:
        rows = [{"authorization_id": a, "code_system": s, "code": c} for a, s, c in new]
        upsert(session, AuthorizationCode, rows, key=("authorization_id", "code_system", "code"), update=False)
    changed = {wanted[code] for code in new} | {key_of_id[auth_id] for auth_id, _, _ in gone}
    for k in changed & result.unchanged:
        result.unchanged.discard(k)
        result.updated.add(k)
    return result

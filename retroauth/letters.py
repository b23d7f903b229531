"""Request and appeal letters: Jinja2 templates rendered to HTML, typeset to PDF, stored and versioned.

The pieces, in the order a batch goes through them:

* ``LetterData``: everything a letter says, as frozen pydantic models, read from the database for a
  whole batch of cases in a fixed number of queries (``load_letter_data``). Its canonical JSON's
  sha256 is the letter's ``data_hash``.
* ``LetterTemplates``: the Jinja2 environment. The search path is ``templates/payers/<payer id>/``
  then ``templates/``, so a payer's file of the same name wins; a payer file can extend the shared
  one as ``default/<name>``. ``StrictUndefined``: a missing value fails, naming the template and
  line (``LetterTemplateError``). HTML is autoescaped. Templates are ``request/<reason>.html.j2`` and
  ``appeal/level-<n>.html.j2`` over ``base.html.j2`` (the layout and letterhead).
  The ``template_hash`` covers the template, every template it extends, includes or imports (as
  resolved for that payer), the Typst program and the engine versions.
* HTML and PDF come from the same rendering: the HTML is the letter, and ``retroauth.typeset``
  typesets the PDF from it (data reaches Typst as JSON strings, never as markup).
* ``render_letters``: a batch. Letters whose (case, kind, level, data hash, template hash) exist
  already are not rendered again and nothing is written; new ones are rendered in parallel
  (threads: Typst releases the GIL), stored under ``letters/<case>/v<n>/request.html|.pdf``
  (``appeal-<level>`` for appeals), and recorded in ``letters`` in one transaction with the cases'
  move ``ready -> letter_rendered`` and their audit events (letter id, version, hashes).

The letter date is the day of ``as_of`` in the facility's zone; it is not part of the data hash (the
same content rendered again another day is the same letter), and it is the PDF's creation date,
so the same data, template and date always give the same bytes.

Patient data lives in the letters (storage) only: results, events and exceptions carry case ids,
template names, line numbers, hashes and codes.
"""

from __future__ import annotations

import hashlib
import json
import threading
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from itertools import chain
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

import jinja2
import sqlalchemy as sa
from jinja2 import meta
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
from sqlmodel import Session

from retroauth import failpoints
from retroauth.cases import Actor, record_events, transition_many
from retroauth.db import session_scope
from retroauth.models import (
    Appeal, CaseServiceLine, Coverage, Diagnosis, Encounter, Letter, Packet, Patient, PayerOutage, PayerResponse,
    RetroCase, ServiceLine, Submission, utcnow,
)
from retroauth.rules import PayerRules, RuleLibrary
from retroauth.storage import Storage, key
from retroauth.typeset import CONVERTER_VERSION, ENGINE, Typesetter, TypesetError, sha256_file, to_document
from retroauth.vocab import DELAY_REASON_CODES, CaseStatus, MissReason

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
TYPST_PROGRAM = "letter.typ"
PAYERS_SUBDIR = "payers"
DEFAULT_PREFIX = "default"  # "default/base.html.j2": the shared template, even where a payer overrides it

Kind = Literal["request", "appeal"]
Format = Literal["pdf", "html"]
APPEAL_LEVELS = (1, 2, 3)
# The fewest letters stored and recorded in one transaction while the next ones are typeset. A chunk is half
# of what is left to write (at least this): few transactions (each costs ~7 ms of CPU that Typst would have
# had), yet a short last chunk, whose writes nothing overlaps.
WRITE_CHUNK = 8
# Letters loaded first, on their own, and typeset while the rest of the batch loads (~0.5 ms a letter).
LOAD_FIRST = 8

# --- words for codes (what a reviewer reads next to the code) -------------------------------------

REASON_LABELS: Mapping[str, str] = {
    MissReason.EMERGENCY: "emergency services",
    MissReason.ADMINISTRATIVE_ERROR: "administrative error",
    MissReason.DELAYED_INSURANCE_VERIFICATION: "delayed insurance verification",
    MissReason.SYSTEM_ISSUE: "system or technical issue",
    MissReason.RETROACTIVE_ELIGIBILITY: "retroactive eligibility",
}
# X12 element 1514 (delay reason code).
DELAY_REASON_TEXT: Mapping[str, str] = {
    "1": "proof of eligibility unknown or unavailable",
    "2": "litigation",
    "3": "authorization delays",
    "4": "delay in certifying provider",
    "5": "delay in supplying billing forms",
    "6": "delay in delivery of custom-made appliances",
    "7": "third-party processing delay",
    "8": "delay in eligibility determination",
    "9": "original claim rejected or denied due to a reason unrelated to the billing limitation rules",
    "10": "administration delay in the prior approval process",
    "11": "other",
    "15": "natural disaster",
    "16": "lack of information",
    "17": "no response to initial request",
}
# Denial reasons a retro-authorization case meets: CARC (835 CAS), RARC and X12 278 HCR01 decisions.
DENIAL_CODE_TEXT: Mapping[str, str] = {
    "15": "The authorization number is missing, invalid, or does not apply to the billed services or provider.",
    "39": "Services denied at the time authorization/pre-certification was requested.",
    "50": "These are non-covered services because this is not deemed a medical necessity by the payer.",
    "62": "Payment denied/reduced for absence of, or exceeded, pre-certification/authorization.",
    "197": "Precertification/authorization/notification/pre-treatment absent.",
    "198": "Precertification/notification/authorization/pre-treatment exceeded.",
    "M62": "Missing/incomplete/invalid treatment authorization code.",
    "N54": "Claim information is inconsistent with pre-certified/authorized services.",
    "A3": "Not certified.",
    "A6": "Modified.",
    "A2": "Certified, partial.",
}
ENCOUNTER_LABELS: Mapping[str, str] = {
    "emergency": "emergency department visit",
    "inpatient": "inpatient admission",
    "outpatient": "outpatient services",
    "observation": "observation stay",
    "home_health": "home health services",
    "virtual": "telehealth visit",
}
DISCOVERY_LABELS: Mapping[str, str] = {
    "on_file": "the coverage on file at registration",
    "eligibility_check": "an eligibility inquiry made after the service",
    "patient_reported": "insurance information the patient provided after the service",
    "retroactive_eligibility": "a retroactive eligibility determination",
    "remittance": "another payer's remittance advice",
    "other": "other means",
}
APPEAL_LEVEL_NAMES: Mapping[int, str] = {1: "First-level appeal", 2: "Second-level appeal", 3: "External review"}


# --- the data a letter is rendered from ------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FacilityInfo(_Frozen):
    name: str
    address: str
    phone: str
    contact: str
    npi: str
    tin: str


class PayerInfo(_Frozen):
    id: str
    name: str
    mail_lines: tuple[str, ...] = ()
    fax: str | None = None
    phone: str | None = None
    portal_url: str | None = None


class PatientInfo(_Frozen):
    given_name: str
    family_name: str
    birth_date: date | None
    sex: str | None
    mrn: str | None
    member_id: str
    group_number: str | None
    plan_name: str | None

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}".strip()


class EncounterInfo(_Frozen):
    id: int
    encounter_class: str
    admission_type: str | None
    admitted_at: datetime  # in the encounter's own zone
    discharged_at: datetime | None
    timezone: str
    place_of_service: str | None
    type_of_bill: str | None
    system_issue_reference: str | None


class ServiceInfo(_Frozen):
    line_number: int
    service_date: date
    code_system: str
    code: str
    modifiers: str | None
    description: str | None
    units: Decimal
    unit_charge: Decimal
    charges: Decimal  # units x unit charge
    rendering_npi: str | None
    ordering_npi: str | None
    denial_carc: str | None
    denial_rarc: str | None


class DiagnosisInfo(_Frozen):
    rank: int
    code_system: str
    code: str
    description: str | None


class ProviderInfo(_Frozen):
    role: str  # facility, rendering, ordering
    name: str | None
    npi: str


class CoverageInfo(_Frozen):
    effective_from: date
    effective_to: date | None
    discovered_at: datetime  # in the encounter's zone
    discovery_method: str


class OutageInfo(_Frozen):
    reference: str
    starts_at: datetime  # in the payer's zone
    ends_at: datetime | None
    description: str | None


class EnclosureInfo(_Frozen):
    type: str  # LOINC document code or evidence slug
    label: str


class PriorAppealInfo(_Frozen):
    level: int
    name: str
    status: str
    filed_on: date | None
    decided_on: date | None


class DenialInfo(_Frozen):
    decided_on: date | None
    decision: str | None  # X12 HCR01 / PAS review action code
    reference: str | None  # the payer's response reference
    codes: tuple[str, ...]  # CARC / RARC / decision reason codes, in the order found


class AppealInfo(_Frozen):
    level: int
    name: str  # the payer's name for the level
    due_at: datetime | None  # in the payer's zone
    denial: DenialInfo
    request_sent_on: date | None
    request_tracking_number: str | None
    prior: tuple[PriorAppealInfo, ...] = ()


class LetterData(_Frozen):
    """Everything one letter says: the input of both the HTML and the PDF."""

    case_id: int
    kind: Kind
    appeal_level: int = 0  # 0 for a request
    reason: MissReason
    delay_reason_code: str
    due_at: datetime | None  # the retro request deadline, in the payer's zone
    identified_on: date  # when the case was found, in the facility's zone
    facility: FacilityInfo
    payer: PayerInfo
    patient: PatientInfo
    encounter: EncounterInfo
    coverage: CoverageInfo | None
    services: tuple[ServiceInfo, ...]
    diagnoses: tuple[DiagnosisInfo, ...]
    providers: tuple[ProviderInfo, ...]
    outages: tuple[OutageInfo, ...] = ()
    enclosures: tuple[EnclosureInfo, ...] = ()
    appeal: AppealInfo | None = None
    _data_hash: str | None = PrivateAttr(default=None)

    @property
    def total_charges(self) -> Decimal:
        return sum((s.charges for s in self.services), Decimal("0.00"))

    @property
    def first_service_date(self) -> date:
        return min(s.service_date for s in self.services)

    @property
    def last_service_date(self) -> date:
        return max(s.service_date for s in self.services)

    @property
    def days_to_discovery(self) -> int | None:
        """Whole days from the start of services to the discovery of the coverage (local dates)."""
        if self.coverage is None:
            return None
        return (self.coverage.discovered_at.date() - self.encounter.admitted_at.date()).days

    def canonical_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def data_hash(self) -> str:
        """SHA-256 of the canonical JSON; computed once per instance (the batch plans and stores with it)."""
        if self._data_hash is None:
            self._data_hash = hashlib.sha256(self.canonical_json()).hexdigest()
        return self._data_hash

    def context(self, letter_date: date) -> dict[str, Any]:
        """What templates see: every field by name, the whole object as ``letter``, and the date."""
        ctx: dict[str, Any] = {name: getattr(self, name) for name in type(self).model_fields}
        ctx.update(letter=self, letter_date=letter_date)
        return ctx


class LetterRequest(NamedTuple):
    case_id: int
    kind: Kind = "request"
    appeal_level: int = 0


# --- errors ------------------------------------------------------------------------------------------


class LetterTemplateError(Exception):
    """A template is wrong: names the template file and line, never the data."""

    def __init__(self, template: str | None, line: int | None, message: str):
        self.template, self.line, self.message = template, line, message
        where = f"{template}:{line}" if template and line else (template or "template")
        super().__init__(f"{where}: {message}")


class LetterError(Exception):
    """A letter could not be produced for a case (ids and codes only)."""

    def __init__(self, case_id: int, message: str):
        self.case_id = case_id
        super().__init__(f"case {case_id}: {message}")


class LettersIncomplete(Exception):
    """Some letters of a batch failed: case ids with the template and line or an error code."""

    def __init__(self, failed: Mapping[int, str]):
        self.failed = dict(failed)
        shown = "; ".join(f"case {cid}: {msg}" for cid, msg in sorted(self.failed.items())[:20])
        more = f" and {len(self.failed) - 20} more" if len(self.failed) > 20 else ""
        super().__init__(f"letters not rendered for {len(self.failed)} case(s): {shown}{more}")

    @property
    def template_problem(self) -> bool:
        """True when every failure is a template problem (retrying will not help)."""
        return all(m.startswith("template ") for m in self.failed.values())


# --- the Jinja2 environment -----------------------------------------------------------------------------


def _long_date(v: date | datetime | None) -> str:
    if v is None:
        return "not on file"
    return f"{v:%B} {v.day}, {v.year}"


def _short_date(v: date | datetime | None) -> str:
    return "not on file" if v is None else f"{v:%m/%d/%Y}"


def _clock(v: datetime) -> str:
    hour = v.hour % 12 or 12
    return f"{hour}:{v:%M} {'AM' if v.hour < 12 else 'PM'} {v.tzname()}"


def _long_datetime(v: datetime | None) -> str:
    if v is None:
        return "not on file"
    return f"{_long_date(v)}, {_clock(v)}"


def _money(v: Decimal | int | float | None) -> str:
    return "$0.00" if v is None else f"${Decimal(v):,.2f}"


def _quantity(v: Decimal | None) -> str:
    if v is None:
        return ""
    text = f"{Decimal(v):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _join_and(items: Iterable[object]) -> str:
    words = [str(i) for i in items]
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _label(table: Mapping[str, str]) -> Callable[[str | None], str]:
    def label(code: str | None) -> str:
        if code is None:
            return "not on file"
        return table.get(str(code), str(code).replace("_", " "))
    return label


def _period(first: date, last: date) -> str:
    return _long_date(first) if first == last else f"{_long_date(first)} through {_long_date(last)}"


def _enclosure_number(enclosures: Sequence[EnclosureInfo], *types: str) -> int | None:
    """The 1-based number of the first enclosure of one of ``types`` (None: not enclosed)."""
    for i, e in enumerate(enclosures, 1):
        if e.type in types:
            return i
    return None


def _rel(path: str | Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _reference_lines(tree: jinja2.nodes.Template) -> dict[str | None, int]:
    """The line of each template an ``extends``/``include``/``import`` names (None: named by a variable)."""
    lines: dict[str | None, int] = {}
    kinds = (jinja2.nodes.Extends, jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport)
    for node in tree.find_all(kinds):
        names = node.template.items if isinstance(node.template, (jinja2.nodes.Tuple, jinja2.nodes.List)) else [
            node.template]
        for item in names:
            value = item.value if isinstance(item, jinja2.nodes.Const) and isinstance(item.value, str) else None
            lines.setdefault(value, node.lineno)
    return lines


def _bad_byte_line(exc: UnicodeDecodeError) -> int:
    """The 1-based line of the first byte that is not UTF-8."""
    return bytes(exc.object[: exc.start]).count(b"\n") + 1


@dataclass(frozen=True)
class ResolvedTemplate:
    """The template a letter uses, as resolved for one payer."""

    name: str  # "request/emergency.html.j2", or "payers/<id>:request/emergency.html.j2" with payer files in play
    file: str  # the leaf template's path under the templates directory
    template_hash: str
    sources: tuple[str, ...]  # every file that went into the hash, relative to the templates directory
    program: Path  # the Typst program


class LetterTemplates:
    """The letter templates of one directory: environments per payer, template hashes, rendering."""

    def __init__(self, templates_dir: str | Path = TEMPLATES_DIR):
        self.root = Path(templates_dir).resolve()
        if not (self.root / "base.html.j2").is_file():
            raise LetterTemplateError(str(self.root), None, "not a templates directory (no base.html.j2)")
        self._envs: dict[str | None, jinja2.Environment] = {}
        self._resolved: dict[tuple[str | None, str], ResolvedTemplate] = {}
        self._typesetters: dict[Path, Typesetter] = {}
        self._scopes: dict[str, str | None] = {}  # payer id -> its folder's name, or None
        self._lock = threading.RLock()  # the caches fill from the render threads

    # environments

    def payer_overrides(self) -> list[str]:
        """Payer ids that have their own folder of templates."""
        base = self.root / PAYERS_SUBDIR
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def _scope(self, payer_id: str | None) -> str | None:
        """The payer's own folder of templates if it has one; looked up once per payer (a folder added later
        is seen by the next process, as the caches below are)."""
        if not payer_id:
            return None
        with self._lock:
            if payer_id not in self._scopes:
                self._scopes[payer_id] = payer_id if (self.root / PAYERS_SUBDIR / payer_id).is_dir() else None
            return self._scopes[payer_id]

    def environment(self, payer_id: str | None = None) -> jinja2.Environment:
        scope = self._scope(payer_id)
        with self._lock:
            if scope not in self._envs:
                self._envs[scope] = self._new_environment(scope)
            return self._envs[scope]

    def _new_environment(self, scope: str | None) -> jinja2.Environment:
        search = [str(self.root / PAYERS_SUBDIR / scope), str(self.root)] if scope else [str(self.root)]
        loader = jinja2.ChoiceLoader([
            jinja2.FileSystemLoader(search),
            jinja2.PrefixLoader({DEFAULT_PREFIX: jinja2.FileSystemLoader(str(self.root))}),
        ])
        env = jinja2.Environment(
            loader=loader, undefined=jinja2.StrictUndefined, autoescape=True, trim_blocks=True,
            lstrip_blocks=True, auto_reload=False, cache_size=-1,
        )
        env.filters.update(
            long_date=_long_date, short_date=_short_date, long_datetime=_long_datetime, clock=_clock,
            money=_money, quantity=_quantity, join_and=_join_and,
            reason_label=_label(REASON_LABELS), delay_reason_text=_label(DELAY_REASON_TEXT),
            denial_code_text=_label(DENIAL_CODE_TEXT), encounter_label=_label(ENCOUNTER_LABELS),
            discovery_label=_label(DISCOVERY_LABELS),
        )
        env.globals.update(period=_period, enclosure_number=_enclosure_number,
                           appeal_level_name=lambda n: APPEAL_LEVEL_NAMES.get(n, f"Level {n} appeal"))
        return env

    @staticmethod
    def template_name(kind: Kind, reason: str | None = None, appeal_level: int = 0) -> str:
        if kind == "request":
            return f"request/{MissReason(reason).value}.html.j2"
        if appeal_level not in APPEAL_LEVELS:
            raise ValueError(f"appeal level must be 1, 2 or 3, got {appeal_level}")
        return f"appeal/level-{appeal_level}.html.j2"

    # hashes

    def _sources(self, env: jinja2.Environment, name: str, out: dict[str, str], stack: tuple[str, ...],
                 referrer: tuple[str, int | None] | None = None) -> None:
        """Every file ``name`` is made of, into ``out``. ``referrer``: the file and line that named it,
        which a missing template or a cycle is reported at."""
        where, line = referrer or (name, None)
        if name in stack:
            raise LetterTemplateError(where, line, f"template cycle: {' -> '.join((*stack, name))}")
        try:
            source, filename, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound:
            raise LetterTemplateError(where, line, f"template {name!r} not found") from None
        except UnicodeDecodeError as exc:
            raise LetterTemplateError(name, _bad_byte_line(exc), "not UTF-8 text") from None
        rel = _rel(filename, self.root) or name
        if rel in out:
            return
        out[rel] = hashlib.sha256(source.encode()).hexdigest()
        try:
            tree = env.parse(source, name, filename)
        except jinja2.TemplateSyntaxError as exc:
            raise LetterTemplateError(rel, exc.lineno, exc.message or "syntax error") from None
        lines = _reference_lines(tree)
        for ref in meta.find_referenced_templates(tree):
            if ref is None:
                raise LetterTemplateError(rel, lines.get(None), "extends/includes/imports a template named by a "
                                          "variable: name templates literally so that the template hash covers them")
            self._sources(env, ref, out, (*stack, name), (rel, lines.get(ref)))

    def program_path(self, payer_id: str | None) -> Path:
        scope = self._scope(payer_id)
        if scope and (self.root / PAYERS_SUBDIR / scope / TYPST_PROGRAM).is_file():
            return self.root / PAYERS_SUBDIR / scope / TYPST_PROGRAM
        return self.root / TYPST_PROGRAM

    def resolve(self, payer_id: str | None, kind: Kind, reason: str | None = None,
                appeal_level: int = 0) -> ResolvedTemplate:
        scope = self._scope(payer_id)
        name = self.template_name(kind, reason, appeal_level)
        cache_key = (scope, name)
        with self._lock:
            if cache_key not in self._resolved:
                self._resolved[cache_key] = self._resolve(scope, name)
            return self._resolved[cache_key]

    def _resolve(self, scope: str | None, name: str) -> ResolvedTemplate:
        env = self.environment(scope)
        sources: dict[str, str] = {}
        self._sources(env, name, sources, ())
        program = self.program_path(scope)
        leaf = next(iter(sources))
        payer_prefix = f"{PAYERS_SUBDIR}/{scope}/" if scope else None
        program_rel = _rel(program, self.root) or TYPST_PROGRAM
        hashed = {
            "templates": sources,
            "typst": {program_rel: sha256_file(program)},
            "converter": CONVERTER_VERSION,
            "engine": ENGINE,
        }
        template_hash = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
        payer_used = payer_prefix and any(s.startswith(payer_prefix) for s in (*sources, program_rel))
        display = leaf if not payer_used or leaf.startswith(payer_prefix or "") else f"{PAYERS_SUBDIR}/{scope}:{leaf}"
        return ResolvedTemplate(
            name=display, file=leaf, template_hash=template_hash,
            sources=tuple(sorted((*sources, program_rel))), program=program,
        )

    def resolve_for(self, data: LetterData) -> ResolvedTemplate:
        return self.resolve(data.payer.id, data.kind, data.reason, data.appeal_level)

    # rendering

    def _location(self, exc: BaseException) -> tuple[str | None, int | None]:
        """The innermost template frame of a traceback (Jinja2 maps frames to template files and lines)."""
        where: tuple[str | None, int | None] = (None, None)
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            filename = frame.f_code.co_filename
            if filename.endswith((".j2", ".html", ".jinja")) and Path(filename).is_file():
                where = (_rel(filename, self.root), lineno)
        return where

    def render_html(self, data: LetterData, letter_date: date) -> str:
        """The letter as HTML; ``LetterTemplateError`` names the template and line of any failure."""
        resolved = self.resolve_for(data)
        env = self.environment(data.payer.id)
        name = self.template_name(data.kind, data.reason, data.appeal_level)
        try:
            return env.get_template(name).render(data.context(letter_date))
        except jinja2.TemplateSyntaxError as exc:
            raise LetterTemplateError(_rel(exc.filename, self.root) or exc.name, exc.lineno,
                                      exc.message or "syntax error") from None
        except jinja2.TemplateError as exc:  # undefined values and the like: messages name variables, not data
            template, line = self._location(exc)
            raise LetterTemplateError(template or resolved.file, line, str(exc)) from None
        except Exception as exc:  # a filter choking on a value: its message could quote the value
            template, line = self._location(exc)
            raise LetterTemplateError(template or resolved.file, line,
                                      f"{type(exc).__name__} while rendering") from None

    def typesetter(self, payer_id: str | None = None, program: Path | None = None) -> Typesetter:
        program = program or self.program_path(payer_id)
        with self._lock:
            if program not in self._typesetters:
                self._typesetters[program] = Typesetter(program)
            return self._typesetters[program]

    def render_pdf(self, data: LetterData, letter_date: date, html: str | None = None) -> bytes:
        """The PDF, typeset from the letter's HTML (rendered here unless given)."""
        html = self.render_html(data, letter_date) if html is None else html
        resolved = self.resolve_for(data)
        try:  # the program the template hash covers
            return self.typesetter(program=resolved.program).pdf(html)
        except TypesetError as exc:
            raise LetterTemplateError(resolved.file, None, f"rendered HTML: {exc}") from None

    def render(self, data: LetterData, letter_date: date) -> RenderedLetter:
        resolved = self.resolve_for(data)
        html = self.render_html(data, letter_date)
        pdf = self.render_pdf(data, letter_date, html)
        return RenderedLetter(html.encode(), pdf, resolved.name, resolved.template_hash, data.data_hash())


@dataclass(frozen=True)
class RenderedLetter:
    html: bytes
    pdf: bytes
    template_name: str
    template_hash: str
    data_hash: str


@lru_cache(maxsize=8)
def letter_templates(templates_dir: str | Path = TEMPLATES_DIR) -> LetterTemplates:
    """One ``LetterTemplates`` per directory and process (environments and compilers are reused)."""
    return LetterTemplates(templates_dir)


def templates_dir_of(settings: Any) -> Path:
    """The templates directory: ``settings.templates_dir`` when the settings have one, else ``templates/``."""
    return Path(getattr(settings, "templates_dir", None) or TEMPLATES_DIR)


# --- reading a batch from the database ------------------------------------------------------------------


def _chunks(items: Sequence[int], size: int = 500) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _local(t: datetime | None, tz: str) -> datetime | None:
    return t.astimezone(ZoneInfo(tz)) if t is not None else None


def _cents(v: Decimal | None) -> Decimal:
    return Decimal(v or 0).quantize(Decimal("0.01"))


def facility_info(settings: Any) -> FacilityInfo:
    return FacilityInfo(name=settings.facility_name, address=settings.facility_address, phone=settings.facility_phone,
                        contact=settings.facility_contact, npi=settings.facility_npi, tin=settings.facility_tin)


def payer_info(payer: PayerRules) -> PayerInfo:
    c = payer.contact
    return PayerInfo(id=payer.id, name=payer.name, mail_lines=tuple(c.mail_lines), fax=c.fax, phone=c.phone,
                     portal_url=c.portal_url)


def _codes(*values: str | None) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        for code in (v or "").replace(";", ",").split(","):
            code = code.strip()
            if code and code not in out:
                out.append(code)
    return tuple(out)


_CASE_COLUMNS = (
    RetroCase.id.label("case_id"), RetroCase.payer_id, RetroCase.reason, RetroCase.delay_reason_code, RetroCase.due_at,
    RetroCase.created_at, RetroCase.coverage_id, Encounter.id.label("encounter_id"), Encounter.patient_id,
    Encounter.encounter_class, Encounter.admission_type, Encounter.admitted_at, Encounter.discharged_at,
    Encounter.timezone, Encounter.place_of_service, Encounter.type_of_bill, Encounter.system_issue_reference,
    Encounter.facility_npi, Patient.given_name, Patient.family_name, Patient.birth_date, Patient.sex, Patient.mrn,
)
_COVERAGE_COLUMNS = (
    Coverage.id, Coverage.patient_id, Coverage.payer_id, Coverage.member_id, Coverage.group_number, Coverage.plan_name,
    Coverage.effective_from, Coverage.effective_to, Coverage.discovered_at, Coverage.discovery_method,
)
_LINE_COLUMNS = (
    ServiceLine.line_number, ServiceLine.service_date, ServiceLine.code_system, ServiceLine.code, ServiceLine.modifiers,
    ServiceLine.description, ServiceLine.units, ServiceLine.charge, ServiceLine.rendering_npi, ServiceLine.ordering_npi,
    ServiceLine.denial_carc, ServiceLine.denial_rarc, ServiceLine.denied_on,
)


def load_letter_data(
    session: Session, settings: Any, library: RuleLibrary, requests: Sequence[LetterRequest],
) -> tuple[dict[LetterRequest, LetterData], dict[int, str]]:
    """``LetterData`` for a batch: one query per table, whatever the batch size (in chunks of 500 ids).

    Columns, not ORM objects: building a SQLModel instance per row costs more than the letter's HTML.
    Returns the data per request and the cases that cannot have a letter, with a code saying why
    (``not_found``, ``unknown_payer``, ``no_reason``, ``no_services``, ``no_coverage``, ``no_appeal``).
    """
    ids = sorted({r.case_id for r in requests})
    failed: dict[int, str] = {}
    facility = facility_info(settings)
    cases: dict[int, Any] = {}
    lines: dict[int, list[Any]] = defaultdict(list)
    diagnoses: dict[int, list[Any]] = defaultdict(list)
    manifests: dict[int, dict | None] = {}
    coverages: dict[int, Any] = {}
    appeals: dict[int, list[Appeal]] = defaultdict(list)
    responses: dict[int, list[PayerResponse]] = defaultdict(list)
    submissions: dict[int, list[Submission]] = defaultdict(list)
    want_appeals = sorted({r.case_id for r in requests if r.kind == "appeal"})
    for chunk in _chunks(ids):
        for row in session.execute(
            sa.select(*_CASE_COLUMNS)
            .join(Encounter, Encounter.id == RetroCase.encounter_id)
            .join(Patient, Patient.id == Encounter.patient_id)
            .where(RetroCase.id.in_(chunk))
        ):
            cases[row.case_id] = row
        for row in session.execute(
            sa.select(CaseServiceLine.case_id, *_LINE_COLUMNS)
            .join(ServiceLine, ServiceLine.id == CaseServiceLine.service_line_id)
            .where(CaseServiceLine.case_id.in_(chunk))
            .order_by(CaseServiceLine.case_id, ServiceLine.service_date, ServiceLine.line_number)
        ):
            lines[row.case_id].append(row)
        for case_id, manifest in session.execute(
            sa.select(Packet.case_id, Packet.manifest).where(Packet.case_id.in_(chunk))
        ):
            manifests[case_id] = manifest
    # Coverage: the one linked to the case, else the patient's for that payer (primary first).
    linked = sorted({c.coverage_id for c in cases.values() if c.coverage_id is not None})
    unlinked = sorted({c.patient_id for c in cases.values() if c.coverage_id is None})
    by_member: dict[tuple[int, str], Any] = {}
    for chunk in _chunks(linked):
        coverages.update((row.id, row) for row in session.execute(
            sa.select(*_COVERAGE_COLUMNS).where(Coverage.id.in_(chunk))))
    for chunk in _chunks(unlinked):
        for row in session.execute(
            sa.select(*_COVERAGE_COLUMNS).where(Coverage.patient_id.in_(chunk))
            .order_by(Coverage.patient_id, Coverage.priority, Coverage.effective_from.desc(), Coverage.id)
        ):
            by_member.setdefault((row.patient_id, row.payer_id), row)
    encounter_ids = sorted({c.encounter_id for c in cases.values()})
    for chunk in _chunks(encounter_ids):
        for row in session.execute(
            sa.select(Diagnosis.encounter_id, Diagnosis.rank, Diagnosis.code_system, Diagnosis.code,
                      Diagnosis.description)
            .where(Diagnosis.encounter_id.in_(chunk))
            .order_by(Diagnosis.encounter_id, Diagnosis.rank, Diagnosis.code_system, Diagnosis.code)
        ):
            diagnoses[row.encounter_id].append(row)
    # Payer outages that overlap any encounter of the batch; matched per case below.
    outages: dict[str, list[Any]] = defaultdict(list)
    if cases:
        starts = [c.admitted_at for c in cases.values()]
        ends = [c.discharged_at or c.admitted_at for c in cases.values()]
        for o in session.execute(
            sa.select(PayerOutage.payer_id, PayerOutage.reference, PayerOutage.starts_at, PayerOutage.ends_at,
                      PayerOutage.description)
            .where(
                PayerOutage.payer_id.in_(sorted({c.payer_id for c in cases.values()})),
                PayerOutage.starts_at <= max(ends),
                sa.or_(PayerOutage.ends_at.is_(None), PayerOutage.ends_at >= min(starts)),
            ).order_by(PayerOutage.starts_at, PayerOutage.id)
        ):
            outages[o.payer_id].append(o)
    for chunk in _chunks(want_appeals):
        for a in session.execute(sa.select(Appeal).where(Appeal.case_id.in_(chunk)).order_by(Appeal.level)).scalars():
            appeals[a.case_id].append(a)
        for r in session.execute(
            sa.select(PayerResponse).where(PayerResponse.case_id.in_(chunk))
            .order_by(PayerResponse.received_at, PayerResponse.id)
        ).scalars():
            responses[r.case_id].append(r)
        for sub in session.execute(
            sa.select(Submission).where(Submission.case_id.in_(chunk)).order_by(Submission.attempt, Submission.id)
        ).scalars():
            submissions[sub.case_id].append(sub)

    facility_zone = ZoneInfo(settings.facility_timezone)
    out: dict[LetterRequest, LetterData] = {}
    for req in requests:
        c = cases.get(req.case_id)
        if c is None:
            failed[req.case_id] = "not_found"
            continue
        cov = coverages.get(c.coverage_id) if c.coverage_id is not None else by_member.get((c.patient_id, c.payer_id))
        payer = library.get(c.payer_id)
        case_lines = lines.get(c.case_id, [])
        why = ("unknown_payer" if payer is None else "no_reason" if not c.reason
               else "no_services" if not case_lines else "no_coverage" if cov is None else None)
        if why:
            failed[req.case_id] = why
            continue
        assert payer is not None and cov is not None
        appeal = None
        if req.kind == "appeal":
            appeal = _appeal_info(req, payer, appeals.get(c.case_id, []), responses.get(c.case_id, []),
                                  submissions.get(c.case_id, []), case_lines, facility_zone)
            if appeal is None:
                failed[req.case_id] = "no_appeal"
                continue
        try:
            out[req] = _letter_data(req, c, cov, payer, case_lines, diagnoses.get(c.encounter_id, []),
                                    outages.get(c.payer_id, []), manifests.get(c.case_id), appeal, facility,
                                    facility_zone)
        except (ValidationError, ValueError, KeyError) as exc:  # the message would quote the values: not kept
            failed[req.case_id] = f"invalid_data:{type(exc).__name__}"
    return out, failed


def _letter_data(req: LetterRequest, c: Any, cov: Any, payer: PayerRules, case_lines: Sequence[Any],
                 diagnoses: Sequence[Any], outages: Sequence[Any], manifest: Mapping[str, Any] | None,
                 appeal: AppealInfo | None, facility: FacilityInfo, facility_zone: ZoneInfo) -> LetterData:
    """One case's rows as ``LetterData`` (times in the zone each is read in: encounter, payer, facility)."""
    tz = c.timezone
    end = c.discharged_at or c.admitted_at
    return LetterData(
        case_id=c.case_id, kind=req.kind, appeal_level=req.appeal_level, reason=MissReason(c.reason),
        delay_reason_code=c.delay_reason_code or DELAY_REASON_CODES[MissReason(c.reason)],
        due_at=_local(c.due_at, payer.time_zone), identified_on=c.created_at.astimezone(facility_zone).date(),
        facility=facility, payer=payer_info(payer),
        patient=PatientInfo(given_name=c.given_name, family_name=c.family_name, birth_date=c.birth_date,
                            sex=c.sex, mrn=c.mrn, member_id=cov.member_id, group_number=cov.group_number,
                            plan_name=cov.plan_name),
        encounter=EncounterInfo(id=c.encounter_id, encounter_class=c.encounter_class,
                                admission_type=c.admission_type, admitted_at=_local(c.admitted_at, tz),
                                discharged_at=_local(c.discharged_at, tz), timezone=tz,
                                place_of_service=c.place_of_service, type_of_bill=c.type_of_bill,
                                system_issue_reference=c.system_issue_reference),
        coverage=CoverageInfo(effective_from=cov.effective_from, effective_to=cov.effective_to,
                              discovered_at=_local(cov.discovered_at, tz), discovery_method=cov.discovery_method),
        services=tuple(_service(s) for s in case_lines),
        diagnoses=tuple(DiagnosisInfo(rank=d.rank, code_system=d.code_system, code=d.code, description=d.description)
                        for d in diagnoses),
        providers=_providers(c.facility_npi, case_lines, facility),
        outages=tuple(
            OutageInfo(reference=o.reference, starts_at=_local(o.starts_at, payer.time_zone),
                       ends_at=_local(o.ends_at, payer.time_zone), description=o.description)
            for o in outages if o.starts_at <= end and (o.ends_at is None or o.ends_at >= c.admitted_at)
        ),
        enclosures=_enclosures(manifest),
        appeal=appeal,
    )


def _service(s: Any) -> ServiceInfo:
    units, unit_charge = Decimal(s.units).quantize(Decimal("0.01")), _cents(s.charge)
    return ServiceInfo(line_number=s.line_number, service_date=s.service_date, code_system=s.code_system, code=s.code,
                       modifiers=s.modifiers, description=s.description, units=units, unit_charge=unit_charge,
                       charges=_cents(units * unit_charge), rendering_npi=s.rendering_npi,
                       ordering_npi=s.ordering_npi, denial_carc=s.denial_carc, denial_rarc=s.denial_rarc)


def _providers(facility_npi: str | None, lines: Sequence[Any], facility: FacilityInfo) -> tuple[ProviderInfo, ...]:
    out = [ProviderInfo(role="facility", name=facility.name, npi=facility_npi or facility.npi)]
    seen = {("facility", out[0].npi)}
    for role, attr in (("rendering", "rendering_npi"), ("ordering", "ordering_npi")):
        for s in lines:
            npi = getattr(s, attr)
            if npi and (role, npi) not in seen:
                seen.add((role, npi))
                out.append(ProviderInfo(role=role, name=None, npi=npi))
    return tuple(out)


def _enclosures(manifest: Mapping[str, Any] | None) -> tuple[EnclosureInfo, ...]:
    """The packet's included items, in manifest order (a missing packet: nothing enclosed)."""
    if not manifest:
        return ()
    return tuple(
        EnclosureInfo(type=str(item["type"]), label=str(item.get("label") or item["type"]))
        for item in manifest.get("items", []) if item.get("status") == "included"
    )


def _appeal_info(req: LetterRequest, payer: PayerRules, appeals: Sequence[Appeal],
                 responses: Sequence[PayerResponse], submissions: Sequence[Submission],
                 lines: Sequence[Any], facility_zone: ZoneInfo) -> AppealInfo | None:
    by_level = {a.level: a for a in appeals}
    this = by_level.get(req.appeal_level)
    if this is None:
        return None
    names = {a.level: a.name for a in payer.appeals}
    tz = ZoneInfo(payer.time_zone)
    denials = [r for r in responses if r.decision not in ("A1", "A4", "NA")]
    denial = denials[-1] if denials else None
    requests = [s for s in submissions if s.kind == "request" and s.sent_at is not None]
    first_request = requests[0] if requests else None
    denied_on = denial.received_at.astimezone(tz).date() if denial else max(
        (s.denied_on for s in lines if s.denied_on), default=None)
    codes = _codes(this.denial_codes, denial.reason_codes if denial else None,
                   *(s.denial_carc for s in lines), *(s.denial_rarc for s in lines))
    return AppealInfo(
        level=req.appeal_level, name=names.get(req.appeal_level, APPEAL_LEVEL_NAMES[req.appeal_level]),
        due_at=_local(this.due_at, payer.time_zone),
        denial=DenialInfo(decided_on=denied_on, decision=denial.decision if denial else None,
                          reference=denial.response_ref if denial else None, codes=codes),
        request_sent_on=first_request.sent_at.astimezone(facility_zone).date() if first_request else None,
        request_tracking_number=first_request.tracking_number if first_request else None,
        prior=tuple(
            PriorAppealInfo(level=a.level, name=names.get(a.level, APPEAL_LEVEL_NAMES.get(a.level, str(a.level))),
                            status=a.status,
                            filed_on=a.filed_at.astimezone(tz).date() if a.filed_at else None,
                            decided_on=a.decided_at.astimezone(tz).date() if a.decided_at else None)
            for a in appeals if a.level < req.appeal_level
        ),
    )


# --- which letter each case gets -----------------------------------------------------------------------

# Request letters: rendered for ready cases (which then move to letter_rendered) and re-rendered,
# when their inputs changed, for cases whose letter is not yet sent.
REQUEST_STATES = (CaseStatus.READY, CaseStatus.LETTER_RENDERED)
# Appeal letters: denied cases with an open appeal (the letter for its highest open level).
APPEAL_STATES = (CaseStatus.DENIED,)


def needs_letter() -> sa.ColumnElement[bool]:
    """The cases whose letter a batch renders: ready ones, and denied ones with an open appeal."""
    return sa.or_(
        RetroCase.status == CaseStatus.READY,
        sa.and_(RetroCase.status.in_([str(s) for s in APPEAL_STATES]),
                sa.exists().where(Appeal.case_id == RetroCase.id, Appeal.status == "open")),
    )


def cases_to_render(engine: sa.Engine, limit: int | None = None) -> list[int]:
    """Ready cases, and denied cases with an open appeal (ids only)."""
    q = sa.select(RetroCase.id).where(needs_letter()).order_by(RetroCase.id)
    if limit is not None:
        q = q.limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(q).scalars())


def cases_with_open_appeals(engine: sa.Engine, limit: int | None = None) -> list[int]:
    """Denied cases with an open appeal: the appeal letters to render (ids only)."""
    q = (sa.select(RetroCase.id).where(RetroCase.status.in_([str(s) for s in APPEAL_STATES]),
                                       sa.exists().where(Appeal.case_id == RetroCase.id, Appeal.status == "open"))
         .order_by(RetroCase.id))
    with engine.connect() as conn:
        return list(conn.execute(q.limit(limit) if limit is not None else q).scalars())


def plan_letters(session: Session, case_ids: Sequence[int]) -> tuple[list[LetterRequest], list[int]]:
    """The letter each case of a batch gets from its state, and the ids that get none (skipped)."""
    ids = sorted(set(case_ids))
    status: dict[int, str] = {}
    open_level: dict[int, int] = {}
    for chunk in _chunks(ids):
        status.update(session.execute(
            sa.select(RetroCase.id, RetroCase.status).where(RetroCase.id.in_(chunk))).tuples().all())
        open_level.update(session.execute(
            sa.select(Appeal.case_id, sa.func.max(Appeal.level)).where(Appeal.case_id.in_(chunk), Appeal.status == "open")
            .group_by(Appeal.case_id)).tuples().all())
    plan, skipped = [], []
    for cid in ids:
        s = status.get(cid)
        if s in REQUEST_STATES:
            plan.append(LetterRequest(cid, "request", 0))
        elif s in APPEAL_STATES and cid in open_level:
            plan.append(LetterRequest(cid, "appeal", open_level[cid]))
        else:
            skipped.append(cid)
    return plan, skipped


# --- rendering and storing a batch ---------------------------------------------------------------------


@dataclass
class RenderResult:
    rendered: int = 0  # new letters (or new versions) stored
    unchanged: int = 0  # same data and template as a stored letter: nothing written
    moved: int = 0  # cases moved ready -> letter_rendered
    skipped: int = 0  # no letter for the case's state
    letters: dict[int, int] = field(default_factory=dict)  # case id -> letter id (new or existing)
    failed: dict[int, str] = field(default_factory=dict)  # case id -> "template <file>:<line>: ..." or a code

    def as_dict(self) -> dict[str, Any]:
        return {"rendered": self.rendered, "unchanged": self.unchanged, "moved": self.moved, "skipped": self.skipped,
                "letters": {str(k): v for k, v in sorted(self.letters.items())},
                "failed": {str(k): v for k, v in sorted(self.failed.items())}}


def merge_results(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up ``RenderResult.as_dict()`` of several batches."""
    total = RenderResult().as_dict()
    for r in results:
        for k in ("rendered", "unchanged", "moved", "skipped"):
            total[k] += r.get(k, 0)
        total["letters"].update(r.get("letters", {}))
        total["failed"].update(r.get("failed", {}))
    return total


def letter_stem(kind: str, appeal_level: int) -> str:
    return "request" if kind == "request" else f"appeal-{appeal_level}"


def letter_keys(case_id: int, version: int, kind: str, appeal_level: int) -> tuple[str, str]:
    stem = letter_stem(kind, appeal_level)
    return (key("letters", case_id, f"v{version}", f"{stem}.html"),
            key("letters", case_id, f"v{version}", f"{stem}.pdf"))


def letter_date_of(as_of: datetime, settings: Any) -> date:
    return as_of.astimezone(ZoneInfo(settings.facility_timezone)).date()


def _render_with(templates: LetterTemplates, data: LetterData, letter_date: date) -> RenderedLetter | str:
    """One letter, or the template problem that stopped it."""
    try:
        return templates.render(data, letter_date)
    except LetterTemplateError as exc:
        return f"template {exc}"


def _render_in_process(templates_dir: str, data: LetterData, letter_date: date) -> RenderedLetter | str:
    return _render_with(letter_templates(templates_dir), data, letter_date)


def render_all(templates: LetterTemplates, jobs: Sequence[tuple[LetterData, date]], *, workers: int = 1,
               executor: Literal["thread", "process"] = "thread") -> list[RenderedLetter | str]:
    """Render letters, in parallel when ``workers`` > 1: each is a ``RenderedLetter`` or a template problem.

    Typst releases the GIL while it typesets, so threads use every core without the start-up and
    pickling of processes (``benchmarks/letters.py`` measures both; processes are spawned, not
    forked, since a flow run has threads of its own)."""
    with ExitStack() as stack:
        return list(_renderer(stack, templates, workers if len(jobs) > 1 else 1, executor)(jobs))


Renderer = Callable[[Sequence[tuple[LetterData, date]]], Iterator[RenderedLetter | str]]


def _renderer(stack: ExitStack, templates: LetterTemplates, workers: int,
              executor: Literal["thread", "process"]) -> Renderer:
    """Starts rendering jobs as soon as it is given them and yields the results in the jobs' order, as each is
    done; its pool lives on ``stack``, and each call's letters not started yet are dropped when the stack
    unwinds (on a failure, nothing is typeset for nothing)."""
    if workers <= 1:
        return lambda jobs: (_render_with(templates, d, day) for d, day in jobs)

    def started(results: Iterator[RenderedLetter | str]) -> Iterator[RenderedLetter | str]:
        stack.callback(results.close)  # type: ignore[attr-defined]  # Executor.map's generator
        return results

    if executor == "process":
        procs = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")))
        return lambda jobs: started(procs.map(
            _render_in_process, [str(templates.root)] * len(jobs), [d for d, _ in jobs], [day for _, day in jobs],
            chunksize=max(1, len(jobs) // (workers * 4))))
    threads = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="letters"))
    return lambda jobs: started(threads.map(lambda job: _render_with(templates, *job), jobs))


def _existing(session: Session, case_ids: Sequence[int]) -> tuple[dict[tuple, Letter], dict[tuple, int]]:
    """Stored letters by identity (case, kind, level, data hash, template hash) and the last version of each."""
    found: dict[tuple, Letter] = {}
    last: dict[tuple, int] = {}
    for chunk in _chunks(sorted(set(case_ids))):
        for letter in session.execute(sa.select(Letter).where(Letter.case_id.in_(chunk))).scalars():
            found[(letter.case_id, letter.kind, letter.appeal_level, letter.data_hash, letter.template_hash)] = letter
            k = (letter.case_id, letter.kind, letter.appeal_level)
            last[k] = max(last.get(k, 0), letter.version)
    return found, last


def _put_all(storage: Storage, objects: Sequence[tuple[str, bytes, str]],
             pool: ThreadPoolExecutor | None) -> dict[str, str]:
    """Store ``objects`` (key, bytes, media type), on ``pool`` when there is one (``Storage.put_concurrency``);
    the SHA-256 of each by key."""
    if pool is None:
        stored = [storage.put(k, body, content_type=media) for k, body, media in objects]
    else:
        stored = [f.result() for f in [pool.submit(storage.put, k, body, content_type=media)
                                       for k, body, media in objects]]
    return {o.key: o.sha256 for o in stored}


def _details(letter: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit event of a letter records (``letter``: a ``letters`` row's columns)."""
    return {"letter_id": letter["id"], "kind": letter["kind"], "appeal_level": letter["appeal_level"],
            "version": letter["version"], "template": letter["template_name"],
            "template_hash": letter["template_hash"], "data_hash": letter["data_hash"],
            "pdf_sha256": letter["pdf_sha256"]}


def render_letters(
    engine: sa.Engine,
    storage: Storage,
    settings: Any,
    library: RuleLibrary,
    case_ids: Sequence[int] | None = None,
    *,
    requests: Sequence[LetterRequest] | None = None,
    templates: LetterTemplates | None = None,
    as_of: datetime | None = None,
    actor: Actor = Actor(),
    workers: int = 1,
    executor: Literal["thread", "process"] = "thread",
) -> RenderResult:
    """Render, store and record the letters of a batch; move ready cases to letter_rendered.

    ``case_ids``: each case gets the letter its state calls for (``plan_letters``); ``requests``
    asks for given letters whatever the state (the CLI). Safe to repeat: a letter whose data and
    template are unchanged is neither rendered nor written again (a ready case is still moved).
    Failures are per case in ``RenderResult.failed``; the others go on.
    """
    templates = templates or letter_templates(templates_dir_of(settings))
    as_of = as_of or datetime.now(timezone.utc)
    if as_of.tzinfo is None:
        raise ValueError("as_of must carry its time zone")
    letter_date = letter_date_of(as_of, settings)
    result = RenderResult()

    # 1. Read: the plan and what is stored already.
    with session_scope(engine) as s:
        if requests is None:
            plan, skipped = plan_letters(s, case_ids or [])
            result.skipped = len(skipped)
        else:
            plan = list(requests)
        existing, _ = _existing(s, [r.case_id for r in plan])

    # 2. Load the data and render what is new (no lock held meanwhile), and 3. store and record the letters a
    # chunk at a time, each chunk in one transaction, in a writer thread: chunk k waits on storage and the
    # database while chunk k+1 is typeset (the cores would idle through those waits otherwise). The first few
    # letters are loaded on their own and typeset while the rest load, for the same reason.
    todo: list[tuple[LetterRequest, str, str]] = []  # request, template hash, data hash
    new: set[LetterRequest] = set()
    with ExitStack() as stack:
        render = _renderer(stack, templates, workers if len(plan) > 1 else 1, executor)
        parts: list[Iterator[RenderedLetter | str]] = []
        for part in (plan[:LOAD_FIRST], plan[LOAD_FIRST:]):
            if not part:
                continue
            with session_scope(engine) as s:
                data, failed = load_letter_data(s, settings, library, part)
            result.failed.update(failed)
            fresh: list[tuple[LetterData, date]] = []
            for req, d in data.items():
                try:
                    th = templates.resolve_for(d).template_hash
                except LetterTemplateError as exc:
                    result.failed[req.case_id] = f"template {exc}"
                    continue
                dh = d.data_hash()
                todo.append((req, th, dh))
                if (req.case_id, req.kind, req.appeal_level, dh, th) not in existing:
                    new.add(req)
                    fresh.append((d, letter_date))
            parts.append(render(fresh))
        outputs = chain.from_iterable(parts)
        # The writer puts the objects itself (local files: each waits on its own fsync) or, when the storage
        # takes several puts at once (S3), on one pool for the batch. (Entered before the writer, so that the
        # writer has finished with it when it shuts down.)
        concurrency = getattr(storage, "put_concurrency", 1)  # 1 when a storage does not say
        puts = None if concurrency <= 1 else stack.enter_context(
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="letters-put"))
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="letters-write"))
        queued: list[tuple[LetterRequest, str, str, RenderedLetter | None]] = []  # handed over, not yet taken
        lock = threading.Lock()

        def write_queued() -> RenderResult:
            """One transaction for every letter queued by now. Chunks that queue up while the writer is busy (it
            waits on fsyncs, and for the GIL after each) go in together: a writer that fell behind catches up in
            fewer transactions, and the batch's tail after its last letter is typeset is one transaction."""
            with lock:
                keep = queued[:]
                queued.clear()
            return _store_and_record(engine, storage, actor, keep, puts) if keep else RenderResult()

        written: list[Future[RenderResult]] = []
        chunk: list[tuple[LetterRequest, str, str, RenderedLetter | None]] = []
        chunk_size = max(WRITE_CHUNK, len(todo) // 2)
        for n, (req, th, dh) in enumerate(todo, 1):
            out = next(outputs) if req in new else None  # None: stored already
            if isinstance(out, str):
                result.failed[req.case_id] = out
            else:
                chunk.append((req, th, dh, out))
            if chunk and (len(chunk) >= chunk_size or n == len(todo)):
                if any(f.done() and f.exception() for f in written):
                    break  # storage or the database failed: stop typesetting, raise it below
                with lock:
                    queued.extend(chunk)
                written.append(writer.submit(write_queued))
                chunk, chunk_size = [], max(WRITE_CHUNK, (len(todo) - n) // 2)
        for f in written:
            part = f.result()  # the first failure is raised; every chunk whose transaction ended stays recorded
            result.rendered += part.rendered
            result.unchanged += part.unchanged
            result.moved += part.moved
            result.letters.update(part.letters)
            result.failed.update(part.failed)
    if not written:
        return result
    failpoints.hit("render.after_batch")
    return result


def _store_and_record(engine: sa.Engine, storage: Storage, actor: Actor,
                      keep: Sequence[tuple[LetterRequest, str, str, RenderedLetter | None]],
                      puts: ThreadPoolExecutor | None = None) -> RenderResult:
    """Store the new letters of ``keep`` (request, template hash, data hash, the letter or None when it was
    stored already) and record them and the moves of ready cases, in one transaction (the cases' rows are
    locked against a concurrent run)."""
    result = RenderResult()
    with session_scope(engine) as s:
        ids = sorted({req.case_id for req, *_ in keep})
        statuses: dict[int, str] = {}
        for chunk in _chunks(ids):
            statuses.update(s.execute(
                sa.select(RetroCase.id, RetroCase.status).where(RetroCase.id.in_(chunk)).with_for_update()
            ).tuples().all())
        existing, last = _existing(s, ids)  # again, under the lock: a concurrent run may have stored some
        letters: dict[LetterRequest, dict[str, Any]] = {}  # the letters rows' columns, stored or new
        new: dict[LetterRequest, dict[str, Any]] = {}
        objects: list[tuple[str, bytes, str]] = []
        now = utcnow()
        for req, th, dh, out in keep:
            ident = (req.case_id, req.kind, req.appeal_level, dh, th)
            if ident in existing:
                letters[req] = existing[ident].model_dump()
                continue
            if out is None:  # listed as stored when we read, gone now: letters are never deleted
                result.failed[req.case_id] = "letter_changed_concurrently"
                continue
            version = last.get((req.case_id, req.kind, req.appeal_level), 0) + 1
            html_key, pdf_key = letter_keys(req.case_id, version, req.kind, req.appeal_level)
            objects += [(html_key, out.html, "text/html; charset=utf-8"), (pdf_key, out.pdf, "application/pdf")]
            letters[req] = new[req] = dict(
                case_id=req.case_id, kind=req.kind, appeal_level=req.appeal_level, version=version,
                template_name=out.template_name, template_hash=th, data_hash=dh, html_key=html_key,
                pdf_key=pdf_key, created_at=now)
        # Objects first (a row never points at nothing). A failure rolls the rows back; the orphaned objects
        # are rewritten by the retry.
        sha256 = _put_all(storage, objects, puts)
        if new:
            for row in new.values():
                row["pdf_sha256"] = sha256[row["pdf_key"]]
            # One statement for the chunk's rows (ORM objects would go in one INSERT ... RETURNING each); the
            # returned rows come in any order, and (case, kind, level) is the request they belong to.
            made = s.execute(sa.insert(Letter).returning(Letter.id, Letter.case_id, Letter.kind, Letter.appeal_level),
                             list(new.values()))
            for letter_id, *req in made:
                new[LetterRequest(*req)]["id"] = letter_id
        ready = [req.case_id for req in letters if req.kind == "request" and statuses.get(req.case_id) == CaseStatus.READY]
        details = {req.case_id: _details(row) for req, row in letters.items()}
        moved = set(transition_many(s, ready, CaseStatus.LETTER_RENDERED, from_statuses=[CaseStatus.READY],
                                    actor=actor, details={cid: details[cid] for cid in ready}))
        record_events(s, "letter_rendered", {req.case_id: details[req.case_id] for req in new
                                             if req.case_id not in moved}, actor=actor)
        for req, row in letters.items():
            result.letters[req.case_id] = row["id"]
        result.rendered = len(new)
        result.unchanged = len(letters) - len(new)
        result.moved = len(moved)
    return result


def render_one(
    engine: sa.Engine,
    storage: Storage,
    settings: Any,
    library: RuleLibrary,
    case_id: int,
    fmt: Format = "pdf",
    *,
    kind: Kind | None = None,
    appeal_level: int | None = None,
    templates: LetterTemplates | None = None,
    as_of: datetime | None = None,
    actor: Actor = Actor(name="cli"),
) -> bytes:
    """``retroauth letter CASE_ID [--format pdf|html]``: the case's letter, rendered and stored if new.

    The letter is the one the case's state calls for (an appeal for a denied case with an open
    appeal, else the request) unless ``kind`` / ``appeal_level`` say otherwise. It goes through the
    batch path (stored, versioned, a ready case moves to letter_rendered); unchanged inputs return
    the stored letter. ``LetterError`` / ``LetterTemplateError`` say why there is none.
    """
    if fmt not in ("pdf", "html"):
        raise ValueError("format must be pdf or html")
    with session_scope(engine) as s:
        if s.get(RetroCase, case_id) is None:
            raise LetterError(case_id, "no such case")
        if kind is None:
            plan, _ = plan_letters(s, [case_id])
            req = plan[0] if plan else LetterRequest(case_id, "request", 0)
        else:
            level = 0 if kind == "request" else appeal_level or s.execute(
                sa.select(sa.func.max(Appeal.level)).where(Appeal.case_id == case_id)).scalar() or 1
            req = LetterRequest(case_id, kind, level)
    result = render_letters(engine, storage, settings, library, requests=[req], templates=templates, as_of=as_of,
                            actor=actor)
    if case_id in result.failed:
        msg = result.failed[case_id]
        if msg.startswith("template "):
            raise LetterError(case_id, msg)
        raise LetterError(case_id, f"no letter: {msg}")
    with session_scope(engine) as s:
        letter = s.get(Letter, result.letters[case_id])
        assert letter is not None
        if fmt == "pdf":
            return storage.get(letter.pdf_key, sha256=letter.pdf_sha256)
        return storage.get(letter.html_key)


# --- checking the templates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateProblem:
    template: str  # relative to the templates directory
    line: int | None
    message: str
    context: str = ""  # which letter was being rendered: "payer hometown-health, request emergency"

    def __str__(self) -> str:
        where = f"{self.template}:{self.line}" if self.line else self.template
        return f"{where}: {self.message}" + (f" ({self.context})" if self.context else "")


SAMPLE_PAYER = PayerInfo(id="sample-payer", name="Sample Health Plan",
                         mail_lines=("Sample Health Plan", "Utilization Management", "PO Box 100", "Springfield, IL 62701"),
                         fax="217-555-0142", phone="217-555-0143")


def sample_letter_data(settings: Any, payer: PayerInfo = SAMPLE_PAYER, *, kind: Kind = "request",
                       reason: MissReason | str = MissReason.EMERGENCY, appeal_level: int = 0,
                       case_id: int = 1) -> LetterData:
    """Made-up data exercising every part of a letter (template checks, benchmarks, tests)."""
    chi = ZoneInfo("America/Chicago")
    admitted = datetime(2026, 11, 13, 17, 5, tzinfo=chi)
    level = appeal_level if kind == "appeal" else 0
    return LetterData(
        case_id=case_id, kind=kind, appeal_level=level, reason=MissReason(reason),
        delay_reason_code=DELAY_REASON_CODES[MissReason(reason)],
        due_at=datetime(2027, 2, 11, 23, 59, 59, tzinfo=chi), identified_on=date(2026, 11, 20),
        facility=facility_info(settings), payer=payer,
        patient=PatientInfo(given_name="Alex", family_name="Sample", birth_date=date(1970, 5, 5), sex="female",
                            mrn="MRN-0001", member_id="SAMPLE-000001", group_number="GRP-7", plan_name="Sample PPO"),
        encounter=EncounterInfo(id=1, encounter_class="emergency", admission_type="emergency", admitted_at=admitted,
                                discharged_at=datetime(2026, 11, 14, 9, 30, tzinfo=chi), timezone="America/Chicago",
                                place_of_service="23", type_of_bill="0131", system_issue_reference="INC-0001"),
        coverage=CoverageInfo(effective_from=date(2026, 11, 1), effective_to=None,
                              discovered_at=datetime(2026, 11, 18, 10, 0, tzinfo=chi),
                              discovery_method="eligibility_check"),
        services=(
            ServiceInfo(line_number=1, service_date=date(2026, 11, 13), code_system="CPT", code="70551",
                        modifiers=None, description="MRI brain without contrast", units=Decimal("1.00"),
                        unit_charge=Decimal("1850.00"), charges=Decimal("1850.00"), rendering_npi="1234567893",
                        ordering_npi="1245319599", denial_carc="197", denial_rarc="M62"),
            ServiceInfo(line_number=2, service_date=date(2026, 11, 14), code_system="CPT", code="74177",
                        modifiers="26", description="CT abdomen and pelvis with contrast", units=Decimal("1.00"),
                        unit_charge=Decimal("1200.00"), charges=Decimal("1200.00"), rendering_npi="1234567893",
                        ordering_npi=None, denial_carc=None, denial_rarc=None),
        ),
        diagnoses=(DiagnosisInfo(rank=1, code_system="ICD10CM", code="G44.309",
                                 description="Post-traumatic headache, unspecified, not intractable"),
                   DiagnosisInfo(rank=2, code_system="ICD10CM", code="R10.9", description="Unspecified abdominal pain")),
        providers=(ProviderInfo(role="facility", name=settings.facility_name, npi=settings.facility_npi),
                   ProviderInfo(role="rendering", name=None, npi="1234567893"),
                   ProviderInfo(role="ordering", name=None, npi="1245319599")),
        outages=(OutageInfo(reference="PORTAL-OUT-7", starts_at=datetime(2026, 11, 13, 8, 0, tzinfo=chi),
                            ends_at=datetime(2026, 11, 14, 20, 0, tzinfo=chi), description="Portal unavailable"),),
        enclosures=(EnclosureInfo(type="case_summary", label="Case summary"),
                    EnclosureInfo(type="medical_necessity", label="Medical necessity statement"),
                    EnclosureInfo(type="34117-2", label="History and physical note"),
                    EnclosureInfo(type="34111-5", label="Emergency department note"),
                    EnclosureInfo(type="coverage_discovery_timeline", label="Coverage discovery timeline"),
                    EnclosureInfo(type="outage_record", label="System outage record")),
        appeal=None if kind == "request" else AppealInfo(
            level=level, name=APPEAL_LEVEL_NAMES[level], due_at=datetime(2027, 1, 29, 23, 59, 59, tzinfo=chi),
            denial=DenialInfo(decided_on=date(2026, 12, 1), decision="A3", reference="DEN-0001", codes=("197", "M62")),
            request_sent_on=date(2026, 11, 21), request_tracking_number="TRK-0001",
            prior=tuple(PriorAppealInfo(level=n, name=APPEAL_LEVEL_NAMES[n], status="upheld",
                                        filed_on=date(2026, 12, 2 + n), decided_on=date(2026, 12, 20 + n))
                        for n in range(1, level)),
        ),
    )


def check_templates(templates_dir: str | Path, settings: Any, payers_dir: str | Path) -> list[TemplateProblem]:
    """``retroauth letters check``: every template parsed, and every letter (each reason, each appeal
    level, for the shared templates and each payer's overrides) rendered to HTML and PDF against
    sample data. Each problem names the template file and line; an empty list means all is well."""
    from retroauth.rules import PayerRuleError, load_rule_library

    root = Path(templates_dir)
    try:
        templates = LetterTemplates(root)
    except LetterTemplateError as exc:
        return [TemplateProblem(str(root), None, exc.message)]
    problems: list[TemplateProblem] = []
    try:
        library: Mapping[str, PayerRules] = load_rule_library(payers_dir)
    except PayerRuleError as exc:
        problems.append(TemplateProblem(str(payers_dir), None, f"payer rules do not load: {len(exc.problems)} problem(s)"))
        library = {}
    scopes: list[str | None] = [None]
    for pid in templates.payer_overrides():
        if library and pid not in library:
            problems.append(TemplateProblem(f"{PAYERS_SUBDIR}/{pid}", None,
                                            f"no payer {pid!r} in {payers_dir}: these templates would never be used"))
        scopes.append(pid)
    # Every file parses (also the ones no letter reaches yet).
    for scope in scopes:
        env = templates.environment(scope)
        folder = root / PAYERS_SUBDIR / scope if scope else root
        for path in sorted(folder.rglob("*.j2")):
            if scope is None and path.relative_to(root).parts[0] == PAYERS_SUBDIR:
                continue
            rel = _rel(path, templates.root) or str(path)
            try:
                env.parse(path.read_bytes().decode("utf-8"), path.name, str(path))
            except jinja2.TemplateSyntaxError as exc:
                problems.append(TemplateProblem(rel, exc.lineno, exc.message or "syntax error"))
            except UnicodeDecodeError as exc:
                problems.append(TemplateProblem(rel, _bad_byte_line(exc), "not UTF-8 text"))
    broken = {p.template for p in problems}
    day = date(2026, 11, 20)
    for scope in scopes:
        payer = payer_info(library[scope]) if scope and scope in library else (
            SAMPLE_PAYER.model_copy(update={"id": scope}) if scope else SAMPLE_PAYER)
        letters = [("request", r.value, 0) for r in MissReason] + [("appeal", None, n) for n in APPEAL_LEVELS]
        for kind, reason, level in letters:
            what = f"{'payer ' + scope if scope else 'shared templates'}, {kind} {reason or f'level {level}'}"
            data = sample_letter_data(settings, payer, kind=kind, reason=reason or MissReason.EMERGENCY,
                                      appeal_level=level)
            try:
                resolved = templates.resolve_for(data)
                html = templates.render_html(data, day)
                try:
                    to_document(html)
                except TypesetError as exc:  # HTML outside the subset the PDF is typeset from
                    raise LetterTemplateError(resolved.file, None, f"rendered HTML: {exc}") from None
                templates.render_pdf(data, day, html)
            except LetterTemplateError as exc:
                if exc.template in broken and exc.line is not None:
                    continue  # already reported as a syntax error
                problems.append(TemplateProblem(exc.template or "?", exc.line, exc.message, what))
    # One line per problem: a broken shared template would otherwise be reported once per letter.
    seen: set[tuple[str, int | None, str]] = set()
    unique = []
    for p in problems:
        if (p.template, p.line, p.message) not in seen:
            seen.add((p.template, p.line, p.message))
            unique.append(p)
    return unique

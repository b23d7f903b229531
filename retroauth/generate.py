"""Synthetic data at realistic proportions, written straight into the database (demos, benchmarks, load tests).

``generate(engine, library, encounters=N, seed=S, days=D, end=E)`` makes N encounters spread over the D
days ending at E (inclusive, facility local time), with their patients, coverages, service lines,
diagnoses, document metadata and the authorizations on file. Nothing in it is a real person: names
come from a small list of obviously made-up words, birth dates have day == month, phone numbers are
in the 555-01xx range kept for fiction, member and record numbers carry the seed.

Determinism: everything is drawn from one ``random.Random(seed)`` in a fixed order, with no clock and no
database-assigned value in it. Primary keys are assigned here (the next free id of each table plus a
counter), so two fresh databases given the same seed and arguments hold identical rows, on SQLite and
PostgreSQL alike; the chunk size does not change the output.

Re-running: the set is ``source_system = "gen:<seed>"`` and its run is recorded in ``import_runs``
(kind ``generate``, source = ``gen:<seed>`` plus the arguments). A second call with the same seed and
arguments finds that run and SKIPS (``GenerateSummary.skipped``; nothing written, counts unchanged).
The same seed with different arguments would make a different set under the same ids, so it is
REFUSED with a ``GenerateError`` that says what is there; use another seed or a fresh database.
The whole set goes in as ONE transaction: a crash or Ctrl-C leaves nothing behind, so there is never
a half-generated set to clean up (SQLite holds its write lock meanwhile; PostgreSQL locks the eight
tables against other writers, readers are not blocked).

Proportions, and why:

* Encounter classes: outpatient 70%, emergency 15%, inpatient 8%, observation 4%, home health 2%,
  virtual 1%: the usual hospital-system mix (ambulatory visits dominate; ED about one visit in seven;
  admissions under one in ten).
* Places of service (CMS POS): outpatient 22 on-campus hospital 45%, 19 off-campus 15%, 11 office 40%;
  emergency 23, inpatient 21, observation 22, home health 12, virtual 10 (telehealth at home). Type of
  bill 0131 for hospital outpatient (incl. ED and observation), 0111 inpatient, 0321 home health;
  none for office and telehealth (professional claims).
* Service lines per encounter: outpatient 1-4 (mean 2.2), emergency 2-6, observation 2-5,
  inpatient 4-12 (physician, lab, imaging lines over the stay), home health 1-2, virtual 1:
  about 2.85 lines per encounter overall (353,000 encounters make 1.0 million lines).
* Lines needing authorization: each line, with probability 6%, is drawn from the codes the patient's
  payer requires authorization for *for that encounter* (code system, place of service, encounter
  class, effective dates; a pair rule brings its partner code onto the same encounter). Where the
  payer has no such rule (e.g. Medicare OPD outside POS 19/22, or an ED visit for payers that restrict
  imaging to outpatient) the line is an ordinary one, so about 4.7% of all lines end up needing
  authorization ("a few percent of services need authorization"). Every drawn line is checked with
  ``PayerRules.rules_requiring_auth``, the reference the SQL sweep reproduces, and an authorization of
  another encounter of the same member that happens to cover a line is counted too, so the summary's
  ``auth_required_lines`` / ``unauthorized_lines`` are exactly what a sweep over the window finds.
  Ordinary lines come from common CPT/HCPCS codes (99213, 99214, 80053, 85025, 71046, 93000, 36415,
  ...) with every code the payer lists removed, so they never need authorization.
* Authorization on file: 87.5% of encounters with such lines have one (approved, 5% still pending),
  for the same payer and member and the encounter's attending NPI, covering all those codes from
  0-7 days before the first service date to 0-30 days after the last ("a small share slips through").
  The other 12.5% are the retro cases.
* Patients and coverage: one coverage per patient (secondary coverage is not modelled). A patient
  comes back for another encounter with probability 0.45 x min(1, days/90) (mean 1.8 encounters per
  patient over a quarter; mostly one in a short window). Coverage found late: 5% of patients by an
  eligibility check 1-20 days after their first encounter, 1% by retroactive eligibility (effective
  from the first of that month, found 1-20 days later); discovery never lies after the window's end.
* Payer mix: the shipped payers weighted like a Midwest hospital's book (Medicare FFS 30%, large
  commercial 18% / 12% / 10% / 10%, Medicaid managed care 12% / 8%; unknown payers 10 each), plus
  ``extra_payers`` synthetic payers cloned from the shipped rule shapes, with a long tail of weights
  (20 / (k + 1) for the k-th), so 92 extra payers hold about 45% of patients: a few big payers, many
  small ones. Medicare patients are 67-90 years old, Medicaid ones any age, commercial 19-64.
* Emergency visits carry admission type emergency; inpatient admissions are emergency
  55%, urgent 20%, elective 25%; observation emergency 60%, urgent 40%.
* System issue reference (an outage ticket) on 0.5% of encounters.
* Diagnoses: 1-3 ICD-10-CM codes per encounter (45/35/20%), from a short class-specific list.
* Document metadata: ED note (34111-5) for 90% of emergency visits, H&P (34117-2) for 95% of inpatient
  and 80% of observation stays, discharge summary (18842-5) for 85% of discharged inpatient stays,
  progress note (11506-3) for 25% of other visits. Storage keys are ``documents/<patient id>/gen<seed>-
  <n>.txt``; no bytes are written unless ``documents=True`` (a tiny placeholder body whose sha256 and
  size the rows already carry), so by default the packet step sees the documents as missing.
* Encounter times in the facility's zone (America/Chicago): office hours for planned visits, any hour
  for emergencies; inpatient stays 1-10 nights (mean 4.4); a stay still open at the window's end has
  no discharge time. Charges come from a per-facility chargemaster (realistic list prices per code).

Speed: rows are built as tuples in chunks of ``chunk_encounters`` encounters (one chunk in memory at
a time) and written with the compiled Core ``insert(table)`` through the driver's ``executemany``
(SQLite) or ``COPY ... FROM STDIN`` (PostgreSQL); then ANALYZE, so the sweep's planner has statistics.
Measured on the project's 2-core machine, 50,000 encounters (142k lines), whole run: SQLite 9.2 s with
tuples already in SQLAlchemy's storage format (its own bind processors, applied here; byte-identical
rows) against 14.4 s for Core executemany of dict rows; PostgreSQL 13.2 s with COPY against 30.3 s for
Core executemany. One million lines (353,000 encounters, one day): SQLite about 70-80 s and 165 MiB
peak RSS; PostgreSQL about 100 s wall (server-bound; 46 s client CPU) and 100 MiB.

Run it: ``python -m retroauth.generate --db sqlite:////tmp/gen.db --migrate --encounters 353000 --seed 1
--days 1 --end 2026-11-26`` (prints the summary as JSON with the peak RSS).
"""

from __future__ import annotations

import hashlib
import re
import time as _time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import yaml

from retroauth.identifiers import npi_is_valid
from retroauth.models import (
    Authorization, AuthorizationCode, ClinicalDocument, Coverage, Diagnosis, Encounter, ImportRun, Patient,
    ServiceLine, utcnow,
)
from retroauth.rules import AuthRule, PayerRules, RuleLibrary, code_family, code_in_entry
from retroauth.storage import Storage, sha256_hex
from retroauth.vocab import AdmissionType, CodeSystem, CoverageDiscovery, EncounterClass

GENERATOR_VERSION = 1  # part of the recorded arguments: bump it when a seed's output changes
FACILITY_TZ = "America/Chicago"
_CHI = ZoneInfo(FACILITY_TZ)
_UTC = timezone.utc
T = TypeVar("T")

# --- proportions (see the module doc for the reasoning) ------------------------------------------------

C = EncounterClass
CLASS_WEIGHTS = {C.OUTPATIENT: 70, C.EMERGENCY: 15, C.INPATIENT: 8, C.OBSERVATION: 4, C.HOME_HEALTH: 2,
                 C.VIRTUAL: 1}
LINES_PER_ENCOUNTER: dict[EncounterClass, dict[int, int]] = {
    C.OUTPATIENT: {1: 35, 2: 30, 3: 20, 4: 15},
    C.EMERGENCY: {2: 20, 3: 30, 4: 25, 5: 15, 6: 10},
    C.OBSERVATION: {2: 25, 3: 35, 4: 25, 5: 15},
    C.INPATIENT: {4: 10, 5: 12, 6: 14, 7: 14, 8: 13, 9: 11, 10: 10, 11: 8, 12: 8},
    C.HOME_HEALTH: {1: 60, 2: 40},
    C.VIRTUAL: {1: 100},
}
PLACE_OF_SERVICE: dict[EncounterClass, dict[str, int]] = {
    C.OUTPATIENT: {"22": 45, "19": 15, "11": 40},
    C.EMERGENCY: {"23": 1}, C.INPATIENT: {"21": 1}, C.OBSERVATION: {"22": 1}, C.HOME_HEALTH: {"12": 1},
    C.VIRTUAL: {"10": 1},
}
TYPE_OF_BILL = {C.EMERGENCY: "0131", C.INPATIENT: "0111", C.OBSERVATION: "0131", C.HOME_HEALTH: "0321"}
ADMISSION_TYPES: dict[EncounterClass, dict[AdmissionType | None, int]] = {
    C.EMERGENCY: {AdmissionType.EMERGENCY: 1},
    C.INPATIENT: {AdmissionType.EMERGENCY: 55, AdmissionType.URGENT: 20, AdmissionType.ELECTIVE: 25},
    C.OBSERVATION: {AdmissionType.EMERGENCY: 60, AdmissionType.URGENT: 40},
}
INPATIENT_NIGHTS = {1: 12, 2: 17, 3: 17, 4: 14, 5: 11, 6: 9, 7: 7, 8: 5, 9: 4, 10: 4}
AUTH_LINE_SHARE = 0.06  # chance a line is drawn from the payer's auth-required codes (when it has any)
AUTHORIZED_SHARE = 0.875  # of encounters with such lines: authorization on file
PENDING_SHARE = 0.05  # of those authorizations: still pending (pending covers too)
LATE_DISCOVERY_SHARE = 0.05
RETRO_ELIGIBILITY_SHARE = 0.01
SYSTEM_ISSUE_SHARE = 0.005
REPEAT_VISIT = 0.45  # chance of one more encounter, scaled by min(1, days / 90)
MAX_ENCOUNTERS_PER_PATIENT = 6
DIAGNOSES_PER_ENCOUNTER = {1: 45, 2: 35, 3: 20}

# Shipped payers: share of the book (unknown payers weigh UNKNOWN_PAYER_WEIGHT), and their kind.
PAYER_WEIGHTS = {"medicare-ffs-opd": 30, "uhc-commercial": 18, "priority-health": 12, "hpsj-medi-cal": 12,
                 "emblemhealth": 10, "hometown-health": 10, "alameda-alliance-imaging": 8}
UNKNOWN_PAYER_WEIGHT = 10
PAYER_KINDS = {"medicare-ffs-opd": "medicare", "hpsj-medi-cal": "medicaid", "alameda-alliance-imaging": "medicaid"}
PLAN_NAMES = {"medicare": "Medicare Part A and B", "medicaid": "Medi-Cal managed care", "commercial": "PPO"}
# Code systems claims are coded in: payers whose rules use none of them are left out by default
# (the fictional synthea-demo-health plan is written in SNOMED CT for the Synthea fixtures).
CLAIM_CODE_SYSTEMS = {CodeSystem.CPT, CodeSystem.HCPCS, CodeSystem.REVENUE}
SYNTHETIC_PREFIX = "gen-payer-"

# --- vocabularies: codes, prices, names -------------------------------------------------------------------

_HC = CodeSystem.HCPCS.value
_CPT = CodeSystem.CPT.value
_REV = CodeSystem.REVENUE.value
_ICD10CM = CodeSystem.ICD10CM.value
# Common services that need no authorization, per encounter class: (system, code).
_COMMON: dict[EncounterClass, tuple[tuple[str, str], ...]] = {
    C.OUTPATIENT: tuple((_CPT, c) for c in (
        "99213", "99213", "99214", "99214", "99212", "99203", "80053", "85025", "36415", "36415", "80061",
        "83036", "71046", "93000", "81001", "90471", "20610", "97110")),
    C.EMERGENCY: tuple((_CPT, c) for c in (
        "99283", "99284", "99284", "99285", "36415", "85025", "80053", "71046", "93000", "81001", "96374")),
    C.OBSERVATION: ((_HC, "G0378"), (_CPT, "99222"), (_CPT, "80053"), (_CPT, "85025"), (_CPT, "36415"),
                    (_CPT, "93000"), (_CPT, "71046")),
    C.INPATIENT: tuple((_CPT, c) for c in (
        "99221", "99222", "99223", "99231", "99232", "99232", "99233", "99238", "80053", "85025", "36415",
        "71045", "93005", "80048")),
    C.HOME_HEALTH: ((_HC, "G0299"), (_HC, "G0300"), (_HC, "G0151")),
    C.VIRTUAL: ((_CPT, "99213"), (_CPT, "99214")),
}
# Real codes to prefer when drawing from a rule's range (a range also holds numbers that are not codes).
_PREFERRED = sorted({
    "70450", "70460", "70470", "70551", "70553", "71250", "71260", "72141", "72148", "72158", "73221",
    "73721", "74176", "74177", "74178", "75574", "78452", "78815", "78816", "93306", "93458", "95810",
    "95811", "81162", "81528", "97110", "97140", "97161", "64490", "64493", "0110", "0120", "0200", "0206",
})
_DESCRIPTIONS = {
    "99212": "Office visit, established patient, straightforward", "99213": "Office visit, established patient, low",
    "99214": "Office visit, established patient, moderate", "99203": "Office visit, new patient, low",
    "80053": "Comprehensive metabolic panel", "85025": "Complete blood count with differential",
    "36415": "Routine venipuncture", "80061": "Lipid panel", "83036": "Hemoglobin A1c",
    "71046": "Chest X-ray, 2 views", "71045": "Chest X-ray, single view", "93000": "Electrocardiogram, complete",
    "93005": "Electrocardiogram, tracing only", "81001": "Urinalysis with microscopy", "90471": "Immunization administration",
    "20610": "Arthrocentesis, major joint", "97110": "Therapeutic exercise, each 15 minutes",
    "99283": "Emergency department visit, moderate", "99284": "Emergency department visit, moderately high",
    "99285": "Emergency department visit, high", "96374": "IV push, single drug",
    "99221": "Initial hospital care, low", "99222": "Initial hospital care, moderate",
    "99223": "Initial hospital care, high", "99231": "Subsequent hospital care, low",
    "99232": "Subsequent hospital care, moderate", "99233": "Subsequent hospital care, high",
    "99238": "Hospital discharge day management", "80048": "Basic metabolic panel",
    "G0378": "Hospital observation service, per hour", "G0299": "Home health skilled nursing, RN, each 15 minutes",
    "G0300": "Home health skilled nursing, LPN, each 15 minutes", "G0151": "Home health physical therapy, each 15 minutes",
    "70450": "CT head without contrast", "70551": "MRI brain without contrast", "70553": "MRI brain with and without contrast",
    "71250": "CT chest without contrast", "72148": "MRI lumbar spine without contrast",
    "74177": "CT abdomen and pelvis with contrast",
    "78815": "PET/CT skull base to mid-thigh", "93306": "Transthoracic echocardiogram, complete",
    "95810": "Polysomnography, attended", "95811": "Polysomnography with CPAP titration",
    "0120": "Room and board, semi-private", "0110": "Room and board, private", "0200": "Intensive care unit",
}
# List prices (USD per unit) of a mid-size hospital; facilities scale them.
_PRICES = {
    "99212": 110, "99213": 185, "99214": 265, "99203": 240, "80053": 95, "85025": 45, "36415": 25, "80061": 80,
    "83036": 55, "71046": 210, "71045": 160, "93000": 120, "93005": 95, "81001": 30, "90471": 40, "20610": 320,
    "97110": 120, "99283": 620, "99284": 980, "99285": 1450, "96374": 310, "99221": 420, "99222": 560,
    "99223": 780, "99231": 160, "99232": 230, "99233": 320, "99238": 210, "80048": 70, "G0378": 95,
    "G0299": 180, "G0300": 160, "G0151": 170, "70450": 1400, "70551": 2900, "70553": 3600, "74177": 3100,
    "78815": 6500, "22551": 48000, "22552": 12000, "63650": 18000, "64612": 900, "64615": 950,
    "27447": 52000, "27130": 55000, "29881": 8500, "43644": 38000, "43775": 31000, "A0130": 85, "T2005": 150,
}
# Prices by leading characters for the rest (longest prefix wins).
_PRICE_PREFIXES = {
    "70": 2200, "71": 1600, "72": 2700, "73": 2400, "74": 2600, "75": 3400, "78": 5200, "93": 1900, "934": 9800,
    "958": 3200, "95": 3200, "81": 3800, "97": 120, "6449": 2100, "6463": 2400, "1582": 4500, "1583": 9000,
    "1584": 9000, "1587": 9000, "679": 4200, "2": 15000, "3": 9500, "4": 12000, "6": 6000, "J05": 12,
    "G03": 900, "01": 2800, "02": 4100, "0": 2500,
}
_UNIT_CHOICES = {"G0378": (8, 12, 24, 36), "97110": (1, 2, 3, 4), "G0299": (2, 3, 4), "G0300": (2, 3, 4),
                 "G0151": (2, 3, 4), "J0585": (100, 150, 200), "J0586": (100, 150, 200), "J0587": (100, 150),
                 "J0588": (100, 150, 200)}
_ICD: dict[str, tuple[tuple[str, str], ...]] = {
    "general": (
        ("E11.9", "Type 2 diabetes mellitus without complications"), ("I10", "Essential (primary) hypertension"),
        ("E78.5", "Hyperlipidemia, unspecified"), ("J06.9", "Acute upper respiratory infection, unspecified"),
        ("M54.50", "Low back pain, unspecified"), ("Z00.00", "General adult medical examination without abnormal findings"),
        ("F41.1", "Generalized anxiety disorder"), ("K21.9", "Gastro-esophageal reflux disease without esophagitis"),
        ("M17.11", "Unilateral primary osteoarthritis, right knee"), ("G47.33", "Obstructive sleep apnea"),
        ("R51.9", "Headache, unspecified"), ("E66.9", "Obesity, unspecified"), ("J45.909", "Unspecified asthma, uncomplicated"),
        ("N39.0", "Urinary tract infection, site not specified")),
    "emergency": (
        ("R07.9", "Chest pain, unspecified"), ("R10.9", "Unspecified abdominal pain"),
        ("S09.90XA", "Unspecified injury of head, initial encounter"), ("S93.401A", "Sprain of right ankle, initial encounter"),
        ("R55", "Syncope and collapse"), ("J18.9", "Pneumonia, unspecified organism"), ("R06.02", "Shortness of breath"),
        ("N39.0", "Urinary tract infection, site not specified"), ("I10", "Essential (primary) hypertension")),
    "inpatient": (
        ("I50.9", "Heart failure, unspecified"), ("J18.9", "Pneumonia, unspecified organism"),
        ("A41.9", "Sepsis, unspecified organism"), ("I21.4", "Non-ST elevation (NSTEMI) myocardial infarction"),
        ("J44.1", "Chronic obstructive pulmonary disease with (acute) exacerbation"), ("N17.9", "Acute kidney failure, unspecified"),
        ("I63.9", "Cerebral infarction, unspecified"), ("K35.80", "Unspecified acute appendicitis"),
        ("E11.9", "Type 2 diabetes mellitus without complications"), ("I10", "Essential (primary) hypertension")),
}
_ICD_GROUP = {C.OUTPATIENT: "general", C.VIRTUAL: "general", C.HOME_HEALTH: "general", C.EMERGENCY: "emergency",
              C.OBSERVATION: "emergency", C.INPATIENT: "inpatient"}
# (LOINC, title, share, minutes after admission) per class; the discharge summary is dated at discharge.
_DOCS: dict[EncounterClass, tuple[tuple[str, str, float, int], ...]] = {
    C.EMERGENCY: (("34111-5", "Emergency department note", 0.90, 90),),
    C.INPATIENT: (("34117-2", "History and physical note", 0.95, 240), ("18842-5", "Discharge summary", 0.85, -1)),
    C.OBSERVATION: (("34117-2", "History and physical note", 0.80, 180),),
    C.OUTPATIENT: (("11506-3", "Progress note", 0.25, 45),),
    C.HOME_HEALTH: (("11506-3", "Progress note", 0.25, 60),),
    C.VIRTUAL: (("11506-3", "Progress note", 0.25, 20),),
}
_GIVEN = ("Alex", "Blair", "Casey", "Drew", "Emery", "Finley", "Gray", "Harper", "Indy", "Jules", "Kai", "Logan",
          "Morgan", "Noel", "Oakley", "Parker", "Quinn", "Reese", "Sage", "Tatum")
_FAMILY = ("Testperson", "Example", "Sampleton", "Placeholder", "Fakename", "Notreal", "Mockwell", "Fixture",
           "Dummyfield", "Synthetica")
_BIRTH_YEARS = {"medicare": tuple(range(1936, 1960)), "medicaid": tuple(range(1950, 2023)),
                "commercial": tuple(range(1962, 2008))}
_CITIES = (("Springfield", "62701"), ("Testville", "62702"), ("Sampleton", "62703"))
# Fictional facilities in one zone: (name, price factor, NPI base); the clinic takes the office visits.
_FACILITIES = (("Prairie Example Medical Center", 1.00), ("Lakeshore Sample Hospital", 1.12),
               ("Riverbend Fictional Health Campus", 0.93))
_CLINIC = ("Northfield Test Clinic", 0.88)
_PROVIDERS = 60


def _npi(n: int) -> str:
    """A fictional NPI with a valid check digit: 9 digits from ``n`` plus the Luhn digit."""
    base = f"19{n:07d}"
    return next(base + d for d in "0123456789" if npi_is_valid(base + d))


_FACILITY_NPIS = [_npi(9_000_000 + i) for i in range(len(_FACILITIES) + 1)]
_PROVIDER_NPIS = [_npi(1000 + i) for i in range(_PROVIDERS)]
_PROVIDER_NAMES = [f"Dr. {_GIVEN[i % len(_GIVEN)]} {_FAMILY[(i * 7) % len(_FAMILY)]}" for i in range(_PROVIDERS)]


class _Weighted(Generic[T]):
    """A weighted choice with one random number (``Random.choices`` is slower per call)."""

    def __init__(self, weights: Mapping[T, float]) -> None:
        self.items = tuple(weights)
        self.cum: list[float] = []
        total = 0.0
        for w in weights.values():
            total += w
            self.cum.append(total)
        self.total = total

    def pick(self, random: Callable[[], float]) -> T:
        i = bisect_right(self.cum, random() * self.total)
        return self.items[min(i, len(self.items) - 1)]


# --- the public API ----------------------------------------------------------------------------------------


class GenerateError(Exception):
    """The generated set cannot be written as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class GenerateSummary:
    source_system: str
    skipped: bool  # the same set was already there: nothing written
    patients: int
    coverages: int
    encounters: int
    service_lines: int
    diagnoses: int
    clinical_documents: int
    authorizations: int
    authorization_codes: int
    auth_required_lines: int  # lines the payer's rules require authorization for
    unauthorized_lines: int  # of those, without an authorization on file: what a sweep should find
    payer_ids: tuple[str, ...]
    documents_written: int = 0
    seconds: float = 0.0
    library: RuleLibrary | None = field(default=None, repr=False, compare=False)  # incl. synthetic payers

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "library"}
        d["payer_ids"] = len(self.payer_ids)
        return d


TABLES = ("patients", "coverages", "encounters", "service_lines", "diagnoses", "clinical_documents",
          "authorizations", "authorization_codes")
# Columns written per table, in the order the generator builds its tuples (the rest stay NULL/default).
_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": ("id", "source_system", "source_id", "mrn", "family_name", "given_name", "birth_date", "sex",
                 "address_line", "city", "state", "postal_code", "phone"),
    "coverages": ("id", "patient_id", "payer_id", "plan_name", "member_id", "group_number", "priority",
                  "effective_from", "discovered_at", "discovery_method"),
    "encounters": ("id", "source_system", "source_id", "patient_id", "encounter_class", "admission_type",
                   "admitted_at", "discharged_at", "timezone", "facility_name", "facility_npi", "place_of_service",
                   "type_of_bill", "system_issue_reference"),
    "service_lines": ("id", "encounter_id", "line_number", "code_system", "code", "description", "modifiers",
                      "units", "charge", "service_date", "rendering_npi"),
    "diagnoses": ("id", "encounter_id", "code_system", "code", "description", "rank"),
    "clinical_documents": ("id", "source_system", "source_id", "patient_id", "encounter_id", "loinc_type", "title",
                           "author", "authored_at", "content_type", "storage_key", "sha256", "size_bytes"),
    "authorizations": ("id", "payer_id", "member_id", "patient_id", "provider_npi", "auth_number", "starts_on",
                       "ends_on", "status", "source"),
    "authorization_codes": ("id", "authorization_id", "code_system", "code"),
}
_MODELS = {"patients": Patient, "coverages": Coverage, "encounters": Encounter, "service_lines": ServiceLine,
           "diagnoses": Diagnosis, "clinical_documents": ClinicalDocument, "authorizations": Authorization,
           "authorization_codes": AuthorizationCode}


def default_payer_ids(library: Mapping[str, PayerRules]) -> list[str]:
    """Payers whose rules are in claim code systems (CPT, HCPCS, revenue codes), synthetic ones left out."""
    return [pid for pid, p in library.items()
            if not pid.startswith(SYNTHETIC_PREFIX)
            and any(r.code_system in CLAIM_CODE_SYSTEMS for r in p.authorization_required)]


def synthetic_library(library: RuleLibrary, n: int, templates: Sequence[str] | None = None) -> RuleLibrary:
    """``library`` plus ``n`` payers ``gen-payer-001``... cloned in turn from ``templates`` (default:
    ``default_payer_ids``). The k-th clone always copies the same template, whatever the seed, so the
    ids mean the same rules in every generated set of a database; ids already in ``library`` (e.g. read
    back from files written by ``write_payer_files``) are kept as they are.
    """
    base = list(templates) if templates is not None else default_payer_ids(library)
    if n and not base:
        raise GenerateError("no payer to clone synthetic payers from (none has CPT, HCPCS or revenue-code rules)")
    payers = dict(library.items())
    files = {pid: library.file_of(pid) for pid in library}
    for k in range(1, n + 1):
        pid = f"{SYNTHETIC_PREFIX}{k:03d}"
        if pid in payers:
            continue
        template = library[base[(k - 1) % len(base)]]
        payers[pid] = template.model_copy(update={"id": pid, "name": f"Generated payer {k:03d} (rules of {template.id})"})
        files[pid] = library.file_of(template.id)
    return RuleLibrary(payers, files)


def write_payer_files(library: Mapping[str, PayerRules], payer_ids: Sequence[str], directory: str | Path) -> list[Path]:
    """Write these payers as rule files ``<dir>/<id>.yaml`` that ``load_rule_library`` reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for pid in payer_ids:
        data = _hhmm(library[pid].model_dump(mode="json", exclude_none=True))
        path = directory / f"{pid}.yaml"
        header = f"# Generated by retroauth.generate: a synthetic payer, not a real one ({library[pid].name}).\n"
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        out.append(path)
    return out


def _hhmm(value: Any) -> Any:
    # JSON dumps times as HH:MM:SS; the rule files take HH:MM.
    if isinstance(value, dict):
        return {k: _hhmm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hhmm(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"\d\d:\d\d:00", value):
        return value[:5]
    return value


def generate(
    engine: sa.Engine,
    library: RuleLibrary,
    *,
    encounters: int,
    seed: int,
    days: int,
    end: date,
    payer_ids: Sequence[str] | None = None,
    extra_payers: int = 0,
    progress: Callable[[int], None] | None = None,
    documents: bool = False,
    storage: Storage | None = None,
    chunk_encounters: int = 5000,
) -> GenerateSummary:
    """Write one deterministic synthetic set ``gen:<seed>`` (see the module doc); skip it if present.

    ``progress(encounters_done)`` is called after each chunk. ``documents=True`` also writes each
    document's placeholder body to ``storage`` (and, when the set is already there, the missing ones).
    The returned ``library`` holds the synthetic payers too: give it to the sweep.
    """
    if encounters < 0 or days < 1 or extra_payers < 0 or chunk_encounters < 1:
        raise GenerateError("encounters and extra_payers must be >= 0, days and chunk_encounters >= 1")
    if documents and storage is None:
        raise GenerateError("documents=True needs a storage to write the placeholder bodies to")
    started = _time.perf_counter()
    base_ids = list(payer_ids) if payer_ids is not None else default_payer_ids(library)
    lib = synthetic_library(library, extra_payers, base_ids) if extra_payers else library
    unknown = [p for p in base_ids if p not in lib]
    if unknown or not base_ids:
        raise GenerateError(f"unknown payer ids: {', '.join(unknown)}" if unknown else "no payers to generate for")
    ids = base_ids + [f"{SYNTHETIC_PREFIX}{k:03d}" for k in range(1, extra_payers + 1)]
    source_system = f"gen:{seed}"
    payers_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    source = (f"{source_system} encounters={encounters} days={days} end={end.isoformat()} payers={payers_hash} "
              f"extra_payers={extra_payers} v={GENERATOR_VERSION}")

    gen = _Generator(Random(seed), lib, ids, seed=seed, encounters=encounters, days=days, end=end)
    with engine.connect() as conn, _bulk_load_pragmas(conn), conn.begin():
        writer = _Writer(conn)  # from here on no other writer can add a set (write lock / table locks)
        previous = _previous_run(conn, source_system, source)
        if previous is not None:
            counts = previous
        else:
            run_started = utcnow()
            counts = _write_set(writer, gen, chunk_encounters, storage if documents else None, progress)
            conn.execute(sa.insert(ImportRun.__table__).values(
                kind="generate", source=source, started_at=run_started, finished_at=utcnow(), counts=counts,
                error_count=0))
    if previous is not None and documents and storage is not None:
        gen.documents_written = _write_missing_bodies(engine, source_system, storage)
    return _summary_from_counts(source_system, counts, tuple(ids), lib, gen.documents_written,
                                _time.perf_counter() - started, skipped=previous is not None)


def _write_set(writer: _Writer, gen: _Generator, chunk_encounters: int,
               storage: Storage | None, progress: Callable[[int], None] | None) -> dict[str, dict[str, int]]:
    """Generate and write the set chunk by chunk; its counts for the run record."""
    gen.set_bases(writer.bases)
    for chunk in gen.chunks(chunk_encounters):
        writer.write(chunk)
        if storage is not None:
            for doc_key, body in chunk.bodies:
                storage.put(doc_key, body, content_type="text/plain")  # before the commit: an orphan at worst
            gen.documents_written += len(chunk.bodies)
        if progress:
            progress(gen.counts["encounters"])
    writer.finish()
    counts = {t: {"inserted": gen.counts[t]} for t in TABLES}
    counts["service_lines"].update(auth_required=gen.auth_required_lines, unauthorized=gen.unauthorized_lines)
    return counts


def _previous_run(conn: sa.Connection, source_system: str, source: str) -> dict | None:
    """The counts of the finished run that made this very set, or None; raise if another set is there."""
    runs = conn.execute(sa.select(ImportRun.source, ImportRun.counts).where(
        ImportRun.kind == "generate", ImportRun.source.startswith(source_system + " ", autoescape=True))).all()
    for run in runs:
        if run.source == source:
            return run.counts
    if runs:
        raise GenerateError(
            f"{source_system} already holds a generated set made with other arguments ({runs[0].source}); "
            "use another seed, or a fresh database")
    if conn.execute(sa.select(Patient.id).where(Patient.source_system == source_system).limit(1)).first():
        raise GenerateError(f"patients of {source_system} exist but no generate run records them; "
                            "use another seed, or a fresh database")
    return None


def _summary_from_counts(source_system: str, counts: dict, ids: tuple[str, ...], lib: RuleLibrary,
                         written: int, seconds: float, *, skipped: bool) -> GenerateSummary:
    lines = counts["service_lines"]
    return GenerateSummary(
        source_system=source_system, skipped=skipped,
        **{t: counts[t]["inserted"] for t in TABLES},
        auth_required_lines=lines["auth_required"], unauthorized_lines=lines["unauthorized"],
        payer_ids=ids, documents_written=written, seconds=round(seconds, 3), library=lib,
    )


def _write_missing_bodies(engine: sa.Engine, source_system: str, storage: Storage) -> int:
    """Placeholder bodies of an existing set's documents that storage does not hold yet."""
    written = 0
    docs = ClinicalDocument.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(docs.c.source_id, docs.c.loinc_type, docs.c.title, docs.c.storage_key)
                            .where(docs.c.source_system == source_system).order_by(docs.c.id))
        for r in rows:
            if not storage.exists(r.storage_key):
                storage.put(r.storage_key, _body(r.source_id, r.loinc_type, r.title), content_type="text/plain")
                written += 1
    return written


def _body(source_id: str, loinc: str, title: str) -> bytes:
    return (f"SYNTHETIC TEST DOCUMENT - not a medical record.\nType: LOINC {loinc} {title}\n"
            f"Document: {source_id}\n").encode()


# --- generation ----------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    rows: dict[str, list[tuple]] = field(default_factory=lambda: {t: [] for t in TABLES})
    bodies: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    """Codes of one rule that can be drawn for a setting, and the partner codes a pair rule needs."""

    system: str
    codes: tuple[str, ...]
    category: str
    partner_system: str | None = None
    partner_codes: tuple[str, ...] = ()


def _codes_in(lo: str, hi: str, limit: int = 50) -> tuple[str, ...]:
    """Codes to draw from a rule entry: the preferred real codes in it, else up to ``limit`` spread over it."""
    if lo == hi:
        return (lo,)
    preferred = tuple(c for c in _PREFERRED if code_in_entry(c, lo, hi))
    if preferred:
        return preferred
    digits_lo, digits_hi = re.sub(r"\D", "", lo), re.sub(r"\D", "", hi)
    a, b, width = int(digits_lo), int(digits_hi), len(digits_lo)
    numbers = range(a, b + 1) if b - a < limit else sorted({a + (b - a) * i // (limit - 1) for i in range(limit)})
    out = []
    for n in numbers:  # put the digits back into the range's shape (letters stay where they are)
        it = iter(str(n).zfill(width))
        out.append("".join(next(it) if ch.isdigit() else ch for ch in lo))
    return tuple(out)


class _PayerPlan:
    """What the generator needs of one payer: kind, ordinary codes and auth-required candidates."""

    def __init__(self, payer: PayerRules, kind: str) -> None:
        self.payer = payer
        self.id = payer.id
        self.kind = kind
        # Ordinary codes: drop every code any rule of this payer lists, whatever the setting.
        self.common = {cls: tuple(c for c in pool if not any(r.contains(c[0], c[1]) for r in payer.authorization_required))
                       or (("CPT", "99213"),) for cls, pool in _COMMON.items()}
        self._by_setting: dict[tuple[str, str], list[tuple[AuthRule, _Candidate]]] = {}
        self._by_day: dict[tuple[str, str, date], tuple[_Candidate, ...]] = {}

    def candidates(self, cls: str, pos: str, day: date) -> tuple[_Candidate, ...]:
        k = (cls, pos, day)
        found = self._by_day.get(k)
        if found is None:
            found = self._by_day[k] = tuple(c for r, c in self._setting(cls, pos) if r.in_effect(day))
        return found

    def _setting(self, cls: str, pos: str) -> list[tuple[AuthRule, _Candidate]]:
        k = (cls, pos)
        if k not in self._by_setting:
            out = []
            for r in self.payer.authorization_required:
                if r.places_of_service is not None and pos not in r.places_of_service:
                    continue
                if r.encounter_classes is not None and cls not in r.encounter_classes:
                    continue
                partner = r.only_with
                pcodes = tuple(c for lo, hi in partner.ranges() for c in _codes_in(lo, hi)) if partner else ()
                for lo, hi in r.ranges():  # one candidate per entry: entries are drawn evenly
                    out.append((r, _Candidate(r.code_system.value, _codes_in(lo, hi), r.category,
                                              partner.code_system.value if partner else None, pcodes)))
            self._by_setting[k] = out
        return self._by_setting[k]


def _payer_weights(ids: Sequence[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    k = 0
    for pid in ids:
        if pid.startswith(SYNTHETIC_PREFIX):
            k += 1
            weights[pid] = 20 / (k + 1)  # a long tail of smaller payers
        else:
            weights[pid] = PAYER_WEIGHTS.get(pid, UNKNOWN_PAYER_WEIGHT)
    return weights


def _kind(payer: PayerRules) -> str:
    """medicare, medicaid or commercial; a synthetic payer is of its template's kind (its name says which)."""
    m = re.search(r"\(rules of ([a-z0-9-]+)\)", payer.name) if payer.id.startswith(SYNTHETIC_PREFIX) else None
    return PAYER_KINDS.get(m.group(1) if m else payer.id, "commercial")


class _Generator:
    """Draws the set from one ``Random`` in a fixed order; hot paths use plain strings and ``random()``."""

    def __init__(self, rng: Random, library: RuleLibrary, payer_ids: Sequence[str], *, seed: int, encounters: int,
                 days: int, end: date) -> None:
        self.random = rng.random  # int(random() * n) is several times faster than randrange(n)
        self.seed = seed
        self.source_system = f"gen:{seed}"
        self.total = encounters
        self.days = days
        self.first_day = end - timedelta(days=days - 1)
        self.window_end = datetime.combine(end + timedelta(days=1), time(0), _CHI).astimezone(_UTC)
        self.plans = {pid: _PayerPlan(library[pid], _kind(library[pid])) for pid in payer_ids}
        self.payer_pick = _Weighted(_payer_weights(payer_ids))
        self.class_pick = _Weighted({c.value: w for c, w in CLASS_WEIGHTS.items()})
        self.lines_pick = {c.value: _Weighted(w) for c, w in LINES_PER_ENCOUNTER.items()}
        self.pos_pick = {c.value: _Weighted(w) for c, w in PLACE_OF_SERVICE.items()}
        self.admission_pick = {c.value: _Weighted({a.value: w for a, w in ws.items()})
                               for c, ws in ADMISSION_TYPES.items()}
        self.nights_pick = _Weighted(INPATIENT_NIGHTS)
        self.dx_pick = _Weighted(DIAGNOSES_PER_ENCOUNTER)
        self.repeat = REPEAT_VISIT * min(1.0, days / 90)
        self.counts = dict.fromkeys(TABLES, 0)
        self.bases = dict.fromkeys(TABLES, 0)
        self.auth_required_lines = 0
        self.unauthorized_lines = 0
        self.documents_written = 0
        self._prices: dict[tuple[int, str], Decimal] = {}
        self._units = {n: Decimal(n) for n in range(0, 400)}
        self._days = [self.first_day + timedelta(days=i) for i in range(days)]
        # Per patient: authorizations (code families and codes, dates, NPI), and the auth-required lines
        # (code family, code, day, NPI, provider-specific rule?) their own encounter did not authorize.
        self._auths: list[tuple[set[tuple[str, str]], date, date, str]] = []
        self._open: list[tuple[str, str, date, str, bool]] = []

    def set_bases(self, bases: Mapping[str, int]) -> None:
        self.bases = dict(bases)

    def _next(self, table: str) -> tuple[int, int]:
        """(database id, number within the set) of the next row of ``table``."""
        n = self.counts[table] = self.counts[table] + 1
        return self.bases[table] + n, n

    def chunks(self, size: int) -> Iterator[_Chunk]:
        chunk = _Chunk()
        in_chunk = 0
        while self.counts["encounters"] < self.total:
            in_chunk += self._patient(chunk)
            if in_chunk >= size:
                yield chunk
                chunk, in_chunk = _Chunk(), 0
        if in_chunk:
            yield chunk

    # -- one patient with their coverage and encounters --

    def _patient(self, chunk: _Chunk) -> int:
        random = self.random
        plan = self.plans[self.payer_pick.pick(random)]
        n_enc = 1
        while n_enc < MAX_ENCOUNTERS_PER_PATIENT and random() < self.repeat:
            n_enc += 1
        n_enc = min(n_enc, self.total - self.counts["encounters"])
        starts = sorted(self._days[int(random() * self.days)] for _ in range(n_enc))

        pid, pn = self._next("patients")
        month = 1 + int(random() * 12)
        years = _BIRTH_YEARS[plan.kind]
        city, postal = _CITIES[pn % len(_CITIES)]
        chunk.rows["patients"].append((
            pid, self.source_system, f"patient-{pn:08d}", f"GEN{self.seed}-{pn:08d}",
            _FAMILY[int(random() * len(_FAMILY))], _GIVEN[int(random() * len(_GIVEN))],
            date(years[int(random() * len(years))], month, month), "female" if random() < 0.52 else "male",
            f"{100 + pn % 900} Example Street", city, "IL", postal, f"217-555-01{pn % 100:02d}",
        ))
        member_id = f"G{self.seed}M{pn:08d}"
        self._auths, self._open = [], []
        first_admitted = min([self._encounter(chunk, plan, pid, member_id, day) for day in starts])
        # Count as unauthorized only what no authorization of this member covers (another encounter's may),
        # by the sweep's rule: same code family and code, date inside, and the NPI where the rule says so.
        self.unauthorized_lines += sum(
            not any((fam, code) in codes and start <= day <= stop and (not specific or auth_npi == npi)
                    for codes, start, stop, auth_npi in self._auths)
            for fam, code, day, npi, specific in self._open)

        # Coverage: on file since a first of the month before the window, or found late.
        u = random()
        months_back = 1 + int(random() * 60)
        y, m = divmod(self.first_day.year * 12 + self.first_day.month - 1 - months_back, 12)
        effective_from = date(y, m + 1, 1)
        discovered_at = datetime.combine(effective_from, time(9), _CHI).astimezone(_UTC)
        method = CoverageDiscovery.ON_FILE.value
        if u < LATE_DISCOVERY_SHARE + RETRO_ELIGIBILITY_SHARE:
            method = CoverageDiscovery.ELIGIBILITY_CHECK.value
            if u < RETRO_ELIGIBILITY_SHARE:
                method = CoverageDiscovery.RETROACTIVE_ELIGIBILITY.value
                effective_from = first_admitted.astimezone(_CHI).date().replace(day=1)  # back-dated enrolment
            late = first_admitted + timedelta(days=1 + int(random() * 20), minutes=int(random() * 480))
            # Nothing is known after the window's end; still after the first encounter.
            discovered_at = max(min(late, self.window_end - timedelta(minutes=1)), first_admitted + timedelta(hours=1))
        chunk.rows["coverages"].append((
            self._next("coverages")[0], pid, plan.id, PLAN_NAMES[plan.kind], member_id,
            f"GRP{pn % 500:05d}" if plan.kind == "commercial" else None, 1, effective_from, discovered_at, method,
        ))
        return n_enc

    # -- one encounter --

    def _encounter(self, chunk: _Chunk, plan: _PayerPlan, pid: int, member_id: str, day: date) -> datetime:
        random = self.random
        cls = self.class_pick.pick(random)
        pos = self.pos_pick[cls].pick(random)
        adm = self.admission_pick[cls].pick(random) if cls in self.admission_pick else None
        if cls == "emergency" or cls == "observation" or adm == "emergency":
            start_minute = int(random() * 1440)
        elif cls == "inpatient":
            start_minute = 360 + int(random() * 300)  # elective/urgent admissions: 6-11 am
        else:
            start_minute = 420 + int(random() * 660)  # visits: 7 am - 6 pm
        admitted = datetime.combine(day, time(start_minute // 60, start_minute % 60), _CHI).astimezone(_UTC)
        nights = 0
        if cls == "inpatient":
            nights = self.nights_pick.pick(random)
            length = timedelta(days=nights, minutes=int(random() * 540) - 180)
        elif cls == "observation":
            length = timedelta(hours=18 + int(random() * 23))
        elif cls == "emergency":
            length = timedelta(minutes=120 + int(random() * 361))
        else:
            length = timedelta(minutes=15 + int(random() * 106))
        discharged: datetime | None = admitted + length
        if discharged >= self.window_end:
            discharged = None  # still in house when the window ends
        span = 1
        if nights or cls == "observation":
            span = ((discharged or self.window_end - timedelta(minutes=1)).astimezone(_CHI).date() - day).days + 1

        if cls == "outpatient" and pos == "11":
            (facility, factor), f_index = _CLINIC, len(_FACILITIES)
        else:
            f_index = int(random() * len(_FACILITIES))
            facility, factor = _FACILITIES[f_index]
        attending = int(random() * _PROVIDERS)
        npi = _PROVIDER_NPIS[attending]
        eid, en = self._next("encounters")
        issue = f"INC-G{self.seed}-{en:08d}" if random() < SYSTEM_ISSUE_SHARE else None
        chunk.rows["encounters"].append((
            eid, self.source_system, f"encounter-{en:09d}", pid, cls, adm, admitted, discharged, FACILITY_TZ,
            facility, _FACILITY_NPIS[f_index], pos, TYPE_OF_BILL.get(cls), issue,
        ))

        # Service lines (system, code, units, day); drawn: indexes of lines drawn from the auth rules.
        lines: list[tuple[str, str, int, date]] = []
        drawn: list[int] = []
        pool = plan.common[cls]
        for _ in range(self.lines_pick[cls].pick(random)):
            sday = day + timedelta(days=int(random() * span)) if span > 1 else day
            if random() < AUTH_LINE_SHARE:
                cands = plan.candidates(cls, pos, sday)
                if cands:
                    cand = cands[int(random() * len(cands))]
                    code = cand.codes[int(random() * len(cand.codes))]
                    drawn.append(len(lines))
                    lines.append((cand.system, code, self._unit_count(cand.system, code, nights), sday))
                    if cand.partner_system:
                        pcode = cand.partner_codes[int(random() * len(cand.partner_codes))]
                        drawn.append(len(lines))
                        lines.append((cand.partner_system, pcode, self._unit_count(cand.partner_system, pcode, nights), sday))
                    continue
            system, code = pool[int(random() * len(pool))]
            lines.append((system, code, self._unit_count(system, code, nights), sday))

        # The reference check on the drawn lines (ordinary codes are none of the payer's): the summary then
        # counts exactly what the sweep will see.
        needs_auth: list[tuple[str, str, date, bool]] = []  # system, code, day, a provider-specific rule?
        if drawn:
            others = [(s, c) for s, c, _, _ in lines]
            for i in drawn:
                system, code, _, sday = lines[i]
                rules = plan.payer.rules_requiring_auth(system, code, sday, pos, cls, others[:i] + others[i + 1:])
                if rules:
                    needs_auth.append((system, code, sday, any(r.provider_specific for r in rules)))
        modifiers = "95" if cls == "virtual" else None
        rows = chunk.rows["service_lines"]
        units_of = self._units
        for number, (system, code, units, sday) in enumerate(lines, 1):
            rows.append((self._next("service_lines")[0], eid, number, system, code,
                         _DESCRIPTIONS.get(code) or f"{system} {code}", modifiers, units_of[units],
                         self._price(f_index, factor, code), sday, npi))

        if needs_auth:
            self.auth_required_lines += len(needs_auth)
            if random() < AUTHORIZED_SHARE:
                auth_id = self._next("authorizations")[0]
                first = min(n[2] for n in needs_auth) - timedelta(days=int(random() * 8))
                last = max(n[2] for n in needs_auth) + timedelta(days=int(random() * 31))
                status = "pending" if random() < PENDING_SHARE else "approved"
                chunk.rows["authorizations"].append((
                    auth_id, plan.id, member_id, pid, npi, f"GEN{self.seed}-A{en:09d}", first, last, status, "import"))
                codes = dict.fromkeys((n[0], n[1]) for n in needs_auth)
                for system, code in codes:
                    chunk.rows["authorization_codes"].append((self._next("authorization_codes")[0], auth_id, system, code))
                self._auths.append(({(code_family(s), c) for s, c in codes}, first, last, npi))
            else:
                self._open += [(code_family(s), c, d, npi, specific) for s, c, d, specific in needs_auth]

        group = _ICD[_ICD_GROUP[cls]]
        picked: list[int] = []
        for _ in range(self.dx_pick.pick(random)):  # distinct codes, first one principal
            i = int(random() * len(group))
            while i in picked:
                i = (i + 1) % len(group)
            picked.append(i)
        for rank, i in enumerate(picked, 1):
            code, text = group[i]
            chunk.rows["diagnoses"].append((self._next("diagnoses")[0], eid, _ICD10CM, code, text, rank))

        for loinc, title, share, minutes in _DOCS[cls]:
            if random() >= share:
                continue
            if minutes < 0:  # the discharge summary: only once discharged
                if discharged is None:
                    continue
                authored = discharged
            else:
                authored = admitted + timedelta(minutes=minutes // 3 + int(random() * (minutes - minutes // 3 + 1)))
            did, dn = self._next("clinical_documents")
            source_id = f"document-{dn:09d}"
            body = _body(source_id, loinc, title)
            doc_key = f"documents/{pid}/gen{self.seed}-{dn:09d}.txt"  # what storage.key() makes of these parts
            chunk.rows["clinical_documents"].append((
                did, self.source_system, source_id, pid, eid, loinc, title, _PROVIDER_NAMES[attending], authored,
                "text/plain", doc_key, sha256_hex(body), len(body)))
            chunk.bodies.append((doc_key, body))
        return admitted

    def _unit_count(self, system: str, code: str, nights: int) -> int:
        if system == _REV and code[:2] in ("01", "02"):
            return max(1, nights)  # room and board: one unit per night
        choices = _UNIT_CHOICES.get(code)
        return choices[int(self.random() * len(choices))] if choices else 1

    def _price(self, f_index: int, factor: float, code: str) -> Decimal:
        k = (f_index, code)
        price = self._prices.get(k)
        if price is None:
            base = _PRICES.get(code)
            if base is None:
                prefix = max((p for p in _PRICE_PREFIXES if code.startswith(p)), key=len, default=None)
                base = _PRICE_PREFIXES[prefix] if prefix else 250
            price = self._prices[k] = Decimal(str(round(base * factor, 2))).quantize(Decimal("0.01"))
        return price


# --- writing ------------------------------------------------------------------------------------------------


@contextmanager
def _bulk_load_pragmas(conn: sa.Connection) -> Iterator[None]:
    """SQLite: a bigger page cache while loading (index pages stay in memory) and a sampled ANALYZE;
    both per connection, restored afterwards. Durability settings are left alone: the load is one
    transaction, so synchronous=OFF would save one fsync and risk the file on a power cut."""
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.driver_connection
    old = {p: int(raw.execute(f"PRAGMA {p}").fetchone()[0]) for p in ("cache_size", "analysis_limit")}
    raw.execute("PRAGMA cache_size=-65536")  # 64 MiB
    raw.execute("PRAGMA analysis_limit=1000")
    try:
        yield
    finally:
        for p, value in old.items():
            raw.execute(f"PRAGMA {p}={value}")


class _Writer:
    """Bulk rows into one open transaction: driver executemany (SQLite) or COPY (PostgreSQL)."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        self.pg = conn.dialect.name == "postgresql"
        tables = {t: _MODELS[t].__table__ for t in TABLES}  # type: ignore[attr-defined]
        if self.pg:
            # Our explicit ids must not meet a concurrent writer's sequence values.
            conn.exec_driver_sql(f"LOCK TABLE {', '.join(TABLES)} IN SHARE ROW EXCLUSIVE MODE")
        self.bases = {t: self._base(t) for t in TABLES}
        self.sql: dict[str, str] = {}
        self.procs: dict[str, list[tuple[int, Callable[[Any], Any]]]] = {}
        for t, table in tables.items():
            cols = _COLUMNS[t]
            if self.pg:
                self.sql[t] = f"COPY {t} ({', '.join(cols)}) FROM STDIN"
                continue
            self.sql[t] = str(sa.insert(table).compile(dialect=self.dialect, column_keys=list(cols)))
            # SQLAlchemy's own bind processors: the stored values are exactly what a Core insert writes.
            procs = []
            for i, c in enumerate(cols):
                proc = table.c[c].type.dialect_impl(self.dialect).bind_processor(self.dialect)
                if proc is not None:
                    procs.append((i, _memo(proc) if isinstance(table.c[c].type, sa.Date) else proc))
            self.procs[t] = procs

    def _base(self, table: str) -> int:
        top = self.conn.execute(sa.text(f"SELECT coalesce(max(id), 0) FROM {table}")).scalar_one()
        if self.pg:  # a sequence may be ahead of max(id) (rolled back or deleted rows)
            seq = self.conn.execute(sa.text(
                f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {self._sequence(table)}")).scalar_one()
            top = max(top, seq)
        return int(top)

    def _sequence(self, table: str) -> str:
        return self.conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()

    def write(self, chunk: _Chunk) -> None:
        for t in TABLES:  # parents first
            rows = chunk.rows[t]
            if not rows:
                continue
            if self.pg:
                with self.conn.connection.driver_connection.cursor() as cur, cur.copy(self.sql[t]) as copy:
                    for row in rows:
                        copy.write_row(row)
                continue
            procs = self.procs[t]
            if procs:
                rows = [_apply(row, procs) for row in rows]
            self.conn.exec_driver_sql(self.sql[t], rows)

    def finish(self) -> None:
        if self.pg:  # move each sequence past the ids written here
            for t in TABLES:
                self.conn.execute(sa.text(f"SELECT setval(:seq, greatest((SELECT coalesce(max(id), 0) FROM {t}), 1), "
                                          f"(SELECT count(*) > 0 FROM {t}))"), {"seq": self._sequence(t)})
        # Fresh planner statistics, or the sweep's matching query may start from the wrong table. Measured:
        # a 2,000-encounter PostgreSQL sweep 7.4 s before ANALYZE, 1.2 s after; on SQLite with 1M lines
        # (sweep with payer_ids) one batch of 500 encounters 70 s before, 0.03 s after.
        if self.pg:
            self.conn.exec_driver_sql(f"ANALYZE {', '.join(TABLES)}")
        else:
            for t in TABLES:  # sampled (analysis_limit, see _bulk_load_pragmas): milliseconds
                self.conn.exec_driver_sql(f"ANALYZE {t}")


def _apply(row: tuple, procs: list[tuple[int, Callable[[Any], Any]]]) -> tuple:
    values = list(row)
    for i, proc in procs:
        values[i] = proc(values[i])
    return tuple(values)


def _memo(proc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # Dates repeat (a window has few days): format each once.
    cache: dict[Any, Any] = {}

    def run(value: Any) -> Any:
        try:
            return cache[value]
        except KeyError:
            out = cache[value] = proc(value)
            return out

    return run


# --- command line (the lead wires ``retroauth generate``) ----------------------------------------------------

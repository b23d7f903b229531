"""The database tables: the single schema of the product (Alembic migrations are generated from it).

Conventions:
- Every row that comes from outside carries a natural key with a unique constraint, so a repeated
  import or run finds the row instead of adding a second one.
- Instants are timezone-aware and stored in UTC (``UTCDateTime``); the time zone they happened in is
  kept beside them where deadlines need it (encounters).
- Codes are stored as the (code system, code) pair they came with; nothing assumes CPT.
- Money is ``Numeric(12, 2)``, never float.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from retroauth.vocab import CaseStatus

MONEY = sa.Numeric(12, 2)


class UTCDateTime(TypeDecorator):
    """A timezone-aware instant on every backend: SQLite keeps no zone, so store UTC and say so on read."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: every instant stored must carry its time zone")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _instant(nullable: bool = False, now: bool = False) -> Any:
    column = sa.Column(UTCDateTime(), nullable=nullable)
    if now:
        return Field(default_factory=utcnow, sa_column=column)
    return Field(default=None, sa_column=column) if nullable else Field(sa_column=column)


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=nullable))


# --- people and coverage -------------------------------------------------------------------------


class Patient(SQLModel, table=True):
    __tablename__ = "patients"
    __table_args__ = (sa.UniqueConstraint("source_system", "source_id", name="uq_patients_source"),)

    id: int | None = Field(default=None, primary_key=True)
    source_system: str = Field(max_length=64)  # "fhir:<export>", "csv", ...
    source_id: str = Field(max_length=128)
    mrn: str | None = Field(default=None, max_length=64)
    family_name: str = Field(max_length=128)
    given_name: str = Field(max_length=128)
    birth_date: date | None = None
    sex: str | None = Field(default=None, max_length=16)
    address_line: str | None = Field(default=None, max_length=256)
    city: str | None = Field(default=None, max_length=128)
    state: str | None = Field(default=None, max_length=2)
    postal_code: str | None = Field(default=None, max_length=10)
    phone: str | None = Field(default=None, max_length=32)


class Coverage(SQLModel, table=True):
    __tablename__ = "coverages"
    __table_args__ = (
        sa.UniqueConstraint("patient_id", "payer_id", "member_id", "effective_from", name="uq_coverages_member"),
        sa.Index("ix_coverages_payer_member", "payer_id", "member_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patients.id", index=True)
    payer_id: str = Field(max_length=64)  # the id of a payer rule file
    plan_name: str | None = Field(default=None, max_length=128)
    member_id: str = Field(max_length=64)
    group_number: str | None = Field(default=None, max_length=64)
    priority: int = Field(default=1)  # 1 primary, 2 secondary, ...
    effective_from: date
    effective_to: date | None = None
    discovered_at: datetime = _instant()  # when the provider learned of this coverage
    discovery_method: str = Field(max_length=32)  # vocab.CoverageDiscovery


# --- encounters and what was done ----------------------------------------------------------------


class Encounter(SQLModel, table=True):
    __tablename__ = "encounters"
    __table_args__ = (
        sa.UniqueConstraint("source_system", "source_id", name="uq_encounters_source"),
        sa.Index("ix_encounters_admitted_at", "admitted_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source_system: str = Field(max_length=64)
    source_id: str = Field(max_length=128)
    patient_id: int = Field(foreign_key="patients.id", index=True)
    encounter_class: str = Field(max_length=16)  # vocab.EncounterClass
    admission_type: str | None = Field(default=None, max_length=16)  # vocab.AdmissionType
    admitted_at: datetime = _instant()
    discharged_at: datetime | None = _instant(nullable=True)
    timezone: str = Field(max_length=64)  # where it happened: local dates and cut-offs need it
    facility_name: str | None = Field(default=None, max_length=256)
    facility_npi: str | None = Field(default=None, max_length=10)
    place_of_service: str | None = Field(default=None, max_length=2)  # CMS POS code
    type_of_bill: str | None = Field(default=None, max_length=4)
    # A system problem that kept staff from asking in time (outage ticket, EHR failure reference).
    system_issue_reference: str | None = Field(default=None, max_length=128)


class ServiceLine(SQLModel, table=True):
    __tablename__ = "service_lines"
    __table_args__ = (
        sa.UniqueConstraint("encounter_id", "line_number", name="uq_service_lines_line"),
        sa.Index("ix_service_lines_code", "code_system", "code"),
        sa.Index("ix_service_lines_service_date", "service_date"),
    )

    id: int | None = Field(default=None, primary_key=True)
    encounter_id: int = Field(foreign_key="encounters.id", index=True)
    line_number: int
    source_id: str | None = Field(default=None, max_length=128)  # e.g. the FHIR Procedure id
    code_system: str = Field(max_length=16)  # vocab.CodeSystem
    code: str = Field(max_length=32)
    description: str | None = Field(default=None, max_length=512)
    modifiers: str | None = Field(default=None, max_length=32)  # comma-separated, e.g. "RT,59"
    units: Decimal = Field(default=Decimal("1"), sa_type=sa.Numeric(9, 2))
    charge: Decimal = Field(default=Decimal("0"), sa_type=MONEY)
    service_date: date
    rendering_npi: str | None = Field(default=None, max_length=10)
    ordering_npi: str | None = Field(default=None, max_length=10)
    # Set when a remittance (835) denied this line for missing or invalid authorization.
    denial_carc: str | None = Field(default=None, max_length=8)
    denial_rarc: str | None = Field(default=None, max_length=8)
    denied_on: date | None = None


class Diagnosis(SQLModel, table=True):
    __tablename__ = "diagnoses"
    __table_args__ = (sa.UniqueConstraint("encounter_id", "code_system", "code", name="uq_diagnoses_code"),)

    id: int | None = Field(default=None, primary_key=True)
    encounter_id: int = Field(foreign_key="encounters.id", index=True)
    code_system: str = Field(max_length=16)
    code: str = Field(max_length=32)
    description: str | None = Field(default=None, max_length=512)
    rank: int = Field(default=1)  # 1 principal


class ClinicalDocument(SQLModel, table=True):
    """A note or report; its content lives in object storage under ``storage_key``."""

    __tablename__ = "clinical_documents"
    __table_args__ = (
        sa.UniqueConstraint("source_system", "source_id", name="uq_clinical_documents_source"),
        sa.Index("ix_clinical_documents_type", "patient_id", "loinc_type", "authored_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source_system: str = Field(max_length=64)
    source_id: str = Field(max_length=128)
    patient_id: int = Field(foreign_key="patients.id")
    encounter_id: int | None = Field(default=None, foreign_key="encounters.id", index=True)
    loinc_type: str = Field(max_length=16)
    title: str | None = Field(default=None, max_length=256)
    author: str | None = Field(default=None, max_length=256)
    authored_at: datetime = _instant()
    content_type: str = Field(default="text/plain", max_length=64)
    storage_key: str = Field(max_length=512)
    sha256: str = Field(max_length=64)
    size_bytes: int


class PayerOutage(SQLModel, table=True):
    """A recorded outage of a payer's portal or API: evidence for the 'system issue' reason."""

    __tablename__ = "payer_outages"
    __table_args__ = (sa.UniqueConstraint("payer_id", "starts_at", name="uq_payer_outages_start"),)

    id: int | None = Field(default=None, primary_key=True)
    payer_id: str = Field(max_length=64)
    starts_at: datetime = _instant()
    ends_at: datetime | None = _instant(nullable=True)
    reference: str = Field(max_length=128)  # ticket or notice number
    description: str | None = Field(default=None, max_length=512)


# --- authorizations on file ----------------------------------------------------------------------


class Authorization(SQLModel, table=True):
    """An authorization the payer granted (or one in flight) that can cover services."""

    __tablename__ = "authorizations"
    __table_args__ = (
        sa.UniqueConstraint("payer_id", "auth_number", name="uq_authorizations_number"),
        sa.Index("ix_authorizations_member", "payer_id", "member_id", "starts_on", "ends_on"),
    )

    id: int | None = Field(default=None, primary_key=True)
    payer_id: str = Field(max_length=64)
    member_id: str = Field(max_length=64)
    patient_id: int | None = Field(default=None, foreign_key="patients.id")
    provider_npi: str | None = Field(default=None, max_length=10)
    auth_number: str = Field(max_length=64)
    starts_on: date
    ends_on: date
    status: str = Field(max_length=16)  # approved, pending, denied, cancelled
    source: str = Field(max_length=32)  # import, payer_response, manual
    case_id: int | None = Field(default=None, foreign_key="retro_cases.id")  # when we obtained it


class AuthorizationCode(SQLModel, table=True):
    """One code an authorization covers: a child table, so coverage checks are a join, not a parse."""

    __tablename__ = "authorization_codes"
    __table_args__ = (
        sa.UniqueConstraint("authorization_id", "code_system", "code", name="uq_authorization_codes"),
        sa.Index("ix_authorization_codes_code", "code_system", "code"),
    )

    id: int | None = Field(default=None, primary_key=True)
    authorization_id: int = Field(foreign_key="authorizations.id")
    code_system: str = Field(max_length=16)
    code: str = Field(max_length=32)


# --- retro-authorization cases -------------------------------------------------------------------


class RetroCase(SQLModel, table=True):
    """One encounter's uncovered services for one payer: the unit of work of the whole product."""

    __tablename__ = "retro_cases"
    __table_args__ = (
        sa.UniqueConstraint("encounter_id", "payer_id", name="uq_retro_cases_encounter_payer"),
        sa.Index("ix_retro_cases_worklist", "status", "due_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    encounter_id: int = Field(foreign_key="encounters.id")
    payer_id: str = Field(max_length=64)
    coverage_id: int | None = Field(default=None, foreign_key="coverages.id")
    status: str = Field(default=CaseStatus.IDENTIFIED, max_length=32)  # vocab.CaseStatus
    reason: str | None = Field(default=None, max_length=40)  # vocab.MissReason
    delay_reason_code: str | None = Field(default=None, max_length=4)  # X12 element 1514
    due_at: datetime | None = _instant(nullable=True)
    deadline_rule: str | None = Field(default=None, max_length=256)  # which rule produced due_at
    not_eligible_why: str | None = Field(default=None, max_length=64)  # machine-readable
    priority: int = Field(default=0)  # higher is more urgent
    amount_at_risk: Decimal = Field(default=Decimal("0"), sa_type=MONEY)
    # Set when the payer has not answered within its review SLA (or stopped answering inquiries): the
    # worklist shows it for a person to call the payer. Cleared by nothing: the history stays visible.
    escalated_at: datetime | None = _instant(nullable=True)
    created_at: datetime = _instant(now=True)
    updated_at: datetime = _instant(now=True)
    # Bumped on every transition: a compare-and-set guard against two workers moving one case.
    version: int = Field(default=1)
    # The claim of a run working on the case now (retroauth.claims): the run, until when (the lease; a
    # crashed run's lease runs out), and the step and round it was taken for, which stays after the lease
    # is handed back so that the round does not take the case again. Ids and codes only.
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = _instant(nullable=True)
    claim_round: str | None = Field(default=None, max_length=64)


class CaseServiceLine(SQLModel, table=True):
    __tablename__ = "case_service_lines"
    __table_args__ = (sa.UniqueConstraint("case_id", "service_line_id", name="uq_case_service_lines"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id", index=True)
    service_line_id: int = Field(foreign_key="service_lines.id", index=True)
    rule_category: str | None = Field(default=None, max_length=64)  # the payer rule that required auth


class CaseEvent(SQLModel, table=True):
    """The audit trail: one row per state change or notable step, written with the change itself."""

    __tablename__ = "case_events"
    __table_args__ = (sa.Index("ix_case_events_case", "case_id", "occurred_at"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id")
    occurred_at: datetime = _instant(now=True)
    run_id: str | None = Field(default=None, max_length=64)  # Prefect flow-run id, or "cli:<user>"
    actor: str = Field(default="system", max_length=64)
    event: str = Field(max_length=32)  # "transition", "note", ...
    from_status: str | None = Field(default=None, max_length=32)
    to_status: str | None = Field(default=None, max_length=32)
    details: dict | None = _json()  # ids and codes only, never patient data


# --- talking to the payer ------------------------------------------------------------------------


class Submission(SQLModel, table=True):
    """The outbox: written in the same transaction as the case's move to ``submitting``."""

    __tablename__ = "submissions"
    __table_args__ = (
        sa.UniqueConstraint("idempotency_key", name="uq_submissions_idempotency_key"),
        sa.UniqueConstraint("case_id", "attempt", name="uq_submissions_attempt"),
        sa.Index("ix_submissions_status", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id")
    attempt: int = Field(default=1)
    kind: str = Field(default="request", max_length=16)  # request, appeal
    channel: str = Field(max_length=16)  # vocab.Channel
    idempotency_key: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16)  # pending, sent, failed, reconciled
    created_at: datetime = _instant(now=True)
    sent_at: datetime | None = _instant(nullable=True)
    tracking_number: str | None = Field(default=None, max_length=64)
    payload_key: str | None = Field(default=None, max_length=512)  # what was sent, in storage
    last_error: str | None = Field(default=None, max_length=256)  # codes only
    # The claim of the run sending it now (retroauth.claims), as on RetroCase.
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = _instant(nullable=True)
    claim_round: str | None = Field(default=None, max_length=64)


class PayerResponse(SQLModel, table=True):
    __tablename__ = "payer_responses"
    __table_args__ = (sa.UniqueConstraint("submission_id", "response_ref", name="uq_payer_responses_ref"),)

    id: int | None = Field(default=None, primary_key=True)
    submission_id: int = Field(foreign_key="submissions.id", index=True)
    case_id: int = Field(foreign_key="retro_cases.id", index=True)
    response_ref: str = Field(max_length=128)  # payer's response id, or a hash of the payload
    received_at: datetime = _instant(now=True)
    decision: str = Field(max_length=4)  # X12 HCR01 / PAS reviewActionCode: A1, A3, A4, ...
    certification_number: str | None = Field(default=None, max_length=64)
    reason_codes: str | None = Field(default=None, max_length=128)  # comma-separated
    payload_key: str | None = Field(default=None, max_length=512)


class Appeal(SQLModel, table=True):
    __tablename__ = "appeals"
    __table_args__ = (sa.UniqueConstraint("case_id", "level", name="uq_appeals_level"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id", index=True)
    level: int  # 1 first level, 2 second level, 3 external review
    status: str = Field(default="open", max_length=16)  # open, filed, upheld, overturned, lapsed
    denial_codes: str | None = Field(default=None, max_length=128)
    due_at: datetime = _instant()
    filed_at: datetime | None = _instant(nullable=True)
    decided_at: datetime | None = _instant(nullable=True)


class FollowUp(SQLModel, table=True):
    __tablename__ = "follow_ups"
    __table_args__ = (
        # At most one open follow-up of each kind per case (done ones are its history).
        sa.Index("uq_follow_ups_open", "case_id", "kind", unique=True,
                 sqlite_where=sa.text("done_at IS NULL"), postgresql_where=sa.text("done_at IS NULL")),
        sa.Index("ix_follow_ups_open", "done_at", "due_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id", index=True)
    kind: str = Field(max_length=32)  # status_inquiry, sla_escalation, appeal_deadline, documentation
    due_at: datetime = _instant()
    done_at: datetime | None = _instant(nullable=True)
    attempts: int = Field(default=0)
    outcome: str | None = Field(default=None, max_length=64)


# --- the payer rule library, loaded for set-based matching -----------------------------------------


class PayerAuthRule(SQLModel, table=True):
    """One code range of one "authorization required" rule, flattened from ``config/payers``.

    The YAML files are the source; the sweep reloads these rows before it runs so that matching is
    a join. A range matches a code when the lengths agree and ``code_lo <= code <= code_hi``. Rules
    limited to several places of service or encounter classes get one row per value (NULL: any).
    """

    __tablename__ = "payer_auth_rules"
    __table_args__ = (sa.Index("ix_payer_auth_rules_match", "payer_id", "code_system", "code_len", "code_lo"),)

    id: int | None = Field(default=None, primary_key=True)
    payer_id: str = Field(max_length=64)
    rule_index: int  # position in the payer file, to point people at the rule
    category: str = Field(max_length=64)
    code_system: str = Field(max_length=16)
    code_lo: str = Field(max_length=32)
    code_hi: str = Field(max_length=32)
    code_len: int
    place_of_service: str | None = Field(default=None, max_length=2)
    encounter_class: str | None = Field(default=None, max_length=16)
    effective_from: date
    effective_to: date | None = None
    provider_specific: bool = False
    requires_partner: bool = False  # "only together with": see PayerAuthPartner


class PayerAuthPartner(SQLModel, table=True):
    """The codes a pair rule needs on the same encounter ("64612 only with J0585-J0588")."""

    __tablename__ = "payer_auth_partners"
    __table_args__ = (sa.Index("ix_payer_auth_partners_rule", "payer_id", "rule_index"),)

    id: int | None = Field(default=None, primary_key=True)
    payer_id: str = Field(max_length=64)
    rule_index: int
    code_system: str = Field(max_length=16)
    code_lo: str = Field(max_length=32)
    code_hi: str = Field(max_length=32)
    code_len: int


# --- imports ----------------------------------------------------------------------------------------


class ImportRun(SQLModel, table=True):
    """One run of an importer: what it read and what became of it (``retroauth imports``)."""

    __tablename__ = "import_runs"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)  # fhir, csv, remit, generate
    source: str = Field(max_length=512)  # the directory or file imported
    started_at: datetime = _instant(now=True)
    finished_at: datetime | None = _instant(nullable=True)
    counts: dict | None = _json()  # per record type: read, inserted, updated, unchanged, skipped, errors
    error_count: int = Field(default=0)


class ImportErrorRecord(SQLModel, table=True):
    """A rejected record, kept so that nothing is dropped silently. Never the record's values."""

    __tablename__ = "import_errors"
    __table_args__ = (sa.Index("ix_import_errors_run", "import_run_id"),)

    id: int | None = Field(default=None, primary_key=True)
    import_run_id: int = Field(foreign_key="import_runs.id")
    file: str = Field(max_length=256)
    line: int | None = None  # 1-based line, CSV row or X12 segment number
    record: str = Field(max_length=160)  # "Encounter/<id>", "encounters.csv row 12", "CLP 4711"
    field: str = Field(max_length=160)
    message: str = Field(max_length=512)


# --- documentation packets ---------------------------------------------------------------------------


class Packet(SQLModel, table=True):
    """A case's documentation packet: what is enclosed, what is missing, and the inputs it was built from.

    The manifest (JSON, also stored in object storage under ``manifest_key``) lists each item's type,
    source id, storage key, sha256, size and whether it is included or missing. ``input_hash`` covers
    everything the packet was built from, so an unchanged case is not rebuilt.
    """

    __tablename__ = "packets"
    __table_args__ = (sa.UniqueConstraint("case_id", name="uq_packets_case"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id")
    version: int = Field(default=1)
    input_hash: str = Field(max_length=64)
    manifest: dict | None = _json()
    manifest_key: str | None = Field(default=None, max_length=512)
    complete: bool = False
    missing: list | None = Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=True))
    built_at: datetime = _instant(now=True)


class Letter(SQLModel, table=True):
    """A rendered request or appeal letter: HTML and PDF in storage, and what produced them.

    The same data rendered by the same template is the same letter: the unique key makes a
    re-render with unchanged inputs a no-op.
    """

    __tablename__ = "letters"
    __table_args__ = (
        sa.UniqueConstraint("case_id", "kind", "appeal_level", "data_hash", "template_hash", name="uq_letters_inputs"),
        sa.Index("ix_letters_case", "case_id", "version"),
    )

    id: int | None = Field(default=None, primary_key=True)
    case_id: int = Field(foreign_key="retro_cases.id")
    kind: str = Field(max_length=16)  # request, appeal
    appeal_level: int = Field(default=0)  # 0 for a request (not NULL: NULLs never collide in a unique key)
    version: int = Field(default=1)
    template_name: str = Field(max_length=256)
    template_hash: str = Field(max_length=64)
    data_hash: str = Field(max_length=64)
    html_key: str = Field(max_length=512)
    pdf_key: str = Field(max_length=512)
    pdf_sha256: str = Field(max_length=64)
    created_at: datetime = _instant(now=True)

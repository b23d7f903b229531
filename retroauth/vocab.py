"""The words the whole product shares: code systems, encounter classes, reasons, deadline units.

Every enum is a ``StrEnum`` so that its values are what the database, the YAML rule files and the
JSON output carry, and a typo fails validation instead of silently matching nothing.
"""

from __future__ import annotations

from enum import StrEnum


class CodeSystem(StrEnum):
    """Code systems a service or diagnosis can be coded in."""

    CPT = "CPT"
    HCPCS = "HCPCS"
    SNOMED = "SNOMED"
    ICD10PCS = "ICD10PCS"
    ICD10CM = "ICD10CM"
    REVENUE = "REV"  # UB-04 revenue codes, for institutional services
    LOINC = "LOINC"


# FHIR / terminology URIs, the one place they are spelled out.
CODE_SYSTEM_URIS: dict[str, CodeSystem] = {
    "http://www.ama-assn.org/go/cpt": CodeSystem.CPT,
    "urn:oid:2.16.840.1.113883.6.12": CodeSystem.CPT,
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": CodeSystem.HCPCS,
    "urn:oid:2.16.840.1.113883.6.285": CodeSystem.HCPCS,
    "http://snomed.info/sct": CodeSystem.SNOMED,
    "http://www.cms.gov/Medicare/Coding/ICD10": CodeSystem.ICD10PCS,
    "http://hl7.org/fhir/sid/icd-10-cm": CodeSystem.ICD10CM,
    "http://loinc.org": CodeSystem.LOINC,
}


class EncounterClass(StrEnum):
    EMERGENCY = "emergency"
    INPATIENT = "inpatient"
    OUTPATIENT = "outpatient"
    OBSERVATION = "observation"
    HOME_HEALTH = "home_health"
    VIRTUAL = "virtual"


# HL7 v3 ActCode encounter classes (FHIR Encounter.class) to ours.
FHIR_ENCOUNTER_CLASSES: dict[str, EncounterClass] = {
    "EMER": EncounterClass.EMERGENCY,
    "IMP": EncounterClass.INPATIENT,
    "ACUTE": EncounterClass.INPATIENT,
    "NONAC": EncounterClass.INPATIENT,
    "AMB": EncounterClass.OUTPATIENT,
    "OBSENC": EncounterClass.OBSERVATION,
    "HH": EncounterClass.HOME_HEALTH,
    "VR": EncounterClass.VIRTUAL,
}


class AdmissionType(StrEnum):
    EMERGENCY = "emergency"
    URGENT = "urgent"
    ELECTIVE = "elective"


class MissReason(StrEnum):
    """Why authorization was not obtained in advance; each has its own evidence."""

    EMERGENCY = "emergency"
    DELAYED_INSURANCE_VERIFICATION = "delayed_insurance_verification"
    SYSTEM_ISSUE = "system_issue"
    RETROACTIVE_ELIGIBILITY = "retroactive_eligibility"
    ADMINISTRATIVE_ERROR = "administrative_error"


# X12 delay reason code (element 1514) sent with the request for each reason.
DELAY_REASON_CODES: dict[MissReason, str] = {
    MissReason.EMERGENCY: "11",  # other: emergency care, no time to ask
    MissReason.DELAYED_INSURANCE_VERIFICATION: "1",  # proof of eligibility unknown or unavailable
    MissReason.SYSTEM_ISSUE: "7",  # third-party processing delay
    MissReason.RETROACTIVE_ELIGIBILITY: "8",  # delay in eligibility determination
    MissReason.ADMINISTRATIVE_ERROR: "10",  # administration delay in the prior approval process
}


class CoverageDiscovery(StrEnum):
    """How a coverage became known to the provider."""

    ON_FILE = "on_file"  # known at registration
    ELIGIBILITY_CHECK = "eligibility_check"  # a 270/271 or portal check after the service
    PATIENT_REPORTED = "patient_reported"
    RETROACTIVE_ELIGIBILITY = "retroactive_eligibility"  # enrolment back-dated by the payer
    REMITTANCE = "remittance"  # another payer's 835 pointed at it
    OTHER = "other"


class WindowUnit(StrEnum):
    HOURS = "hours"
    CALENDAR_DAYS = "calendar_days"
    BUSINESS_DAYS = "business_days"


class Anchor(StrEnum):
    """The event a deadline counts from."""

    SERVICE_DATE = "service_date"
    ADMISSION = "admission"
    DISCHARGE = "discharge"
    COVERAGE_DISCOVERY = "coverage_discovery"
    REMITTANCE = "remittance"  # the remittance (835) or denial date
    DENIAL = "denial"  # a payer's denial of our request, for appeals


class Channel(StrEnum):
    X12_278 = "x12_278"
    FHIR_PAS = "fhir_pas"
    PACKET = "packet"


class CaseStatus(StrEnum):
    """States of a retro-authorization case; the transitions live in ``retroauth.cases``."""

    IDENTIFIED = "identified"
    AWAITING_DOCUMENTATION = "awaiting_documentation"
    READY = "ready"
    LETTER_RENDERED = "letter_rendered"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    IN_REVIEW = "in_review"
    APPROVED = "approved"
    DENIED = "denied"
    APPEALED = "appealed"
    NOT_ELIGIBLE = "not_eligible"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"
    CLOSED = "closed"

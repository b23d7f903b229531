"""Da Vinci PAS: the request bundle we build, the responses we read (real examples), the HTTP client."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from retroauth.channels.pas import (
    EXT_CERTIFICATION_TYPE,
    EXT_REQUEST_TYPE,
    EXT_REVIEW_ACTION,
    SUBMISSION_SYSTEM,
    PasAddress,
    PasClient,
    PasCoverage,
    PasDiagnosis,
    PasDocument,
    PasItem,
    PasMismatch,
    PasOrganization,
    PasPatient,
    PasPractitioner,
    PasRejected,
    PasRequest,
    PasResponseError,
    PasUnavailable,
    PasValidationError,
    build_pas_bundle,
    build_pas_inquiry_bundle,
    overall_decision,
    parse_pas_response,
    validate_pas_request,
)
from retroauth.payer_sim import run_simulator
from retroauth.vocab import CodeSystem
from tests.conftest import PAS

KEY = "case-41-request-1"
TS = datetime(2026, 3, 2, 15, 30, tzinfo=timezone.utc)
TOKEN = "tok-9f8e7d"
PATIENT_NAME = "Quillfeather"  # must never appear in an error or a log


def fixture(name: str) -> dict:
    return json.loads((PAS / name).read_text())


def pas_request(**changes) -> PasRequest:
    base = dict(
        case_id=41,
        claim_type="institutional",
        patient=PasPatient(member_id="MBR0042", family_name=PATIENT_NAME, given_name="Ada",
                           birth_date=date(1961, 4, 3), sex="female"),
        coverage=PasCoverage(member_id="MBR0042", payer_id="acme-health", payer_name="Acme Health",
                             plan_name="Gold PPO", group_number="GRP-7"),
        requester=PasOrganization(name="Riverside Community Hospital", npi="1234567893",
                                  address=PasAddress("100 Main Street", "Springfield", "IL", "62701"),
                                  phone="217-555-0100"),
        insurer=PasOrganization(name="Acme Health"),
        practitioners=(PasPractitioner(npi="1245319599", family_name="Okafor", given_name="Lena"),),
        diagnoses=(PasDiagnosis("M47.816"), PasDiagnosis("G89.4", recorded_on=date(2026, 1, 9))),
        items=(
            PasItem(CodeSystem.CPT, "64490", date(2026, 1, 10), Decimal("1"), Decimal("1840.50"),
                    description="Facet joint injection", modifiers=("RT", "59"), place_of_service="22",
                    practitioner_npi="1245319599", diagnosis_sequences=(1, 2)),
            PasItem(CodeSystem.HCPCS, "J0585", date(2026, 1, 10), Decimal("100"), Decimal("612.00")),
            PasItem(CodeSystem.SNOMED, "387713003", date(2026, 1, 10), service_end_date=date(2026, 1, 11)),
        ),
        documents=(
            PasDocument("note-1", "34117-2", "text/plain", title="History and physical", data=b"H&P text"),
            PasDocument("note-2", "11504-8", "application/pdf", title="Operative note",
                        url="https://docs.example.org/packet/41/op-note.pdf", sha256="ab" * 32, size=2048,
                        created=datetime(2026, 1, 10, 18, 0, tzinfo=timezone.utc)),
        ),
        request_category="HS",
        level_of_service="03",
        event_start=date(2026, 1, 10),
        event_end=date(2026, 1, 11),
        type_of_bill="131",
        message="Retrospective request: emergency care (delay reason 11).",
    )
    base.update(changes)
    return PasRequest(**base)


def resources(bundle: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in bundle["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    return out


def ext(element: dict, url: str) -> dict:
    (found,) = [e for e in element.get("extension", []) if e["url"] == url]
    return found


# --- building -------------------------------------------------------------------------------------


def test_bundle_builds_and_validates():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    Bundle.model_validate(bundle)  # FHIR R4B
    validate_pas_request(bundle)
    assert bundle["type"] == "collection"
    assert bundle["identifier"] == {"system": SUBMISSION_SYSTEM, "value": KEY}
    assert bundle["timestamp"] == "2026-03-02T15:30:00+00:00"
    claim = bundle["entry"][0]["resource"]
    assert claim["resourceType"] == "Claim"
    assert (claim["use"], claim["status"]) == ("preauthorization", "active")
    assert claim["identifier"] == [{"system": SUBMISSION_SYSTEM, "value": KEY}]
    assert claim["type"]["coding"][0]["code"] == "institutional"
    assert claim["priority"]["coding"][0]["code"] == "normal"
    assert [d["diagnosisCodeableConcept"]["coding"][0] for d in claim["diagnosis"]] == [
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M47.816"},
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G89.4"}]
    assert claim["insurance"][0]["focal"] is True
    kinds = resources(bundle)
    assert {k: len(v) for k, v in kinds.items()} == {
        "Claim": 1, "Organization": 2, "Coverage": 1, "Patient": 1, "Practitioner": 1, "DocumentReference": 2}
    # Every entry has a fullUrl and every reference of the Claim resolves inside the bundle.
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    refs = [claim[k]["reference"] for k in ("patient", "insurer", "provider")]
    refs += [claim["insurance"][0]["coverage"]["reference"], claim["careTeam"][0]["provider"]["reference"]]
    refs += [si["valueReference"]["reference"] for si in claim["supportingInfo"] if "valueReference" in si]
    assert set(refs) <= full_urls and len(refs) == 7
    coverage = kinds["Coverage"][0]
    assert coverage["subscriberId"] == "MBR0042" and coverage["beneficiary"] == claim["patient"]
    assert coverage["payor"] == [claim["insurer"]]


def test_items_carry_codes_dates_amounts_and_pas_extensions():
    claim = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)["entry"][0]["resource"]
    first, second, third = claim["item"]
    assert first["productOrService"]["coding"][0] == {
        "system": "http://www.ama-assn.org/go/cpt", "code": "64490", "display": "Facet joint injection"}
    assert [m["coding"][0] for m in first["modifier"]] == [
        {"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "RT"},
        {"system": "http://www.ama-assn.org/go/cpt", "code": "59"}]
    assert first["servicedDate"] == "2026-01-10"
    assert first["quantity"] == {"value": 1}
    assert first["unitPrice"] == {"value": 1840.5, "currency": "USD"}
    assert first["net"] == {"value": 1840.5, "currency": "USD"}
    assert first["diagnosisSequence"] == [1, 2] and first["careTeamSequence"] == [1]
    assert first["locationCodeableConcept"]["coding"][0]["code"] == "22"
    assert second["productOrService"]["coding"][0]["system"] == "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
    assert second["unitPrice"] == {"value": 6.12, "currency": "USD"} and second["quantity"] == {"value": 100}
    assert second["locationCodeableConcept"]["coding"][0]["code"] == "131"  # type of bill when no POS
    assert third["productOrService"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert third["servicedPeriod"] == {"start": "2026-01-10", "end": "2026-01-11"}
    assert "unitPrice" not in third
    for item in claim["item"]:
        cert = ext(item, EXT_CERTIFICATION_TYPE)["valueCodeableConcept"]["coding"][0]
        assert (cert["system"], cert["code"]) == ("https://codesystem.x12.org/005010/1322", "I")
        assert ext(item, EXT_REQUEST_TYPE)["valueCodeableConcept"]["coding"][0]["code"] == "HS"
        assert item["category"]["coding"][0]["system"] == "https://codesystem.x12.org/005010/1365"


def test_supporting_info_references_the_packet_documents():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    claim = bundle["entry"][0]["resource"]
    cats = [si["category"]["coding"][0]["code"] for si in claim["supportingInfo"]]
    assert cats == ["patientEvent", "additionalInformation", "additionalInformation", "freeFormMessage"]
    assert [si["sequence"] for si in claim["supportingInfo"]] == [1, 2, 3, 4]
    assert claim["supportingInfo"][0]["timingPeriod"] == {"start": "2026-01-10", "end": "2026-01-11"}
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    inline, linked = (by_url[si["valueReference"]["reference"]] for si in claim["supportingInfo"][1:3])
    a = inline["content"][0]["attachment"]
    assert inline["type"]["coding"][0] == {"system": "http://loinc.org", "code": "34117-2"}
    assert (a["contentType"], a["title"], a["size"]) == ("text/plain", "History and physical", 8)
    assert a["hash"] == base64.b64encode(hashlib.sha1(b"H&P text").digest()).decode()  # FHIR: base64 SHA-1
    assert base64.b64decode(a["data"]) == b"H&P text"
    assert inline["masterIdentifier"]["value"].startswith("ni:///sha-256;")
    b = linked["content"][0]["attachment"]
    assert (b["url"], b["contentType"], b["size"]) == ("https://docs.example.org/packet/41/op-note.pdf",
                                                       "application/pdf", 2048)
    assert "data" not in b and inline["subject"] == claim["patient"] == linked["subject"]


def test_bundle_resembles_the_conformant_example():
    ours = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    theirs = fixture("conformant_pas_bundle_v110.json")
    assert set(theirs) - {"id"} <= set(ours)
    assert ours["meta"]["profile"] == theirs["meta"]["profile"]
    our_claim, their_claim = ours["entry"][0]["resource"], theirs["entry"][0]["resource"]
    assert set(their_claim) - {"text"} <= set(our_claim)
    assert our_claim["meta"]["profile"] == their_claim["meta"]["profile"]
    # Same item extensions where ours overlap theirs, same certification type and code systems.
    their_item, our_item = their_claim["item"][0], our_claim["item"][0]
    their_urls = {e["url"] for e in their_item["extension"]}
    assert {e["url"] for e in our_item["extension"]} <= their_urls
    assert {"sequence", "careTeamSequence", "diagnosisSequence", "productOrService", "locationCodeableConcept"} <= set(our_item)
    code = lambda item, url: ext(item, url)["valueCodeableConcept"]["coding"][0]  # noqa: E731
    assert code(our_item, EXT_CERTIFICATION_TYPE)["code"] == code(their_item, EXT_CERTIFICATION_TYPE)["code"] == "I"
    assert code(our_item, EXT_CERTIFICATION_TYPE)["system"].split("://")[1] == \
        code(their_item, EXT_CERTIFICATION_TYPE)["system"].split("://")[1]
    assert our_claim["extension"][0]["url"] == their_claim["extension"][0]["url"]  # levelOfServiceCode
    assert our_claim["careTeam"][0]["extension"] == their_claim["careTeam"][0]["extension"]
    assert our_claim["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["system"] == \
        their_claim["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["system"]
    # The same supporting resources, with the same PAS profiles.
    profiles = lambda b: {(r["resourceType"], p) for e in b["entry"] for r in [e["resource"]]  # noqa: E731
                          for p in r.get("meta", {}).get("profile", [])}
    assert profiles(theirs) - {("ServiceRequest", "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-servicerequest")} \
        <= profiles(ours)


def test_the_same_inputs_give_the_same_bundle():
    one = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    two = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    assert json.dumps(one) == json.dumps(two)
    other = build_pas_bundle(pas_request(), idempotency_key="case-41-request-2", timestamp=TS)
    assert other["id"] != one["id"] and other["entry"][0]["fullUrl"] != one["entry"][0]["fullUrl"]


def test_professional_minimal_request():
    req = pas_request(claim_type="professional", practitioners=(), diagnoses=(), documents=(), level_of_service=None,
                      event_start=None, event_end=None, message=None, type_of_bill=None,
                      items=(PasItem(CodeSystem.CPT, "63650", date(2026, 1, 2)),))
    bundle = build_pas_bundle(req, idempotency_key=KEY, timestamp=TS)
    claim = bundle["entry"][0]["resource"]
    assert "supportingInfo" not in claim and "careTeam" not in claim and "extension" not in claim
    requester = next(r for r in resources(bundle)["Organization"] if r["name"].startswith("Riverside"))
    assert requester["type"][0]["coding"][0]["code"] == "1P"


def test_bad_requests_fail_clearly_without_values():
    with pytest.raises(PasValidationError) as err:
        build_pas_bundle(pas_request(items=()), idempotency_key=KEY, timestamp=TS)
    assert "case 41" in str(err.value) and "items" in str(err.value)
    with pytest.raises(PasValidationError, match="practitioner_npi"):
        build_pas_bundle(pas_request(items=(PasItem(CodeSystem.CPT, "64490", date(2026, 1, 10),
                                                    practitioner_npi="1111111111"),)),
                         idempotency_key=KEY, timestamp=TS)
    with pytest.raises(PasValidationError, match="documents"):
        build_pas_bundle(pas_request(documents=(PasDocument("x", "34117-2", "text/plain"),)),
                         idempotency_key=KEY, timestamp=TS)
    with pytest.raises(ValueError, match="timezone"):
        build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=datetime(2026, 3, 2))
    with pytest.raises(ValueError, match="idempotency_key"):
        build_pas_bundle(pas_request(), idempotency_key="", timestamp=TS)


def test_fhir_validation_errors_name_paths_not_values():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    broken = copy.deepcopy(bundle)
    broken["entry"][0]["resource"]["created"] = PATIENT_NAME  # not a dateTime
    broken["entry"][4]["resource"]["birthDate"] = f"{PATIENT_NAME}-1961"
    broken["entry"][0]["resource"]["nickname"] = PATIENT_NAME  # no such element
    with pytest.raises(PasValidationError) as err:
        validate_pas_request(broken)
    text = str(err.value)
    assert "entry.0.resource.created" in text and "entry.0.resource.nickname: extra_forbidden" in text
    assert "entry.4.resource.birthDate" in text
    assert PATIENT_NAME not in text and PATIENT_NAME not in repr(err.value.problems)


def test_malformed_structures_are_problems_not_crashes():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    for mutate in (lambda b: b["entry"][0]["resource"].update(insurance=["x"]),
                   lambda b: b["entry"][0]["resource"].update(item="x"),
                   lambda b: b.update(entry=[None]),
                   lambda b: b["entry"][0]["resource"].update(patient={"reference": [PATIENT_NAME]})):
        broken = copy.deepcopy(bundle)
        mutate(broken)
        with pytest.raises(PasValidationError) as err:
            validate_pas_request(broken)
        assert PATIENT_NAME not in str(err.value)
    for not_a_bundle in (None, [], "Bundle", {"resourceType": "Claim"}):
        with pytest.raises(PasValidationError):
            validate_pas_request(not_a_bundle)


def test_pas_rules_beyond_fhir():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    for mutate, problem in [
        (lambda b: b["entry"][0]["resource"].update(use="claim"), "Claim.use"),
        (lambda b: b["entry"][0]["resource"].update(status="draft"), "Claim.status"),
        (lambda b: b.update(type="transaction"), "Bundle.type"),
        (lambda b: b.pop("identifier"), "Bundle.identifier"),
        (lambda b: b["entry"].pop(4), "Claim.patient"),  # the Patient entry is gone: reference dangles
        (lambda b: b["entry"].insert(0, b["entry"].pop(4)), "Bundle.entry.0.resource"),
        (lambda b: b["entry"][0]["resource"].update(item=[]), "Claim.item"),
    ]:
        broken = copy.deepcopy(bundle)
        mutate(broken)
        with pytest.raises(PasValidationError, match=problem.replace(".", r"\.")):
            validate_pas_request(broken)


def test_the_conformant_example_passes_and_the_nonconformant_one_is_rejected():
    validate_pas_request(fixture("conformant_pas_bundle_v110.json"))
    with pytest.raises(PasValidationError, match="Bundle.entry"):
        validate_pas_request(fixture("nonconformant_pas_bundle_v110.json"))


def test_inquiry_bundle_names_the_original_request():
    inq = build_pas_inquiry_bundle(pas_request(), idempotency_key=KEY, timestamp=TS + timedelta(days=3))
    Bundle.model_validate(inq)
    assert inq["identifier"]["system"] == "urn:retroauth:inquiry" and inq["identifier"]["value"] != KEY
    assert inq["meta"]["profile"] == ["http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-inquiry-request-bundle"]
    claim = inq["entry"][0]["resource"]
    assert claim["identifier"] == [{"system": SUBMISSION_SYSTEM, "value": KEY}]
    assert claim["meta"]["profile"][0].endswith("profile-claim-inquiry")
    assert "DocumentReference" not in resources(inq) and "supportingInfo" not in claim
    assert all("unitPrice" not in i for i in claim["item"])


# --- reading responses ----------------------------------------------------------------------------


def test_the_real_approval_reads_as_certified_with_its_number():
    d = parse_pas_response(fixture("valid_pa_response_bundle.json"))
    assert (d.kind, d.decision, d.outcome) == ("response", "A1", "complete")
    assert d.approved and d.final and not d.denied and not d.pended
    assert d.authorization_number == "AUTH0001"
    assert [(i.sequence, i.code, i.number) for i in d.items] == [(1, "A1", "AUTH0001")]
    assert (d.authorized_from, d.authorized_to) == (date(2005, 5, 2), date(2005, 6, 2))
    assert d.claim_identifiers == ("111099",)
    assert d.response_id == "ReferralAuthorizationResponseExample"
    assert d.response_ref.startswith("sha256:") and len(d.response_ref) == 71
    assert d.echoes(KEY) is None  # the example carries none of our identifiers


def test_the_real_denial_reads_as_not_certified():
    d = parse_pas_response(fixture("valid_pa_response_bundle_denial.json"))
    assert (d.decision, d.denied, d.approved, d.final) == ("A3", True, False, True)
    assert d.authorization_number is None  # the number on a denial is a review reference, not an authorization
    assert d.items[0].number == "AUTH0001"
    assert d.reason_codes == ()  # the example gives no reason code
    assert (d.authorized_from, d.authorized_to) == (None, None)
    assert d.response_ref != parse_pas_response(fixture("valid_pa_response_bundle.json")).response_ref


def with_review(body: dict, code: str, reasons: list[str] = (), number: str | None = None) -> dict:
    body = copy.deepcopy(body)
    action = body["entry"][0]["resource"]["item"][0]["adjudication"][0]["extension"][0]
    parts = [p for p in action["extension"] if p["url"] != "number"]
    parts[0]["valueCodeableConcept"]["coding"][0] = {"system": "https://codesystem.x12.org/005010/306", "code": code}
    if number:
        parts.insert(0, {"url": "number", "valueString": number})
    parts += [{"url": "reasonCode", "valueCodeableConcept": {"coding": [
        {"system": "https://codesystem.x12.org/external/886", "code": r}]}} for r in reasons]
    action["extension"] = parts
    return body


def test_denial_reason_codes_and_every_review_action():
    base = fixture("valid_pa_response_bundle_denial.json")
    d = parse_pas_response(with_review(base, "A3", ["T1", "0U"]))
    assert d.reason_codes == ("T1", "0U") and d.items[0].reason_codes == ("T1", "0U")
    for code in ("A1", "A2", "A3", "A4", "A6", "C", "CT", "NA"):
        d = parse_pas_response(with_review(base, code, number="N1"))
        assert d.decision == code
        assert d.authorization_number == ("N1" if code in ("A1", "A2", "A6") else None)
        assert d.pended is (code == "A4") and d.final is (code != "A4")


def test_several_items_reduce_to_one_decision():
    body = fixture("valid_pa_response_bundle.json")
    cr = body["entry"][0]["resource"]
    second = copy.deepcopy(cr["item"][0])
    second["itemSequence"] = 2
    second["adjudication"][0]["extension"][0]["extension"][1]["valueCodeableConcept"]["coding"][0]["code"] = "A3"
    cr["item"].append(second)
    d = parse_pas_response(body)
    assert [i.code for i in d.items] == ["A1", "A3"] and d.decision == "A2"
    assert d.approved and d.authorization_number == "AUTH0001"
    assert overall_decision(["A1", "A1"]) == "A1"
    assert overall_decision(["A1", "A4"]) == "A4"
    assert overall_decision(["A3", "CT"]) == "CT"
    assert overall_decision(["A1", "A6"]) == "A6"
    assert overall_decision(["A3", "C"]) == "A3"
    assert overall_decision([]) == "NA"


def test_operation_outcome_is_an_error_result():
    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "required", "diagnostics": f"{PATIENT_NAME} missing",
         "details": {"coding": [{"system": "https://codesystem.x12.org/005010/901", "code": "15"}]}},
        {"severity": "error", "code": "invalid"}]}
    d = parse_pas_response(oo, http_status=400)
    assert (d.kind, d.decision, d.error_codes, d.error_details) == ("error", "ERROR", ("required", "invalid"), ("15",))
    assert not d.final and d.http_status == 400 and PATIENT_NAME not in repr(d)
    in_bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": "2026-01-01T00:00:00Z",
                 "entry": [{"fullUrl": "urn:uuid:1", "resource": oo}]}
    assert parse_pas_response(in_bundle).error_codes == ("required", "invalid")
    not_found = parse_pas_response({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
    assert (not_found.kind, not_found.decision) == ("not_found", "NOT_FOUND")


def test_claim_response_in_error_pended_and_wrapped_forms():
    cr = copy.deepcopy(fixture("valid_pa_response_bundle.json")["entry"][0]["resource"])
    errored = copy.deepcopy(cr)
    errored.pop("item")
    errored["outcome"] = "error"
    errored["error"] = [{"code": {"coding": [{"system": "https://codesystem.x12.org/005010/901", "code": "57"}]}}]
    assert (parse_pas_response(errored).kind, parse_pas_response(errored).error_codes) == ("error", ("57",))
    queued = copy.deepcopy(cr)
    queued.pop("item")
    queued["outcome"] = "queued"
    assert parse_pas_response(queued).pended
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "return", "resource": fixture("valid_pa_response_bundle_denial.json")},
        {"name": "return", "resource": fixture("valid_pa_response_bundle.json")}]}
    assert parse_pas_response(params).decision == "A3"  # the first when none names our key
    assert parse_pas_response({"resourceType": "Parameters"}).kind == "not_found"


def test_responses_that_are_not_pas_are_refused():
    for body in (b"<html>", [], {"resourceType": "Patient", "id": "x"},
                 {"resourceType": "Bundle", "type": "collection", "entry": []},
                 {"resourceType": "Bundle", "type": "collection", "entry": [
                     {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}}]},
                 {"resourceType": "Bundle", "type": "collection", "bogus": 1}):
        with pytest.raises(PasResponseError):
            parse_pas_response(body)


# --- the client against the simulator -----------------------------------------------------------------


@pytest.fixture
def sim():
    started = []

    def start(config: dict):
        server, _ = run_simulator({"token": TOKEN, **config})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Sleeps(list):
    """Records each backoff instead of sleeping it, so the tests stay fast and can check the waits."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(base_url: str, **kw) -> PasClient:
    options = dict(timeout=2.0, max_attempts=6, backoff=0.01, max_backoff=0.05, sleep=Sleeps(), rng=lambda: 0.5)
    options.update(kw)
    return PasClient(base_url, TOKEN, **options)


def test_client_retries_500_429_timeouts_and_lost_answers_then_succeeds(sim, caplog):
    server = sim({"default": {"action": "approve", "faults": [
        {"status": 500}, {"status": 429, "retry_after": 1}, {"status": 503}, {"delay": 1.5}, {"drop": True}]}})
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    caplog.set_level(logging.DEBUG)
    with client(server.url, timeout=0.5) as c:
        decision = c.submit(bundle)
    assert decision.approved and decision.authorization_number
    assert decision.echoes(KEY) is True and decision.http_status == 200
    assert [i.code for i in decision.items] == ["A1", "A1", "A1"]
    assert c.sleep[1] == 1.0  # Retry-After honoured (it exceeds the small backoff)
    assert len(c.sleep) == 5
    stats = server.stats()
    assert stats["calls"] == {KEY: 6}  # five faults, then the answer: all with one key
    assert stats["submissions"] == {KEY: 1}  # the simulator counted exactly one request
    assert stats["repeats"] == {KEY: 2}  # the retries after the slow and the lost answer
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and PATIENT_NAME not in logged and "MBR0042" not in logged


def test_client_does_not_retry_a_400(sim):
    server = sim({"default": {"faults": [{"status": 400}]}})
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    c = client(server.url)
    with pytest.raises(PasRejected) as err:
        c.submit(bundle)
    assert err.value.status == 400 and c.sleep == []
    assert server.stats()["calls"] == {KEY: 1} and server.stats()["submissions"] == {}


def test_client_with_a_wrong_token_is_rejected_once(sim):
    server = sim({})
    c = PasClient(server.url, "not-the-token", max_attempts=4, backoff=0.01, sleep=Sleeps())
    with pytest.raises(PasRejected) as err:
        c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))
    assert err.value.status == 401 and err.value.decision.error_codes == ("login",)
    assert "not-the-token" not in str(err.value) and "not-the-token" not in repr(c)
    assert server.stats()["requests"]["unauthorized"] == 1


def test_client_gives_up_after_max_attempts(sim):
    server = sim({"default": {"faults": [{"status": 503}] * 10}})
    c = client(server.url, max_attempts=3)
    with pytest.raises(PasUnavailable) as err:
        c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))
    assert err.value.attempts == 3 and "HTTP 503" in str(err.value)
    assert server.stats()["calls"] == {KEY: 3} and len(c.sleep) == 2


def test_client_hands_back_a_long_retry_after(sim):
    server = sim({"default": {"faults": [{"status": 429, "retry_after": 3600}]}})
    c = client(server.url, max_retry_after=60)
    with pytest.raises(PasUnavailable) as err:
        c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))
    assert err.value.retry_after == 3600 and err.value.attempts == 1 and c.sleep == []


def test_client_pend_then_inquire_until_decided(sim):
    server = sim({"rules": [{"match": {"code": "64490"}, "action": "pend", "inquiries": 2, "then": "deny",
                             "then_reasons": ["T1"]}]})
    req = pas_request()
    c = client(server.url)
    first = c.submit(build_pas_bundle(req, idempotency_key=KEY, timestamp=TS))
    assert first.pended and first.outcome == "queued" and not first.final
    inquiry = build_pas_inquiry_bundle(req, idempotency_key=KEY, timestamp=TS + timedelta(days=2))
    assert c.inquire(inquiry).pended
    final = c.inquire(inquiry)
    assert final.denied and final.reason_codes == ("T1",) and final.echoes(KEY) is True
    assert server.stats()["inquiries"] == {KEY: 2} and server.stats()["submissions"] == {KEY: 1}


def test_client_inquiry_for_an_unknown_request(sim):
    server = sim({})
    c = client(server.url)
    with pytest.raises(PasRejected) as err:
        c.inquire(build_pas_inquiry_bundle(pas_request(), idempotency_key="never-sent", timestamp=TS))
    assert err.value.status == 404 and err.value.decision.kind == "not_found"


def test_client_refuses_an_invalid_bundle_before_sending(sim):
    server = sim({})
    with pytest.raises(PasValidationError):
        client(server.url).submit(fixture("nonconformant_pas_bundle_v110.json"))
    assert server.stats()["total_requests"] == 0


# --- the client's wire behaviour, seen through a mock transport -----------------------------------------


def test_every_retry_sends_the_same_bytes_key_and_headers():
    bundle = build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)
    seen: list[httpx.Request] = []
    answer = with_review(fixture("valid_pa_response_bundle.json"), "A1", number="AUTH-9")
    answer["identifier"] = {"system": SUBMISSION_SYSTEM, "value": KEY}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(seen) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        if len(seen) == 3:
            return httpx.Response(502)
        return httpx.Response(200, json=answer)

    c = client("https://payer.example.org/fhir/", transport=httpx.MockTransport(handler), rng=lambda: 1.0,
               backoff=0.5, max_backoff=10)
    d = c.submit(bundle)
    assert d.authorization_number == "AUTH-9" and d.echoes(KEY)
    assert len(seen) == 4 and len({r.content for r in seen}) == 1
    assert json.loads(seen[0].content)["identifier"]["value"] == KEY
    for r in seen:
        assert str(r.url) == "https://payer.example.org/fhir/Claim/$submit" and r.method == "POST"
        assert r.headers["Authorization"] == f"Bearer {TOKEN}"
        assert r.headers["Content-Type"] == "application/fhir+json"
        assert r.headers["Idempotency-Key"] == KEY
    assert c.sleep == [0.5, 1.0, 2.0]  # exponential (jitter at its top here)


def test_backoff_jitter_stays_between_half_and_full_step():
    def always_503(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    for r in (0.0, 0.99):
        c = client("https://payer.example.org", transport=httpx.MockTransport(always_503), max_attempts=5,
                   backoff=1.0, max_backoff=4.0, rng=lambda r=r: r)
        with pytest.raises(PasUnavailable):
            c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))
        steps = [1, 2, 4, 4]
        assert all(s / 2 <= got <= s for s, got in zip(steps, c.sleep, strict=True))


def test_retry_after_as_an_http_date():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            when = datetime.now(timezone.utc) + timedelta(seconds=30)
            return httpx.Response(503, headers={"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")})
        return httpx.Response(200, json=fixture("valid_pa_response_bundle.json"))

    c = client("https://payer.example.org", transport=httpx.MockTransport(handler))
    assert c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS)).approved
    assert 25 <= c.sleep[0] <= 31


def test_a_response_for_another_submission_is_refused():
    answer = fixture("valid_pa_response_bundle.json")
    answer["identifier"] = {"system": SUBMISSION_SYSTEM, "value": "someone-else"}
    c = client("https://payer.example.org", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=answer)))
    with pytest.raises(PasMismatch):
        c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))


def test_a_2xx_that_is_not_json_is_an_error_not_a_retry():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, content=b"<html>maintenance</html>")

    c = client("https://payer.example.org", transport=httpx.MockTransport(handler))
    with pytest.raises(PasResponseError):
        c.submit(build_pas_bundle(pas_request(), idempotency_key=KEY, timestamp=TS))
    assert calls == [1]


def test_client_settings_are_checked():
    with pytest.raises(ValueError):
        PasClient("ftp://payer", TOKEN)
    with pytest.raises(ValueError):
        PasClient("https://payer", TOKEN, max_attempts=0)
    assert TOKEN not in repr(PasClient("https://payer", TOKEN))


def test_review_action_extension_url_is_the_igs():
    assert EXT_REVIEW_ACTION == fixture("valid_pa_response_bundle.json")["entry"][0]["resource"]["item"][0][
        "adjudication"][0]["extension"][0]["url"]

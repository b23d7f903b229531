"""The PAS payer simulator, driven with plain HTTP and the real Da Vinci PAS example bundle.

These tests read the simulator's answers by hand (and check them against fhir.resources' R4B
models), not through ``retroauth.channels.pas``: the simulator must stand on its own.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from retroauth.payer_sim import ConfigError, PayerSimulator, load_config, run_simulator
from tests.conftest import PAS, ROOT

REVIEW_ACTION = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-reviewAction"
REVIEW_ACTION_CODE = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-reviewActionCode"
FIXTURE_KEY = "A12345"  # Bundle.identifier of the conformant example
FIXTURE_CLAIM_ID = "111099"  # its Claim.identifier
FIXTURE_MEMBER = "12345678901"
FIXTURE_SERVICE = "3"  # its item's productOrService (X12 1365 "Consultation")
HEADERS = {"Content-Type": "application/fhir+json"}
HTTP = httpx.Client(timeout=5)  # one client: making one per call costs ~0.1 s (TLS context)


@pytest.fixture
def request_bundle() -> dict:
    return json.loads((PAS / "conformant_pas_bundle_v110.json").read_text())


@pytest.fixture
def sim_factory():
    started: list[PayerSimulator] = []

    def start(config: dict | None = None) -> PayerSimulator:
        server, _ = run_simulator(config or {})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def post(server: PayerSimulator, op: str, bundle: dict, token: str | None = None, timeout: float = 5) -> httpx.Response:
    headers = dict(HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return HTTP.post(f"{server.url}/Claim/${op}", content=json.dumps(bundle), headers=headers, timeout=timeout)


def stats(server: PayerSimulator) -> dict:
    return HTTP.get(f"{server.url}/_sim/stats").json()


def review(resp: httpx.Response) -> tuple[dict, list[dict]]:
    """The ClaimResponse and, per item, {code, number, reasons} read straight from the JSON."""
    bundle = resp.json()
    Bundle.model_validate(bundle)  # a valid FHIR Bundle
    assert bundle["type"] == "collection"
    cr = bundle["entry"][0]["resource"]
    assert cr["resourceType"] == "ClaimResponse" and cr["use"] == "preauthorization"
    out = []
    for item in cr["item"]:
        (action,) = [e for adj in item["adjudication"] for e in adj.get("extension", []) if e["url"] == REVIEW_ACTION]
        parts = action["extension"]
        out.append({
            "sequence": item["itemSequence"],
            "code": [p["valueCodeableConcept"]["coding"][0]["code"] for p in parts if p["url"] == REVIEW_ACTION_CODE][0],
            "number": next((p["valueString"] for p in parts if p["url"] == "number"), None),
            "reasons": [p["valueCodeableConcept"]["coding"][0]["code"] for p in parts if p["url"] == "reasonCode"],
        })
    return cr, out


def inquiry_for(bundle: dict) -> dict:
    """A query-by-example bundle: its own transaction id, the original Claim's identifier."""
    inq = copy.deepcopy(bundle)
    inq["identifier"] = {"system": "urn:example:inquiry", "value": "INQ-1"}
    return inq


def test_binds_loopback_by_default(sim_factory):
    server = sim_factory()
    assert server.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


def test_approves_with_a_number_derived_from_the_key(sim_factory, request_bundle):
    server = sim_factory({"default": {"action": "approve"}})
    resp = post(server, "submit", request_bundle)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/fhir+json")
    cr, items = review(resp)
    assert [i["code"] for i in items] == ["A1"]
    number = items[0]["number"]
    assert number and cr["preAuthRef"] == number and cr["outcome"] == "complete"
    # The response echoes the request: Claim identifier, Bundle identifier, referenced parties.
    assert cr["identifier"][0]["value"] == FIXTURE_CLAIM_ID
    assert resp.json()["identifier"]["value"] == FIXTURE_KEY
    assert cr["patient"] == request_bundle["entry"][0]["resource"]["patient"]
    assert {e["resource"]["resourceType"] for e in resp.json()["entry"][1:]} == {"Patient", "Organization"}
    # Deterministic: another simulator gives the same key the same number.
    other = sim_factory({"default": {"action": "approve"}})
    assert review(post(other, "submit", request_bundle))[1][0]["number"] == number
    changed = copy.deepcopy(request_bundle)
    changed["identifier"]["value"] = "B99"
    assert review(post(other, "submit", changed))[1][0]["number"] != number


def test_denies_with_reason_codes(sim_factory, request_bundle):
    server = sim_factory({"rules": [{"match": {"code": FIXTURE_SERVICE}, "action": "deny", "reasons": ["T1", "0U"]}]})
    cr, items = review(post(server, "submit", request_bundle))
    assert items == [{"sequence": 1, "code": "A3", "number": None, "reasons": ["T1", "0U"]}]
    assert "preAuthRef" not in cr
    assert stats(server)["decisions"] == {FIXTURE_KEY: "A3"}


def test_rules_match_by_member_and_fall_back_to_the_default(sim_factory, request_bundle):
    server = sim_factory({
        "default": {"action": "deny"},
        "rules": [{"match": {"code": "99999"}, "action": "approve"},
                  {"match": {"member_id": FIXTURE_MEMBER}, "action": "pend"}],
    })
    assert review(post(server, "submit", request_bundle))[1][0]["code"] == "A4"
    other = copy.deepcopy(request_bundle)
    other["identifier"]["value"] = "OTHER"
    other["entry"][4]["resource"]["identifier"][0]["value"] = "00000000000"
    assert review(post(server, "submit", other))[1][0]["code"] == "A3"


def test_pend_then_decide_after_n_inquiries(sim_factory, request_bundle):
    server = sim_factory({"default": {"action": "pend", "inquiries": 2, "then": "approve"}})
    cr, items = review(post(server, "submit", request_bundle))
    assert items[0]["code"] == "A4" and cr["outcome"] == "queued" and items[0]["number"] is None
    first = post(server, "inquire", inquiry_for(request_bundle))
    assert review(first)[1][0]["code"] == "A4"
    cr, items = review(post(server, "inquire", inquiry_for(request_bundle)))
    assert items[0]["code"] == "A1" and items[0]["number"] and cr["preAuthRef"] == items[0]["number"]
    assert cr["identifier"][0]["value"] == FIXTURE_CLAIM_ID
    s = stats(server)
    assert s["inquiries"] == {FIXTURE_KEY: 2} and s["decisions"] == {FIXTURE_KEY: "A1"}
    assert s["submissions"] == {FIXTURE_KEY: 1}


def test_pend_then_deny_with_reasons(sim_factory, request_bundle):
    server = sim_factory({"default": {"action": "pend", "inquiries": 1, "then": "deny", "then_reasons": ["T1"]}})
    post(server, "submit", request_bundle)
    _, items = review(post(server, "inquire", inquiry_for(request_bundle)))
    assert items[0]["code"] == "A3" and items[0]["reasons"] == ["T1"]


def test_inquiry_for_an_unknown_request_or_another_member_is_not_found(sim_factory, request_bundle):
    server = sim_factory()
    resp = post(server, "inquire", inquiry_for(request_bundle))
    assert resp.status_code == 404 and resp.json()["issue"][0]["code"] == "not-found"
    post(server, "submit", request_bundle)
    wrong_member = inquiry_for(request_bundle)
    wrong_member["entry"][4]["resource"]["identifier"][0]["value"] = "00000000000"
    assert post(server, "inquire", wrong_member).status_code == 404


def test_429_with_retry_after_then_answers(sim_factory, request_bundle):
    server = sim_factory({"default": {"faults": [{"status": 429, "retry_after": 2}, {"status": 500}]}})
    first = post(server, "submit", request_bundle)
    assert first.status_code == 429 and first.headers["Retry-After"] == "2"
    assert first.json()["issue"][0]["code"] == "throttled"
    second = post(server, "submit", request_bundle)
    assert second.status_code == 500 and second.json()["resourceType"] == "OperationOutcome"
    assert post(server, "submit", request_bundle).status_code == 200
    s = stats(server)
    assert s["calls"] == {FIXTURE_KEY: 3} and s["faults"] == {FIXTURE_KEY: 2}
    assert s["submissions"] == {FIXTURE_KEY: 1}  # the failed calls recorded nothing


def test_answers_slowly(sim_factory, request_bundle):
    server = sim_factory({"default": {"delay": 0.3}})
    started = time.monotonic()
    assert post(server, "submit", request_bundle).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_a_slow_answer_is_recorded_even_when_the_client_gave_up(sim_factory, request_bundle):
    server = sim_factory({"default": {"faults": [{"delay": 1.0}]}})
    with pytest.raises(httpx.ReadTimeout):
        post(server, "submit", request_bundle, timeout=0.2)
    assert post(server, "submit", request_bundle).status_code == 200
    s = stats(server)
    assert s["submissions"] == {FIXTURE_KEY: 1} and s["repeats"] == {FIXTURE_KEY: 1}


def test_a_dropped_answer_is_recorded(sim_factory, request_bundle):
    server = sim_factory({"default": {"faults": [{"drop": True}]}})
    with pytest.raises(httpx.RemoteProtocolError):
        post(server, "submit", request_bundle)
    assert post(server, "submit", request_bundle).status_code == 200
    assert stats(server)["submissions"] == {FIXTURE_KEY: 1}


def test_a_repeated_key_is_one_submission_with_the_same_answer(sim_factory, request_bundle):
    server = sim_factory()
    first = post(server, "submit", request_bundle)
    second = post(server, "submit", request_bundle)
    assert first.content == second.content
    s = stats(server)
    assert s["submissions"] == {FIXTURE_KEY: 1} and s["repeats"] == {FIXTURE_KEY: 1}
    assert s["total_requests"] == 2
    other = copy.deepcopy(request_bundle)
    other["identifier"]["value"] = "A12346"
    post(server, "submit", other)
    assert stats(server)["submissions"] == {FIXTURE_KEY: 1, "A12346": 1}


def test_token_required_when_configured(sim_factory, request_bundle):
    server = sim_factory({"token": "s3cret"})
    missing = post(server, "submit", request_bundle)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["issue"][0]["code"] == "login"
    assert post(server, "submit", request_bundle, token="wrong").status_code == 401
    assert post(server, "inquire", inquiry_for(request_bundle)).status_code == 401
    assert post(server, "submit", request_bundle, token="s3cret").status_code == 200
    s = stats(server)
    assert s["requests"]["unauthorized"] == 3 and s["submissions"] == {FIXTURE_KEY: 1}


def test_rejects_the_nonconformant_bundle(sim_factory):
    server = sim_factory()
    bad = json.loads((PAS / "nonconformant_pas_bundle_v110.json").read_text())
    resp = post(server, "submit", bad)
    assert resp.status_code == 400
    issues = resp.json()["issue"]
    assert {"code": "required", "expression": ["Bundle.entry"], "severity": "error"} in issues
    not_json = HTTP.post(f"{server.url}/Claim/$submit", content=b"{nope", headers=HEADERS)
    assert not_json.status_code == 400
    xml = HTTP.post(f"{server.url}/Claim/$submit", content=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml"})
    assert xml.status_code == 415
    assert stats(server)["submissions"] == {}


def test_a_claim_that_is_not_a_preauthorization_is_rejected(sim_factory, request_bundle):
    server = sim_factory()
    request_bundle["entry"][0]["resource"]["use"] = "claim"
    resp = post(server, "submit", request_bundle)
    assert resp.status_code == 400 and resp.json()["issue"][0]["expression"] == ["Claim.use"]


def test_reject_action_answers_a_claim_response_in_error(sim_factory, request_bundle):
    server = sim_factory({"default": {"action": "reject", "errors": ["15", "57"]}})
    resp = post(server, "submit", request_bundle)
    cr = resp.json()["entry"][0]["resource"]
    assert cr["outcome"] == "error" and [e["code"]["coding"][0]["code"] for e in cr["error"]] == ["15", "57"]


def test_unknown_paths_and_reset(sim_factory, request_bundle):
    server = sim_factory()
    stats_resp = HTTP.get(f"{server.url}/_sim/stats")
    assert stats_resp.headers.get_list("content-type") == ["application/json"]
    assert HTTP.post(f"{server.url}/Claim", content=b"{}", headers=HEADERS).status_code == 404
    assert HTTP.get(f"{server.url}/metadata").json()["resourceType"] == "CapabilityStatement"
    post(server, "submit", request_bundle)
    assert HTTP.post(f"{server.url}/_sim/reset").status_code == 204
    assert stats(server)["submissions"] == {} and stats(server)["total_requests"] == 0


def test_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config({"rules": [{"match": {"code": "1"}, "acton": "deny"}]})
    with pytest.raises(ConfigError, match="action"):
        load_config({"default": {"action": "maybe"}})
    with pytest.raises(ConfigError, match="match"):
        load_config({"rules": [{"action": "deny"}]})
    with pytest.raises(ConfigError, match="faults"):
        load_config({"default": {"faults": [{"status": 200}]}})
    path = tmp_path / "sim.yaml"
    path.write_text("token: t\nrules:\n  - match: {code: '64490'}\n    action: deny\n    reasons: [T1]\n")
    cfg = load_config(path)
    assert cfg["token"] == "t" and cfg["rules"][0]["match"]["code"] == ["64490"]
    assert cfg["default"]["action"] == "approve"


def test_command_line(tmp_path, request_bundle):
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"default": {"action": "deny", "reasons": ["T1"]}}))
    proc = subprocess.Popen([sys.executable, "-m", "retroauth.payer_sim", "--port", "0", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "payer simulator on http://127.0.0.1:" in line
        base = line.split(" on ", 1)[1].split(" ", 1)[0]
        resp = HTTP.post(f"{base}/Claim/$submit", content=json.dumps(request_bundle), headers=HEADERS, timeout=5)
        assert resp.status_code == 200
        assert resp.json()["entry"][0]["resource"]["item"][0]["adjudication"][0]["extension"][0]["extension"][0][
            "valueCodeableConcept"]["coding"][0]["code"] == "A3"
    finally:
        proc.terminate()
        proc.wait(timeout=10)

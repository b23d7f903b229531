"""A payer that speaks Da Vinci PAS over HTTP, for tests and demos: ``python -m retroauth.payer_sim``.

It implements ``POST /Claim/$submit`` and ``POST /Claim/$inquire`` and answers with PAS response
Bundles (a ClaimResponse whose items carry the ``reviewAction`` extension: X12 306 code, the
certification number, X12 886 reason codes), decided deterministically by a configuration:

    {
      "token": "s3cret",                 # bearer token required on the PAS endpoints (optional)
      "auth_prefix": "SIM",              # prefix of the generated authorization numbers
      "default": {"action": "approve"},
      "rules": [                         # the first rule whose "match" holds decides the request
        {"match": {"code": "64490"}, "action": "deny", "reasons": ["T1"]},
        {"match": {"member_id": "M-42"}, "action": "pend", "inquiries": 2, "then": "approve"},
        {"match": {"code": ["22551", "22552"]}, "action": "approve",
         "faults": [{"status": 500}, {"status": 429, "retry_after": 1}, {"delay": 2.0}, {"drop": true}]},
        {"match": {"code": "63650"}, "action": "reject", "errors": ["15"]},
        {"match": {"key_prefix": "ra-7-"}, "action": "deny"}  # one submission, by its idempotency key
      ]
    }

Actions: ``approve`` (A1, authorization number derived from the idempotency key), ``deny`` (A3 with
``reasons``; a later request whose ``Claim.related`` names the denied one is its appeal, decided by the
rule's ``appeal`` action, approve by default, with ``appeal_reasons``), ``pend`` (A4; the ``inquiries``-th inquiry gets the ``then`` decision, approve or deny,
with ``then_reasons``), ``reject`` (a ClaimResponse in error with X12 901 ``errors``). ``faults``
shape the first calls of a submission key, one per call: ``status`` answers that HTTP status
(429 and 503 with ``retry_after``) without recording anything; ``delay`` records the submission,
then answers late; ``drop`` records it and closes the connection without an answer (a lost
response). ``inquire_faults`` do the same for inquiries; ``delay`` on a rule slows every answer.

Submissions are keyed by ``Bundle.identifier.value``: a repeat with the same key gets the first
response again, byte for byte, and is not a new request. ``GET /_sim/stats`` reports requests,
submissions and repeats per key, inquiries and current decisions; ``POST /_sim/reset`` forgets all.

It parses requests with plain ``json`` on purpose: it shares no code with
``retroauth.channels.pas``, so a misreading there cannot hide behind the same misreading here.
It binds 127.0.0.1 by default and logs request lines only, never bodies or tokens.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SD = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
REVIEW_ACTION = SD + "extension-reviewAction"
REVIEW_ACTION_CODE = SD + "extension-reviewActionCode"
ACTION_SYSTEM = "https://codesystem.x12.org/005010/306"
REASON_SYSTEM = "https://codesystem.x12.org/external/886"
REJECT_SYSTEM = "https://codesystem.x12.org/005010/901"
ADJUDICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/adjudication"
DISPLAYS = {"A1": "Certified in total", "A3": "Not Certified", "A4": "Pended"}
ACTIONS = {"approve": "A1", "deny": "A3", "pend": "A4", "reject": "ERROR"}
RULE_KEYS = {"match", "action", "reasons", "inquiries", "then", "then_reasons", "faults", "inquire_faults",
             "delay", "errors", "appeal", "appeal_reasons"}
MATCH_KEYS = {"code", "system", "member_id", "key_prefix"}
FAULT_KEYS = {"status", "retry_after", "delay", "drop"}
MAX_BODY = 20 * 1024 * 1024
FHIR_JSON = "application/fhir+json"
NAMESPACE = uuid.UUID("0b7cbb7e-3c55-4f0e-9d0a-5b0d6f4c2a11")


class ConfigError(ValueError):
    pass


# --- configuration -----------------------------------------------------------------------------------


def _check_faults(where: str, faults: Any) -> list[dict[str, Any]]:
    if not isinstance(faults, list):
        raise ConfigError(f"{where}: must be a list")
    out = []
    for i, f in enumerate(faults):
        if not isinstance(f, dict) or not f or set(f) - FAULT_KEYS:
            raise ConfigError(f"{where}[{i}]: a fault has status (+retry_after), delay or drop")
        if "status" in f and not (isinstance(f["status"], int) and 400 <= f["status"] <= 599):
            raise ConfigError(f"{where}[{i}].status: an HTTP error status")
        if "delay" in f and not (isinstance(f["delay"], (int, float)) and f["delay"] >= 0):
            raise ConfigError(f"{where}[{i}].delay: seconds >= 0")
        out.append(dict(f))
    return out


def _check_rule(where: str, rule: Any, *, default: bool) -> dict[str, Any]:
    if not isinstance(rule, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = set(rule) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    r = {"action": "approve", "reasons": [], "inquiries": 1, "then": "approve", "then_reasons": [], "faults": [],
         "inquire_faults": [], "delay": 0.0, "errors": ["15"], "match": {}, "appeal": "approve",
         "appeal_reasons": []} | rule
    if r["action"] not in ACTIONS:
        raise ConfigError(f"{where}.action: one of {sorted(ACTIONS)}")
    if r["appeal"] not in ("approve", "deny"):
        raise ConfigError(f"{where}.appeal: approve or deny")
    if r["then"] not in ("approve", "deny"):
        raise ConfigError(f"{where}.then: approve or deny")
    if not (isinstance(r["inquiries"], int) and r["inquiries"] >= 1):
        raise ConfigError(f"{where}.inquiries: an integer >= 1")
    for k in ("reasons", "then_reasons", "errors", "appeal_reasons"):
        if not (isinstance(r[k], list) and all(isinstance(x, str) for x in r[k])):
            raise ConfigError(f"{where}.{k}: a list of codes")
    r["faults"] = _check_faults(f"{where}.faults", r["faults"])
    r["inquire_faults"] = _check_faults(f"{where}.inquire_faults", r["inquire_faults"])
    if not (isinstance(r["delay"], (int, float)) and r["delay"] >= 0):
        raise ConfigError(f"{where}.delay: seconds >= 0")
    match = r["match"]
    if not isinstance(match, dict) or set(match) - MATCH_KEYS:
        raise ConfigError(f"{where}.match: keys among {sorted(MATCH_KEYS)}")
    if not default and not match:
        raise ConfigError(f"{where}.match: required (use 'default' for the catch-all)")
    for k in ("code", "member_id", "key_prefix"):
        if k in match:
            v = match[k]
            match[k] = [v] if isinstance(v, str) else v
            if not (isinstance(match[k], list) and all(isinstance(x, str) for x in match[k])):
                raise ConfigError(f"{where}.match.{k}: a code or a list of codes")
    return r


def load_config(source: Any) -> dict[str, Any]:
    """A checked configuration from a dict, or a JSON/YAML file path. Typos fail here, not silently."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only the file form needs it

            source = yaml.safe_load(text) or {}
        else:
            source = json.loads(text)
    if source is None:
        source = {}
    if not isinstance(source, dict):
        raise ConfigError("config: must be a mapping")
    unknown = set(source) - {"token", "auth_prefix", "default", "rules"}
    if unknown:
        raise ConfigError(f"config: unknown keys {sorted(unknown)}")
    token = source.get("token")
    if token is not None and not (isinstance(token, str) and token):
        raise ConfigError("config.token: a non-empty string or null")
    rules = source.get("rules") or []
    if not isinstance(rules, list):
        raise ConfigError("config.rules: must be a list")
    return {
        "token": token,
        "auth_prefix": str(source.get("auth_prefix", "SIM")),
        "default": _check_rule("config.default", copy.deepcopy(source.get("default") or {}), default=True),
        "rules": [_check_rule(f"config.rules[{i}]", copy.deepcopy(r), default=False) for i, r in enumerate(rules)],
    }


# --- reading requests (plain json, on purpose) -----------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, issues: list[tuple[str, str]]):
        self.status = status
        self.issues = issues  # (FHIR issue code, expression)
        super().__init__(", ".join(f"{c} at {e}" for c, e in issues))


def _unwrap(body: Any) -> Any:
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        for p in body.get("parameter") or []:
            if isinstance(p, dict) and isinstance(p.get("resource"), dict):
                return p["resource"]
        raise BadRequest(400, [("required", "Parameters.parameter.resource")])
    return body


def _read_request(body: Any, *, inquiry: bool) -> dict[str, Any]:
    """The parts of a PAS request (or inquiry) Bundle the simulator needs; 400 issues otherwise."""
    body = _unwrap(body)
    issues: list[tuple[str, str]] = []
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise BadRequest(400, [("structure", "Bundle")])
    if body.get("type") != "collection":
        issues.append(("value", "Bundle.type"))
    ident = body.get("identifier") if isinstance(body.get("identifier"), dict) else {}
    if not ident.get("value"):
        issues.append(("required", "Bundle.identifier"))
    if not body.get("timestamp"):
        issues.append(("required", "Bundle.timestamp"))
    entries = [e for e in body.get("entry") or [] if isinstance(e, dict)]
    if not entries:
        issues.append(("required", "Bundle.entry"))
        raise BadRequest(400, issues)
    claim = entries[0].get("resource")
    if not isinstance(claim, dict) or claim.get("resourceType") != "Claim":
        issues.append(("required", "Bundle.entry[0].resource (Claim)"))
        raise BadRequest(400, issues)
    if claim.get("use") != "preauthorization":
        issues.append(("value", "Claim.use"))
    if not inquiry:
        if claim.get("status") != "active":
            issues.append(("value", "Claim.status"))
        if not claim.get("item"):
            issues.append(("required", "Claim.item"))
    for name in ("patient", "insurer", "provider"):
        if not isinstance(claim.get(name), dict):
            issues.append(("required", f"Claim.{name}"))
    if issues:
        raise BadRequest(400, issues)

    def find(ref: Any) -> dict[str, Any] | None:
        target = ref.get("reference") if isinstance(ref, dict) else None
        if not target:
            return None
        for e in entries:
            res = e.get("resource") or {}
            if e.get("fullUrl") == target or (e.get("fullUrl") or "").endswith("/" + target) or \
                    f"{res.get('resourceType')}/{res.get('id')}" == target:
                return e
        return None

    codes = []
    for it in claim.get("item") or []:
        for c in (it.get("productOrService") or {}).get("coding") or []:
            if c.get("code"):
                codes.append((c.get("system"), c["code"]))
    member_ids = []
    for ins in claim.get("insurance") or []:
        cov = find(ins.get("coverage"))
        if cov and (cov.get("resource") or {}).get("subscriberId"):
            member_ids.append(cov["resource"]["subscriberId"])
    patient = find(claim.get("patient"))
    for i in ((patient or {}).get("resource") or {}).get("identifier") or []:
        if isinstance(i, dict) and i.get("value"):
            member_ids.append(i["value"])
    claim_idents = [i for i in claim.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    related = [((r.get("claim") or {}).get("identifier") or {}).get("value") for r in claim.get("related") or []
               if isinstance(r, dict)]
    copied = [e for e in (patient, find(claim.get("insurer")), find(claim.get("provider"))) if e]
    return {
        "bundle_identifier": {k: ident[k] for k in ("system", "value") if ident.get(k)},
        "key": ident.get("value"),
        "claim": claim,
        "claim_identifiers": claim_idents,
        "related": [k for k in related if isinstance(k, str) and k],
        "codes": codes,
        "member_ids": member_ids,
        "items": [{"sequence": it.get("sequence"),
                   "start": it.get("servicedDate") or (it.get("servicedPeriod") or {}).get("start"),
                   "end": it.get("servicedDate") or (it.get("servicedPeriod") or {}).get("end")}
                  for it in claim.get("item") or []],
        "entries": copied,
    }


# --- deciding and answering ---------------------------------------------------------------------------


def rule_for(config: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    for rule in config["rules"]:
        m = rule["match"]
        if "code" in m and not any(code in m["code"] and (not m.get("system") or system == m["system"])
                                   for system, code in req["codes"]):
            continue
        if "member_id" in m and not set(m["member_id"]) & set(req["member_ids"]):
            continue
        if "key_prefix" in m and not any((req.get("key") or "").startswith(p) for p in m["key_prefix"]):
            continue
        return rule
    return config["default"]


def _auth_number(prefix: str, key: str) -> str:
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:10].upper()


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(parts)))


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


def _response(sub: dict[str, Any], req: dict[str, Any], *, inquiry: bool, n: int) -> bytes:
    """A PAS response Bundle for the submission's current state, shaped like the IG's examples."""
    code, number, reasons = sub["code"], sub["number"], sub["reasons"]
    claim = sub["claim"]
    cr_id = _uid(sub["key"], "inquiry" if inquiry else "submit", code, str(n))
    outcome = "queued" if code == "A4" else ("error" if code == "ERROR" else "complete")
    cr: dict[str, Any] = {
        "resourceType": "ClaimResponse",
        "id": cr_id,
        "meta": {"profile": [SD + ("profile-claiminquiryresponse" if inquiry else "profile-claimresponse")]},
        "identifier": copy.deepcopy(sub["claim_identifiers"]),
        "status": "active",
        "type": copy.deepcopy(claim.get("type") or _cc("http://terminology.hl7.org/CodeSystem/claim-type",
                                                        "professional")),
        "use": "preauthorization",
        "patient": copy.deepcopy(claim["patient"]),
        "created": _now(),
        "insurer": copy.deepcopy(claim["insurer"]),
        "requestor": copy.deepcopy(claim["provider"]),
        "outcome": outcome,
    }
    if sub["claim_identifiers"]:
        cr["request"] = {"identifier": copy.deepcopy(sub["claim_identifiers"][0])}
    if code == "A1":
        cr["preAuthRef"] = number
    if code == "ERROR":
        cr["error"] = [{
            "extension": [{"url": SD + "extension-errorElement", "valueString": "2000F"}],
            "code": _cc(REJECT_SYSTEM, e),
        } for e in sub["errors"]]
    else:
        items = []
        for it in sub["items"]:
            review: list[dict[str, Any]] = []
            if number:
                review.append({"url": "number", "valueString": number})
            review.append({"url": REVIEW_ACTION_CODE,
                           "valueCodeableConcept": _cc(ACTION_SYSTEM, code, DISPLAYS.get(code))})
            review += [{"url": "reasonCode", "valueCodeableConcept": _cc(REASON_SYSTEM, r)} for r in reasons]
            exts = []
            if code == "A1" and it["start"]:
                exts.append({"url": SD + "extension-itemPreAuthIssueDate", "valueDate": _now()[:10]})
                exts.append({"url": SD + "extension-itemPreAuthPeriod",
                             "valuePeriod": {"start": it["start"], "end": it["end"] or it["start"]}})
            item: dict[str, Any] = {}
            if exts:
                item["extension"] = exts
            item["itemSequence"] = it["sequence"] if isinstance(it["sequence"], int) else len(items) + 1
            item["adjudication"] = [{
                "extension": [{"extension": review, "url": REVIEW_ACTION}],
                "category": _cc(ADJUDICATION_SYSTEM, "submitted"),
            }]
            items.append(item)
        cr["item"] = items
    bundle = {
        "resourceType": "Bundle",
        "id": _uid(cr_id, "bundle"),
        "meta": {"profile": [SD + ("profile-pas-inquiry-response-bundle" if inquiry else "profile-pas-response-bundle")]},
        "identifier": copy.deepcopy(req["bundle_identifier"]),
        "type": "collection",
        "timestamp": _now(),
        "entry": [{"fullUrl": f"urn:uuid:{cr_id}", "resource": cr}, *copy.deepcopy(req["entries"])],
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def _outcome(issues: list[tuple[str, str]], severity: str = "error") -> bytes:
    return json.dumps({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "expression": [expr]} for code, expr in issues],
    }).encode()


# --- the server -----------------------------------------------------------------------------------------


class PayerSimulator(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: Any, host: str = "127.0.0.1", port: int = 0):
        self.config = load_config(config)
        self.lock = threading.Lock()
        self._reset()
        super().__init__((host, port), _Handler)

    def _reset(self) -> None:
        self.submissions: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, dict[str, int]] = {k: {} for k in (
            "submissions", "repeats", "calls", "inquiries", "inquiry_calls", "faults", "appeals")}
        self.requests = {"total": 0, "submit": 0, "inquire": 0, "unauthorized": 0, "invalid": 0}

    def reset(self) -> None:
        with self.lock:
            self._reset()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total_requests": self.requests["total"],
                "requests": dict(self.requests),
                **{k: dict(v) for k, v in self.counts.items()},
                "decisions": {k: s["code"] for k, s in self.submissions.items()},
            }

    def bump(self, table: str, key: str) -> int:
        counts = self.counts[table]
        counts[key] = counts.get(key, 0) + 1
        return counts[key]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: PayerSimulator
    protocol_version = "HTTP/1.0"  # one request per connection: simple, and a drop is a real drop

    def log_message(self, format: str, *args: Any) -> None:  # request line and status only
        logger.debug("payer_sim %s - " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            headers = {"Content-Type": FHIR_JSON if body[:1] == b"{" else "text/plain", **(headers or {})}
            headers["Content-Length"] = str(len(body))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            pass

    def _authorized(self) -> bool:
        token = self.server.config["token"]
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_sim/stats":
            self._send(200, json.dumps(self.server.stats()).encode(), {"Content-Type": "application/json"})
        elif path == "/metadata":
            self._send(200, json.dumps({"resourceType": "CapabilityStatement", "status": "active",
                                        "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                                        "date": "2026-01-01"}).encode())
        else:
            self._send(404, _outcome([("not-found", path)]))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_sim/reset":
            self.server.reset()
            self._send(204, b"")
            return
        ops = {"/Claim/$submit": "submit", "/Claim/%24submit": "submit",
               "/Claim/$inquire": "inquire", "/Claim/%24inquire": "inquire"}
        op = ops.get(path)
        if op is None:
            self._send(404, _outcome([("not-supported", path)]))
            return
        with self.server.lock:
            self.server.requests["total"] += 1
            self.server.requests[op] += 1
        if not self._authorized():
            with self.server.lock:
                self.server.requests["unauthorized"] += 1
            self._send(401, _outcome([("login", "Authorization")]), {"WWW-Authenticate": 'Bearer realm="payer_sim"'})
            return
        ctype = (self.headers.get("Content-Type") or FHIR_JSON).split(";")[0].strip().lower()
        if ctype not in (FHIR_JSON, "application/json"):
            with self.server.lock:
                self.server.requests["invalid"] += 1
            self._send(415, _outcome([("not-supported", "Content-Type")]))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                raise BadRequest(413 if length > MAX_BODY else 400, [("structure", "body")])
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                raise BadRequest(400, [("structure", "body")]) from None
            req = _read_request(body, inquiry=op == "inquire")
        except BadRequest as exc:
            with self.server.lock:
                self.server.requests["invalid"] += 1
            self._send(exc.status, _outcome(exc.issues))
            return
        if op == "submit":
            self._submit(req)
        else:
            self._inquire(req)

    def _fault(self, fault: dict[str, Any] | None) -> bool:
        """Answer a status fault; True when the call ends here (nothing recorded)."""
        if fault and "status" in fault:
            headers = {}
            if "retry_after" in fault:
                headers["Retry-After"] = str(int(fault["retry_after"]))
            code = "throttled" if fault["status"] == 429 else "transient"
            self._send(fault["status"], _outcome([(code, "server")]), headers)
            return True
        return False

    def _finish(self, fault: dict[str, Any] | None, rule: dict[str, Any], payload: bytes) -> None:
        if fault and fault.get("drop"):
            self.close_connection = True  # recorded, but the answer is lost
            return
        pause = (fault or {}).get("delay", 0) + rule["delay"]
        if pause:
            time.sleep(pause)
        self._send(200, payload)

    def _submit(self, req: dict[str, Any]) -> None:
        srv, key = self.server, req["key"]
        with srv.lock:
            sub = srv.submissions.get(key)
            rule = sub["rule"] if sub else rule_for(srv.config, req)
            n = srv.bump("calls", key)
            fault = rule["faults"][n - 1] if n <= len(rule["faults"]) else None
            if fault:
                srv.bump("faults", key)
            if fault and "status" in fault:
                pass  # answered below, outside the lock, with nothing recorded
            elif sub is not None:
                srv.bump("repeats", key)
                payload = sub["first_response"]
            else:
                srv.bump("submissions", key)
                code = ACTIONS[rule["action"]]
                appealed = next((srv.submissions[k] for k in req["related"] if k in srv.submissions), None)
                if appealed is not None and appealed["code"] == "A3":  # an appeal of a denial: its own decision
                    srv.bump("appeals", appealed["key"])
                    code = ACTIONS[rule["appeal"]]
                    rule = rule | {"reasons": rule["appeal_reasons"]}
                sub = {
                    "key": key, "rule": rule, "claim": req["claim"], "claim_identifiers": req["claim_identifiers"],
                    "member_ids": req["member_ids"], "items": req["items"], "code": code,
                    "number": _auth_number(srv.config["auth_prefix"], key) if code == "A1" else None,
                    "reasons": list(rule["reasons"]) if code == "A3" else [], "errors": rule["errors"],
                    "inquiries": 0,
                }
                payload = _response(sub, req, inquiry=False, n=0)
                sub["first_response"] = payload
                srv.submissions[key] = sub
        if self._fault(fault):
            return
        self._finish(fault, rule, payload)

    def _inquire(self, req: dict[str, Any]) -> None:
        srv = self.server
        claim_ids = {(i.get("system"), i["value"]) for i in req["claim_identifiers"]}
        with srv.lock:
            # The original request is named by its Claim.identifier (which may also be its Bundle key).
            sub = next((srv.submissions[v] for _, v in sorted(claim_ids, key=str) if v in srv.submissions), None) or \
                next((s for s in srv.submissions.values()
                      if claim_ids & {(i.get("system"), i["value"]) for i in s["claim_identifiers"]}), None)
            # Query by example: the member must match too, as a payer would check.
            if sub is not None and req["member_ids"] and sub["member_ids"] and \
                    not set(req["member_ids"]) & set(sub["member_ids"]):
                sub = None
            if sub is None:
                payload = None
            else:
                key, rule = sub["key"], sub["rule"]
                n = srv.bump("inquiry_calls", key)
                fault = rule["inquire_faults"][n - 1] if n <= len(rule["inquire_faults"]) else None
                if not (fault and "status" in fault):
                    count = srv.bump("inquiries", key)
                    sub["inquiries"] = count
                    if sub["code"] == "A4" and count >= rule["inquiries"]:
                        sub["code"] = ACTIONS[rule["then"]]
                        sub["number"] = _auth_number(srv.config["auth_prefix"], key) if sub["code"] == "A1" else None
                        sub["reasons"] = list(rule["then_reasons"]) if sub["code"] == "A3" else []
                    payload = _response(sub, req, inquiry=True, n=count)
        if sub is None:
            self._send(404, _outcome([("not-found", "Claim.identifier")]))
            return
        if self._fault(fault):
            return
        self._finish(fault, rule, payload)


def run_simulator(config: Any = None, host: str = "127.0.0.1", port: int = 0) -> tuple[PayerSimulator, threading.Thread]:
    """Start a simulator in a daemon thread; ``server.url`` is its base, ``server.stop()`` ends it."""
    server = PayerSimulator(config or {}, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="payer-sim", daemon=True)
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retroauth.payer_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--config", help="JSON or YAML configuration (default: approve everything)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = PayerSimulator(args.config or {}, args.host, args.port)
    except (ConfigError, OSError, ValueError) as exc:
        parser.error(str(exc))
    print(f"payer simulator on {server.url} (PAS base URL); stats at {server.url}/_sim/stats", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

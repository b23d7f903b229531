"""A clearinghouse and payer for X12 278 files, for tests and demos: ``python -m retroauth.x12_sim``.

Each pass (``process_outbound``) reads the request files under ``outbound/x12/278/<payer>/`` that it has not
read yet, decides each by the configuration of ``retroauth.payer_sim`` (``load_config``; the same rules, the
same matching by service code or member id, the same actions) and writes a 005010X217 278 response to
``inbound/x12/278/<payer>/<request file stem>-response-<n>.x12``:

- approve: HCR*A1 with a certification number derived from the trace (like the PAS simulator's), DTP*007;
- deny: HCR*A3 with the rule's first reason in HCR03 (an HCR holds one reason);
- pend: HCR*A4 now; the ``inquiries``-th later pass answers with ``then`` (approve or deny, ``then_reasons``);
- reject: AAA*N**<error>*C at the patient event for each of the rule's ``errors``, no HCR.
HTTP-only keys (``faults``, ``delay``, ``token``) and ``appeal`` (X12 278 has no appeal) are ignored.

Requests are counted per trace number (the patient event's TRN02): the first request file with a trace is its
submission, any other file (or a rewrite of the same file with other bytes) carrying it is a repeat and gets
the current decision again. The state (what was read, the decisions, the counts) is kept in storage at
``sim/x12_278/state.json``, so separate ``--once`` runs go on where the last one stopped.

It parses requests by splitting at the separators read from the ISA, on purpose: it shares no code with
``retroauth.x12``, so a misreading there cannot hide behind the same misreading here. Logs name storage keys
and counts, never file contents.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from retroauth.payer_sim import ACTIONS, rule_for, load_config  # the PAS simulator's rules, shared on purpose
from retroauth.storage import Storage, key, open_storage

logger = logging.getLogger(__name__)

OUTBOUND, INBOUND = "outbound/x12/278", "inbound/x12/278"
STATE_KEY = key("sim", "x12_278", "state.json")
CPT_URI = "http://www.ama-assn.org/go/cpt"  # what a PAS rule's "system" names (payer_sim matches on it)
HCPCS_URI = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
PAYER_COMPANY_ID = "9X12SIM000"  # TRN03 of the payer's own trace: "9" + a user-assigned id


class BadRequest(ValueError):
    """A request file the simulator cannot read (the message says what is missing, never a value)."""


@dataclass(frozen=True)
class Seps:
    element: str
    component: str
    repetition: str
    segment: str


def split_x12(text: str) -> tuple[Seps, list[list[str]]]:
    """Separators from the ISA (element: 4th character; component: ISA16; terminator: the next one) and
    the segments as lists of elements."""
    text = text.lstrip("\ufeff \t\r\n")
    if not text.startswith("ISA") or len(text) < 106:
        raise BadRequest("no ISA segment")
    element = text[3]
    parts = text.split(element, 16)
    if len(parts) < 17 or len(parts[16]) < 2:
        raise BadRequest("incomplete ISA segment")
    seps = Seps(element, parts[16][0], parts[11], parts[16][1])
    segments = [raw.strip("\r\n").split(element) for raw in text.split(seps.segment)]
    return seps, [s for s in segments if s != [""]]


def read_request(text: str) -> dict[str, Any]:
    """The parts of a 278 request the simulator needs (and echoes back)."""
    seps, segs = split_x12(text)
    isa = segs[0]
    req: dict[str, Any] = {"seps": seps, "sender": isa[6].strip(), "receiver": isa[8].strip(),
                           "sender_q": isa[5], "receiver_q": isa[7], "usage": isa[15],
                           "names": {}, "services": [], "codes": [], "member_ids": []}
    bht = next((s for s in segs if s[0] == "BHT"), None)
    if bht is None or len(bht) < 4 or bht[2] != "13":
        raise BadRequest("no BHT*0007*13 (not a 278 request)")
    req["reference"] = bht[3]
    level = None
    event: dict[str, Any] = {}
    for s in segs:
        if s[0] == "HL":
            level = s[3] if len(s) > 3 else None
            if level == "SS":
                req["services"].append({})
            continue
        if level in ("20", "21", "22") and s[0] == "NM1":
            req["names"][level] = s
            if level == "22" and len(s) > 9 and s[8] == "MI":
                req["member_ids"].append(s[9])
        target = event if level == "EV" else req["services"][-1] if level == "SS" else None
        if target is not None and s[0] in ("TRN", "UM", "DTP", "SV1", "SV2"):
            target.setdefault(s[0], s)
        if level == "SS" and s[0] in ("SV1", "SV2"):
            pos = 1 if s[0] == "SV1" else 2  # the HC:<code>:<modifiers> composite
            proc = s[pos].split(seps.component) if len(s) > pos else []
            if len(proc) > 1:
                req["codes"].append((CPT_URI if proc[1][:1].isdigit() else HCPCS_URI, proc[1]))
            if s[0] == "SV2":
                req["codes"].append((None, s[1]))
    trn = event.get("TRN")
    if not trn or len(trn) < 3 or not trn[2] or set(req["names"]) != {"20", "21", "22"}:
        raise BadRequest("no patient event trace or a missing payer, requester or subscriber level")
    req["trace"], req["company"], req["event"] = trn[2], trn[3] if len(trn) > 3 else "", event
    return req


# --- answering ------------------------------------------------------------------------------------------


def _present(*segments: list[str] | None) -> list[list[str]]:
    return [s for s in segments if s]


def certification_number(prefix: str, trace: str) -> str:
    return prefix + hashlib.sha256(trace.encode()).hexdigest()[:10].upper()


def write_response(req: dict[str, Any], decision: dict[str, Any], control: int, now: datetime) -> str:
    """A 005010X217 278 response to ``req`` with ``decision`` (code A1/A3/A4/AAA, number, reasons, errors)."""
    seps: Seps = req["seps"]
    code, ev = decision["code"], req["event"]
    hcr = (["HCR", "A1", decision["number"]] if code == "A1" else ["HCR", "A3", "", decision["reasons"][0]]
           if code == "A3" and decision["reasons"] else ["HCR", code])
    payer_trace = "SIM" + hashlib.sha256(req["trace"].encode()).hexdigest()[:12].upper()
    body: list[list[str]] = [
        ["HL", "1", "", "20", "1"], req["names"]["20"], ["HL", "2", "1", "21", "1"], req["names"]["21"],
        ["HL", "3", "2", "22", "1"], req["names"]["22"],
        ["HL", "4", "3", "EV", "1" if req["services"] and code != "AAA" else "0"],
        ["TRN", "2", req["trace"], req["company"]], ["TRN", "1", payer_trace, PAYER_COMPANY_ID],
    ]  # fmt: skip
    if code == "AAA":  # rejected: AAA03 the reason, AAA04 C "correct and resubmit"; no decision, no services
        body += [["AAA", "N", "", e, "C"] for e in decision["errors"] or ["15"]] + _present(ev.get("UM"), ev.get("DTP"))
    else:
        body += _present(ev.get("UM")) + [hcr, ["REF", "NT", payer_trace]] + _present(ev.get("DTP"))
        if code == "A1" and ev.get("DTP"):
            body.append(["DTP", "007", *ev["DTP"][2:4]])  # certified for the event's dates
        for n, svc in enumerate(req["services"], start=5):
            trn = ["TRN", "2", *svc["TRN"][2:4]] if svc.get("TRN") else None
            body += [["HL", str(n), "4", "SS", "0"], *_present(trn, svc.get("UM")), hcr,
                     *_present(svc.get("DTP"), svc.get("SV1"), svc.get("SV2"))]
    st = f"{control:04d}"
    segs = [
        ["ISA", "00", " " * 10, "00", " " * 10, req["receiver_q"], req["receiver"].ljust(15)[:15], req["sender_q"],
         req["sender"].ljust(15)[:15], now.strftime("%y%m%d"), now.strftime("%H%M"), seps.repetition, "00501",
         f"{control:09d}", "0", req["usage"], seps.component],
        ["GS", "HI", req["receiver"], req["sender"], now.strftime("%Y%m%d"), now.strftime("%H%M"), str(control), "X",
         "005010X217"],
        ["ST", "278", st, "005010X217"], ["BHT", "0007", "11", req["reference"], now.strftime("%Y%m%d"),
                                          now.strftime("%H%M")],
        *body,
    ]  # fmt: skip
    segs += [["SE", str(len(segs) - 1), st], ["GE", "1", str(control)], ["IEA", "1", f"{control:09d}"]]
    out = []
    for s in segs:
        s = list(s)
        while s[0] != "ISA" and len(s) > 1 and s[-1] == "":
            s.pop()  # no trailing empty elements
        out.append(seps.element.join(s) + seps.segment + "\n")
    return "".join(out)


# --- the passes ------------------------------------------------------------------------------------------


def _load_state(storage: Storage) -> dict[str, Any]:
    if storage.exists(STATE_KEY):
        return json.loads(storage.get(STATE_KEY))
    return {"passes": 0, "control": 0, "files": {}, "traces": {}, "submissions": {}, "repeats": {}}


def _decide(config: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    rule = rule_for(config, req)
    code = ACTIONS[rule["action"]]
    return {"code": "AAA" if code == "ERROR" else code, "reasons": list(rule["reasons"]) if code == "A3" else [],
            "errors": list(rule["errors"]), "then": rule["then"], "then_reasons": list(rule["then_reasons"]),
            "inquiries": rule["inquiries"], "waited": 0,
            "number": certification_number(config["auth_prefix"], req["trace"]) if code == "A1" else None}


def process_outbound(storage: Storage, config: Any) -> dict[str, Any]:
    """One pass: answer new request files and pended requests whose time has come; returns the stats
    (this pass: ``read``, ``answered``, ``invalid`` keys; so far: ``submissions`` and ``repeats`` per trace,
    ``decisions`` per trace, ``passes``)."""
    config = load_config(config)
    state = _load_state(storage)
    state["passes"] += 1
    now = datetime.now(timezone.utc)
    read, answered, invalid, fresh = 0, 0, [], set()

    def answer(file_key: str, req: dict[str, Any], decision: dict[str, Any]) -> None:
        nonlocal answered
        payer, name = file_key.split("/")[-2:]
        stem = name.rsplit(".", 1)[0]
        n = state["files"][file_key]["responses"] = state["files"][file_key]["responses"] + 1
        state["control"] += 1
        storage.put(key("inbound", "x12", "278", payer, f"{stem}-response-{n}.x12"),
                    write_response(req, decision, state["control"], now).encode("latin-1"),
                    content_type="application/edi-x12")
        answered += 1

    for file_key in storage.list(OUTBOUND):
        if file_key.count("/") != 4:  # outbound/x12/278/<payer>/<file>
            continue
        data = storage.get(file_key)
        digest = hashlib.sha256(data).hexdigest()
        if state["files"].get(file_key, {}).get("sha256") == digest:
            continue  # read before
        read += 1
        state["files"][file_key] = {"sha256": digest, "responses": state["files"].get(file_key, {}).get("responses", 0)}
        try:
            req = read_request(data.decode("latin-1"))
        except (BadRequest, IndexError) as exc:
            invalid.append(file_key)
            logger.warning("x12_sim: cannot read %s: %s", file_key, exc if isinstance(exc, BadRequest) else "truncated")
            continue
        trace = req["trace"]
        if trace in state["traces"]:  # the same request again: not a new one
            state["repeats"][trace] = state["repeats"].get(trace, 0) + 1
            answer(file_key, req, state["traces"][trace])
            continue
        state["submissions"][trace] = state["submissions"].get(trace, 0) + 1
        state["traces"][trace] = _decide(config, req) | {"file": file_key}
        fresh.add(trace)
        answer(file_key, req, state["traces"][trace])

    for trace, decision in state["traces"].items():
        if decision["code"] != "A4" or trace in fresh:
            continue
        decision["waited"] += 1
        if decision["waited"] < decision["inquiries"]:
            continue
        try:  # the Nth later pass: the payer decides, answering the request as first filed
            req = read_request(storage.get(decision["file"]).decode("latin-1"))
        except (BadRequest, IndexError):
            continue  # that file was replaced by one that cannot be read (logged above)
        decision["code"] = ACTIONS[decision["then"]]
        decision["reasons"] = decision["then_reasons"] if decision["code"] == "A3" else []
        decision["number"] = certification_number(config["auth_prefix"], trace) if decision["code"] == "A1" else None
        answer(decision["file"], req, decision)

    storage.put(STATE_KEY, json.dumps(state, sort_keys=True).encode(), content_type="application/json")
    return {"passes": state["passes"], "read": read, "answered": answered, "invalid": invalid,
            "submissions": dict(state["submissions"]), "repeats": dict(state["repeats"]),
            "decisions": {t: d["code"] for t, d in state["traces"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retroauth.x12_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--storage", required=True, help="file://DIR or s3://bucket/prefix (the product's storage)")
    parser.add_argument("--config", help="JSON or YAML, as for retroauth.payer_sim (default: approve everything)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one pass, then exit (the default)")
    when.add_argument("--every", type=float, metavar="SECONDS", help="a pass every SECONDS until interrupted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config or {})
        storage = open_storage(args.storage)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        while True:
            stats = process_outbound(storage, config)
            print(json.dumps({k: stats[k] if k != "invalid" else len(stats[k])
                              for k in ("passes", "read", "answered", "invalid")}), flush=True)
            if not args.every:
                return 0
            time.sleep(args.every)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

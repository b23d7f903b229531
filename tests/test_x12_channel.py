"""The X12 278 channel (request files out, responses in) against the X12 clearinghouse simulator.

The requests the channel writes pass ``check_278`` and pyx12's tokenizer; the simulator reads them with its
own plain splitting and answers by the PAS simulator's rules; ``poll`` finds the answers by trace number.
Names, member ids and payers are made up.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import date, datetime, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import select

from config import PAYERS_DIR
from config.settings import load_settings
from retroauth import outbox, x12_sim
from retroauth.cases import Actor
from retroauth.channels import ChannelRefused, Outgoing
from retroauth.channels import x12_278 as channel_module
from retroauth.channels.x12_278 import X12Channel, inbound_prefix, request_278_for, request_key
from retroauth.db import session_scope
from retroauth.models import (
    Authorization, CaseServiceLine, Coverage, Diagnosis, Encounter, Packet, Patient, PayerResponse, RetroCase,
    ServiceLine, Submission,
)
from retroauth.rules import load_rule_library
from retroauth.storage import LocalStorage, key
from retroauth.vocab import CaseStatus
from retroauth.x12 import X12Error, read_segments, read_transactions
from retroauth.x12.check import check_278
from retroauth.x12.x278 import read_278_response, write_278_request
from tests.test_letters import make_case
from tests.test_outbox import storage  # noqa: F401 - the fixture (a LocalStorage counting its writes)
from tests.test_x278 import CORPUS, EMERGENCY_TRACE, IMAGING, IMAGING_REF, IMAGING_TRACE, WHEN, pyx12_segments

CHI = ZoneInfo("America/Chicago")
LIB = load_rule_library(PAYERS_DIR)
SETTINGS = load_settings()
ACTOR = Actor(run_id="test", name="test")
PAYER = "uhc-commercial"  # its channel is x12_278
REASONS = ("emergency", "delayed_insurance_verification", "system_issue", "retroactive_eligibility",
           "administrative_error")
PHI = ("Jane", "Doe", "Brien", "M000001", "M0*07")
NPI, COMPANY_ID = SETTINGS.facility_npi, "1" + "".join(c for c in SETTINGS.facility_tin if c.isdigit())
ZONE = ZoneInfo(SETTINGS.facility_timezone)




def x12_case(engine, reason: str = "administrative_error", n: int = 1) -> int:
    return make_case(engine, reason, payer=PAYER, status=CaseStatus.LETTER_RENDERED, n=n)


def inpatient_case(engine, n: int = 7, member_id: str | None = None) -> int:
    """An emergency admission (institutional: type of bill, revenue-code line, CPT and HCPCS lines) of a
    patient whose name holds X12 separators and an accent."""
    with session_scope(engine) as s:
        p = Patient(source_system="t", source_id=f"p{n}", family_name="O*Brien~", given_name="Zoë",
                    birth_date=date(1950, 1, 2), sex="male")
        s.add(p)
        s.flush()
        cov = Coverage(patient_id=p.id, payer_id=PAYER, member_id=member_id or f"M{n:06d}",
                       effective_from=date(2026, 1, 1), discovered_at=datetime(2026, 11, 11, tzinfo=timezone.utc),
                       discovery_method="eligibility_check")
        e = Encounter(source_system="t", source_id=f"e{n}", patient_id=p.id, encounter_class="inpatient",
                      admission_type="emergency", admitted_at=datetime(2026, 11, 10, 22, 30, tzinfo=CHI),
                      discharged_at=datetime(2026, 11, 14, 11, tzinfo=CHI), timezone="America/Chicago",
                      type_of_bill="0111")
        s.add_all([cov, e])
        s.flush()
        lines = [ServiceLine(encounter_id=e.id, line_number=1, code_system="REV", code="0120", units=Decimal("4"),
                             charge=Decimal("9600"), service_date=date(2026, 11, 10)),
                 ServiceLine(encounter_id=e.id, line_number=2, code_system="CPT", code="93458", modifiers="LT",
                             charge=Decimal("8200.50"), service_date=date(2026, 11, 11)),
                 ServiceLine(encounter_id=e.id, line_number=3, code_system="HCPCS", code="C1874",
                             charge=Decimal("1200"), units=Decimal("2"), service_date=date(2026, 11, 11))]
        s.add_all(lines)
        s.add_all([Diagnosis(encounter_id=e.id, code_system="ICD10CM", code="I21.4", rank=1),
                   Diagnosis(encounter_id=e.id, code_system="SNOMED", code="401314000", rank=2),
                   Diagnosis(encounter_id=e.id, code_system="ICD10CM", code="E11.9", rank=3)])
        s.flush()
        c = RetroCase(encounter_id=e.id, payer_id=PAYER, coverage_id=cov.id, status=CaseStatus.LETTER_RENDERED,
                      reason="emergency", delay_reason_code="11")
        s.add(c)
        s.flush()
        s.add_all([CaseServiceLine(case_id=c.id, service_line_id=ln.id) for ln in lines])
        s.add(Packet(case_id=c.id, input_hash="y" * 64, complete=True, manifest={"items": [
            {"type": "18842-5", "label": "Discharge summary", "status": "included"},
            {"type": "28570-0", "label": "Procedure note", "status": "included"},
            {"type": "case_summary", "label": "Case summary", "status": "included"},
            {"type": "11502-2", "label": "Laboratory report", "status": "missing"}]}))
        return c.id


def queued(engine, case_ids) -> dict[int, Outgoing]:
    """Enqueue the cases (through the outbox) and the Outgoing of each one's submission."""
    outbox.enqueue(engine, case_ids, library=LIB, actor=ACTOR)
    with session_scope(engine) as s:
        subs = s.exec(select(Submission).where(Submission.case_id.in_(case_ids))).all()
        return {sub.case_id: Outgoing(submission_id=sub.id, case_id=sub.case_id, payer_id=PAYER,
                                      attempt=sub.attempt, kind=sub.kind, idempotency_key=sub.idempotency_key)
                for sub in subs}


def body_of(text: str) -> list[list[str]]:
    return [s.elements for s in next(read_transactions(io.StringIO(text))).body]


def only(segments: list[list[str]], sid: str) -> list[list[str]]:
    return [s for s in segments if s[0] == sid]


def poll(ch: X12Channel, storage, out: Outgoing):
    return ch.poll(None, storage, LIB, SETTINGS, out, out.idempotency_key)  # poll reads storage only


def outgoing(k: str, kind: str = "request") -> Outgoing:
    return Outgoing(submission_id=1, case_id=1, payer_id=PAYER, attempt=1, kind=kind, idempotency_key=k)


# --- the requests ------------------------------------------------------------------------------------------


def test_every_sample_case_gives_a_request_that_passes_the_checker_and_pyx12(engine, storage):
    ids = [x12_case(engine, reason, n) for n, reason in enumerate(REASONS, 1)] + [inpatient_case(engine)]
    outs = queued(engine, ids)
    ch = X12Channel()
    for case_id in ids:
        out = outs[case_id]
        sent = ch.send(engine, storage, LIB, SETTINGS, out)
        assert sent.tracking_number == out.idempotency_key and sent.decision is None
        assert sent.payload_key == f"outbound/x12/278/{PAYER}/{out.idempotency_key}.x12"
        text = storage.get(sent.payload_key).decode("ascii")
        assert check_278(text) == []
        ours = [s.separators.element.join(s.elements) + "~" for s in read_segments(io.StringIO(text))]
        theirs, problems = pyx12_segments(text)
        assert problems == [] and theirs == ours

        tx = next(read_transactions(io.StringIO(text)))
        with session_scope(engine) as s:
            created = s.get(Submission, out.submission_id).created_at.astimezone(ZONE)
        assert (tx.isa[9], tx.isa[10], tx.gs[4]) == (created.strftime("%y%m%d"), created.strftime("%H%M"),
                                                     created.strftime("%Y%m%d"))
        assert (tx.isa[6].strip(), tx.isa[8].strip(), tx.isa[13]) == (NPI, "UHCCOMMERCIAL", f"{out.submission_id:09d}")
        body = [s.elements for s in tx.body]
        assert body[0][:4] == ["BHT", "0007", "13", out.idempotency_key]
        assert only(body, "TRN")[0] == ["TRN", "1", out.idempotency_key, COMPANY_ID]
        assert {um[2] for um in only(body, "UM")} == {"I"}  # initial request, with past dates

    emergency, imaging, inpatient = (body_of(storage.get(request_key(PAYER, outs[i].idempotency_key)).decode())
                                     for i in (ids[0], ids[4], ids[5]))
    assert only(emergency, "UM")[0] == ["UM", "HS", "I", "86", "23:B", "", "03"]
    assert only(imaging, "UM")[0] == ["UM", "HS", "I", "62", "22:B"]
    assert only(imaging, "HI") == [["HI", "ABK:G44309", "ABF:R519"]]
    assert only(imaging, "SV1") == [["SV1", "HC:70551", "1850", "UN", "1"], ["SV1", "HC:74177:26", "600", "UN", "2"]]
    assert only(imaging, "DTP") == [["DTP", "AAH", "RD8", "20261113-20261114"], ["DTP", "472", "D8", "20261113"],
                                    ["DTP", "472", "D8", "20261114"]]
    assert only(imaging, "PWK") == [["PWK", "OZ", "AA", "", "", "AC", f"RA{ids[4]}D1", "Case summary"],
                                    ["PWK", "P5", "AA", "", "", "AC", f"RA{ids[4]}D2", "History and physical note"],
                                    ["PWK", "OZ", "AA", "", "", "AC", f"RA{ids[4]}D3", "System outage record"]]
    assert only(imaging, "MSG")[0][1].startswith("RETROSPECTIVE REQUEST. DELAY REASON 10 ")

    assert only(inpatient, "UM")[0] == ["UM", "AR", "I", "48", "11:A", "", "03"]
    assert only(inpatient, "DTP")[:3] == [["DTP", "AAH", "RD8", "20261110-20261114"], ["DTP", "435", "D8", "20261110"],
                                          ["DTP", "096", "D8", "20261114"]]
    assert only(inpatient, "CL1") == [["CL1", "1"]]
    assert only(inpatient, "HI") == [["HI", "ABK:I214", "ABF:E119"]]  # SNOMED left out
    assert only(inpatient, "SV1") == [["SV1", "HC:93458:LT", "8200.5", "UN", "1"],
                                      ["SV1", "HC:C1874", "1200", "UN", "2"]]
    assert [p[1] for p in only(inpatient, "PWK")] == ["DS", "M1", "OZ"]  # the missing document is not announced
    assert only(inpatient, "NM1")[2][:5] == ["NM1", "IL", "1", "O Brien", "Zoe"]
    assert only(inpatient, "DMG") == [["DMG", "D8", "19500102", "M"]]


def test_send_twice_writes_one_object_with_the_same_bytes(engine, storage):
    [out] = queued(engine, [x12_case(engine)]).values()
    ch = X12Channel()
    first = ch.send(engine, storage, LIB, SETTINGS, out)
    assert storage.puts == [first.payload_key]
    data = storage.get(first.payload_key)
    assert X12Channel().send(engine, storage, LIB, SETTINGS, out) == first
    assert storage.puts == [first.payload_key]  # nothing written again
    assert storage.list("outbound") == [first.payload_key]
    # the bytes are a function of the submission: written afresh, they are the same
    assert ch.request_bytes(engine, LIB, SETTINGS, out) == data
    storage.delete(first.payload_key)
    ch.send(engine, storage, LIB, SETTINGS, out)
    assert storage.get(first.payload_key) == data
    assert request_278_for(engine, LIB, SETTINGS, out.case_id).member_id == "M000001"


def test_data_the_278_cannot_carry_is_refused_with_a_field_name_and_the_case_goes_back(engine, storage):
    case_id = inpatient_case(engine, member_id="M0*07")  # an element separator inside an identifier
    [out] = queued(engine, [case_id]).values()
    summary = outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR, channels={"x12_278": X12Channel()})
    assert summary.refused == {out.submission_id: "invalid_278:member_id"}
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == CaseStatus.LETTER_RENDERED
    assert storage.list("outbound") == []


def test_a_request_that_fails_the_check_is_refused_without_patient_data(engine, storage, monkeypatch, caplog):
    [out] = queued(engine, [x12_case(engine)]).values()
    monkeypatch.setattr(channel_module, "check_278", lambda text, file: [
        X12Error(file, 13, "NM1", "NM103", "contains the component separator but is not a composite")])
    with caplog.at_level(logging.ERROR), pytest.raises(ChannelRefused) as info:
        X12Channel().send(engine, storage, LIB, SETTINGS, out)
    assert info.value.code == "invalid_278" and storage.list("outbound") == []
    assert "NM103" in caplog.text and not any(p in caplog.text for p in PHI)


def test_appeals_are_refused():
    ch = X12Channel()
    for call in (lambda: ch.send(None, None, LIB, SETTINGS, outgoing("k", "appeal")),
                 lambda: ch.poll(None, None, LIB, SETTINGS, outgoing("k", "appeal"), "k")):
        with pytest.raises(ChannelRefused) as info:
            call()
        assert info.value.code == "appeal_not_supported_by_x12"


# --- answers from the simulator -------------------------------------------------------------------------------


def sent(engine, storage, case_ids) -> dict[int, Outgoing]:
    outs = queued(engine, case_ids)
    for out in outs.values():
        X12Channel().send(engine, storage, LIB, SETTINGS, out)
    return outs


def test_approval(engine, storage):
    [out] = sent(engine, storage, [x12_case(engine)]).values()
    ch = X12Channel()
    assert poll(ch, storage, out) is None  # nothing collected yet
    stats = x12_sim.process_outbound(storage, {"auth_prefix": "SIM", "default": {"action": "approve"}})
    assert (stats["read"], stats["answered"], stats["submissions"]) == (1, 1, {out.idempotency_key: 1})
    answer = poll(ch, storage, out)
    assert answer.decision == "A1"
    assert answer.certification_number == x12_sim.certification_number("SIM", out.idempotency_key)
    assert answer.reason_codes == () and answer.response_ref.startswith("x12:")
    assert answer.response_key == f"{inbound_prefix(PAYER)}/{out.idempotency_key}-response-1.x12"
    text = storage.get(answer.response_key).decode()
    assert check_278(text) == [] and pyx12_segments(text)[1] == []
    event, *services = read_278_response(text)
    assert (event.reference, event.trace_number, event.certified_from) == (out.idempotency_key,
                                                                           out.idempotency_key, date(2026, 11, 13))
    assert [s.event_trace_number for s in services] == [out.idempotency_key] * 2
    assert x12_sim.process_outbound(storage, {})["answered"] == 0  # nothing new


def test_denial_by_member_id_with_its_reason(engine, storage):
    outs = sent(engine, storage, [x12_case(engine, n=1), x12_case(engine, n=2)])
    config = {"rules": [{"match": {"member_id": "M000001"}, "action": "deny", "reasons": ["T1", "0U"]}]}
    stats = x12_sim.process_outbound(storage, config)
    denied, approved = (outs[c] for c in sorted(outs))
    assert stats["decisions"] == {denied.idempotency_key: "A3", approved.idempotency_key: "A1"}
    ch = X12Channel()
    answer = poll(ch, storage, denied)
    assert (answer.decision, answer.reason_codes, answer.certification_number) == ("A3", ("T1",), None)
    assert poll(ch, storage, approved).decision == "A1"


def test_pend_then_a_later_pass_decides(engine, storage):
    outs = sent(engine, storage, [x12_case(engine, n=1), inpatient_case(engine, n=2)])
    outpatient, inpatient = (outs[c] for c in sorted(outs))
    config = {"rules": [{"match": {"code": "93458"}, "action": "pend", "inquiries": 2, "then": "deny",
                         "then_reasons": ["0U"]}],
              "default": {"action": "pend", "then": "approve"}}
    ch = X12Channel()
    x12_sim.process_outbound(storage, config)
    assert poll(ch, storage, outpatient).decision == "A4" and poll(ch, storage, inpatient).decision == "A4"
    x12_sim.process_outbound(storage, config)
    approved = poll(ch, storage, outpatient)
    assert (approved.decision, approved.response_key.endswith("-response-2.x12")) == ("A1", True)
    assert approved.certification_number == x12_sim.certification_number("SIM", outpatient.idempotency_key)
    assert poll(ch, storage, inpatient).decision == "A4"  # its rule waits two passes
    x12_sim.process_outbound(storage, config)
    denied = poll(ch, storage, inpatient)
    assert (denied.decision, denied.reason_codes) == ("A3", ("0U",))
    assert poll(ch, storage, outpatient) == approved  # answered once: later passes write nothing for it


def test_rejects_map_by_their_follow_up_action(engine, storage):
    [out] = sent(engine, storage, [x12_case(engine)]).values()
    x12_sim.process_outbound(storage, {"default": {"action": "reject", "errors": ["15"]}})
    text = storage.get(f"{inbound_prefix(PAYER)}/{out.idempotency_key}-response-1.x12").decode()
    assert check_278(text) == [] and pyx12_segments(text)[1] == []
    with pytest.raises(ChannelRefused) as info:  # AAA*N**15*C: correct and resubmit, a new request
        poll(X12Channel(), storage, out)
    assert info.value.code == "x12_rejected:AAA:15"


def test_payer_style_responses_from_the_corpus(tmp_path):
    storage = LocalStorage(tmp_path)
    for name in ("a1-certified", "aaa62-date-not-allowed", "aaa75-subscriber-not-found"):
        storage.put(f"{inbound_prefix(PAYER)}/{name}.278", (CORPUS / "responses" / f"{name}.278").read_bytes())
    ch = X12Channel()
    a1 = poll(ch, storage, outgoing(EMERGENCY_TRACE))
    assert (a1.decision, a1.certification_number) == ("A1", "CERT778899")
    late = poll(ch, storage, outgoing(IMAGING_TRACE))  # AAA*N**62*N: a final no to a late request
    assert (late.decision, late.reason_codes) == ("A3", ("AAA:62",))
    with pytest.raises(ChannelRefused) as info:  # rejected at the subscriber (no trace): found by BHT03
        poll(ch, storage, outgoing(IMAGING_REF))
    assert info.value.code == "x12_rejected:AAA:75"
    assert poll(ch, storage, outgoing("ra-unknown")) is None


def test_an_unreadable_inbound_file_is_skipped_and_logged_once(engine, storage, caplog):
    [out] = sent(engine, storage, [x12_case(engine)]).values()
    x12_sim.process_outbound(storage, {})
    good = f"{inbound_prefix(PAYER)}/{out.idempotency_key}-response-1.x12"
    text = storage.get(good)
    storage.put(f"{inbound_prefix(PAYER)}/aaa-garbage.x12", b"Jane Doe M000001 is not X12")
    storage.put(f"{inbound_prefix(PAYER)}/aab-truncated.x12", text[: text.index(b"NM1*IL") + 20])
    ch = X12Channel()
    with caplog.at_level(logging.WARNING, logger="retroauth.channels.x12_278"):
        assert poll(ch, storage, out).decision == "A1"
        assert poll(ch, storage, out).decision == "A1"
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert "aaa-garbage.x12" in skipped[0] + skipped[1] and "aab-truncated.x12" in skipped[0] + skipped[1]
    assert not any(p in caplog.text for p in PHI)


def test_polling_many_submissions_reads_each_file_once(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    keys = [f"ra-{i}-1-{i:010x}" for i in range(1, 41)]
    for i, k in enumerate(keys, 1):
        text = write_278_request(IMAGING, control_number=i, trace_number=k, reference=k, sender_id="1234567893",
                                 receiver_id="UHC", when=WHEN)
        storage.put(request_key(PAYER, k), text.encode())
    assert x12_sim.process_outbound(storage, {})["answered"] == 40
    reads = []
    real = channel_module.read_278_response
    monkeypatch.setattr(channel_module, "read_278_response", lambda text, file: reads.append(file) or real(text, file))
    ch = X12Channel()
    for _ in range(2):
        assert {poll(ch, storage, outgoing(k)).decision for k in keys} == {"A1"}
    assert len(reads) == 40


# --- the simulator on its own -------------------------------------------------------------------------------


def test_a_repeated_request_file_is_a_repeat_and_garbage_is_skipped(engine, storage):
    [out] = sent(engine, storage, [x12_case(engine)]).values()
    k = request_key(PAYER, out.idempotency_key)
    storage.put(key("outbound", "x12", "278", PAYER, "copy-of-it.x12"), storage.get(k))
    storage.put(key("outbound", "x12", "278", PAYER, "junk.x12"), b"ISA*not really")
    stats = x12_sim.process_outbound(storage, {})
    assert stats["submissions"] == {out.idempotency_key: 1} and stats["repeats"] == {out.idempotency_key: 1}
    assert stats["invalid"] == [key("outbound", "x12", "278", PAYER, "junk.x12")]
    assert storage.exists(f"{inbound_prefix(PAYER)}/copy-of-it-response-1.x12")
    again = x12_sim.process_outbound(storage, {})
    assert (again["read"], again["invalid"], again["submissions"]) == (0, [], {out.idempotency_key: 1})


def test_the_simulator_command(tmp_path, capsys):
    storage = LocalStorage(tmp_path / "s")
    text = write_278_request(IMAGING, control_number=3, trace_number="ra-3-1-x", sender_id="1234567893",
                             receiver_id="UHC", when=WHEN, line_breaks=True)
    storage.put(request_key(PAYER, "ra-3-1-x"), text.encode())
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"default": {"action": "deny", "reasons": ["T1"]}}))
    assert x12_sim.main(["--storage", f"file://{tmp_path / 's'}", "--config", str(config), "--once"]) == 0
    assert json.loads(capsys.readouterr().out) == {"passes": 1, "read": 1, "answered": 1, "invalid": 0}
    assert poll(X12Channel(), storage, outgoing("ra-3-1-x")).reason_codes == ("T1",)


# --- end to end through the outbox ------------------------------------------------------------------------


def test_end_to_end_through_the_outbox_once_per_key(engine, storage, monkeypatch):
    case_id = x12_case(engine)
    result = outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    channels = {"x12_278": X12Channel()}
    with session_scope(engine) as s:
        sub = s.get(Submission, result.enqueued[case_id])
    assert sub.channel == "x12_278"

    real = outbox._record_sent  # a crash between writing the file and recording it
    monkeypatch.setattr(outbox, "_record_sent", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR, channels=channels)
    x12_sim.process_outbound(storage, {})  # the clearinghouse collects it meanwhile
    monkeypatch.setattr(outbox, "_record_sent", real)
    summary = outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR, channels=channels)
    assert summary.sent == [sub.id] and summary.decided == {}
    with session_scope(engine) as s:
        sub = s.get(Submission, sub.id)
        assert s.get(RetroCase, case_id).status == CaseStatus.SUBMITTED
    assert (sub.status, sub.tracking_number, sub.payload_key) == ("sent", sub.idempotency_key,
                                                                  request_key(PAYER, sub.idempotency_key))
    assert outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR, channels=channels).sent == []
    stats = x12_sim.process_outbound(storage, {})
    assert stats["submissions"] == {sub.idempotency_key: 1} and stats["repeats"] == {}
    assert storage.puts.count(sub.payload_key) == 1

    # the answer, asked for through the outbox, is recorded with the case's move
    polled = outbox.poll_submissions(engine, storage, LIB, SETTINGS, [sub.id], actor=ACTOR, channels=channels)
    assert polled.decided == {sub.id: "A1"}
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == CaseStatus.APPROVED
        auth = s.exec(select(Authorization).where(Authorization.case_id == case_id)).one()
        resp = s.exec(select(PayerResponse).where(PayerResponse.case_id == case_id)).one()
    assert auth.auth_number == x12_sim.certification_number("SIM", sub.idempotency_key) == resp.certification_number
    assert resp.payload_key == f"{inbound_prefix(PAYER)}/{sub.idempotency_key}-response-1.x12"

"""The submission outbox: enqueue with the case's move, send once per idempotency key (even across a crash
between sending and recording), the packet channel's PDF, and decisions written back for the next sweep."""

from __future__ import annotations

import io
from datetime import datetime
from zoneinfo import ZoneInfo

import pypdf
import pytest
import sqlalchemy as sa
from sqlmodel import select

from config import PAYERS_DIR
from config.settings import load_settings
from retroauth import outbox
from retroauth.cases import Actor
from retroauth.channels import ChannelRefused, Outgoing, SendResult
from retroauth.channels.packet import PacketChannel, packet_key, text_pdf
from retroauth.db import session_scope
from retroauth.letters import render_letters
from retroauth.models import (
    Authorization, AuthorizationCode, CaseEvent, Letter, Packet, PayerResponse, RetroCase, Submission,
)
from retroauth.rules import load_rule_library
from retroauth.storage import LocalStorage
from retroauth.sweep import sweep
from retroauth.vocab import CaseStatus
from tests.conftest import table_counts
from tests.test_letters import make_case

CHI = ZoneInfo("America/Chicago")
LIB = load_rule_library(PAYERS_DIR)
SETTINGS = load_settings()
AS_OF = datetime(2026, 11, 20, 9, 0, tzinfo=CHI)
ACTOR = Actor(run_id="test", name="test")
NOTE = "History and physical.\nPatient seen in ED with headache #set text(red) *not markup*.\n"


class CountingStorage(LocalStorage):
    def __init__(self, root):
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key, data, content_type="application/octet-stream"):
        self.puts.append(key)
        return super().put(key, data, content_type)


@pytest.fixture
def storage(tmp_path):
    return CountingStorage(tmp_path / "storage")


def rendered_case(engine, storage, n: int = 1) -> int:
    """A case in letter_rendered whose packet encloses one text note and one PDF of several pages."""
    case_id = make_case(engine, "delayed_insurance_verification", n=n)  # outpatient: imaging needs auth
    result = render_letters(engine, storage, SETTINGS, LIB, [case_id], as_of=AS_OF)
    assert not result.failed
    note = storage.put(f"documents/{case_id}/note.txt", NOTE.encode())
    pdf_bytes = text_pdf("page\n" * 120, "Operative report")  # several pages
    assert len(pypdf.PdfReader(io.BytesIO(pdf_bytes)).pages) > 1
    pdf = storage.put(f"documents/{case_id}/op.pdf", pdf_bytes)
    with session_scope(engine) as s:
        packet = s.exec(select(Packet).where(Packet.case_id == case_id)).one()
        items = list(packet.manifest["items"])
        items.append({"type": "34117-2", "label": "History and physical note", "status": "included",
                      "storage_key": note.key, "sha256": note.sha256, "media_type": "text/plain"})
        items.append({"type": "11504-8", "label": "Operative report", "status": "included",
                      "storage_key": pdf.key, "sha256": pdf.sha256, "media_type": "application/pdf"})
        items.append({"type": "18842-5", "label": "Discharge summary", "status": "missing", "storage_key": None})
        packet.manifest = {**packet.manifest, "items": items}
        s.add(packet)
    assert status(engine, case_id) == CaseStatus.LETTER_RENDERED
    return case_id


def status(engine, case_id: int) -> str:
    with session_scope(engine) as s:
        return s.get(RetroCase, case_id).status


def submissions(engine, case_id: int) -> list[Submission]:
    with session_scope(engine) as s:
        return list(s.exec(select(Submission).where(Submission.case_id == case_id).order_by(Submission.attempt)))


def events(engine, case_id: int) -> list[CaseEvent]:
    with session_scope(engine) as s:
        return list(s.exec(select(CaseEvent).where(CaseEvent.case_id == case_id).order_by(CaseEvent.id)))


def send(engine, storage, **kw):
    return outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR, **kw)


# --- enqueue ----------------------------------------------------------------------------------------


def test_idempotency_keys_are_deterministic_and_fit_x12():
    assert outbox.idempotency_key(12, 1) == outbox.idempotency_key(12, 1)
    assert outbox.idempotency_key(12, 1) != outbox.idempotency_key(12, 2)
    assert len(outbox.idempotency_key(10**15, 999)) <= 50


def test_enqueue_moves_the_case_with_its_outbox_row_and_a_rerun_adds_nothing(engine, storage):
    case_id = rendered_case(engine, storage)
    result = outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    assert list(result.enqueued) == [case_id]
    assert status(engine, case_id) == CaseStatus.SUBMITTING
    [sub] = submissions(engine, case_id)
    assert (sub.attempt, sub.kind, sub.channel, sub.status) == (1, "request", "packet", "pending")
    assert sub.idempotency_key == outbox.idempotency_key(case_id, 1)
    before = table_counts(engine)
    again = outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    assert again.enqueued == {} and again.skipped == [case_id]
    assert table_counts(engine) == before
    assert outbox.cases_to_enqueue(engine) == []


# --- the packet channel -------------------------------------------------------------------------------


def test_packet_channel_writes_one_pdf_and_a_rerun_writes_nothing(engine, storage):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    summary = send(engine, storage)
    [sub] = submissions(engine, case_id)
    assert summary.sent == [sub.id] and not summary.failed
    assert sub.status == "sent" and sub.sent_at is not None
    assert sub.tracking_number == sub.idempotency_key
    assert sub.payload_key == packet_key("priority-health", sub.idempotency_key)
    assert status(engine, case_id) == CaseStatus.SUBMITTED

    with session_scope(engine) as s:
        letter = s.exec(select(Letter).where(Letter.case_id == case_id)).one()
    letter_pages = len(pypdf.PdfReader(io.BytesIO(storage.get(letter.pdf_key))).pages)
    note_pages = len(pypdf.PdfReader(io.BytesIO(text_pdf(NOTE, "History and physical note"))).pages)
    reader = pypdf.PdfReader(io.BytesIO(storage.get(sub.payload_key)))
    op_pages = len(pypdf.PdfReader(io.BytesIO(storage.get(f"documents/{case_id}/op.pdf"))).pages)
    assert len(reader.pages) == letter_pages + note_pages + op_pages
    text = " ".join(p.extract_text() for p in reader.pages)
    assert "#set text(red) *not markup*" in text  # the note printed literally

    [moved] = [e for e in events(engine, case_id) if e.to_status == CaseStatus.SUBMITTED]
    assert moved.details == {"submission_id": sub.id, "channel": "packet", "tracking_number": sub.idempotency_key}

    before, puts = table_counts(engine), list(storage.puts)
    assert send(engine, storage).sent == []
    # even asked directly again with the same key, the channel writes nothing new
    out = Outgoing(submission_id=sub.id, case_id=case_id, payer_id="priority-health", attempt=1,
                   kind="request", idempotency_key=sub.idempotency_key)
    PacketChannel().send(engine, storage, LIB, SETTINGS, out)
    assert table_counts(engine) == before and storage.puts == puts
    assert storage.list("outbound") == [sub.payload_key]


def test_a_crash_between_send_and_record_does_not_send_twice(engine, storage, monkeypatch):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    real = outbox._record_sent

    def crash(*a, **kw):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(outbox, "_record_sent", crash)
    with pytest.raises(RuntimeError):
        send(engine, storage)
    [sub] = submissions(engine, case_id)
    assert sub.status == "pending" and status(engine, case_id) == CaseStatus.SUBMITTING
    assert len(storage.list("outbound")) == 1

    monkeypatch.setattr(outbox, "_record_sent", real)
    assert send(engine, storage).sent == [sub.id]
    [sub] = submissions(engine, case_id)
    assert sub.status == "sent" and status(engine, case_id) == CaseStatus.SUBMITTED
    assert storage.list("outbound") == [sub.payload_key]
    assert storage.puts.count(sub.payload_key) == 1


class RefusingChannel:
    name = "packet"

    def send(self, engine, storage, library, settings, out):
        raise ChannelRefused("http_422")


class FlakyChannel:
    name = "packet"

    def send(self, engine, storage, library, settings, out):
        raise ConnectionError("Jane Doe M000001 unreachable")  # must not leak into the summary


def test_a_refusal_fails_the_row_and_returns_the_case_and_a_transient_error_leaves_it_pending(engine, storage):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    flaky = send(engine, storage, channels={"packet": FlakyChannel()})
    [sub] = submissions(engine, case_id)
    assert flaky.failed == {sub.id: "ConnectionError"} and sub.status == "pending"
    assert "Jane" not in str(outbox.SendsIncomplete(flaky.failed))

    refused = send(engine, storage, channels={"packet": RefusingChannel()})
    assert refused.refused == {sub.id: "http_422"}
    [sub] = submissions(engine, case_id)
    assert (sub.status, sub.last_error) == ("failed", "http_422")
    assert status(engine, case_id) == CaseStatus.LETTER_RENDERED

    # fixed and resent: a second attempt with its own key
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    first, second = submissions(engine, case_id)
    assert second.attempt == 2 and second.idempotency_key != first.idempotency_key
    assert send(engine, storage).sent == [second.id]
    assert status(engine, case_id) == CaseStatus.SUBMITTED


def test_a_decision_given_at_once_is_recorded_with_the_send(engine, storage):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)

    class Approving:
        name = "packet"

        def send(self, engine, storage, library, settings, out):
            return SendResult(tracking_number="T-1", decision="A1", certification_number="SIM-1",
                              response_ref="R-1")

    assert send(engine, storage, channels={"packet": Approving()}).decided == {case_id: "A1"}
    assert status(engine, case_id) == CaseStatus.APPROVED
    with session_scope(engine) as s:
        assert s.exec(select(Authorization.auth_number).where(Authorization.case_id == case_id)).all() == ["SIM-1"]


# --- decisions --------------------------------------------------------------------------------------


def test_an_approval_is_written_back_and_the_next_sweep_sees_the_services_covered(engine, storage):
    case_id = rendered_case(engine, storage)
    with session_scope(engine) as s:
        encounter_id = s.get(RetroCase, case_id).encounter_id
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    send(engine, storage)
    with pytest.raises(outbox.OutboxError):
        outbox.record_outcome(engine, case_id, approved=True, actor=ACTOR)  # no number
    before = sweep(engine, LIB, as_of=AS_OF, lookback_days=30, encounter_ids=[encounter_id], actor=ACTOR)
    assert before.lines_uncovered == 2

    assert outbox.record_outcome(engine, case_id, approved=True, auth_number="PH-778", actor=ACTOR) == "approved"
    with session_scope(engine) as s:
        auth = s.exec(select(Authorization).where(Authorization.case_id == case_id)).one()
        codes = s.exec(select(AuthorizationCode.code).where(AuthorizationCode.authorization_id == auth.id)).all()
        [resp] = s.exec(select(PayerResponse).where(PayerResponse.case_id == case_id)).all()
    assert (auth.auth_number, auth.status, auth.member_id) == ("PH-778", "approved", "M000001")
    assert (str(auth.starts_on), str(auth.ends_on)) == ("2026-11-13", "2026-11-14")
    assert sorted(codes) == ["70551", "74177"]
    assert (resp.decision, resp.certification_number) == ("A1", "PH-778")

    counts = table_counts(engine)
    assert outbox.record_outcome(engine, case_id, approved=True, auth_number="PH-778", actor=ACTOR) == "approved"
    assert table_counts(engine) == counts  # recording it again changes nothing

    after = sweep(engine, LIB, as_of=AS_OF, lookback_days=30, encounter_ids=[encounter_id], actor=ACTOR)
    assert (after.lines_uncovered, after.cases_created, after.withdrawn) == (0, 0, 0)
    assert status(engine, case_id) == CaseStatus.APPROVED


def test_a_denial_moves_the_case_to_denied_with_its_codes(engine, storage):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    send(engine, storage)
    assert outbox.record_outcome(engine, case_id, approved=False, reason_codes=["T1"], actor=ACTOR) == "denied"
    with session_scope(engine) as s:
        [resp] = s.exec(select(PayerResponse).where(PayerResponse.case_id == case_id)).all()
        assert s.exec(select(sa.func.count()).select_from(Authorization)).one() == 0
    assert (resp.decision, resp.reason_codes) == ("A3", "T1")
    [ev] = [e for e in events(engine, case_id) if e.to_status == CaseStatus.DENIED]
    assert ev.details["reason_codes"] == ["T1"]


def test_no_patient_data_in_events_or_errors(engine, storage):
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    send(engine, storage)
    outbox.record_outcome(engine, case_id, approved=True, auth_number="PH-1", actor=ACTOR)
    blob = " ".join(str(e.details) for e in events(engine, case_id))
    for phi in ("Jane", "Doe", "M000001", "1970", "MRN1"):
        assert phi not in blob
    with pytest.raises(outbox.OutboxError) as err:
        outbox.record_outcome(engine, case_id, approved=False, actor=ACTOR)
    assert "Jane" not in str(err.value) and "M000001" not in str(err.value)


# --- Prefect ----------------------------------------------------------------------------------------------


def test_submit_tasks_retry_with_exponential_backoff_and_jitter():
    from tasks.submit import enqueue_batch, send_batch

    for t in (enqueue_batch, send_batch):
        assert t.retries >= 3 and t.retry_jitter_factor
        delays = t.retry_delay_seconds
        assert isinstance(delays, list) and delays == sorted(delays) and delays[0] < delays[-1]


@pytest.mark.usefixtures("prefect_server", "app_env")
def test_submit_flow_on_a_real_prefect_server(engine, storage):
    from flows.submit import submit_requests

    ids = [rendered_case(engine, storage, n=i) for i in (1, 2, 3)]
    state = submit_requests(batch_size=2, return_state=True)
    summary = state.result()
    assert (summary["enqueued"], summary["sent"], summary["refused"]) == (3, 3, {})
    assert {status(engine, i) for i in ids} == {CaseStatus.SUBMITTED}
    with session_scope(engine) as s:
        run_ids = {e.run_id for e in s.exec(select(CaseEvent).where(CaseEvent.to_status.in_(
            [CaseStatus.SUBMITTING, CaseStatus.SUBMITTED])))}
    assert run_ids == {str(state.state_details.flow_run_id)}
    assert len(storage.list("outbound")) == 3
    before = table_counts(engine)  # again: nothing to queue, nothing pending
    assert submit_requests(case_ids=ids) == {"enqueued": 0, "sent": 0, "refused": {}, "decided": {}}
    assert table_counts(engine) == before


# --- the FHIR PAS channel against the payer simulator ----------------------------------------------------

TOKEN = "sim-token"


@pytest.fixture
def pas_sim():
    from retroauth.payer_sim import run_simulator

    started = []

    def start(config: dict):
        server, _ = run_simulator({"token": TOKEN, **config})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def pas_library(url: str):
    from retroauth.rules import RuleLibrary
    from retroauth.vocab import Channel

    payers = {pid: LIB[pid] for pid in LIB}
    ph = payers["priority-health"]
    payers["priority-health"] = ph.model_copy(update={
        "channel": Channel.FHIR_PAS, "contact": ph.contact.model_copy(update={"api_base_url": url})})
    return RuleLibrary(payers, {pid: LIB.file_of(pid) for pid in LIB})


def pas_channels():
    from retroauth.channels.fhir_pas import PasChannel
    from retroauth.channels.pas import PasClient

    return {"fhir_pas": PasChannel(token=TOKEN, client_factory=lambda url, token: PasClient(
        base_url=url, token=token, max_attempts=2, backoff=0.01, sleep=lambda s: None))}


def test_pas_approval_is_final_once_per_key_even_across_a_crash(engine, storage, pas_sim, monkeypatch):
    server = pas_sim({"auth_prefix": "SIM", "default": {"action": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    [sub] = submissions(engine, case_id)
    assert sub.channel == "fhir_pas"

    real = outbox._record_sent
    monkeypatch.setattr(outbox, "_record_sent", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=pas_channels())
    monkeypatch.setattr(outbox, "_record_sent", real)
    summary = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=pas_channels())
    assert summary.decided == {case_id: "A1"}
    stats = server.stats()
    assert stats["submissions"] == {sub.idempotency_key: 1}  # the rerun was a repeat, not a new request
    assert status(engine, case_id) == CaseStatus.APPROVED
    with session_scope(engine) as s:
        auth = s.exec(select(Authorization).where(Authorization.case_id == case_id)).one()
        [resp] = s.exec(select(PayerResponse).where(PayerResponse.case_id == case_id)).all()
    assert auth.auth_number.startswith("SIM") and resp.decision == "A1"
    assert resp.certification_number == auth.auth_number
    blob = " ".join(str(e.details) for e in events(engine, case_id))
    assert "Jane" not in blob and "M000001" not in blob


def test_pas_denial_and_pend(engine, storage, pas_sim):
    server = pas_sim({"rules": [{"match": {"member_id": "M000001"}, "action": "deny", "reasons": ["T1"]}],
                      "default": {"action": "pend", "inquiries": 2, "then": "approve"}})
    lib = pas_library(server.url)
    denied, pended = rendered_case(engine, storage, n=1), rendered_case(engine, storage, n=2)
    outbox.enqueue(engine, [denied, pended], library=lib, actor=ACTOR)
    summary = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=pas_channels())
    assert summary.decided == {denied: "A3", pended: "A4"}
    assert status(engine, denied) == CaseStatus.DENIED and status(engine, pended) == CaseStatus.IN_REVIEW
    with session_scope(engine) as s:
        assert s.exec(select(PayerResponse.reason_codes).where(PayerResponse.case_id == denied)).one() == "T1"


def test_pas_4xx_fails_the_submission_and_returns_the_case(engine, storage, pas_sim):
    server = pas_sim({"default": {"faults": [{"status": 400}]}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    summary = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=pas_channels())
    [sub] = submissions(engine, case_id)
    assert list(summary.refused) == [sub.id] and summary.refused[sub.id].startswith("http_400")
    assert sub.status == "failed" and sub.last_error == summary.refused[sub.id]  # codes only
    assert status(engine, case_id) == CaseStatus.LETTER_RENDERED
    assert server.stats()["submissions"] == {}

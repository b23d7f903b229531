"""Follow-ups against the PAS payer simulator: approve; deny -> appeal -> approve; pend -> inquire -> approve;
500 / 429 / dropped answers / timeouts retried; a process killed after the payer accepted; SLA escalation;
appeal windows; and the follow-ups flow on a real Prefect server. Each checks the final states and that
exactly one submission per attempt reached the simulator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlmodel import select

from retroauth import followups, outbox
from retroauth.db import session_scope
from retroauth.letters import render_letters
from retroauth.models import Appeal, Authorization, CaseEvent, FollowUp, Letter, RetroCase
from retroauth.vocab import CaseStatus
from tests.conftest import ROOT
from tests.test_outbox import (  # noqa: F401 - pas_sim and storage are fixtures
    ACTOR, LIB, SETTINGS, TOKEN, events, pas_channels, pas_library, pas_sim, rendered_case, status, storage,
    submissions,
)

DAY = timedelta(days=1)


def now() -> datetime:
    return datetime.now(UTC)


def send(engine, storage, lib, **kw):
    return outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=pas_channels(), **kw)


def submit(engine, storage, lib, case_ids):
    outbox.enqueue(engine, case_ids, library=lib, actor=ACTOR)
    return send(engine, storage, lib)


def inquire(engine, storage, lib, as_of):
    due = followups.due_inquiries(engine, as_of)
    return followups.run_inquiries(engine, storage, lib, SETTINGS, due, as_of, actor=ACTOR, channels=pas_channels())


def appeal(engine, storage, lib, as_of):
    """The follow-up flow's appeal steps, called directly: open, render, file, send."""
    opened = followups.open_appeals(engine, lib, as_of, actor=ACTOR)
    result = render_letters(engine, storage, SETTINGS, lib, list(opened.opened), as_of=as_of, actor=ACTOR)
    assert not result.failed
    outbox.enqueue_appeals(engine, outbox.appeals_to_file(engine), library=lib, actor=ACTOR)
    return opened, send(engine, storage, lib)


def transitions(engine, case_id) -> list[tuple[str, str]]:
    return [(e.from_status, e.to_status) for e in events(engine, case_id) if e.event == "transition"]


def open_follow_ups(engine, case_id) -> list[str]:
    with session_scope(engine) as s:
        return sorted(s.exec(select(FollowUp.kind).where(FollowUp.case_id == case_id, FollowUp.done_at.is_(None))))


def test_approve(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    assert submit(engine, storage, lib, [case_id]).decided == {case_id: "A1"}
    [sub] = submissions(engine, case_id)
    assert server.stats()["submissions"] == {sub.idempotency_key: 1}
    assert status(engine, case_id) == CaseStatus.APPROVED and open_follow_ups(engine, case_id) == []
    # later runs find nothing to do
    assert followups.due_inquiries(engine, now() + 100 * DAY) == []
    assert followups.open_appeals(engine, lib, now()).opened == {}


def test_deny_appeal_approve(engine, storage, pas_sim):
    server = pas_sim({"rules": [{"match": {"member_id": "M000001"}, "action": "deny", "reasons": ["T1"],
                                 "appeal": "approve"}]})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    assert submit(engine, storage, lib, [case_id]).decided == {case_id: "A3"}
    assert status(engine, case_id) == CaseStatus.DENIED

    opened, sent = appeal(engine, storage, lib, now())
    assert opened.opened == {case_id: 1}
    assert sent.decided == {case_id: "A1"}
    request, appealed = submissions(engine, case_id)
    assert (appealed.kind, appealed.attempt, appealed.channel) == ("appeal", 2, "fhir_pas")
    stats = server.stats()
    assert stats["submissions"] == {request.idempotency_key: 1, appealed.idempotency_key: 1}
    assert stats["appeals"] == {request.idempotency_key: 1}
    assert status(engine, case_id) == CaseStatus.APPROVED
    assert transitions(engine, case_id)[-4:] == [("submitting", "submitted"), ("submitted", "denied"),
                                                 ("denied", "appealed"), ("appealed", "approved")]
    assert {"appeal_opened", "appeal_sent"} <= {e.event for e in events(engine, case_id)}
    with session_scope(engine) as s:
        [a] = s.exec(select(Appeal).where(Appeal.case_id == case_id)).all()
        letter = s.exec(select(Letter).where(Letter.case_id == case_id, Letter.kind == "appeal")).one()
        auth = s.exec(select(Authorization).where(Authorization.case_id == case_id)).one()
    assert (a.level, a.status, a.denial_codes) == (1, "overturned", "T1")
    assert a.filed_at is not None and a.decided_at is not None
    tz = ZoneInfo(LIB["priority-health"].time_zone)  # 60 calendar days from the denial, to the payer's midnight
    assert a.due_at.astimezone(tz).date() == (now().astimezone(tz) + 60 * DAY).date()
    assert letter.appeal_level == 1 and auth.auth_number.startswith("SIM")
    # the appeal names the denied request and encloses its letter
    bundle = json.loads(storage.get(appealed.payload_key))
    claim = bundle["entry"][0]["resource"]
    assert claim["related"][0]["claim"]["identifier"]["value"] == request.idempotency_key
    docs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    assert any(d["type"]["coding"][0]["code"] == "51852-2" for d in docs)
    # everything again: nothing new anywhere
    assert appeal(engine, storage, lib, now())[0].opened == {}
    assert server.stats()["submissions"] == stats["submissions"]


def test_deny_appeal_denied_again_then_second_level_then_final(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "deny", "reasons": ["T1"], "appeal": "deny", "appeal_reasons": ["T2"]}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    submit(engine, storage, lib, [case_id])
    assert appeal(engine, storage, lib, now())[1].decided == {case_id: "A3"}
    assert status(engine, case_id) == CaseStatus.DENIED
    opened, sent = appeal(engine, storage, lib, now())  # level 2 (Priority Health has two)
    assert opened.opened == {case_id: 2} and sent.decided == {case_id: "A3"}
    final = followups.open_appeals(engine, lib, now(), actor=ACTOR)
    assert final.closed == [case_id] and status(engine, case_id) == CaseStatus.CLOSED
    with session_scope(engine) as s:
        levels = s.exec(select(Appeal.level, Appeal.status).where(Appeal.case_id == case_id).order_by(Appeal.level))
        assert list(levels) == [(1, "upheld"), (2, "upheld")]
    assert sum(server.stats()["submissions"].values()) == 3  # the request and two appeals, once each


def test_pend_inquire_approve(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "pend", "inquiries": 2, "then": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    assert submit(engine, storage, lib, [case_id]).decided == {case_id: "A4"}
    assert status(engine, case_id) == CaseStatus.IN_REVIEW
    assert open_follow_ups(engine, case_id) == ["sla_escalation", "status_inquiry"]
    assert followups.due_inquiries(engine, now()) == []  # Priority Health: first inquiry after 14 days

    first = inquire(engine, storage, lib, now() + 15 * DAY)
    assert (first.asked, first.decided, first.rescheduled) == (1, {case_id: "A4"}, 1)
    assert followups.due_inquiries(engine, now() + 16 * DAY) == []  # next one 7 days later
    second = inquire(engine, storage, lib, now() + 23 * DAY)
    assert second.decided == {case_id: "A1"} and status(engine, case_id) == CaseStatus.APPROVED
    [sub] = submissions(engine, case_id)
    stats = server.stats()
    assert stats["submissions"] == {sub.idempotency_key: 1} and stats["inquiries"] == {sub.idempotency_key: 2}
    assert open_follow_ups(engine, case_id) == []
    with session_scope(engine) as s:
        assert s.exec(select(Authorization).where(Authorization.case_id == case_id)).one().auth_number


def test_no_answer_after_max_inquiries_escalates(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "pend", "inquiries": 20}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    submit(engine, storage, lib, [case_id])
    as_of = now() + 15 * DAY
    for _ in range(4):  # Priority Health: at most 4 inquiries
        summary = inquire(engine, storage, lib, as_of)
        assert summary.asked == 1
        as_of += 8 * DAY
    assert summary.escalated == [case_id] and summary.rescheduled == 0
    assert followups.due_inquiries(engine, as_of + 100 * DAY) == []
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).escalated_at is not None
    assert [e.details for e in events(engine, case_id) if e.event == "escalated"] == [{"why": "max_inquiries"}]
    assert status(engine, case_id) == CaseStatus.IN_REVIEW  # still ours to chase: nothing is lost
    assert sum(server.stats()["inquiries"].values()) == 4


def test_review_sla_escalation_once(engine, storage):
    case_id = rendered_case(engine, storage)  # the packet channel: a person sends it and records the outcome
    outbox.enqueue(engine, [case_id], library=LIB, actor=ACTOR)
    outbox.send_pending(engine, storage, LIB, SETTINGS, actor=ACTOR)
    assert followups.escalate_overdue(engine, now() + 13 * DAY, actor=ACTOR) == []
    assert followups.escalate_overdue(engine, now() + 15 * DAY, actor=ACTOR) == [case_id]
    assert followups.escalate_overdue(engine, now() + 30 * DAY, actor=ACTOR) == []
    assert [e.details for e in events(engine, case_id) if e.event == "escalated"] == [{"why": "review_sla_passed"}]
    # the packet channel cannot ask: the inquiry finds no answer and asks a person later
    summary = followups.run_inquiries(engine, storage, LIB, SETTINGS, followups.due_inquiries(engine, now() + 15 * DAY),
                                      now() + 15 * DAY, actor=ACTOR)
    assert summary.asked == 1 and summary.decided == {} and summary.rescheduled == 1


def test_appeal_windows(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "deny", "reasons": ["T1"]}})
    lib = pas_library(server.url)
    a, b = rendered_case(engine, storage, n=1), rendered_case(engine, storage, n=2)
    submit(engine, storage, lib, [a, b])
    # an opened appeal left unfiled lapses at its deadline; a denial seen too late to appeal expires the case
    assert set(followups.open_appeals(engine, lib, now(), actor=ACTOR).opened) == {a, b}
    assert followups.lapse_appeals(engine, now() + 59 * DAY, actor=ACTOR) == []
    assert sorted(followups.lapse_appeals(engine, now() + 62 * DAY, actor=ACTOR)) == [a, b]
    assert {status(engine, c) for c in (a, b)} == {CaseStatus.EXPIRED}
    with session_scope(engine) as s:
        assert set(s.exec(select(Appeal.status))) == {"lapsed"}
    third = rendered_case(engine, storage, n=3)
    submit(engine, storage, lib, [third])
    assert followups.open_appeals(engine, lib, now() + 61 * DAY, actor=ACTOR).expired == [third]
    assert [e.details for e in events(engine, third) if e.to_status == "expired"] == [
        {"why": "appeal_window_passed", "appeal_level": 1}]


def test_transient_faults_are_retried_until_one_submission_succeeds(engine, storage, pas_sim):
    """500, 429 with Retry-After, a dropped answer and a slow answer (client timeout) in a row, then success."""
    from retroauth.channels.fhir_pas import PasChannel
    from retroauth.channels.pas import PasClient

    server = pas_sim({"default": {"action": "approve",
                                  "faults": [{"status": 500}, {"status": 429, "retry_after": 1}, {"drop": True},
                                             {"delay": 1.5}],
                                  "inquire_faults": [{"status": 503}]}})
    lib = pas_library(server.url)
    waits: list[float] = []
    channels = {"fhir_pas": PasChannel(token=TOKEN, client_factory=lambda url, token: PasClient(
        base_url=url, token=token, timeout=0.5, max_attempts=3, backoff=0.01, sleep=waits.append))}
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    first = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=channels)
    assert list(first.failed.values()) == ["PasUnavailable"]  # 500, 429, dropped: still pending
    assert status(engine, case_id) == CaseStatus.SUBMITTING
    assert max(waits) >= 1  # Retry-After was honoured
    second = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels=channels)
    assert second.decided == {case_id: "A1"}  # timed out once, then the stored first answer
    [sub] = submissions(engine, case_id)
    stats = server.stats()
    assert stats["submissions"] == {sub.idempotency_key: 1}  # recorded once, at the dropped call
    assert stats["calls"][sub.idempotency_key] == 5 and stats["repeats"][sub.idempotency_key] == 2
    assert status(engine, case_id) == CaseStatus.APPROVED


def test_inquiry_faults_are_retried(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "pend", "then": "approve", "inquiries": 1,
                                  "inquire_faults": [{"status": 500}, {"status": 429, "retry_after": 0}]}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    submit(engine, storage, lib, [case_id])
    summary = inquire(engine, storage, lib, now() + 15 * DAY)  # pas_channels: 2 attempts a call
    assert summary.failed == {case_id: "PasUnavailable"}
    assert followups.due_inquiries(engine, now() + 15 * DAY) != []  # still due: the retry asks again
    assert inquire(engine, storage, lib, now() + 15 * DAY).decided == {case_id: "A1"}
    assert status(engine, case_id) == CaseStatus.APPROVED


def test_a_process_killed_after_the_payer_accepted_does_not_submit_twice(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    url = engine.url.render_as_string(hide_password=False)
    proc = subprocess.run([sys.executable, "-m", "tests.crash_send", url, str(storage.root), server.url],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RETROAUTH_FAILPOINTS": "submit.before_record=kill"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    [sub] = submissions(engine, case_id)
    assert sub.status == "pending" and status(engine, case_id) == CaseStatus.SUBMITTING  # nothing recorded
    assert server.stats()["submissions"] == {sub.idempotency_key: 1}  # but the payer has it

    assert send(engine, storage, lib).decided == {case_id: "A1"}  # the rerun
    stats = server.stats()
    assert stats["submissions"] == {sub.idempotency_key: 1} and stats["repeats"] == {sub.idempotency_key: 1}
    assert status(engine, case_id) == CaseStatus.APPROVED
    assert send(engine, storage, lib).sent == []


# --- the flow on a real Prefect server -------------------------------------------------------------------


@pytest.fixture
def pas_payers(tmp_path, monkeypatch):
    """A copy of the payer library in which Priority Health takes PAS requests at the given URL."""
    def make(url: str):
        d = tmp_path / "payers"
        shutil.copytree(ROOT / "config" / "payers", d)
        p = d / "priority-health.yaml"
        p.write_text(p.read_text().replace("channel: packet", "channel: fhir_pas")
                     .replace("contact:\n", f"contact:\n  api_base_url: {url}\n", 1))
        monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(d))
        monkeypatch.setenv("RETROAUTH_PAS_TOKEN", TOKEN)
        from tasks import context
        context.reset()
    return make


@pytest.mark.usefixtures("prefect_server", "app_env")
def test_follow_ups_flow_on_a_real_prefect_server(engine, storage, pas_sim, pas_payers):
    from flows.follow_ups import follow_ups

    server = pas_sim({"rules": [{"match": {"member_id": "M000001"}, "action": "deny", "reasons": ["T1"]}],
                      "default": {"action": "pend", "inquiries": 1, "then": "approve"}})
    pas_payers(server.url)
    lib = pas_library(server.url)
    denied, pended = rendered_case(engine, storage, n=1), rendered_case(engine, storage, n=2)
    submit(engine, storage, lib, [denied, pended])

    summary = follow_ups(as_of=now() + 15 * DAY)
    assert summary["asked"] == 1 and summary["decisions"] == {"A1": 1}
    assert summary["appeals_opened"] == {str(denied): 1} and summary["appeals_filed"] == 1
    assert summary["appeal_decisions"] == {"A1": 1}
    assert {status(engine, c) for c in (denied, pended)} == {CaseStatus.APPROVED}
    assert sum(server.stats()["submissions"].values()) == 3  # two requests and one appeal, once each
    with session_scope(engine) as s:
        run_events = s.exec(select(CaseEvent).where(CaseEvent.case_id.in_([denied, pended]),
                                                    CaseEvent.run_id.is_not(None))).all()
    assert run_events  # the audit trail names the flow run
    again = follow_ups(as_of=now() + 15 * DAY)
    assert (again["asked"], again["appeals_opened"], again["appeals_filed"]) == (0, {}, 0)
    assert sum(server.stats()["submissions"].values()) == 3


def test_follow_up_tasks_retry_with_backoff_and_jitter():
    from tasks import follow_ups as t

    for task in (t.inquire_batch, t.open_appeals, t.file_appeals, t.lapse_appeals, t.escalate_overdue):
        assert task.retries >= 3 and task.retry_jitter_factor
        delays = task.retry_delay_seconds
        assert isinstance(delays, list) and delays == sorted(delays) and delays[0] < delays[-1]


def test_no_patient_data_in_follow_up_events(engine, storage, pas_sim):
    server = pas_sim({"default": {"action": "deny", "reasons": ["T1"]}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    submit(engine, storage, lib, [case_id])
    appeal(engine, storage, lib, now())
    followups.escalate_overdue(engine, now() + 30 * DAY, actor=ACTOR)
    with session_scope(engine) as s:
        blob = " ".join(str(d) for d in s.exec(sa.select(CaseEvent.details)).scalars())
    for phi in ("Jane", "Doe", "M000001", "1970-05-17", "MRN1"):
        assert phi not in blob

"""Request and appeal letters: what they say (text of the real PDF), injection, strictness, idempotency,
reproducible bytes, payer overrides, and the flow on a real Prefect server."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import threading
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pypdf
import pytest
import sqlalchemy as sa
from sqlmodel import select

from config import PAYERS_DIR
from config.settings import load_settings
from retroauth.db import session_scope
from retroauth.letters import (
    TEMPLATES_DIR, LetterError, LetterRequest, LetterTemplateError, LetterTemplates, check_templates,
    payer_info, render_letters, render_one, sample_letter_data,
)
from retroauth.models import (
    Appeal, CaseEvent, CaseServiceLine, Coverage, Diagnosis, Encounter, Letter, Packet, Patient, PayerOutage,
    PayerResponse, RetroCase, ServiceLine, Submission,
)
from retroauth.rules import load_rule_library
from retroauth import letters as letters_module
from retroauth.storage import LocalStorage, StorageError
from retroauth.typeset import TypesetError, to_document
from retroauth.vocab import DELAY_REASON_CODES, CaseStatus, MissReason
from tests.conftest import table_counts

CHI = ZoneInfo("America/Chicago")
DETROIT = ZoneInfo("America/Detroit")
LIB = load_rule_library(PAYERS_DIR)
SETTINGS = load_settings()
AS_OF = datetime(2026, 11, 20, 9, 0, tzinfo=CHI)
INJECTION = "<b>Robert'); DROP</b> #set text(red) $x$ *bold* \\"
NASTY_NOTE = 'MRI <i>brain</i> & "quotes" #let x = 1 [link](y) @ref _under_ ~tilde `code` = - + / 50% {}'


# --- builders ----------------------------------------------------------------------------------------


def make_case(engine, reason: str = "emergency", *, payer: str = "priority-health", status: str = CaseStatus.READY,
              given: str = "Jane", family: str = "Doe", description: str = "MRI brain without contrast",
              appeal_level: int = 0, n: int = 1) -> int:
    """A case with two services, diagnoses, coverage, outage, packet manifest (and appeals) as the reason needs."""
    with session_scope(engine) as s:
        p = Patient(source_system="t", source_id=f"p{n}", family_name=family, given_name=given,
                    birth_date=date(1970, 5, 17), mrn=f"MRN{n}")
        s.add(p)
        s.flush()
        retro = reason == "retroactive_eligibility"
        cov = Coverage(patient_id=p.id, payer_id=payer, member_id=f"M{n:06d}", group_number="G-42",
                       effective_from=date(2026, 11, 1) if retro else date(2026, 1, 1),
                       discovered_at=datetime(2026, 11, 18, 10, 30, tzinfo=CHI),
                       discovery_method="retroactive_eligibility" if retro else "eligibility_check")
        s.add(cov)
        e = Encounter(source_system="t", source_id=f"e{n}", patient_id=p.id,
                      encounter_class="emergency" if reason == "emergency" else "outpatient",
                      admission_type="emergency" if reason == "emergency" else None,
                      admitted_at=datetime(2026, 11, 13, 17, 5, tzinfo=CHI), timezone="America/Chicago",
                      place_of_service="23" if reason == "emergency" else "22",
                      system_issue_reference="INC-4711" if reason == "system_issue" else None)
        s.add(e)
        s.flush()
        lines = [
            ServiceLine(encounter_id=e.id, line_number=1, code_system="CPT", code="70551", description=description,
                        units=Decimal("1"), charge=Decimal("1850.00"), service_date=date(2026, 11, 13),
                        rendering_npi="1234567893", denial_carc="197" if appeal_level else None,
                        denial_rarc="M62" if appeal_level else None),
            ServiceLine(encounter_id=e.id, line_number=2, code_system="CPT", code="74177", modifiers="26",
                        description="CT abdomen and pelvis with contrast", units=Decimal("2"),
                        charge=Decimal("600.00"), service_date=date(2026, 11, 14), rendering_npi="1234567893"),
        ]
        s.add_all(lines)
        s.add(Diagnosis(encounter_id=e.id, code_system="ICD10CM", code="G44.309",
                        description="Post-traumatic headache", rank=1))
        s.add(Diagnosis(encounter_id=e.id, code_system="ICD10CM", code="R51.9", description="Headache", rank=2))
        if reason == "system_issue":
            s.add(PayerOutage(payer_id=payer, starts_at=datetime(2026, 11, 13, 8, tzinfo=CHI),
                              ends_at=datetime(2026, 11, 14, 20, tzinfo=CHI), reference="PORTAL-77",
                              description="Provider portal down"))
        s.flush()
        c = RetroCase(encounter_id=e.id, payer_id=payer, coverage_id=cov.id, status=status, reason=reason,
                      delay_reason_code=DELAY_REASON_CODES[MissReason(reason)],
                      due_at=datetime(2027, 2, 11, 23, 59, 59, tzinfo=DETROIT),
                      deadline_rule=f"{payer} retro window for {reason}", amount_at_risk=Decimal("3050.00"),
                      created_at=datetime(2026, 11, 19, 7, tzinfo=CHI))
        s.add(c)
        s.flush()
        s.add_all([CaseServiceLine(case_id=c.id, service_line_id=ln.id) for ln in lines])
        s.add(Packet(case_id=c.id, input_hash="x" * 64, complete=True, manifest={
            "case_id": c.id, "payer_id": payer, "items": [
                {"type": "case_summary", "label": "Case summary", "status": "included"},
                {"type": "34117-2", "label": "History and physical note", "status": "included"},
                {"type": "18842-5", "label": "Discharge summary", "status": "missing"},
                {"type": "outage_record", "label": "System outage record", "status": "included"},
            ]}))
        if appeal_level:
            sub = Submission(case_id=c.id, channel="packet", idempotency_key=f"k{n}", status="sent",
                             sent_at=datetime(2026, 11, 21, 10, tzinfo=CHI), tracking_number="TRK-9")
            s.add(sub)
            s.flush()
            s.add(PayerResponse(submission_id=sub.id, case_id=c.id, response_ref="DEN-2026-1", decision="A3",
                                reason_codes="197", received_at=datetime(2026, 12, 1, 12, tzinfo=DETROIT)))
            for level in range(1, appeal_level + 1):
                last = level == appeal_level
                s.add(Appeal(case_id=c.id, level=level, status="open" if last else "upheld", denial_codes="197,M62",
                             due_at=datetime(2027, 1, 30, 23, 59, 59, tzinfo=DETROIT),
                             filed_at=None if last else datetime(2026, 12, 3 + level, 12, tzinfo=DETROIT),
                             decided_at=None if last else datetime(2026, 12, 15 + level, 12, tzinfo=DETROIT)))
        return c.id


def pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages)


def flat(text: str) -> str:
    return " ".join(text.split())


def render(engine, storage, case_ids, **kw):
    kw.setdefault("as_of", AS_OF)
    return render_letters(engine, storage, SETTINGS, LIB, case_ids, **kw)


def stored(engine, storage, case_id) -> tuple[Letter, str, str]:
    with session_scope(engine) as s:
        letter = s.exec(select(Letter).where(Letter.case_id == case_id).order_by(Letter.version.desc())).first()
    return letter, flat(pdf_text(storage.get(letter.pdf_key, sha256=letter.pdf_sha256))), storage.get(letter.html_key).decode()


class CountingStorage(LocalStorage):
    def __init__(self, root):
        super().__init__(root)
        self.puts = 0

    def put(self, key, data, content_type="application/octet-stream"):
        self.puts += 1
        return super().put(key, data, content_type)


@pytest.fixture
def storage(tmp_path):
    return CountingStorage(tmp_path / "storage")


# --- what the letters say ------------------------------------------------------------------------------

REASON_WORDS = {
    "emergency": ["needed emergency care", "arrived for emergency care on November 13, 2026 at 5:05 PM CST"],
    "administrative_error": ["administrative error in our authorization process", "November 19, 2026"],
    "delayed_insurance_verification": ["was not known to us at the time of service", "November 18, 2026",
                                       "an eligibility inquiry made after the service"],
    "system_issue": ["system failure", "INC-4711", "PORTAL-77"],
    "retroactive_eligibility": ["established retroactively", "effective November 1, 2026", "November 18, 2026"],
}


@pytest.mark.parametrize("reason", list(REASON_WORDS))
def test_request_letter_per_reason_says_who_what_why_and_encloses(engine, storage, reason):
    case_id = make_case(engine, reason)
    result = render(engine, storage, [case_id])
    assert (result.rendered, result.moved, result.failed) == (1, 1, {})
    letter, text, html = stored(engine, storage, case_id)
    assert letter.html_key == f"letters/{case_id}/v1/request.html" and letter.pdf_key == f"letters/{case_id}/v1/request.pdf"
    assert letter.template_name == f"request/{reason}.html.j2"
    for words in [
        "RE: Request for retrospective authorization", "November 20, 2026",  # the letter date
        "Riverside Community Hospital", "NPI 1234567893", "Tax ID 12-3456789",  # letterhead
        "Jane Doe", "05/17/1970", "M000001", "1234567893",  # who
        "CPT 70551", "MRI brain without contrast", "$1,850.00", "CPT 74177", "modifier 26", "$1,200.00",
        "$3,050.00", "11/13/2026", "11/14/2026",  # what (2 units x $600)
        "November 13, 2026 through November 14, 2026", "February 11, 2027, 11:59 PM EST",  # deadline-relevant dates
        "G44.309", "Post-traumatic headache",  # medical necessity
        f"delay reason code {DELAY_REASON_CODES[MissReason(reason)]}", "Priority Health", "P.O. Box 232",
        "Enclosures (3)", "Case summary", "History and physical note", "System outage record",
        "Patient Financial Services, Authorization Desk", "Sincerely", "Page 1 of 2",
        *REASON_WORDS[reason],
    ]:
        assert words in text, words
    assert "Discharge summary" not in text  # a missing item is not enclosed
    assert "Jane Doe" in html and "G44.309" in html and "Enclosures (3)" in html  # the HTML says the same
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == CaseStatus.LETTER_RENDERED
        event = s.exec(select(CaseEvent).where(CaseEvent.case_id == case_id)).one()
    assert (event.from_status, event.to_status) == ("ready", "letter_rendered")
    assert event.details == {"letter_id": letter.id, "kind": "request", "appeal_level": 0, "version": 1,
                             "template": letter.template_name, "template_hash": letter.template_hash,
                             "data_hash": letter.data_hash, "pdf_sha256": letter.pdf_sha256}


APPEAL_WORDS = {
    1: ["Level I medical authorization appeal: denial of retrospective authorization", "peer-to-peer"],
    2: ["Level II medical authorization appeal", "Appeals so far", "Level I medical authorization appeal",
        "denial upheld", "took no part in the earlier decisions"],
    3: ["External review: denial of retrospective authorization", "Independent Review Organization",
        "exhausted the plan's internal appeals", "Level II medical authorization appeal"],
}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_appeal_letter_per_level_cites_the_denial_and_its_codes(engine, storage, level):
    case_id = make_case(engine, "emergency", status=CaseStatus.DENIED, appeal_level=level)
    result = render(engine, storage, [case_id])
    assert (result.rendered, result.moved, result.failed) == (1, 0, {})
    letter, text, _ = stored(engine, storage, case_id)
    assert (letter.kind, letter.appeal_level) == ("appeal", level)
    assert letter.pdf_key == f"letters/{case_id}/v1/appeal-{level}.pdf"
    for words in [
        "December 1, 2026", "DEN-2026-1", "197", "Precertification/authorization/notification/pre-treatment absent",
        "M62", "Missing/incomplete/invalid treatment authorization code", "January 30, 2027, 11:59 PM EST",
        "November 21, 2026", "TRK-9", "Jane Doe", "CPT 70551", "$3,050.00", "needed emergency care",
        *APPEAL_WORDS[level],
    ]:
        assert words in text, words
    with session_scope(engine) as s:  # an appeal letter moves nothing: filing it does
        assert s.get(RetroCase, case_id).status == CaseStatus.DENIED
        event = s.exec(select(CaseEvent).where(CaseEvent.case_id == case_id)).one()
    assert event.event == "letter_rendered" and event.details["letter_id"] == letter.id


# --- injection ------------------------------------------------------------------------------------------


def test_markup_in_the_data_prints_literally_in_html_and_pdf(engine, storage):
    case_id = make_case(engine, given=INJECTION, family="O'Hara-Smith", description=NASTY_NOTE)
    assert render(engine, storage, [case_id]).rendered == 1
    _, text, html = stored(engine, storage, case_id)
    assert "<b>Robert" not in html and "<i>brain" not in html
    assert "&lt;b&gt;Robert&#39;); DROP&lt;/b&gt; #set text(red) $x$ *bold* \\ O&#39;Hara-Smith" in html
    assert "MRI &lt;i&gt;brain&lt;/i&gt; &amp; &#34;quotes&#34;" in html
    assert f"{INJECTION} O'Hara-Smith" in text  # exactly the input: nothing became Typst markup
    assert flat(NASTY_NOTE) in text
    # And the structure is intact: the same sections, in order, and nothing red or bold from the data.
    assert [h for h in ("RE:", "Why authorization", "Services for which", "Medical necessity", "Our request",
                        "Enclosures (3)") if h in text] == ["RE:", "Why authorization", "Services for which",
                                                            "Medical necessity", "Our request", "Enclosures (3)"]


def test_the_converter_keeps_text_as_text_and_refuses_tags_outside_the_subset():
    doc = to_document('<html><head><meta name="date" content="2026-11-20"></head><body>'
                      '<p>a &lt;b&gt; &amp; #x $y$</p></body></html>')
    assert doc["blocks"] == [{"t": "p", "cls": [], "r": [{"s": "a <b> & #x $y$"}]}]
    for bad, words in [("<script>x</script>", "<script> is not in the letter HTML subset"),
                       ("<p>a <div>b</div></p>", "<div> inside <p>"),
                       ("<p>a</span>", "</span> closes <p>"),
                       ("<p>1 < 2</p>", "starts no tag")]:
        with pytest.raises(TypesetError, match=re.escape(words)):
            to_document(f'<html><head><meta name="date" content="2026-11-20"></head><body>{bad}</body></html>')


CONVERTER_HEAD = ('<!DOCTYPE html>\n<html><head><meta name="date" content="2026-11-20"><title>T</title>\n'
                  '<style>p > b { color: red }</style></head>\n<body>\n')


def test_the_converter_reads_the_whole_subset_and_keeps_loose_text():
    doc = to_document(CONVERTER_HEAD + '<main class="letter">Dear <b>Reviewer</b>,<BR>thanks\n'
                      '<P CLASS="Up">a &amp; b</P>\n<p>x<br>y</br></p><!-- <p>not shown</p> -->\n<hr/>'
                      '<table data-cols="auto,1fr"><tr><th>K</th><td class="num" colspan="1">1 &lt; 2</td></tr></table>'
                      '</main>\n</body></html>')
    assert doc["title"] == "T" and doc["date"] == [2026, 11, 20]
    assert doc["blocks"] == [{"t": "box", "cls": ["letter"], "body": [
        # text straight inside a container is a paragraph of its own, as in the HTML letter
        {"t": "p", "cls": [], "r": [{"s": "Dear "}, {"s": "Reviewer", "b": True}, {"s": ","}, {"br": True},
                                    {"s": "thanks"}]},
        {"t": "p", "cls": ["Up"], "r": [{"s": "a & b"}]},
        {"t": "p", "cls": [], "r": [{"s": "x"}, {"br": True}, {"s": "y"}]},
        {"t": "hr", "cls": []},
        {"t": "table", "cls": [], "cols": [{"auto": True}, {"fr": 1.0}], "head": [], "rows": [{"cls": [], "cells": [
            {"r": [{"s": "K"}], "span": 1, "num": False, "th": True},
            {"r": [{"s": "1 < 2"}], "span": 1, "num": True, "th": False}]}]},
    ]}]
    for bad, words in [("<p>a</p>\n<p>b <div>c</div></p>", "line 6: <div> inside <p>"),
                       ("<p>a</p>\n\n<p>1 < 2</p>", "line 7: a '<' that starts no tag"),
                       ("<div>\n<span><p>x</p></span></div>", "line 6: <p> inside <span>"),
                       ("<div>\n<p>x</div>", "line 6: </div> closes <p> (opened at line 6)")]:
        with pytest.raises(TypesetError, match=re.escape(words)):
            to_document(CONVERTER_HEAD + bad + "</body></html>")


# --- templates: strict, checked, overridable -----------------------------------------------------------------


@pytest.fixture
def tdir(tmp_path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def _override(tdir: Path, payer: str, name: str, text: str) -> None:
    path = tdir / "payers" / payer / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_missing_value_fails_naming_the_template_and_line(tdir):
    _override(tdir, "priority-health", "request/emergency.html.j2",
              '{% extends "default/request/emergency.html.j2" %}\n{% block why %}\n<p>{{ patient.middle_name }}</p>\n'
              "{% endblock %}\n")
    data = sample_letter_data(SETTINGS, payer_info(LIB["priority-health"]))
    with pytest.raises(LetterTemplateError) as err:
        LetterTemplates(tdir).render_html(data, date(2026, 11, 20))
    assert (err.value.template, err.value.line) == ("payers/priority-health/request/emergency.html.j2", 3)
    assert "middle_name" in str(err.value) and "Alex" not in str(err.value)


def test_check_templates_passes_the_shipped_templates_and_names_broken_ones(tdir):
    assert check_templates(TEMPLATES_DIR, SETTINGS, PAYERS_DIR) == []
    (tdir / "appeal" / "level-2.html.j2").write_text(
        (TEMPLATES_DIR / "appeal" / "level-2.html.j2").read_text().replace("{% block request %}", "{% block request %}{% if %}"))
    _override(tdir, "hometown-health", "request/system_issue.html.j2",
              '{% extends "default/request/system_issue.html.j2" %}\n\n{% block why %}{{ outage_count }}{% endblock %}\n')
    _override(tdir, "no-such-payer", "base.html.j2", '{% extends "default/base.html.j2" %}\n')
    problems = [str(p) for p in check_templates(tdir, SETTINGS, PAYERS_DIR)]
    level2_line = next(i for i, ln in enumerate((tdir / "appeal/level-2.html.j2").read_text().splitlines(), 1)
                       if "{% if %}" in ln)
    assert any(p.startswith(f"appeal/level-2.html.j2:{level2_line}: ") for p in problems), problems
    assert any(p.startswith("payers/hometown-health/request/system_issue.html.j2:3: 'outage_count' is undefined")
               for p in problems), problems
    assert any(p.startswith("payers/no-such-payer: no payer 'no-such-payer'") for p in problems), problems


def test_payer_override_is_found_first(engine, storage, tdir):
    hometown = make_case(engine, "emergency", payer="hometown-health", n=1)
    priority = make_case(engine, "emergency", payer="priority-health", n=2)
    render(engine, storage, [hometown, priority])
    h_letter, h_text, _ = stored(engine, storage, hometown)
    p_letter, p_text, _ = stored(engine, storage, priority)
    heading = "Explanation of why authorization was not requested before the service"
    assert heading in h_text and "Hometown Health's Administrative Guidelines" in h_text
    assert heading not in p_text and "Why authorization was not obtained in advance" in p_text
    assert h_letter.template_name == "payers/hometown-health:request/emergency.html.j2"
    assert p_letter.template_name == "request/emergency.html.j2"
    assert h_letter.template_hash != p_letter.template_hash
    # A payer's file of the same name replaces the shared one outright.
    _override(tdir, "priority-health", "request/emergency.html.j2",
              '{% extends "request/_request.html.j2" %}{% block reason_phrase %}OVERRIDE WINS{% endblock %}')
    resolved = LetterTemplates(tdir).resolve("priority-health", "request", "emergency")
    assert resolved.name == "payers/priority-health/request/emergency.html.j2"
    data = sample_letter_data(SETTINGS, payer_info(LIB["priority-health"]))
    assert "OVERRIDE WINS" in LetterTemplates(tdir).render_html(data, date(2026, 11, 20))


# --- idempotency and reproducible bytes ----------------------------------------------------------------------


def test_rendering_unchanged_inputs_again_writes_nothing(engine, storage):
    case_id = make_case(engine)
    render(engine, storage, [case_id])
    before, puts, files = table_counts(engine), storage.puts, storage.list("letters")
    again = render(engine, storage, [case_id], as_of=datetime(2026, 11, 23, 9, tzinfo=CHI))  # even another day
    assert (again.rendered, again.unchanged, again.moved) == (0, 1, 0)
    assert (table_counts(engine), storage.puts, storage.list("letters")) == (before, puts, files)

    with session_scope(engine) as s:  # a corrected description is new data: version 2, case stays rendered
        s.execute(sa.update(ServiceLine).where(ServiceLine.code == "70551").values(description="MRI brain w/o contrast"))
    third = render(engine, storage, [case_id])
    assert (third.rendered, third.moved) == (1, 0)
    letter, text, _ = stored(engine, storage, case_id)
    assert letter.version == 2 and letter.pdf_key == f"letters/{case_id}/v2/request.pdf"
    assert "MRI brain w/o contrast" in text
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == CaseStatus.LETTER_RENDERED
        events = s.exec(select(CaseEvent.event).where(CaseEvent.case_id == case_id).order_by(CaseEvent.id)).all()
    assert events == ["transition", "letter_rendered"]


class FailingAfter(CountingStorage):
    """Storage that refuses every put after the first ``ok`` ones (a bucket that went away mid-batch)."""

    def __init__(self, root, ok):
        super().__init__(root)
        self.ok = ok

    def put(self, key, data, content_type="application/octet-stream"):
        if self.puts >= self.ok:
            raise StorageError(f"cannot write {key}: service unavailable")
        return super().put(key, data, content_type)


def test_a_storage_failure_in_a_later_chunk_keeps_the_chunks_before_and_a_rerun_finishes(engine, tmp_path, monkeypatch):
    """A batch is stored and recorded WRITE_CHUNK letters per transaction while the next are typeset. When
    storage fails in the second chunk, the error is raised, the first chunk stays recorded (each of its
    rows pointing at its objects), nothing of the failed chunk is recorded, and a rerun writes the rest once."""
    monkeypatch.setattr(letters_module, "WRITE_CHUNK", 3)
    ids = [make_case(engine, n=n) for n in range(1, 8)]
    failing = FailingAfter(tmp_path / "storage", ok=6 + 1)  # chunk 1 (3 letters, 6 objects), then one more put
    with pytest.raises(StorageError):
        render(engine, failing, ids, workers=2)
    with session_scope(engine) as s:
        first = s.exec(select(Letter).order_by(Letter.case_id)).all()
        statuses = {i: s.get(RetroCase, i).status for i in ids}
    assert [letter.case_id for letter in first] == ids[:3]
    for letter in first:
        assert failing.get(letter.pdf_key, sha256=letter.pdf_sha256)
    assert [statuses[i] for i in ids] == [CaseStatus.LETTER_RENDERED] * 3 + [CaseStatus.READY] * 4

    storage = CountingStorage(tmp_path / "storage")
    again = render(engine, storage, ids, workers=2)
    assert (again.rendered, again.unchanged, again.moved, again.failed) == (4, 3, 4, {})
    assert storage.puts == 8  # the four letters not recorded before, two objects each: no letter twice
    with session_scope(engine) as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Letter)).scalar_one() == 7
        assert {s.get(RetroCase, i).status for i in ids} == {CaseStatus.LETTER_RENDERED}


def test_s3_puts_go_out_on_the_batchs_pool_local_files_from_the_writer_each_once(engine, tmp_path, s3_bucket,
                                                                               s3_server, monkeypatch):
    """A batch spanning several chunks: on S3 (the moto server) its objects are put on the batch's pool of
    ``put_concurrency`` threads, local files by the writer thread itself; either way every object is put
    once, each row points at an object with the recorded checksum, and a rerun puts nothing."""
    from retroauth.s3 import S3Storage
    from tests.faults import CountingStorage as Counting

    class Threads(Counting):
        """Which threads put."""

        def __init__(self, inner):
            super().__init__(inner)
            self.threads: set[str] = set()

        def put(self, key, data, content_type="application/octet-stream"):
            self.threads.add(threading.current_thread().name.rsplit("_", 1)[0])
            return super().put(key, data, content_type)

    monkeypatch.setattr(letters_module, "WRITE_CHUNK", 3)
    reasons = ["emergency", "administrative_error", "retroactive_eligibility", "delayed_insurance_verification",
               "emergency"] * 2
    reasons[0] = "system_issue"  # once: make_case adds a payer outage for each
    s3 = Threads(S3Storage(s3_bucket, "letters-test", endpoint_url=s3_server))
    local = Threads(LocalStorage(tmp_path / "storage"))
    assert (s3.put_concurrency, local.put_concurrency) == (8, 1)
    for k, (storage, threads) in enumerate(((s3, {"letters-put"}), (local, {"letters-write"}))):
        ids = [make_case(engine, reason, n=10 * k + n) for n, reason in enumerate(reasons[k:], 1)]
        first = render(engine, storage, ids, workers=2)
        assert (first.rendered, first.moved, first.failed) == (len(ids), len(ids), {})
        assert storage.calls["put"] == 2 * len(ids) and storage.threads == threads
        with session_scope(engine) as s:
            letters = s.exec(select(Letter).where(Letter.case_id.in_(ids)).order_by(Letter.case_id)).all()
        assert [letter.case_id for letter in letters] == ids
        assert first.letters == {letter.case_id: letter.id for letter in letters}  # ids of one insert per chunk
        with session_scope(engine) as s:
            moves = s.exec(select(CaseEvent).where(CaseEvent.case_id.in_(ids), CaseEvent.event == "transition")).all()
        assert {e.case_id: e.details["letter_id"] for e in moves} == first.letters
        for letter in letters:
            assert storage.get(letter.pdf_key, sha256=letter.pdf_sha256).startswith(b"%PDF")
            assert b"</html>" in storage.get(letter.html_key)
        again = render(engine, storage, ids, workers=2)
        assert (again.rendered, again.unchanged, again.failed) == (0, len(ids), {})
        assert storage.calls["put"] == 2 * len(ids)


def test_no_more_letters_compile_at_once_than_there_are_cores(monkeypatch):
    """Two batches of four threads each render at once (as two batches in flight do), yet Typst compiles at
    most one letter per core at a time: more would only time-slice the compiles."""
    from concurrent.futures import ThreadPoolExecutor

    from retroauth import typeset
    from retroauth.letters import render_all

    cores = 1
    monkeypatch.setattr(typeset, "COMPILES_AT_ONCE", threading.BoundedSemaphore(cores))
    now, most, lock = 0, 0, threading.Lock()

    class Watched:
        def __init__(self, compiler):
            self.compiler = compiler

        def compile(self, **kw):
            nonlocal now, most
            with lock:
                now += 1
                most = max(most, now)
            try:
                return self.compiler.compile(**kw)
            finally:
                with lock:
                    now -= 1

    new_compiler = typeset.Typesetter._new_compiler
    monkeypatch.setattr(typeset.Typesetter, "_new_compiler", lambda self: Watched(new_compiler(self)))
    templates = LetterTemplates()
    jobs = [(sample_letter_data(SETTINGS, reason=reason), date(2026, 11, 20))
            for reason in ["emergency", "administrative_error", "system_issue", "retroactive_eligibility"]]
    with ThreadPoolExecutor(2) as batches:
        done = list(batches.map(lambda part: render_all(templates, part, workers=4), [jobs, jobs[::-1]]))
    assert all(letter.pdf.startswith(b"%PDF") for part in done for letter in part)
    assert most == cores


def test_identical_inputs_give_identical_pdf_bytes():
    data = sample_letter_data(SETTINGS, reason="system_issue")
    first = LetterTemplates().render(data, date(2026, 11, 20))
    second = LetterTemplates().render(data.model_copy(), date(2026, 11, 20))  # fresh environment and compiler
    assert first.pdf == second.pdf and first.html == second.html and first.data_hash == second.data_hash
    info = pypdf.PdfReader(io.BytesIO(first.pdf)).metadata
    assert info.creation_date.date() == date(2026, 11, 20)  # from the letter, not the clock
    later = LetterTemplates().render(data, date(2026, 11, 21))
    assert later.pdf != first.pdf and later.data_hash == first.data_hash  # the date is not data


def test_render_one_returns_the_stored_letter(engine, storage):
    case_id = make_case(engine, "delayed_insurance_verification")
    pdf = render_one(engine, storage, SETTINGS, LIB, case_id, "pdf")
    html = render_one(engine, storage, SETTINGS, LIB, case_id, "html")
    assert pdf.startswith(b"%PDF") and b"Jane Doe" in html
    with session_scope(engine) as s:
        assert len(s.exec(select(Letter)).all()) == 1
        assert s.get(RetroCase, case_id).status == CaseStatus.LETTER_RENDERED
    with pytest.raises(LetterError, match="case 999: no such case"):
        render_one(engine, storage, SETTINGS, LIB, 999)


def test_a_batch_loaded_in_two_parts_comes_out_as_one(engine, storage, monkeypatch):
    """The first LOAD_FIRST letters are loaded and typeset while the rest load: letters stored already, cases
    that cannot have one and new letters, in either part, come out as in a batch loaded at once."""
    monkeypatch.setattr(letters_module, "LOAD_FIRST", 4)
    monkeypatch.setattr(letters_module, "WRITE_CHUNK", 2)
    payers = ["priority-health", "no-such-payer", "priority-health", "priority-health", "priority-health",
              "priority-health", "no-such-payer", "priority-health", "priority-health", "priority-health"]
    ids = [make_case(engine, payer=payer, n=n) for n, payer in enumerate(payers, 1)]
    bad = [ids[1], ids[6]]
    stored_before = render(engine, storage, [ids[2], ids[7]]).letters  # one in each part
    puts = storage.puts
    result = render(engine, storage, ids, workers=2)
    assert (result.rendered, result.unchanged, result.moved) == (6, 2, 6)
    assert result.failed == {case_id: "unknown_payer" for case_id in bad}
    assert storage.puts - puts == 2 * 6
    with session_scope(engine) as s:
        rows = {letter.case_id: letter for letter in s.exec(select(Letter)).all()}
        assert {i for i in ids if s.get(RetroCase, i).status == CaseStatus.LETTER_RENDERED} == set(ids) - set(bad)
    assert result.letters == {case_id: rows[case_id].id for case_id in set(ids) - set(bad)}
    assert {case_id: result.letters[case_id] for case_id in stored_before} == stored_before
    for case_id, letter in rows.items():
        assert letter.version == 1 and storage.get(letter.pdf_key, sha256=letter.pdf_sha256).startswith(b"%PDF")


def test_cases_that_cannot_have_a_letter_are_reported_by_id(engine, storage):
    ready = make_case(engine, n=1)
    elsewhere = make_case(engine, n=2, status=CaseStatus.IDENTIFIED)
    unknown = make_case(engine, n=3, payer="no-such-payer")
    result = render(engine, storage, [ready, elsewhere, unknown])
    assert (result.rendered, result.skipped, result.failed) == (1, 1, {unknown: "unknown_payer"})
    result = render_letters(engine, storage, SETTINGS, LIB, requests=[LetterRequest(ready, "appeal", 1)], as_of=AS_OF)
    assert result.failed == {ready: "no_appeal"}


# --- the flow --------------------------------------------------------------------------------------------------


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # once: the domain is tested on both backends above
@pytest.mark.usefixtures("prefect_server", "app_env")
def test_render_flow_on_a_real_prefect_server(engine):
    from flows.render import render_letters as render_flow

    ids = [make_case(engine, reason, n=i) for i, reason in enumerate(["emergency", "system_issue"], 1)]
    ids.append(make_case(engine, n=3, status=CaseStatus.DENIED, appeal_level=1))
    state = render_flow(as_of=AS_OF, batch_size=2, return_state=True)
    summary = state.result()
    assert (summary["rendered"], summary["moved"], summary["failed"]) == (3, 2, {})
    with session_scope(engine) as s:
        assert {s.get(RetroCase, i).status for i in ids[:2]} == {CaseStatus.LETTER_RENDERED}
        run_ids = {e.run_id for e in s.exec(select(CaseEvent))}
    assert run_ids == {str(state.state_details.flow_run_id)}
    text = " ".join(str(a.data) for a in asyncio.run(_artifacts(state.state_details.flow_run_id)))
    assert "rendered: **3**" in text
    for phi in ("Doe", "Jane", "M000001", "1970"):
        assert phi not in text
    before = table_counts(engine)  # the same flow again: the ready ones are done, nothing new
    assert render_flow(case_ids=ids, as_of=AS_OF)["rendered"] == 0
    assert table_counts(engine) == before


def test_render_task_retries_with_backoff_but_not_template_problems():
    from retroauth.letters import LettersIncomplete
    from tasks.letters import render_batch

    assert render_batch.retries >= 2 and render_batch.retry_jitter_factor
    assert LettersIncomplete({1: "template base.html.j2:3: 'x' is undefined"}).template_problem
    assert not LettersIncomplete({1: "template base.html.j2:3: x", 2: "StorageError"}).template_problem

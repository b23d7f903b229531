"""No protected health information where operators look: after the whole demo (the Synthea export and a
generated hospital day, swept, assembled, rendered, submitted to the payer simulator, followed up and
appealed) on a real Prefect server, no patient name, date of birth, member id, MRN or note sentence
appears in any log line, artifact, flow-run parameter, state message or persisted result."""

from __future__ import annotations

import asyncio
import io
import os
import re
from pathlib import Path

import pytest
from rich.console import Console
from sqlmodel import select

from config.settings import load_settings
from retroauth.db import make_engine, session_scope
from retroauth.models import ClinicalDocument, Coverage, Patient
from retroauth.storage import open_storage

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'/.\-]*[A-Za-z0-9]|[A-Za-z0-9]")
_SENTENCE = re.compile(r"[^.\n]{40,}")


async def _everything_on_the_server() -> list[str]:
    """Every log message, artifact, flow-run parameter set and state message, and task-run state message."""
    from prefect.client.orchestration import get_client

    texts: list[str] = []
    async with get_client() as client:
        for read, kw in ((client.read_logs, {}), (client.read_artifacts, {}), (client.read_flow_runs, {}),
                         (client.read_task_runs, {})):
            offset = 0
            while True:
                page = await read(limit=200, offset=offset, **kw)
                for item in page:
                    if hasattr(item, "message") and not hasattr(item, "state"):  # a log line
                        texts.append(f"{item.name} {item.message}")
                    elif hasattr(item, "data") and hasattr(item, "key"):  # an artifact
                        texts.append(f"{item.key} {item.description} {item.data}")
                    else:  # a flow run or task run
                        texts.append(f"{item.name} {getattr(item, 'parameters', '')} "
                                     f"{item.state.message if item.state else ''} {item.state_name}")
                if len(page) < 200:
                    break
                offset += 200
    return texts


def _phi(url: str, storage_url: str) -> tuple[set[str], set[str], list[str]]:
    """Tokens (names, member ids, MRNs, dates of birth in three spellings) and note sentences."""
    tokens: set[str] = set()
    sentences: list[str] = []
    storage = open_storage(storage_url)
    with session_scope(make_engine(url)) as s:
        for p in s.exec(select(Patient)):
            tokens |= {p.given_name, p.family_name, p.mrn or ""}
            if p.birth_date and p.birth_date.year < 2020:  # later ones could be a run date by chance
                d = p.birth_date
                tokens |= {d.isoformat(), f"{d:%m/%d/%Y}", f"{d:%Y%m%d}"}
        tokens |= {c.member_id for c in s.exec(select(Coverage))}
        docs = s.exec(select(ClinicalDocument).where(ClinicalDocument.source_system == "fhir").limit(40)).all()
        for doc in docs:
            try:
                body = storage.get(doc.storage_key).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - a generated document without a body
                continue
            sentences += [m.group(0).strip() for m in _SENTENCE.finditer(body)][:5]
    words = {t for t in tokens if t and len(t) >= 3}
    return words, {t for t in tokens if t}, sentences


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("prefect_server", "app_env")
def test_no_patient_data_anywhere_an_operator_looks(db_url, tmp_path):
    from flows.demo import run_demo

    out = io.StringIO()
    run_demo(load_settings(), Console(file=out, width=200))
    console = out.getvalue()
    assert "appeal" in console and "approved" in console  # the demo really ran to the follow-ups

    texts = asyncio.run(_everything_on_the_server())
    home = Path(os.environ["PREFECT_HOME"])
    for f in home.rglob("*"):  # persisted results and anything else the runs stored
        if f.is_file() and f.suffix not in (".db", ".db-wal", ".db-shm", ".toml", ".log") and f.stat().st_size < 2**20:
            texts.append(f.read_bytes().decode("utf-8", "replace"))
    blob = "\n".join(texts)
    assert len(texts) > 100 and "daily-sweep" in blob  # logs, runs and artifacts were read

    words, tokens, sentences = _phi(db_url, os.environ["RETROAUTH_STORAGE_URL"])
    assert len(words) > 100 and sentences  # names, ids, dates and notes to look for
    planted = sorted(words)[:3]  # the scan itself finds what it looks for
    assert {t for t in _TOKEN.findall(f"run ({planted[0]}) {planted[1]}, {planted[2]}.") if t in words} == set(planted)
    found = {t for t in _TOKEN.findall(blob) if t in words}
    assert found == set(), sorted(found)[:20]
    assert [s for s in sentences if s in blob] == []

"""Transient faults on about 20% of calls, while a whole day runs (tests/run_day.py) and each batch is called
again while it raises or reports failures, the way Prefect retries a task:

- storage: 503 (SlowDown), connection reset, slow calls, puts whose answer is lost (``faults.FlakyStorage``);
- the payer (the PAS simulator): 500, 429 with Retry-After, dropped answers, answers slower than the
  client's timeout, on submissions and on inquiries;
- the database (``faults.FlakyDatabase``): on PostgreSQL the transaction's server process terminated
  before a statement or the commit, or right after the commit (its answer lost); on SQLite "database
  is locked" at a statement or the commit, and another writer holding the lock for a moment.

Every case must end as in the fault-free day (the normalized snapshot of ``run_day.snapshot``), with no
duplicate submission (the simulator saw each idempotency key submitted once) and nothing half-written
(``run_day.check_integrity``, no stray letter objects). The seeds are fixed: a failure reproduces.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from retroauth.db import make_engine
from retroauth.payer_sim import run_simulator
from retroauth.storage import LocalStorage
from tests import run_day
from tests.conftest import table_counts
from tests.faults import FlakyDatabase, FlakyStorage
from tests.run_day import DayTemplate, plan

SEED = 20261127
ATTEMPTS = 40  # calls per batch before the day gives up (see the report: far fewer are needed)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
SLOW_ANSWER, CLIENT_TIMEOUT = 1.0, 0.5


@pytest.fixture(scope="module")
def template(tmp_path_factory, request) -> DayTemplate:
    return DayTemplate(tmp_path_factory.mktemp("transient-faults"), request)


def payer_faults(rate: float = 0.2, seed: int = SEED):
    """Fault lists per member for the simulator: each of the first four calls of a submission (and of an
    inquiry) fails with probability ``rate``; the first members get one of each kind for sure."""
    rng = random.Random(seed)
    kinds = [{"status": 500}, {"status": 429, "retry_after": 1}, {"drop": True}, {"delay": SLOW_ANSWER}]
    sure = iter(kinds)

    def seq(first: dict | None) -> list[dict]:
        out = [first] if first else []
        while len(out) < 4:
            out.append(rng.choice(kinds) if rng.random() < rate else {"delay": 0})  # delay 0: answered normally
        while out and out[-1] == {"delay": 0}:
            out.pop()
        return out

    def faults(p) -> dict:
        first = next(sure, None)
        return {"faults": seq(first), "inquire_faults": seq(first if p.kind.startswith("pend") else None)}

    return faults


class FaultyDay:
    """A copy of the day with its own simulator, run with whichever faults a test asks for."""

    def __init__(self, template: DayTemplate, backend: str, dest, *, payer_faults=None):
        self.url, root = template.clone(backend, dest)
        self.server, _ = run_simulator(run_day.sim_config(payer_faults))
        self.library = run_day.pas_library(self.server.url)
        self.engine = make_engine(self.url)
        self.plain = LocalStorage(root)
        self.waits: list[float] = []
        self.follow_up_as_of = datetime.now(UTC) + timedelta(days=15)

    def run(self, storage=None, **channel_options) -> dict:
        day = run_day.Day(self.engine, storage or self.plain, self.library,
                          run_day.pas_channels(sleep=self.waits.append, **channel_options),
                          follow_up_as_of=self.follow_up_as_of, attempts=ATTEMPTS)
        return day.run()

    def close(self) -> None:
        self.engine.dispose()
        self.server.stop()


@pytest.fixture(scope="module")
def baselines(template, tmp_path_factory):
    cache: dict[str, tuple[dict, dict, int]] = {}

    def get(backend: str):
        if backend not in cache:
            day = FaultyDay(template, backend, tmp_path_factory.mktemp(f"baseline-{backend}"))
            try:
                report = day.run()
                assert report["errors"] == {} and report["refused"] == {}
                cache[backend] = (run_day.snapshot(day.engine, day.library, exact=False), table_counts(day.engine),
                                  len(day.plain.list("letters")))
            finally:
                day.close()
        return cache[backend]

    return get


def assert_as_fault_free(day: FaultyDay, baseline, report: dict) -> None:
    expected, counts, letter_objects = baseline
    assert report["refused"] == {}
    snap = run_day.snapshot(day.engine, day.library, exact=False)
    assert sorted(snap) == sorted(expected), "a case was lost or added"
    for encounter in sorted(expected):
        assert snap[encounter] == expected[encounter], encounter
    assert table_counts(day.engine) == counts
    assert run_day.check_integrity(day.engine, day.plain) == []
    assert set(day.plain.list("letters")) == run_day.referenced_letter_objects(day.engine)  # no strays
    assert len(day.plain.list("letters")) == letter_objects
    stats = day.server.stats()
    assert set(stats["submissions"].values()) == {1}, "a duplicate submission"
    with day.engine.connect() as conn:
        keys = set(conn.exec_driver_sql("SELECT idempotency_key FROM submissions").scalars())
    assert set(stats["submissions"]) == keys and len(keys) == 18
    assert {enc: c["case"]["status"] for enc, c in snap.items()} == \
        {p.source_id: run_day.FINAL[p.kind] for p in plan() if p.kind != "covered"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_faults(backend, template, baselines, tmp_path):
    day = FaultyDay(template, backend, tmp_path)
    try:
        flaky = FlakyStorage(day.plain, rate=0.2, seed=SEED, slow_seconds=0.05, keyed=True)
        report = day.run(flaky)
        print("day:", report)  # shown when the test fails
        assert set(flaky.faults) == {"503", "reset", "slow", "lost_ack"}  # every kind happened
        assert sum(report["errors"].values()) > 0  # and some steps had to be retried
        assert_as_fault_free(day, baselines(backend), report)
    finally:
        day.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_payer_faults(backend, template, baselines, tmp_path):
    day = FaultyDay(template, backend, tmp_path, payer_faults=payer_faults())
    try:
        report = day.run(timeout=CLIENT_TIMEOUT, max_attempts=2)
        print("day:", report)  # shown when the test fails
        stats = day.server.stats()
        assert sum(stats["faults"].values()) > 0 and sum(stats["repeats"].values()) > 0
        assert max(day.waits) >= 1  # a 429's Retry-After was waited out
        assert sum(report["errors"].values()) > 0
        assert_as_fault_free(day, baselines(backend), report)
    finally:
        day.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_database_faults(backend, template, baselines, tmp_path):
    day = FaultyDay(template, backend, tmp_path)
    flaky = FlakyDatabase(day.engine, rate=0.2, seed=SEED)
    try:
        report = day.run()
        print("day:", report, flaky.faults)  # shown when the test fails
        assert set(flaky.faults) == set(flaky.kinds)
        assert sum(report["errors"].values()) > 0
    finally:
        flaky.remove()
    try:
        assert_as_fault_free(day, baselines(backend), report)
    finally:
        day.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_faults_at_once(backend, template, baselines, tmp_path):
    day = FaultyDay(template, backend, tmp_path, payer_faults=payer_faults(seed=SEED + 1))
    flaky_db = FlakyDatabase(day.engine, rate=0.2, seed=SEED + 1)
    try:
        storage = FlakyStorage(day.plain, rate=0.2, seed=SEED + 1, slow_seconds=0.05, keyed=True)
        report = day.run(storage, timeout=CLIENT_TIMEOUT, max_attempts=2)
        print("day:", report)  # shown when the test fails
    finally:
        flaky_db.remove()
    try:
        assert_as_fault_free(day, baselines(backend), report)
    finally:
        day.close()


# --- found while writing these tests ------------------------------------------------------------------------


class SharedNumberChannel:
    """A PAS payer that approves at once, and gives the first two requests the same authorization number
    (one authorization for two visits): an answer the outbox cannot record for the second case."""

    name = "fhir_pas"

    def __init__(self, first_two: list[int]):
        self.first_two = first_two
        self.sent: list[int] = []

    def send(self, engine, storage, library, settings, out):
        from retroauth.channels import SendResult

        self.sent.append(out.case_id)
        number = "AUTH-SHARED" if out.case_id in self.first_two else f"AUTH-{out.case_id}"
        return SendResult(tracking_number=f"T-{out.case_id}", decision="A1", certification_number=number,
                          response_ref=f"R-{out.idempotency_key}")


def test_an_answer_that_cannot_be_recorded_does_not_hold_back_the_rest_of_the_batch(template, tmp_path):
    from retroauth import outbox
    from retroauth.documents import assemble, cases_needing_packets
    from retroauth.letters import cases_to_render, render_letters
    from retroauth.sweep import sweep

    url, root = template.clone("sqlite", tmp_path)
    engine, storage = make_engine(url), LocalStorage(root)
    library, settings = run_day.pas_library("http://127.0.0.1:9"), run_day.load_settings()
    try:
        sweep(engine, library, as_of=run_day.AS_OF, lookback_days=30)
        assemble(engine, storage, library, cases_needing_packets(engine)[:4], as_of=run_day.AS_OF)
        render_letters(engine, storage, settings, library, cases_to_render(engine)[:4], as_of=run_day.AS_OF)
        ids = outbox.cases_to_enqueue(engine)
        assert len(ids) == 4
        outbox.enqueue(engine, ids, library=library)
        channel = SharedNumberChannel(ids[:2])
        for _ in range(4):  # the send task and its retries
            try:
                outbox.send_pending(engine, storage, library, settings, channels={"fhir_pas": channel})
                break
            except outbox.OutboxError:
                continue
        with engine.connect() as conn:
            pending = set(conn.exec_driver_sql("SELECT case_id FROM submissions WHERE status = 'pending'").scalars())
            status = dict(conn.exec_driver_sql("SELECT id, status FROM retro_cases").all())
            flagged = set(conn.exec_driver_sql("SELECT id FROM retro_cases WHERE escalated_at IS NOT NULL").scalars())
            whys = conn.exec_driver_sql("SELECT case_id, details FROM case_events WHERE event = 'escalated'").all()
        # Every request went out once and was recorded; the second case's approval, whose number is the
        # first case's, waits for a person (escalated, with the code), instead of stopping the batch.
        assert pending == set() and sorted(channel.sent) == sorted(ids)
        assert [status[i] for i in ids] == ["approved", "submitted", "approved", "approved"]
        assert flagged == {ids[1]} and len(whys) == 1 and "auth_number_of_another_case" in str(whys[0][1])
    finally:
        engine.dispose()

"""The fault matrix: a whole day (tests/run_day.py) killed by SIGKILL at each commit point of each stage, at
the first, a middle and the last pass, then run again as a retry would; the end must be the fault-free day's.

"The same" is compared on a normalized snapshot (``run_day.snapshot``: per encounter, the case's state,
reason and deadline, its packet, its letters (kind, level, data hash), submissions (kind, attempt, status),
the payer's answers, appeals, authorizations, follow-ups and its audit events in order), on the row
count of every table, on the integrity checks (``run_day.check_integrity``: no row pointing at nothing,
every state with its audit event, nothing left pending), and on the payer's side: the simulator saw
each idempotency key submitted exactly once and only keys the database knows. Every scenario runs on
SQLite; a reduced set runs on PostgreSQL. The day's data is built once per backend and copied.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from retroauth import failpoints
from retroauth.db import make_engine
from retroauth.payer_sim import run_simulator
from retroauth.storage import LocalStorage
from tests import run_day
from tests.conftest import ROOT, table_counts
from tests.run_day import AS_OF, FINAL, PLACES, DayTemplate, plan


@pytest.fixture(scope="module")
def template(tmp_path_factory, request) -> DayTemplate:
    return DayTemplate(tmp_path_factory.mktemp("fault-matrix"), request)


class Run:
    """One copy of the day with its own payer simulator."""

    def __init__(self, template: DayTemplate, backend: str, dest):
        self.url, self.storage_root = template.clone(backend, dest)
        self.server, _ = run_simulator(run_day.sim_config())
        self.library = run_day.pas_library(self.server.url)
        self.engine = make_engine(self.url)
        self.storage = LocalStorage(self.storage_root)
        # The follow-ups look 15 days ahead of now: the first inquiry is due 14 days after a request is sent.
        self.follow_up_as_of = datetime.now(UTC) + timedelta(days=15)

    def argv(self) -> list[str]:
        return [self.url, str(self.storage_root), self.server.url, AS_OF.isoformat(), self.follow_up_as_of.isoformat()]

    def day(self) -> dict:
        """The day in this process, as a retry runs it again."""
        return run_day.Day(self.engine, self.storage, self.library, run_day.pas_channels(),
                           follow_up_as_of=self.follow_up_as_of).run()

    def snapshot(self, exact: bool = True) -> dict:
        return run_day.snapshot(self.engine, self.library, exact=exact)

    def close(self) -> None:
        self.engine.dispose()
        self.server.stop()


class Baseline:
    def __init__(self, run: Run, hits: dict[str, int]):
        self.hits = hits
        self.snapshot = run.snapshot()
        self.loose = run.snapshot(exact=False)
        self.counts = table_counts(run.engine)
        self.stats = run.server.stats()
        self.letter_objects = sorted(run.storage.list("letters"))


@pytest.fixture(scope="module")
def baselines(template, tmp_path_factory):
    """The fault-free day per backend (computed on first use), with how often each failpoint was passed."""
    cache: dict[str, Baseline] = {}

    def get(backend: str) -> Baseline:
        if backend not in cache:
            run = Run(template, backend, tmp_path_factory.mktemp(f"baseline-{backend}"))
            try:
                os.environ[failpoints.ENV] = ",".join(f"{p}=raise@1000000" for p in PLACES)  # count, never fire
                failpoints.reset()
                try:
                    report = run.day()
                finally:
                    del os.environ[failpoints.ENV]
                    hits = dict(failpoints._passes)
                    failpoints.reset()
                assert report["errors"] == {} and report["refused"] == {}
                cache[backend] = Baseline(run, hits)
            finally:
                run.close()
        return cache[backend]

    return get


def assert_same_day(run: Run, base: Baseline, *, exact: bool = True) -> None:
    """The end of a day that was killed and run again is the fault-free day's, and nothing is half-written."""
    snap = run.snapshot(exact)
    expected = base.snapshot if exact else base.loose
    assert sorted(snap) == sorted(expected), "a case was lost or added"
    for encounter in sorted(expected):
        assert snap[encounter] == expected[encounter], encounter
    assert table_counts(run.engine) == base.counts
    assert run_day.check_integrity(run.engine, run.storage) == []
    letters = sorted(run.storage.list("letters"))
    assert letters == sorted(run_day.referenced_letter_objects(run.engine))  # no stray letter objects
    assert (letters == base.letter_objects) if exact else (len(letters) == len(base.letter_objects))
    # The payer's side: one submission per idempotency key, and only keys the database has sent.
    stats = run.server.stats()
    assert set(stats["submissions"].values()) == {1}, "a duplicate submission"
    with run.engine.connect() as conn:
        keys = set(conn.exec_driver_sql("SELECT idempotency_key FROM submissions WHERE status = 'sent'").scalars())
    assert set(stats["submissions"]) == keys
    assert len(keys) == sum(1 for v in base.stats["submissions"].values())
    assert set(stats["appeals"].values()) <= {1}


# --- the fault-free day -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_fault_free_day_is_the_expected_one_and_a_fixpoint(backend, baselines, template, tmp_path):
    base = baselines(backend)
    # Every stage ran several batches, so first, middle and last are different places.
    assert base.hits == {"sweep.after_page": 4, "assemble.after_batch": 4, "render.after_batch": 5,
                         "submit.before_record": 18, "submit.after_record": 18, "follow_up.after_inquiry": 6}
    statuses = {enc: c["case"]["status"] for enc, c in base.snapshot.items()}
    assert statuses == {p.source_id: FINAL[p.kind] for p in plan() if p.kind != "covered"}
    kinds = {p.source_id: p.kind for p in plan()}
    for enc, c in base.snapshot.items():
        appealed = kinds[enc] in ("deny", "pend_deny")
        if kinds[enc] in ("not_eligible", "awaiting"):
            assert "letters" not in c and "submissions" not in c
            continue
        assert [(lt["kind"], lt["level"]) for lt in c["letters"]] == \
            ([("appeal", 1)] if appealed else []) + [("request", 0)]
        assert all(lt["data_is_current"] for lt in c["letters"])
        assert [(s["kind"], s["attempt"], s["status"]) for s in c["submissions"]] == \
            [("request", 1, "sent")] + ([("appeal", 2, "sent")] if appealed else [])
        assert len(c["authorizations"]) == 1
    assert set(base.stats["submissions"].values()) == {1} and len(base.stats["submissions"]) == 18
    assert len(base.stats["appeals"]) == 6 and len(base.stats["inquiries"]) == 6

    # The same day again (a retry of a run that had finished) changes nothing and sends nothing.
    run = Run(template, backend, tmp_path)
    try:
        run.day()
        assert_same_day(run, base)
        first = run.server.stats()
        again = run.day()
        assert again["refused"] == {} and again["errors"] == {}
        assert_same_day(run, base)
        assert run.server.stats()["total_requests"] == first["total_requests"]  # not even an inquiry
    finally:
        run.close()


# --- killed at each commit point, then run again ------------------------------------------------------------

WHICH = ("first", "middle", "last")
SCENARIOS = [pytest.param("sqlite", place, which, id=f"sqlite-{place}-{which}") for place in PLACES for which in WHICH]
SCENARIOS += [pytest.param("postgres", place, which, id=f"postgres-{place}-{which}", marks=pytest.mark.postgres)
              for place, which in (("sweep.after_page", "middle"), ("render.after_batch", "middle"),
                                   ("submit.before_record", "middle"), ("submit.after_record", "last"),
                                   ("follow_up.after_inquiry", "middle"))]


def nth(which: str, hits: int) -> int:
    return {"first": 1, "middle": (hits + 1) // 2, "last": hits}[which]


@pytest.mark.parametrize(("backend", "place", "which"), SCENARIOS)
def test_a_day_killed_and_run_again_ends_as_the_fault_free_day(backend, place, which, baselines, template, tmp_path):
    base = baselines(backend)
    n = nth(which, base.hits[place])
    run = Run(template, backend, tmp_path)
    try:
        code = run_day.run_in_child(run.argv(), f"{place}=kill@{n}")
        assert code == -signal.SIGKILL, f"the day was not killed at {place} pass {n} (exit code {code})"
        at_kill = run.server.stats()
        if place == "submit.before_record":  # the payer has the n-th submission; the database does not say so
            with run.engine.connect() as conn:
                sent = conn.exec_driver_sql("SELECT count(*) FROM submissions WHERE status = 'sent'").scalar_one()
            assert (sum(at_kill["submissions"].values()), sent) == (n, n - 1)
        report = run.day()  # the retry
        assert report["errors"] == {} and report["refused"] == {}
        # PostgreSQL: the rerun's sweep of the pages already done draws case ids from the sequence (an
        # INSERT ... ON CONFLICT DO NOTHING does) so later cases get other ids: compare what does not embed them.
        assert_same_day(run, base, exact=not (backend == "postgres" and place == "sweep.after_page"))
        if place == "submit.before_record":  # the retry sent the same key again: a repeat, not a new request
            assert sum(run.server.stats()["repeats"].values()) == 1
    finally:
        run.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_command_line_day_killed_after_the_payer_took_a_request(backend, baselines, template, tmp_path):
    """``python -m tests.run_day`` as a plain process: killed before recording the 5th submission, run again."""
    base = baselines(backend)
    run = Run(template, backend, tmp_path)
    try:
        env = {**os.environ, failpoints.ENV: "submit.before_record=kill@5"}
        proc = subprocess.run([sys.executable, "-m", "tests.run_day", *run.argv()], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        env.pop(failpoints.ENV)
        proc = subprocess.run([sys.executable, "-m", "tests.run_day", *run.argv()], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_same_day(run, base)
    finally:
        run.close()

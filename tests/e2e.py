"""End to end, as an operator runs it: a deployment run of ``daily-run`` that dies in the middle of the send
step, then a retry of that same run. Shared by tests/test_ui_retry.py (the UI's request, sent to the API) and
tests/test_browser_retry.py (the Retry button of the real UI, clicked in Chromium).

The pieces are the real ones: a Prefect server, the deployments applied by deployments/setup.py (pool,
queues, payer limits, deployments, as ``make serve`` does), a process worker started with
``prefect worker start`` in the environment ``retroauth.cli_ops.prefect_env`` gives it, and the Da Vinci PAS
payer simulator, which the test payer (a copy of tests/data/payers/test-commercial.yaml with the channel
``fhir_pas`` and the simulator's address) sends to.

The day: CASES encounters of the day before, each with a service the payer wanted authorized and none on
file, worked in batches of BATCH cases (the run's ``batch_size`` parameter): several batches per step.

The fault: the first worker runs with ``RETROAUTH_FAILPOINTS=submit.after_record=kill@KILL_AT``, so its
flow-run process dies (SIGKILL, like a lost machine) right after the KILL_AT-th submission is recorded, while
the send batches are under way; with at most two batches in flight, KILL_AT > 2 x (BATCH - 1) means that at
least one whole send batch had gone through. The worker reports the run Crashed. (``raise@N`` would not do:
the send task's own retries, 10 s and more apart, absorb a one-shot exception and the run completes; an
exception on every pass would fail the run only after all of them, minutes later.) Then the worker is
started again without the failpoint (the cause "fixed") and the run is retried.

Ids, codes and counts only in what this module logs or asserts: the encounters it writes carry made-up names.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import sqlalchemy as sa
import yaml

from config.settings import load_settings
from retroauth.cli_ops import POOL, load_setup_module, prefect_env
from retroauth.db import session_scope
from retroauth.models import CaseEvent, Letter, Packet, RetroCase, Submission
from tests.conftest import DATA, ROOT
from tests.factories import CHI, add_encounter

DEPLOYMENT = "daily-run/daily-run"
QUEUE = "default"
AS_OF = datetime(2026, 11, 20, 6, tzinfo=CHI)  # the day's run, as of 06:00; the encounters are of the day before
PAYER = "test-commercial"
CASES = 24
BATCH = 6  # four batches per step
KILL_AT = 14  # the flow-run process dies right after the 14th submission is recorded
FAILPOINT = f"submit.after_record=kill@{KILL_AT}"
SIM_TOKEN = "e2e-sim-token"
# A killed process keeps the payer slots it held (payer-api-<payer>) until their Prefect lease runs out
# (300 s): with the default limit of 2 and both send batches in flight at the kill, the retry would wait
# that long for a slot. The test gives the limit room for the retry's batch.
PAYER_API_CONCURRENCY = 4
RUN_TIMEOUT = 300  # seconds, for one attempt of the run: about 20 s on a quiet machine, minutes on a loaded one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payer_limits(rules_dir: Path) -> set[str]:
    """The payer limits deployments/setup.py creates for a rule library (``payer-api-<payer id>``)."""
    from retroauth.rules import load_rule_library
    from tasks.submit import payer_api_limit

    return {payer_api_limit(payer_id) for payer_id in load_rule_library(rules_dir)}


def pas_rules_dir(dest: Path, sim_url: str) -> Path:
    """tests/data/payers with the test payer sending by Da Vinci PAS to the simulator at ``sim_url``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((DATA / "payers").glob("*.yaml")):
        shutil.copy(f, dest / f.name)
    path = dest / f"{PAYER}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["channel"] = "fhir_pas"
    spec.setdefault("contact", {})["api_base_url"] = sim_url
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


@contextmanager
def prefect_server_with_ui(home: Path, log: Path) -> Iterator[str]:
    """``prefect server start`` (it serves the UI; the test harness's server does not) on a free port, with
    its own home and SQLite database, no telemetry and no scheduler (the deployments' schedules must not
    start runs of their own during the test). Yields the API URL."""
    from retroauth.cli_ops import healthy

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not healthy(api, timeout=1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start:\n{tail(log)}")
            time.sleep(0.3)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Snapshot:
    """What the steps wrote, as ids, versions, hashes and codes."""

    letters: set[tuple]
    packets: set[tuple]
    events: list[tuple]  # (id, case_id, event, from_status, to_status)
    submissions: dict[int, tuple]  # case id -> (submission id, attempt, status, idempotency key)
    statuses: dict[int, str]
    at_payer: set[str] = field(default_factory=set)  # idempotency keys the payer had then

    @property
    def last_event_id(self) -> int:
        return max((e[0] for e in self.events), default=0)


@dataclass
class Pipeline:
    api: str
    engine: sa.Engine
    tmp: Path
    sim: Any
    rules_dir: Path
    results_dir: Path
    limits_before: dict[str, int] = field(default_factory=dict)  # the server's global limits before setup
    limits_set: list[str] = field(default_factory=list)  # the payer limits setup created or changed
    worker: subprocess.Popen | None = None
    worker_log: Path | None = None
    _workers: int = 0
    _t0: float = field(default_factory=time.monotonic)

    def mark(self, what: str) -> None:
        """A line of the scenario's timeline (printed: pytest shows it with a failure, or with -rP)."""
        print(f"{time.monotonic() - self._t0:7.1f} s  {what}", flush=True)

    # --- the worker ------------------------------------------------------------------------------------

    def worker_env(self, failpoints: str | None) -> dict[str, str]:
        settings = load_settings(payer_rules_dir=self.rules_dir, results_dir=self.results_dir)
        env = {k: v for k, v in os.environ.items() if k != "RETROAUTH_FAILPOINTS"}
        env.update(prefect_env(settings, self.api, poll_seconds=1))
        env.update(PREFECT_HOME=str(self.tmp / "worker-home"), PREFECT_LOGGING_LEVEL="INFO",
                   RETROAUTH_PAYER_RULES_DIR=str(self.rules_dir), RETROAUTH_PAS_TOKEN=SIM_TOKEN,
                   RETROAUTH_RESULTS_DIR=str(self.results_dir))
        if failpoints:
            env["RETROAUTH_FAILPOINTS"] = failpoints
        return env

    def start_worker(self, failpoints: str | None = None) -> None:
        """A process worker on the pool, polling every second, started as ``retroauth worker`` starts one;
        returns once it has asked the default queue for work."""
        from prefect.client.orchestration import get_client

        assert self.worker is None
        self._workers += 1
        self.worker_log = self.tmp / f"worker-{self._workers}.log"
        started = datetime.now(timezone.utc)
        with open(self.worker_log, "wb") as out:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                 "--name", f"e2e-worker-{self._workers}"],
                env=self.worker_env(failpoints), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                polled = client.read_work_queue_by_name(QUEUE, work_pool_name=POOL).last_polled
                if polled is not None and polled >= started - timedelta(seconds=1):
                    return
                assert self.worker.poll() is None, f"the worker stopped:\n{tail(self.worker_log)}"
                assert time.monotonic() < deadline, f"the worker never polled:\n{tail(self.worker_log)}"
                time.sleep(0.2)

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        if self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(10)
        self.worker = None

    # --- runs ----------------------------------------------------------------------------------------------

    def trigger(self) -> Any:
        from prefect.deployments import run_deployment

        return run_deployment(DEPLOYMENT, parameters={"as_of": AS_OF, "batch_size": BATCH}, timeout=0).id

    def flow_run(self, flow_run_id: Any) -> Any:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id)

    def wait_final(self, flow_run_id: Any, run_count: int, timeout: float = RUN_TIMEOUT) -> Any:
        """The run once its ``run_count``-th attempt has ended."""
        deadline = time.monotonic() + timeout
        while True:
            fr = self.flow_run(flow_run_id)
            if fr.run_count >= run_count and fr.state is not None and fr.state.is_final():
                return fr
            assert time.monotonic() < deadline, (
                f"run {flow_run_id} attempt {run_count} not finished after {timeout:g} s: "
                f"{fr.state.name if fr.state else '-'} (run_count {fr.run_count})\n{tail(self.worker_log)}")
            assert self.worker is None or self.worker.poll() is None, f"the worker stopped:\n{tail(self.worker_log)}"
            time.sleep(0.5)

    def ui_retry(self, flow_run_id: Any) -> dict:
        """Exactly what the Retry button of Prefect's UI sends (the V2 UI's request; a V1 page, which the
        /runs/flow-run/<id> links open, sends the same with ``force: false``: tests/test_browser_retry.py)."""
        r = httpx.post(f"{self.api}/flow_runs/{flow_run_id}/set_state", timeout=30, json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
        r.raise_for_status()
        return r.json()

    def subflow_runs(self, flow_run_id: Any) -> dict[str, list[Any]]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            names = {f.id: f.name for f in client.read_flows()}
        out: dict[str, list[Any]] = {}
        for r in runs:
            out.setdefault(names[r.flow_id], []).append(r)
        return out

    def task_runs(self, flow_run_ids: list[Any]) -> list[tuple[str, str]]:
        """(task, state type) of each task run of these flow runs ("render-letters-3fa" is render-letters)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                                         limit=200)
        return [(tr.name.rsplit("-", 1)[0], tr.state.type.value if tr.state else "") for tr in runs]

    def payer_slots_held(self) -> int:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(f"payer-api-{PAYER}").active_slots

    # --- the database ----------------------------------------------------------------------------------

    def claims_held(self) -> dict[str, int]:
        """Unsent outbox rows by who holds them (retroauth.claims), for failure messages: counts only."""
        with session_scope(self.engine) as s:
            cols = Submission.__table__.c
            if "claimed_by" not in cols:
                return {}
            rows = s.execute(sa.select(cols.claimed_by, cols.claimed_until).where(cols.status != "sent")).all()
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        return dict(Counter("free" if until is None else ("lease ran out" if until.replace(tzinfo=None) < now
                                                          else f"leased to {by}") for by, until in rows))

    def snapshot(self) -> Snapshot:
        with session_scope(self.engine) as s:
            return Snapshot(
                letters={tuple(r) for r in s.execute(sa.select(Letter.id, Letter.case_id, Letter.version,
                                                                Letter.data_hash, Letter.pdf_key))},
                packets={tuple(r) for r in s.execute(sa.select(Packet.id, Packet.case_id, Packet.version,
                                                                Packet.input_hash, Packet.built_at))},
                events=[tuple(r) for r in s.execute(sa.select(CaseEvent.id, CaseEvent.case_id, CaseEvent.event,
                                                               CaseEvent.from_status, CaseEvent.to_status)
                                                     .order_by(CaseEvent.id))],
                submissions={r[0]: tuple(r[1:]) for r in s.execute(sa.select(
                    Submission.case_id, Submission.id, Submission.attempt, Submission.status,
                    Submission.idempotency_key))},
                statuses=dict(s.execute(sa.select(RetroCase.id, RetroCase.status)).all()),
            )


@contextmanager
def pipeline(api: str, engine: sa.Engine, tmp: Path, monkeypatch: Any) -> Iterator[Pipeline]:
    """The simulator, the payer pointed at it, the deployments on the server at ``api`` (the test's Prefect
    client must already talk to it), and CASES encounters that each need a retro request. Stops the worker
    and the simulator, and removes the payer limits it created (the session's server is shared)."""
    from prefect.client.orchestration import get_client

    from retroauth.payer_sim import run_simulator

    sim, _ = run_simulator({"token": SIM_TOKEN, "default": {"action": "approve"}})
    p = None
    try:
        rules = pas_rules_dir(tmp / "payers", sim.url)
        monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(rules))
        monkeypatch.setenv("RETROAUTH_PAS_TOKEN", SIM_TOKEN)
        p = Pipeline(api=api, engine=engine, tmp=tmp, sim=sim, rules_dir=rules, results_dir=tmp / "results")
        with get_client(sync_client=True) as client:
            p.limits_before = {lim.name: lim.limit for lim in client.read_global_concurrency_limits(limit=200)}
        settings = load_settings(payer_rules_dir=rules, results_dir=p.results_dir,
                                 payer_api_concurrency=PAYER_API_CONCURRENCY)
        p.limits_set = sorted(payer_limits(rules))
        report = load_setup_module().setup(settings)
        assert sorted(report.limits) == p.limits_set, report.limits
        assert "daily-run" in report.deployments, report.skipped
        for _ in range(CASES):  # emergency CTs the payer wanted authorized; no authorization on file
            add_encounter(engine, payer=PAYER, cls="emergency", pos="23", admitted=AS_OF - timedelta(hours=20))
        p.mark(f"deployments applied, {CASES} encounters written")
        yield p
    finally:
        if p is not None:
            p.stop_worker()
            from prefect.exceptions import ObjectNotFound

            with get_client(sync_client=True) as client:  # the payer limits as they were (the server is shared)
                for name in p.limits_set:
                    if name in p.limits_before:
                        client.upsert_global_concurrency_limit_by_name(name, p.limits_before[name])
                    else:
                        with suppress(ObjectNotFound):
                            client.delete_global_concurrency_limit_by_name(name)
        sim.stop()


# --- the scenario ----------------------------------------------------------------------------------------


def crash_a_daily_run(p: Pipeline) -> tuple[Any, Snapshot]:
    """A deployment run of daily-run whose process dies in the send step; then the worker is started again
    without the fault. Returns the run's id and what the database held after the crash."""
    p.start_worker(FAILPOINT)
    p.mark("worker with the failpoint polling")
    flow_run_id = p.trigger()
    first = p.wait_final(flow_run_id, 1)
    p.mark(f"run ended {first.state.name}")
    assert first.state.is_crashed(), (first.state.name, first.state.message, tail(p.worker_log))
    assert first.run_count == 1
    p.stop_worker()
    p.mark(f"worker stopped; payer slots the dead process still holds: {p.payer_slots_held()}")

    after = p.snapshot()
    assert len(after.statuses) == CASES
    sent = [c for c, sub in after.submissions.items() if sub[2] == "sent"]
    pending = [c for c, sub in after.submissions.items() if sub[2] == "pending"]
    # Sweep, packets and letters were done for every case and each was queued; the process died right
    # after the KILL_AT-th submission was recorded: a batch of the send step had gone through, not all.
    assert (len(sent), len(pending)) == (KILL_AT, CASES - KILL_AT)
    assert len(after.letters) == len(after.packets) == CASES
    assert Counter(after.statuses.values()) == {"approved": KILL_AT, "submitting": CASES - KILL_AT}
    # The payer has every recorded submission once; a send still in flight in the other batch may have
    # reached it without being recorded (pending here): the retry sends that one again, with the same key.
    at_payer = p.sim.stats()["submissions"]
    assert set(at_payer.values()) == {1}, at_payer
    assert {after.submissions[c][3] for c in sent} <= set(at_payer) <= {sub[3] for sub in after.submissions.values()}
    after.at_payer = set(at_payer)
    sends = [state for runs in p.subflow_runs(flow_run_id).values() for r in runs
             for name, state in p.task_runs([r.id]) if name == "send-submissions"]
    assert "COMPLETED" in sends, sends

    p.start_worker()  # the cause fixed: no failpoint
    p.mark("worker without the failpoint polling")
    return flow_run_id, after


def assert_retried_once(p: Pipeline, flow_run_id: Any, before: Snapshot) -> Any:
    """The retried run completed as the same run, every case reached the payer exactly once, and the steps
    that had finished did not work again."""
    fr = p.wait_final(flow_run_id, 2)
    p.mark(f"retried run ended {fr.state.name}")
    assert fr.state.is_completed(), (fr.state.name, fr.state.message, tail(p.worker_log))
    assert (fr.id, fr.run_count) == (flow_run_id, 2)

    after = p.snapshot()
    # Every case sent once: one outbox row each (attempt 1, the same key as before the crash), and the payer
    # saw one submission per key, as many keys as cases; a repeat only for a send the crash had cut off
    # between the payer's answer and its record (the payer recognised the key and answered as before).
    statuses = Counter(after.statuses.values())
    unsent = Counter(sub[2] for sub in after.submissions.values() if sub[2] != "sent")
    assert statuses == {"approved": CASES}, (statuses, unsent, p.claims_held())
    assert all(sub[1:3] == (1, "sent") for sub in after.submissions.values())
    assert {c: sub[3] for c, sub in after.submissions.items()} == {c: sub[3] for c, sub in before.submissions.items()}
    stats = p.sim.stats()
    assert stats["submissions"] == {sub[3]: 1 for sub in after.submissions.values()}
    assert len(stats["submissions"]) == CASES
    recorded_before = {sub[3] for sub in before.submissions.values() if sub[2] == "sent"}
    assert {k: n for k, n in stats["repeats"].items() if n} == {k: 1 for k in before.at_payer - recorded_before}

    # The finished steps did no work again: the same packets and letters (no new row, version or hash),
    # and the retry's audit events are the send step's, for the cases the crash had left pending only.
    assert after.packets == before.packets
    assert after.letters == before.letters
    assert after.events[:len(before.events)] == before.events
    new = [e for e in after.events if e[0] > before.last_event_id]
    pending = {c for c, sub in before.submissions.items() if sub[2] == "pending"}
    assert {e[1] for e in new} == pending
    assert Counter((e[3], e[4]) for e in new if e[2] == "transition") == {
        ("submitting", "submitted"): len(pending), ("submitted", "approved"): len(pending)}

    # ... and in Prefect's terms: the retry reused the finished subflow runs with their persisted results
    # (one run each, never started again) and started no packet or letter batch.
    subflows = p.subflow_runs(flow_run_id)
    for name in ("daily-sweep", "assemble-documentation", "render-letters"):
        assert [(r.run_count, r.state.type.value) for r in subflows[name]] == [(1, "COMPLETED")], (name, subflows)
    assert all(r.state.is_final() for runs in subflows.values() for r in runs)
    tasks = Counter(name for name, _ in p.task_runs([r.id for runs in subflows.values() for r in runs]))
    assert (tasks["assemble-packets"], tasks["render-letters"]) == (CASES // BATCH,) * 2, tasks
    assert any(p.results_dir.iterdir())  # where the deployments keep the results the retry read
    return fr

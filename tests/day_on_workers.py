"""One day on real Prefect workers: a Prefect server (its database on PostgreSQL, or SQLite), the deployments
of deployments/prefect.yaml, process workers, a Da Vinci PAS payer simulator that answers with a delay, and a
generated day run by the daily-run deployment. Shared by tests/test_scale_out.py and benchmarks/scale_out.py.

Every process gets its settings from the environment built here (nothing from the caller's environment that
names a server, a database or a Prefect home); the caller's own Prefect client talks to the server inside
``rig.client()``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PAYER = "test-commercial"  # the test payer: retro requests accepted, no documents beyond the generated ones
TOKEN = "scale-out-token"
_SUBMITTING = re.compile(r"Worker '([^']+)' submitting flow run '([0-9a-f-]{36})'")
# Two workers may both pick up a run: the server lets one start it and tells the other to abort.
_ABORTED = re.compile(r"Aborted submission of flow run '([0-9a-f-]{36})'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppDay:
    """retroauth's side of one day: its database, its storage, the payer rules."""

    name: str
    database_url: str
    storage_dir: Path
    payers_dir: Path

    def env(self) -> dict[str, str]:
        return {"RETROAUTH_DATABASE_URL": self.database_url, "RETROAUTH_STORAGE_URL": f"file://{self.storage_dir}",
                "RETROAUTH_PAYER_RULES_DIR": str(self.payers_dir), "RETROAUTH_PAS_TOKEN": TOKEN}


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class DayOnWorkers:
    tmp: Path
    prefect_database_url: str | None = None  # None: SQLite under the Prefect home
    payer_delay: float = 0.2  # seconds the payer takes to answer each request
    payer_api_concurrency: int = 6  # send batches per payer at a time, across all workers
    poll_seconds: float = 1.0
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        from retroauth.payer_sim import run_simulator

        self.tmp.mkdir(parents=True, exist_ok=True)
        self.home = self.tmp / "prefect-home"
        self.results = self.tmp / "results"
        self.sim, _ = run_simulator({"token": TOKEN, "default": {"action": "approve", "delay": self.payer_delay}})
        self.payers_dir = self.tmp / "payers"
        shutil.copytree(DATA / "payers", self.payers_dir)
        p = self.payers_dir / f"{PAYER}.yaml"
        p.write_text(p.read_text().replace("channel: packet", "channel: fhir_pas")
                     .replace("contact: {", f'contact: {{api_base_url: "{self.sim.url}", ', 1))

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RETROAUTH_"))}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="INFO", **extra)
        return env

    # --- the Prefect server and the deployments ----------------------------------------------------------

    def start_server(self, timeout: float = 240) -> float:
        """Start the server (no scheduler: no scheduled run may take a worker during the day); seconds taken."""
        from retroauth.cli_ops import healthy

        extra = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
        if self.prefect_database_url:
            extra["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.prefect_database_url
        log = self.tmp / "server.log"
        t0 = time.perf_counter()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self._env(**extra), cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        while not healthy(self.api):
            if self.server.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the Prefect server did not start:\n{tail(log)}")
            time.sleep(0.3)
        return time.perf_counter() - t0

    @contextmanager
    def client(self) -> Iterator[None]:
        """This process's Prefect client (run_deployment, get_client) talks to this rig's server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api}):
            yield

    def deploy(self) -> Any:
        """Work pool, queues, payer limits, deployments (deployments/setup.py), as `make serve` does."""
        from config.settings import load_settings
        from retroauth.cli_ops import load_setup_module

        settings = load_settings(results_dir=str(self.results), payer_rules_dir=str(self.payers_dir),
                                 payer_api_concurrency=self.payer_api_concurrency)
        with self.client():
            return load_setup_module().setup(settings)

    # --- retroauth's side ------------------------------------------------------------------------------

    def app(self, name: str, database_url: str) -> AppDay:
        from retroauth.db import migrate

        migrate(database_url)
        return AppDay(name, database_url, self.tmp / f"storage-{name}", self.payers_dir)

    def generate(self, day: AppDay, encounters: int, seed: int = 11, end: date = date(2026, 11, 19)) -> Any:
        from retroauth.db import make_engine
        from retroauth.generate import generate
        from retroauth.rules import load_rule_library
        from retroauth.storage import open_storage

        engine = make_engine(day.database_url)
        try:
            return generate(engine, load_rule_library(self.payers_dir), encounters=encounters, seed=seed, days=1,
                            end=end, payer_ids=[PAYER], documents=True, storage=open_storage(f"file://{day.storage_dir}"))
        finally:
            engine.dispose()

    def add_cases(self, day: AppDay, count: int, as_of: datetime) -> list[int]:
        """``count`` emergency encounters two days before ``as_of`` whose CT needed an authorization the payer
        never gave: each becomes one case of ``PAYER`` that the day takes to submitted (encounter ids)."""
        from retroauth.db import make_engine
        from tests.factories import add_encounter

        engine = make_engine(day.database_url)
        try:
            return [add_encounter(engine, payer=PAYER, cls="emergency", pos="23", admitted=as_of - timedelta(days=2))
                    for _ in range(count)]
        finally:
            engine.dispose()

    # --- workers -----------------------------------------------------------------------------------------

    def start_workers(self, day: AppDay, count: int, timeout: float = 120,
                      env: dict[str, str] | None = None) -> float:
        """``count`` process workers on the pool, at most one flow run each, for ``day``, with ``env`` in their
        environment and their flow runs' (failpoints, say); seconds until all polled."""
        from prefect.client.orchestration import get_client

        env = self._env(PREFECT_WORKER_QUERY_SECONDS=str(self.poll_seconds),
                        PREFECT_WORKER_PREFETCH_SECONDS=str(max(1.0, self.poll_seconds)), **day.env(), **(env or {}))
        started = datetime.now().astimezone()
        t0 = time.perf_counter()
        for i in range(1, count + 1):
            name = f"{day.name}-worker-{i}"
            log = self.tmp / f"{name}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "retroauth", "--type", "process",
                 "--limit", "1", "--name", name],
                env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            self.workers.append(Worker(name, proc, log))
        names = {w.name for w in self.workers[-count:]}
        with self.client(), get_client(sync_client=True) as client:
            while True:
                seen = {w.name for w in client.read_workers_for_work_pool("retroauth")
                        if w.last_heartbeat_time and w.last_heartbeat_time >= started}
                if names <= seen:
                    return time.perf_counter() - t0
                dead = [w for w in self.workers if w.proc.poll() is not None]
                if dead or time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"workers did not start: {sorted(names - seen)}\n"
                                       + "\n".join(tail(w.log) for w in self.workers))
                time.sleep(0.3)

    def stop_workers(self) -> None:
        for w in self.workers:
            stop(w.proc)
        self.workers = []

    def runs_by_worker(self) -> dict[str, str]:
        """Flow run id -> the worker that started it (from the workers' logs)."""
        out = {}
        for w in self.workers:
            log = w.log.read_text(errors="replace")
            aborted = set(_ABORTED.findall(log))
            for name, run_id in _SUBMITTING.findall(log):
                if run_id not in aborted:
                    out[run_id] = name
        return out

    # --- the day -----------------------------------------------------------------------------------------

    def run_day(self, as_of: datetime, *, helpers: int, batch_size: int, timeout: float = 600) -> tuple[Any, float]:
        """The daily-run deployment for ``as_of`` with ``helpers``; its final flow run and the seconds from the
        trigger to its end (it ends when the helpers have)."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        with self.client():
            t0 = time.perf_counter()
            flow_run = run_deployment("daily-run/daily-run", timeout=0, as_subflow=False,
                                      parameters={"as_of": as_of, "helpers": helpers, "batch_size": batch_size})
            with get_client(sync_client=True) as client:
                while True:
                    fr = client.read_flow_run(flow_run.id)
                    if fr.state is not None and fr.state.is_final():
                        return fr, time.perf_counter() - t0
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"the day did not finish within {timeout:g} s ({fr.state!r})\n"
                                           + "\n".join(tail(w.log) for w in self.workers))
                    time.sleep(0.5)

    def deployment_run_of(self) -> dict[str, str]:
        """Every flow run id -> the deployment run (daily-run or work-day, one per worker process) it ran in:
        step subflows climb to their parents; a work-day run started by a daily run is its own."""
        from prefect.client.orchestration import get_client

        with self.client(), get_client(sync_client=True) as client:
            runs = {str(r.id): r for r in client.read_flow_runs(limit=200)}
            parent: dict[str, str | None] = {}
            for rid, r in runs.items():
                parent[rid] = (str(client.read_task_run(r.parent_task_run_id).flow_run_id)
                               if r.parent_task_run_id and r.deployment_id is None else None)
        out = {}
        for rid in runs:
            top = rid
            while parent.get(top):
                top = parent[top]
            out[rid] = top
        return out

    def artifact(self, flow_run_id: Any, key: str) -> str:
        """The data of a flow run's artifact (markdown)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        with self.client(), get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
        return "\n".join(str(a.data) for a in found)

    def flow_runs(self) -> list[Any]:
        from prefect.client.orchestration import get_client

        with self.client(), get_client(sync_client=True) as client:
            return client.read_flow_runs(limit=200)

    def close(self) -> None:
        self.stop_workers()
        stop(self.server)
        self.sim.stop()


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

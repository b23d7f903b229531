"""Put retroauth on a Prefect server: the work pool and its queues, one concurrency limit per payer, the
automation that marks unresponsive runs crashed, and the deployments of deployments/prefect.yaml. Every
step is idempotent: run it again and nothing changes (or what the settings or the file changed is
updated in place).

    .venv/bin/python deployments/setup.py          # against PREFECT_API_URL (default http://127.0.0.1:4200/api)

``retroauth serve`` (make serve) calls ``setup`` after starting the server. The daily-run time comes
from ``RETROAUTH_DAILY_RUN_AT`` in ``RETROAUTH_FACILITY_TIMEZONE`` (the file's cron is the default), the
payer limits from ``RETROAUTH_PAYER_API_CONCURRENCY``. A deployment whose flow file is not in this
checkout yet is skipped and named in the report.
"""

from __future__ import annotations

import copy
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from config.settings import Settings, daily_run_cron, load_settings  # noqa: E402


@dataclass
class SetupReport:
    work_pool: str = ""
    queues: dict[str, int] = field(default_factory=dict)  # queue -> priority
    queue_limits: dict[str, int] = field(default_factory=dict)  # queue -> runs at once (limited queues only)
    automations: dict[str, str] = field(default_factory=dict)  # name -> what it does
    limits: dict[str, int] = field(default_factory=dict)  # limit name -> slots
    deployments: dict[str, str] = field(default_factory=dict)  # flow/deployment -> id
    skipped: dict[str, str] = field(default_factory=dict)  # deployment -> why


def load_spec(path: Path = PREFECT_YAML) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def results_dir(settings: Settings, root: Path = ROOT) -> Path:
    """Where flow runs keep their results: RETROAUTH_RESULTS_DIR, a relative one read from the project
    directory (where the flow runs work)."""
    path = Path(settings.results_dir)
    return path if path.is_absolute() else root / path


def engine_command() -> str:
    """How a process worker starts a flow run: Prefect's engine on this checkout's interpreter, directly.

    Without a command, Prefect's process worker starts each run through a workspace supervisor: one more
    Python process per run (about 2.5 CPU-s of imports) and a new session. On Linux a new session is a
    new scheduling autogroup, which gets as much CPU as the Prefect server's whatever the worker's
    niceness: under a burst of urgent runs the server then answered triggers in 2-8 s, not 0.3 s.
    With the command the run stays in the worker's session, at its niceness."""
    return shlex.join([sys.executable, "-m", "prefect.engine"])


def deployment_specs(spec: dict[str, Any], settings: Settings, root: Path = ROOT) -> list[dict[str, Any]]:
    """The file's deployments with the facility's time zone on every schedule, the daily-run time from the
    settings, the engine command (``engine_command``), and in each run's environment (whoever started the
    worker) the results directory and the heartbeat the unresponsive-run automation listens for."""
    heartbeat = spec["retroauth"]["unresponsive_runs"]["heartbeat_seconds"]
    out = []
    for d in copy.deepcopy(spec["deployments"]):
        for schedule in d.get("schedules") or []:
            schedule["timezone"] = settings.facility_timezone
            if d["name"] == "daily-run" and "cron" in schedule:
                schedule["cron"] = daily_run_cron(settings)
        pool = d.setdefault("work_pool", {})
        job = pool.setdefault("job_variables", {})
        job.setdefault("command", engine_command())
        env = job.setdefault("env", {})
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results_dir(settings, root))
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(heartbeat)
        out.append(d)
    return out


def _schedules(d: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron, Interval

    out = []
    for s in d.get("schedules") or []:
        if "cron" in s:
            out.append(Cron(s["cron"], timezone=s.get("timezone"), slug=s.get("slug")))
        else:
            anchor = datetime.fromisoformat(s["anchor_date"]) if s.get("anchor_date") else None
            out.append(Interval(s["interval"], anchor_date=anchor, timezone=s.get("timezone"), slug=s.get("slug")))
    return out


def ensure_work_pool(client: Any, pool: dict[str, Any], report: SetupReport) -> None:
    """The process work pool and its queues, with their priorities (1 is served first) and limits (runs
    of the queue at once over all workers; none: unlimited)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(pool["name"])
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=pool["name"], type=pool.get("type", "process"), description=pool.get("description"),
            base_job_template=ProcessWorker.get_default_base_job_template()))
    report.work_pool = pool["name"]
    # Lowest priority first, so that the pool's own "default" queue (created with priority 1) has moved
    # out of the way before "urgent" takes 1.
    for q in sorted(pool["queues"], key=lambda q: -q["priority"]):
        try:
            existing = client.read_work_queue_by_name(q["name"], work_pool_name=pool["name"])
        except ObjectNotFound:
            client.create_work_queue(name=q["name"], description=q.get("description"), priority=q["priority"],
                                     concurrency_limit=q.get("concurrency_limit"), work_pool_name=pool["name"])
        else:
            wanted = {"priority": q["priority"], "description": q.get("description"),
                      "concurrency_limit": q.get("concurrency_limit")}
            if any(getattr(existing, k) != v for k, v in wanted.items()):
                client.update_work_queue(existing.id, **wanted)
    for q in client.read_work_queues(work_pool_name=pool["name"]):
        report.queues[q.name] = q.priority
        if q.concurrency_limit is not None:
            report.queue_limits[q.name] = q.concurrency_limit


def unresponsive_run_automation(name: str, crashed_after_seconds: float, tag: str = "retroauth") -> Any:
    """Prefect's recipe for zombie runs: a run tagged ``tag`` that has sent a heartbeat and then neither
    another one nor a final state within ``crashed_after_seconds`` is marked Crashed (a machine that died
    takes its runs' processes with it; nobody else would ever end them)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=name,
        description="Marks a retroauth flow run Crashed when its heartbeats stop (deployments/prefect.yaml)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=crashed_after_seconds)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, message=f"no heartbeat for {crashed_after_seconds:g} s: "
                                             "its process or machine stopped")],
    )


def ensure_automation(client: Any, automation: Any, report: SetupReport) -> None:
    """Create the automation, or bring the one of that name in line with it (one of that name, always)."""
    found = client.read_automations_by_name(automation.name)
    wanted = automation.model_dump(mode="json")
    if not found:
        client.create_automation(automation)
    else:
        for extra in found[1:]:
            client.delete_automation(extra.id)
        have = {k: v for k, v in found[0].model_dump(mode="json").items() if k in wanted}
        if have != wanted:
            client.update_automation(found[0].id, automation)
    report.automations[automation.name] = automation.description


def ensure_payer_limits(client: Any, prefix: str, payer_ids: list[str], limit: int, report: SetupReport) -> None:
    """One global concurrency limit per payer of the rule library (the send step takes a slot)."""
    for payer_id in sorted(payer_ids):
        name = f"{prefix}{payer_id}"
        client.upsert_global_concurrency_limit_by_name(name, limit)
        report.limits[name] = client.read_global_concurrency_limit_by_name(name).limit


def deploy(d: dict[str, Any], root: Path = ROOT) -> str:
    """One deployment of the file, loaded from this checkout, applied (created or updated in place)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    limit = None
    if d.get("concurrency_limit"):
        c = d["concurrency_limit"]
        limit = ConcurrencyLimitConfig(limit=c["limit"],
                                       collision_strategy=ConcurrencyLimitStrategy(c.get("collision_strategy", "ENQUEUE")))
    pool = d.get("work_pool") or {}
    deployment = RunnerDeployment.from_storage(
        storage=LocalStorage(str(root)), entrypoint=d["entrypoint"], name=d["name"],
        schedules=_schedules(d), concurrency_limit=limit, parameters=d.get("parameters") or {},
        description=d.get("description"), tags=d.get("tags") or [],
        enforce_parameter_schema=bool(d.get("enforce_parameter_schema", True)),
        work_pool_name=pool.get("name"), work_queue_name=pool.get("work_queue_name"),
        job_variables=pool.get("job_variables") or {},
    )
    return str(deployment.apply())


def setup(settings: Settings | None = None, spec_path: Path = PREFECT_YAML, root: Path = ROOT) -> SetupReport:
    """Work pool, queues, payer limits, deployments: all of them, idempotently."""
    from prefect.client.orchestration import get_client

    from retroauth.rules import load_rule_library

    settings = settings or load_settings()
    spec = load_spec(spec_path)
    ours = spec["retroauth"]
    report = SetupReport()
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, ours["work_pool"], report)
        ensure_payer_limits(client, ours["payer_api_limits"]["prefix"],
                            list(load_rule_library(settings.payer_rules_dir)), settings.payer_api_concurrency, report)
        unresponsive = ours["unresponsive_runs"]
        ensure_automation(client, unresponsive_run_automation(
            unresponsive["name"], unresponsive["crashed_after_seconds"]), report)
    for d in deployment_specs(spec, settings, root):
        flow_file = root / d["entrypoint"].split(":", 1)[0]
        if not flow_file.is_file():
            report.skipped[d["name"]] = f"{flow_file.relative_to(root)} is not in this checkout yet"
            continue
        report.deployments[d["name"]] = deploy(d, root)
    return report


def main() -> None:
    report = setup()
    print(f"work pool {report.work_pool}: queues " + ", ".join(
        f"{q} (priority {p}" + (f", {report.queue_limits[q]} runs at once)" if q in report.queue_limits else ")")
        for q, p in sorted(report.queues.items(), key=lambda kv: kv[1])))
    print(f"payer limits: {len(report.limits)} ({', '.join(sorted(report.limits))})")
    for name, what in report.automations.items():
        print(f"automation {name}: {what}")
    for name, dep_id in report.deployments.items():
        print(f"deployment {name}: {dep_id}")
    for name, why in report.skipped.items():
        print(f"deployment {name} skipped: {why}")


if __name__ == "__main__":
    main()

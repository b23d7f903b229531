"""Commands for operators and billing staff that talk to Prefect: ``serve``, ``worker``, ``trigger urgent``.

A typer app of its own; ``retroauth.cli`` adds it with ``app.add_typer(cli_ops.app)`` (its commands
then sit beside the others), and ``python -m retroauth.cli_ops`` runs it alone (``make serve`` does).
Prefect is imported inside the commands only: the domain package never imports it at import time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from config.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 4200
POOL = "retroauth"
# Workers (and the flow-run processes they start, which inherit it) run at a lower CPU priority than the
# server: under a burst of urgent runs the UI, the API and new triggers still get answered at once.
WORKER_NICENESS = 10
# How often a worker asks the server for runs: an urgent run waits half of it on average; each ask costs
# the server a query over the queue's scheduled runs (all of them, under a burst).
WORKER_POLL_SECONDS = 2.0
URGENT_DEPLOYMENT = "urgent-case/urgent-case"
URGENT_QUEUE = "urgent"
# A request made again within the same window of this many seconds is the same request (one run).
IDEMPOTENCY_WINDOW_SECONDS = 120

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)
trigger_app = typer.Typer(
    help="Run something now instead of waiting for its schedule (billing staff: an urgent case).",
    no_args_is_help=True,
)
app.add_typer(trigger_app, name="trigger")

console = Console()
err = Console(stderr=True)


def start_worker(cmd: list[str], niceness: int = WORKER_NICENESS, **popen: Any) -> subprocess.Popen:
    """A ``prefect worker start`` process at ``niceness`` (set before it starts any flow run).

    In its own process group, so that a Ctrl-C in the terminal reaches only the command that started it
    (which stops it with SIGTERM), never its flow runs; but in the same session: on Linux a session is
    a scheduling autogroup, and niceness only counts against the processes of the same autogroup."""
    popen.setdefault("process_group", 0)
    proc = subprocess.Popen(cmd, **popen)
    if niceness:
        os.setpriority(os.PRIO_PROCESS, proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness))
    return proc


def _reflowed(command: Any) -> Any:
    """Help text as paragraphs: typer keeps a docstring's line breaks, which look ragged in a terminal."""
    import inspect

    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return command


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/]")
    return typer.Exit(2)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise _fail(str(exc)) from None


# --- the Prefect environment ---------------------------------------------------------------------------


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def prefect_env(settings: Settings, api: str, poll_seconds: float | None = None) -> dict[str, str]:
    """What every retroauth Prefect process needs: the server's address, no telemetry, a Prefect home
    under var/ (unless one is set), the results directory every worker reads, the server's database."""
    env = {
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    defaults = {
        "PREFECT_HOME": str(Path("var/prefect").resolve()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(settings.results_dir) if Path(settings.results_dir).is_absolute()
                                                  else ROOT / settings.results_dir),
    }
    if poll_seconds is not None:
        defaults["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_seconds)
        defaults["PREFECT_WORKER_PREFETCH_SECONDS"] = str(max(1.0, poll_seconds))
    for k, v in defaults.items():
        env[k] = os.environ.get(k) or v
    if settings.prefect_database_url is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = settings.prefect_database_url.get_secret_value()
    if settings.prefect_login is not None:  # the server asks for it; our clients (workers, commands) send it
        env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"] = settings.prefect_login.get_secret_value()
    return env


def healthy(api: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def ui_url(api: str) -> str:
    return api[:-4] if api.endswith("/api") else api


def load_setup_module() -> Any:
    """deployments/setup.py of this checkout (a script, not an installed package), loaded once."""
    import importlib.util

    name = "retroauth_deployments_setup"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "deployments" / "setup.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _stop(proc: subprocess.Popen | None, name: str, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    console.print(f"stopping the {name} ...")
    proc.terminate()  # SIGTERM: both stop cleanly on it (SIGINT may be ignored in a background job)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- serve ----------------------------------------------------------------------------------------------


@app.command()
@_reflowed
def serve(
    host: Annotated[str, typer.Option(help="Address the Prefect server listens on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port of the Prefect server and its UI.")] = DEFAULT_PORT,
    poll_seconds: Annotated[float, typer.Option(help="How often the worker asks for new runs (seconds).")]
    = WORKER_POLL_SECONDS,
    worker: Annotated[bool, typer.Option(help="Start a worker on the pool here too.")] = True,
) -> None:
    """Run retroauth on this machine: the Prefect server and UI, the deployments and a worker.

    Starts a Prefect server on HOST:PORT (its database: SQLite under var/prefect, or PostgreSQL when
    RETROAUTH_PREFECT_DATABASE_URL is set; no telemetry), waits until it answers, creates the work pool
    "retroauth" with its queues "urgent" and "default" and one concurrency limit per payer, deploys
    daily-run, follow-ups, urgent-case and work-day (the daily run's helpers), starts a worker on the pool
    (at a lower CPU priority than the server, so that the UI and triggers stay quick while it works) and
    prints the UI address.
    Everything it creates is created once: running it again changes nothing. Ctrl-C stops it all.
    """
    settings = _settings()
    api = api_url(host, port)
    os.environ.update(prefect_env(settings, api, poll_seconds))
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]).mkdir(parents=True, exist_ok=True)

    from retroauth.db import migrate

    migrate(settings.database_url)
    console.print("[green]database ready[/]")

    server: subprocess.Popen | None = None
    worker_proc: subprocess.Popen | None = None
    stopping = False

    def on_term(signum, frame):  # noqa: ANN001, ARG001 - signal handler
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started in the background
    try:
        if healthy(api):
            console.print(f"[yellow]a Prefect server already answers at {ui_url(api)}: using it[/]")
        elif _port_taken(host, port):
            raise _fail(f"port {port} on {host} is taken by something that is not a Prefect server: "
                        "stop it or pass --port")
        else:
            server_log = home / "server.log"
            console.print(f"starting the Prefect server on {host}:{port} (log: {server_log}) ...")
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                stdout=open(server_log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )
            deadline = time.monotonic() + 180
            while not healthy(api):
                if server.poll() is not None:
                    raise _fail(f"the Prefect server stopped (exit {server.returncode}):\n{_tail(server_log)}")
                if time.monotonic() > deadline:
                    raise _fail(f"the Prefect server did not answer within 180 s:\n{_tail(server_log)}")
                time.sleep(0.5)
            console.print("[green]Prefect server ready[/]")

        report = load_setup_module().setup(settings)
        _print_setup(report)

        if worker:
            worker_log = home / "worker.log"
            worker_proc = start_worker(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                 "--name", f"{POOL}-{socket.gethostname()}-{os.getpid()}"],
                stdout=open(worker_log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
            )
            console.print(f"[green]worker started[/] on pool {POOL}, polling every {poll_seconds:g} s, "
                          f"niceness +{WORKER_NICENESS} (log: {worker_log})")

        console.rule()
        console.print(f"Prefect UI: [bold]{ui_url(api)}[/]")
        console.print("An urgent case now: [bold]retroauth trigger urgent --encounter ID[/] (or --case ID)")
        console.print("Ctrl-C stops the worker and the server.")
        while True:
            time.sleep(1)
            if server is not None and server.poll() is not None:
                raise _fail(f"the Prefect server stopped (exit {server.returncode}):\n{_tail(home / 'server.log')}")
            if worker_proc is not None and worker_proc.poll() is not None:
                raise _fail(f"the worker stopped (exit {worker_proc.returncode}):\n{_tail(home / 'worker.log')}")
    except KeyboardInterrupt:
        stopping = True
    finally:
        _stop(worker_proc, "worker")
        _stop(server, "Prefect server")
        if stopping:
            console.print("stopped")


def _print_setup(report: Any) -> None:
    t = Table("what", "name", "detail", title="On the Prefect server")
    t.add_row("work pool", report.work_pool, "process")
    for q, p in sorted(report.queues.items(), key=lambda kv: kv[1]):
        limit = report.queue_limits.get(q)
        t.add_row("queue", q, f"priority {p}" + (f", {limit} runs at a time" if limit else ""))
    for name, limit in sorted(report.limits.items()):
        t.add_row("concurrency limit", name, f"{limit} at a time")
    for name, what in report.automations.items():
        t.add_row("automation", name, what)
    for name in report.deployments:
        t.add_row("deployment", name, "")
    for name, why in report.skipped.items():
        t.add_row("[yellow]deployment skipped[/]", name, why)
    console.print(t)


# --- worker ---------------------------------------------------------------------------------------------


@app.command()
@_reflowed
def worker(
    api: Annotated[str | None, typer.Option("--api-url", help="The Prefect API (default: PREFECT_API_URL, "
                                            "else http://127.0.0.1:4200/api).")] = None,
    poll_seconds: Annotated[float, typer.Option(help="How often to ask for new runs (seconds).")]
    = WORKER_POLL_SECONDS,
    limit: Annotated[int | None, typer.Option(min=1, help="Flow runs this worker runs at a time (default: "
                                              "no limit). 1 spreads a day's runs over the workers.")] = None,
    queue: Annotated[list[str] | None, typer.Option(help="Serve only this queue of the pool (repeatable; "
                                                    "default: all, urgent first).")] = None,
    niceness: Annotated[int, typer.Option(min=0, max=19, help="How much lower than normal the CPU priority "
                                          "of the worker and its flow runs is (0: the same as the server's).")]
    = WORKER_NICENESS,
) -> None:
    """Start one more worker on the "retroauth" pool (on this or another machine) until Ctrl-C.

    Needs the same checkout at the same path as the machine that deployed (with its .venv: runs
    start on the interpreter that deployed), the same RETROAUTH_*
    settings (the same database and storage) and RETROAUTH_RESULTS_DIR on a directory every worker
    shares. With several workers the Prefect server should run on PostgreSQL. A worker with --limit 1
    takes one run of a day (the daily run or one of its helpers) and leaves the others to the other
    workers; keep one worker with --queue urgent free for urgent cases."""
    settings = _settings()
    api = api or os.environ.get("PREFECT_API_URL") or api_url()
    if not healthy(api):
        raise _fail(f"no Prefect server answers at {api}: start it with `make serve`")
    env = {**os.environ, **prefect_env(settings, api, poll_seconds)}
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    for q in queue or []:
        cmd += ["--work-queue", q]
    proc = start_worker(cmd, niceness, env=env, cwd=ROOT)
    try:
        raise typer.Exit(proc.wait())
    except KeyboardInterrupt:
        _stop(proc, "worker")


# --- trigger urgent ---------------------------------------------------------------------------------------


def urgent_idempotency_key(kind: str, business_id: int, now: datetime | None = None,
                           window_seconds: int = IDEMPOTENCY_WINDOW_SECONDS) -> str:
    """``urgent-<encounter|case>-<id>-<window>``: the same id asked for within one window of
    ``window_seconds`` (fixed windows, counted from the epoch) is one run. Two clicks that straddle a
    window's end make two runs, and that is harmless: the second finds the work done (every step is
    idempotent, and the outbox never sends a request twice)."""
    now = now or datetime.now(timezone.utc)
    return f"urgent-{kind}-{business_id}-{int(now.timestamp()) // window_seconds}"


@trigger_app.command("urgent")
@_reflowed
def trigger_urgent(
    encounter: Annotated[int | None, typer.Option("--encounter", help="The encounter id to run now.")] = None,
    case: Annotated[int | None, typer.Option("--case", help="The case id to run now.")] = None,
    wait: Annotated[float, typer.Option(help="Wait up to this many seconds for the run to finish and show "
                                             "the cases' statuses (0: do not wait).")] = 0,
    api: Annotated[str | None, typer.Option("--api-url", help="The Prefect API (default: PREFECT_API_URL, "
                                            "else http://127.0.0.1:4200/api).")] = None,
) -> None:
    """Send one encounter (or one case) through the whole pipeline now, ahead of the daily work.

    For a payer window that closes within hours: the encounter is swept, its documents gathered, the
    letter written and the request sent, on the "urgent" queue that workers serve first. Give exactly
    one of --encounter and --case. Asking twice within two minutes (a double click) starts one run, not
    two. With --wait the command waits for the run and shows where each case stands; otherwise follow
    the run in the Prefect UI (the link is printed) or with `retroauth case show ID`.
    """
    if (encounter is None) == (case is None):
        raise _fail("give exactly one of --encounter ID and --case ID")
    settings = _settings()
    api = api or os.environ.get("PREFECT_API_URL") or api_url()
    os.environ.update({"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})  # before Prefect loads
    if not healthy(api):
        raise _fail(f"no Prefect server answers at {api}: start it with `make serve`")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
    from prefect.deployments import run_deployment
    from prefect.utilities.urls import url_for

    kind, business_id = ("encounter", encounter) if encounter is not None else ("case", case)
    parameters = {"encounter_id": encounter} if encounter is not None else {"case_id": case}
    key = urgent_idempotency_key(kind, business_id)
    with get_client(sync_client=True) as client:  # only to say so: the server itself keeps the key unique
        again = bool(client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])), limit=1))
    flow_run = run_deployment(URGENT_DEPLOYMENT, parameters=parameters, idempotency_key=key,
                              work_queue_name=URGENT_QUEUE, timeout=wait, poll_interval=1, tags=["urgent"])
    if again:
        console.print(f"[yellow]{kind} {business_id} was asked for at {flow_run.created:%H:%M:%S} UTC already: "
                      "that same run goes on (no second run)[/]")
    else:
        console.print(f"[green]urgent run requested[/] for {kind} {business_id}: run [bold]{flow_run.name}[/] "
                      f"on the urgent queue")
    console.print(f"follow it: {url_for(flow_run) or ui_url(api)}")
    if wait <= 0:
        return
    state = flow_run.state
    if state is None or not state.is_final():
        console.print(f"[yellow]not finished after {wait:g} s ({state.name if state else 'unknown'}): "
                      "it goes on; see the link above[/]")
        raise typer.Exit(1)
    _print_cases(settings, kind, business_id)
    if not state.is_completed():
        raise _fail(f"the run ended {state.name}: see the link above")
    console.print(f"[green]run {state.name.lower()}[/]")


def _print_cases(settings: Settings, kind: str, business_id: int) -> None:
    from retroauth.db import make_engine
    from retroauth.worklist import case_statuses, cases_of_encounter

    engine = make_engine(settings.database_url)
    try:
        ids = cases_of_encounter(engine, business_id) if kind == "encounter" else [business_id]
        statuses = case_statuses(engine, ids)
    finally:
        engine.dispose()
    t = Table("case", "status", title=f"{kind} {business_id}")
    for cid, status in sorted(statuses.items()):
        t.add_row(str(cid), status)
    console.print(t if statuses else f"{kind} {business_id}: no case (no service needs a retro request)")


if __name__ == "__main__":
    app()

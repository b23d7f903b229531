"""The command line as a person uses it: the real entry point in a subprocess, on a temp directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from retroauth.db import current_revision, make_engine

RETROAUTH = [sys.executable, "-c", "from retroauth.cli import main; main()"]


def run(args, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RETROAUTH_")}
    full_env.update(env)
    full_env["COLUMNS"] = "160"
    return subprocess.run([*RETROAUTH, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def test_init_migrates_and_prepares_storage_with_private_files(tmp_path):
    r = run(["init"], tmp_path)
    assert r.returncode == 0, r.stderr
    db = tmp_path / "var" / "retroauth.db"
    assert current_revision(make_engine(f"sqlite:///{db}")) is not None
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert (tmp_path / "var" / "storage").is_dir()
    assert run(["init"], tmp_path).returncode == 0  # idempotent


def test_bad_setting_stops_with_its_name_and_no_traceback(tmp_path):
    r = run(["init"], tmp_path, RETROAUTH_FACILITY_TIMEZONE="Nowhere/Land")
    assert r.returncode == 2
    assert "RETROAUTH_FACILITY_TIMEZONE" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "var" / "retroauth.db").exists()


@pytest.mark.parametrize("cmd", [[], ["init"], ["settings"], ["cases"], ["case"], ["case", "show"],
                                 ["payers"], ["payers", "check"], ["demo"], ["submit"], ["record"], ["serve"], ["worker"], ["trigger", "urgent"], ["follow-ups"], ["payer-sim"],
                                 ["letter"], ["templates", "check"], ["packets", "build"], ["generate"], ["sweep"],
                                 ["import", "fhir"], ["import", "csv"], ["import", "remit"], ["imports"]])
def test_every_command_has_help(cmd):
    """In-process (the entry point itself runs in a subprocess in the test below and everywhere else here):
    25 interpreter starts cost a minute of the suite for nothing more."""
    from typer.testing import CliRunner

    from retroauth.cli import app

    r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output.splitlines()) > 3


def test_the_entry_point_prints_help(tmp_path):
    r = run(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "sweep" in r.stdout


def test_worklist_json_on_an_empty_database(tmp_path):
    assert run(["init"], tmp_path).returncode == 0
    r = run(["cases", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    r = run(["case", "show", "999"], tmp_path)
    assert r.returncode == 2 and "no case 999" in r.stderr


def test_payers_check_passes_on_the_shipped_library_and_names_file_field_line_on_bad_ones(tmp_path):
    from tests.conftest import DATA, ROOT

    r = run(["payers", "check", str(ROOT / "config" / "payers"), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    ids = {p["id"] for p in json.loads(r.stdout)["payers"]}
    assert {"medicare-ffs-opd", "synthea-demo-health"} <= ids

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text((DATA / "bad" / "payers" / "unknown-time-zone.yaml").read_text())
    r = run(["payers", "check", str(bad)], tmp_path)
    assert r.returncode == 2
    assert "x.yaml:" in r.stderr and "time_zone" in r.stderr and "Traceback" not in r.stderr


def test_import_with_bad_rows_keeps_every_rejected_record(tmp_path):
    from tests.conftest import DATA

    assert run(["init"], tmp_path).returncode == 0
    r = run(["import", "csv", str(DATA / "csv" / "bad_rows"), "--json"], tmp_path)
    assert r.returncode == 1, r.stderr  # the good rows went in; the exit code says some did not
    out = json.loads(r.stdout)
    rejected = sum(c["errors"] for c in out["counts"].values())
    assert rejected > 0 and sum(c["inserted"] for c in out["counts"].values()) > 0
    r = run(["imports", str(out["import_run"]), "--json"], tmp_path)
    kept = json.loads(r.stdout)
    assert len(kept) == len(out["problems"]) and all(k["file"] and k["field"] for k in kept)


def test_a_day_from_the_command_line_sweep_worklist_packets_and_case_show(tmp_path):
    from tests.conftest import ROOT

    assert run(["init"], tmp_path).returncode == 0
    assert run(["import", "csv", str(ROOT / "examples" / "csv")], tmp_path).returncode == 0
    r = run(["sweep", "--as-of", "2026-11-27T06:00", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cases_created"] >= 3
    worklist = json.loads(run(["cases", "--json"], tmp_path).stdout)
    due = [c["due_at"] for c in worklist if c["due_at"]]
    assert worklist and due == sorted(due)  # nearest deadline first
    r = run(["packets", "build", "--as-of", "2026-11-27T06:00", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    case_id = worklist[0]["id"]
    detail = json.loads(run(["case", "show", str(case_id), "--json"], tmp_path).stdout)
    assert detail["case"]["reason"] and detail["case"]["deadline_rule"]
    assert detail["service_lines"] and detail["packet"]["items"]
    assert {"letters", "submissions"} <= set(detail)
    assert [e["event"] for e in detail["events"]][:2] == ["identified", "evaluated"]


def test_submit_and_record_commands(tmp_path):
    assert run(["init"], tmp_path).returncode == 0
    r = run(["submit", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["enqueued"] == 0
    r = run(["record", "999", "--approved"], tmp_path)
    assert r.returncode == 2 and "--auth-number" in r.stderr
    r = run(["record", "999", "--denied", "--reason", "A3"], tmp_path)
    assert r.returncode == 2 and "999" in r.stderr and "Traceback" not in r.stderr


def test_workers_run_at_a_lower_cpu_priority_than_the_server():
    import os

    from retroauth.cli_ops import WORKER_NICENESS, start_worker

    proc = start_worker(["sleep", "30"])
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, ours + WORKER_NICENESS) > ours
        stat = open(f"/proc/{proc.pid}/stat").read()
        assert int(stat.rsplit(")", 1)[1].split()[16]) == min(19, ours + WORKER_NICENESS)  # the kernel's "nice"
        # Its own process group (a Ctrl-C reaches only the command that started it), our session: on Linux a
        # new session is a new autogroup, where the niceness would not count against the server's.
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        assert os.getsid(proc.pid) == os.getsid(0)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("why,says", [
    ("auth_number_of_another_case", "already on another case"),
    ("review_sla_passed", "review time is over"),
    ("", "call the payer"),
])
def test_case_show_says_what_to_do_with_an_escalated_case(tmp_path, why, says):
    from datetime import datetime, timezone

    from retroauth.cases import Actor, escalate
    from retroauth.db import session_scope
    from retroauth.vocab import CaseStatus
    from tests.factories import new_case

    assert run(["init"], tmp_path).returncode == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'retroauth.db'}")
    with session_scope(engine) as s:
        case_id = new_case(s, status=CaseStatus.SUBMITTED).id
        assert escalate(s, [case_id], why, datetime(2026, 11, 27, tzinfo=timezone.utc), Actor(name="test")) == [case_id]
    engine.dispose()
    r = run(["case", "show", str(case_id)], tmp_path)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # the table wraps long lines
    assert "escalated" in text and says in text

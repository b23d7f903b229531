"""Security properties, one test each (others live beside the code they guard: letters escape their input in
tests/test_letters.py, storage keys and owner-only files and S3 encryption in tests/test_storage.py, the
database file mode in tests/test_cli.py)."""

from __future__ import annotations

import inspect
import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa

from config.settings import load_settings
from retroauth import outbox
from retroauth.storage import StorageError, key
from tests.conftest import ROOT
from tests.test_outbox import ACTOR, SETTINGS, pas_library, pas_sim, rendered_case, storage  # noqa: F401 - fixtures

SECRET = "tok-3f9a1c-never-logged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_pas_token_comes_from_settings_and_is_never_logged_or_stored(engine, storage, pas_sim, caplog,
                                                                          monkeypatch):
    from retroauth.channels.fhir_pas import PasChannel

    server = pas_sim({"token": SECRET, "default": {"action": "approve"}})
    lib = pas_library(server.url)
    monkeypatch.setenv("RETROAUTH_PAS_TOKEN", SECRET)
    settings = load_settings()
    assert settings.pas_token.get_secret_value() == SECRET and SECRET not in repr(settings)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    caplog.set_level(logging.DEBUG)
    sent = outbox.send_pending(engine, storage, lib, settings, actor=ACTOR, channels={"fhir_pas": PasChannel()})
    assert sent.decided == {case_id: "A1"}  # the payer accepted the token from the settings
    assert SECRET not in caplog.text
    with engine.connect() as conn:  # every text value of every table
        meta = sa.MetaData()
        meta.reflect(bind=conn)
        dump = " ".join(str(row) for t in meta.sorted_tables for row in conn.execute(sa.select(t)))
    assert SECRET not in dump
    assert all(SECRET.encode() not in storage.get(k) for k in storage.list("outbound"))


def test_a_wrong_token_is_refused_and_not_echoed(engine, storage, pas_sim, caplog):
    from retroauth.channels.fhir_pas import PasChannel

    server = pas_sim({"default": {"action": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    sent = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR,
                               channels={"fhir_pas": PasChannel(token=SECRET + "-wrong")})
    assert [v.split(":")[0] for v in sent.refused.values()] == ["http_401"]
    assert SECRET not in caplog.text and server.stats()["submissions"] == {}


def test_without_a_pas_token_nothing_is_sent_and_the_submission_waits_for_the_setting(engine, storage, pas_sim):
    from retroauth.channels.fhir_pas import PasChannel

    server = pas_sim({"default": {"action": "approve"}})
    lib = pas_library(server.url)
    case_id = rendered_case(engine, storage)
    outbox.enqueue(engine, [case_id], library=lib, actor=ACTOR)
    assert SETTINGS.pas_token is None or not SETTINGS.pas_token.get_secret_value()
    sent = outbox.send_pending(engine, storage, lib, SETTINGS, actor=ACTOR, channels={"fhir_pas": PasChannel()})
    assert list(sent.failed.values()) == ["ChannelNotConfigured"] and not sent.refused  # pending, not burnt
    assert server.stats()["submissions"] == {}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status FROM submissions").scalars().all() == ["pending"]


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "x\\y", "a b", ""])
def test_storage_keys_cannot_be_steered_by_data(bad):
    with pytest.raises(StorageError):
        key("documents", bad, "note.txt")


def test_servers_bind_to_this_machine_unless_told_otherwise():
    from retroauth import cli_ops, payer_sim

    assert cli_ops.DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(payer_sim.run_simulator).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli_ops.serve).parameters["host"].default == "127.0.0.1"
    server, _ = payer_sim.run_simulator({})
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_serve_passes_the_login_to_the_server_and_to_its_clients(monkeypatch):
    from retroauth.cli_ops import prefect_env

    monkeypatch.setenv("RETROAUTH_PREFECT_LOGIN", "ops:s3cret")
    env = prefect_env(load_settings(), "http://127.0.0.1:4200/api")
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"] == "ops:s3cret"
    monkeypatch.delenv("RETROAUTH_PREFECT_LOGIN")
    assert "PREFECT_SERVER_API_AUTH_STRING" not in prefect_env(load_settings(), "http://127.0.0.1:4200/api")


def test_with_the_login_on_an_unauthenticated_api_call_is_refused(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_AUTH_STRING": "ops:s3cret", "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-services"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code == 401
        assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=("ops", "wrong"), timeout=10).status_code == 401
        assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=("ops", "s3cret"), timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()

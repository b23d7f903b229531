"""Settings: embedded defaults, and a bad value fails at start naming the variable."""

from __future__ import annotations

import pytest

from config.settings import SettingsError, load_settings
from retroauth.identifiers import npi_is_valid


def test_defaults_are_the_embedded_setup(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env around
    s = load_settings()
    assert s.database_url.startswith("sqlite:///./var/")
    assert s.storage_url == "file://./var/storage"
    assert s.sweep_lookback_days == 30
    assert s.payer_rules_dir.is_dir()


@pytest.mark.parametrize(
    "var,value,fragment",
    [
        ("RETROAUTH_FACILITY_TIMEZONE", "Mars/Olympus", "IANA time zone"),
        ("RETROAUTH_FACILITY_NPI", "1234567890", "valid NPI"),
        ("RETROAUTH_FACILITY_TIN", "12345", "valid TIN"),
        ("RETROAUTH_DATABASE_URL", "mysql://x", "sqlite"),
        ("RETROAUTH_STORAGE_URL", "s3://ab", "bucket"),
        ("RETROAUTH_STORAGE_URL", "ftp://host/x", "file://"),
        ("RETROAUTH_SWEEP_LOOKBACK_DAYS", "0", "greater than or equal to 1"),
        ("RETROAUTH_SWEEP_LOOKBACK_DAYS", "thirty", "valid integer"),
        ("RETROAUTH_PAYER_RULES_DIR", "/no/such/dir", "does not exist"),
        ("RETROAUTH_S3_SSE", "rot13", "AES256"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch, tmp_path, var, value, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert var in str(exc.value) and fragment in str(exc.value)


def test_env_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("RETROAUTH_SWEEP_LOOKBACK_DAYS=45\n")
    assert load_settings().sweep_lookback_days == 45


@pytest.mark.parametrize("npi,ok", [("1234567893", True), ("1234567890", False), ("123456789", False),
                                    ("1245319599", True), ("abcdefghij", False)])
def test_npi_check_digit(npi, ok):
    assert npi_is_valid(npi) is ok


def test_the_tasks_read_the_payer_rules_once_and_again_when_a_file_changes(monkeypatch, tmp_path):
    import os
    import shutil

    from tasks import context
    from tests.conftest import DATA

    rules = tmp_path / "payers"
    shutil.copytree(DATA / "payers", rules)
    monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(rules))
    context.reset()
    try:
        first = context.rule_library()
        assert context.rule_library() is first  # not read again
        changed = sorted(rules.glob("*.yaml"))[0]
        changed.write_text(changed.read_text() + "\n# edited\n")
        os.utime(changed, ns=(1, 1))  # a new mtime, even within the file system's clock tick
        assert context.rule_library() is not first
        (rules / "extra.yaml").write_text(changed.read_text().replace("id: ", "id: x-", 1))
        assert set(context.rule_library()) == {*first, "x-" + changed.stem}  # a file added
    finally:
        context.reset()

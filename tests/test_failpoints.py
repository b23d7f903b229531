"""Failpoints fail exactly where and when asked, meet other processes where asked, and cost nothing when unset."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retroauth import failpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh():
    failpoints.reset()
    yield
    failpoints.reset()


def test_unset_does_nothing(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    for _ in range(3):
        failpoints.hit("submit.before_record")


def test_raise_on_the_nth_pass_only(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "render.after_batch=raise@2, submit.after_record=raise")
    failpoints.hit("render.after_batch")
    failpoints.hit("sweep.after_page")  # not named: nothing
    with pytest.raises(failpoints.FailpointHit, match="render.after_batch"):
        failpoints.hit("render.after_batch")
    failpoints.hit("render.after_batch")  # the third pass goes through
    with pytest.raises(failpoints.FailpointHit):
        failpoints.hit("submit.after_record")


@pytest.mark.parametrize("bad", ["x=explode", "x=kill@two", "x", "x=meet", "x=meet:0", "x=meet:two", "x=kill:2"])
def test_a_typo_fails_loudly(monkeypatch, tmp_path, bad):
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, bad)
    with pytest.raises(ValueError, match=failpoints.ENV):
        failpoints.hit("x")


def test_meet_needs_a_directory(monkeypatch):
    monkeypatch.delenv(failpoints.DIR_ENV, raising=False)
    monkeypatch.setenv(failpoints.ENV, "x=meet:2")
    with pytest.raises(ValueError, match=failpoints.DIR_ENV):
        failpoints.hit("x")


def test_meet_waits_until_every_process_is_there(monkeypatch, tmp_path):
    """This process waits at the place until another process (a real one) reaches it too; then both go on,
    and the next pass does not wait (``meet`` acts at one pass, the first by default)."""
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "render.after_claim=meet:2")
    here = threading.Thread(target=failpoints.hit, args=("render.after_claim",), daemon=True)
    here.start()
    here.join(0.5)
    assert here.is_alive()  # alone: still waiting
    other = subprocess.run([sys.executable, "-c", "from retroauth import failpoints; "
                            "failpoints.hit('render.after_claim')"], cwd=ROOT, timeout=60)
    assert other.returncode == 0
    here.join(10)
    assert not here.is_alive()
    assert len(os.listdir(tmp_path / "render.after_claim")) == 2  # one file per process, named by its pid
    failpoints.hit("render.after_claim")  # the second pass goes straight through


def test_meet_gives_up_on_a_process_that_never_comes(monkeypatch, tmp_path):
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "assemble.after_claim=meet:3@2")
    monkeypatch.setattr(failpoints, "MEET_SECONDS", 0.3)
    failpoints.hit("assemble.after_claim")  # the first pass goes through
    with pytest.raises(failpoints.FailpointHit, match=r"^assemble\.after_claim$"):
        failpoints.hit("assemble.after_claim")

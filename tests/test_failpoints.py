"""Failpoints fail exactly where and when asked, and cost nothing when unset."""

from __future__ import annotations

import pytest

from retroauth import failpoints


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


@pytest.mark.parametrize("bad", ["x=explode", "x=kill@two", "x"])
def test_a_typo_fails_loudly(monkeypatch, bad):
    monkeypatch.setenv(failpoints.ENV, bad)
    with pytest.raises(ValueError, match=failpoints.ENV):
        failpoints.hit("x")

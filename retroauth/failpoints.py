"""Failpoints: named places where a test can make the running process fail, to prove recovery.

``RETROAUTH_FAILPOINTS`` lists ``name=action`` pairs separated by commas, where the action is
``kill`` (SIGKILL: the process vanishes mid-step, like a lost machine) or ``raise`` (an exception, like a
bug or a lost database), optionally after N passes: ``submit.before_record=kill@3`` kills the process the
third time it reaches that place. Unset (production), ``hit`` is one dictionary lookup.

The places, each between two effects that must not be separated silently:
- ``sweep.after_page``: a page of encounters evaluated and committed;
- ``assemble.after_batch``, ``render.after_batch``: a batch of packets or letters committed;
- ``submit.before_record``: the payer has the submission, nothing is recorded yet;
- ``submit.after_record``: a submission recorded;
- ``follow_up.after_inquiry``: one inquiry answered and recorded.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "RETROAUTH_FAILPOINTS"


class FailpointHit(RuntimeError):
    """Raised by a ``raise`` failpoint: the message is the failpoint's name only."""


_lock = threading.Lock()
_passes: dict[str, int] = {}


def _plan() -> dict[str, tuple[str, int]]:
    plan: dict[str, tuple[str, int]] = {}
    for item in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        if action not in ("kill", "raise") or (nth and not nth.isdigit()):
            raise ValueError(f"{ENV}: {item!r} is not name=kill|raise[@N]")
        plan[name.strip()] = (action, int(nth or 1))
    return plan


def hit(name: str) -> None:
    """Fail here if the environment asks for it (see the module doc)."""
    if ENV not in os.environ:
        return
    wanted = _plan().get(name)
    if wanted is None:
        return
    action, nth = wanted
    with _lock:
        _passes[name] = n = _passes.get(name, 0) + 1
    if n != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointHit(name)


def reset() -> None:
    """Forget the pass counts (tests)."""
    with _lock:
        _passes.clear()

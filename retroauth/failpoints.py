"""Failpoints: named places where a test can make the running process fail, to prove recovery, or hold it
until other processes are there too, to make a race come out the same way every time.

``RETROAUTH_FAILPOINTS`` lists ``name=action`` pairs separated by commas, where the action is
``kill`` (SIGKILL: the process vanishes mid-step, like a lost machine), ``raise`` (an exception, like a
bug or a lost database) or ``meet:P`` (a rendezvous, not a failure: the process waits there until P
processes, itself included, have reached the same place, then goes on), optionally at the N-th pass only:
``submit.before_record=kill@3`` kills the process the third time it reaches that place. Unset
(production), ``hit`` is one dictionary lookup.

``meet`` needs ``RETROAUTH_FAILPOINTS_DIR``, a directory that every process sees: each one that arrives
leaves a file in ``<dir>/<name>/`` (named by its process id and a random token: no data) and waits until
there are P. One that has waited ``MEET_SECONDS`` raises ``FailpointHit`` instead (a process that never came).

The places, each between two effects that must not be separated silently:
- ``sweep.after_page``: a page of encounters evaluated and committed;
- ``assemble.after_claim``, ``render.after_claim``, ``send.after_claim``: a run claimed a batch of the
  day's work shared with other runs (flows/batches.py; it may be empty), nothing of it is worked yet;
- ``assemble.after_batch``, ``render.after_batch``: a batch of packets or letters committed;
- ``submit.before_record``: the payer has the submission, nothing is recorded yet;
- ``submit.after_record``: a submission recorded;
- ``follow_up.after_inquiry``: one inquiry answered and recorded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

ENV = "RETROAUTH_FAILPOINTS"
DIR_ENV = "RETROAUTH_FAILPOINTS_DIR"
MEET_SECONDS = 300.0  # a ``meet`` waits this long for the others at the most
MEET_POLL_SECONDS = 0.1


class FailpointHit(RuntimeError):
    """Raised by a ``raise`` failpoint, or a ``meet`` the others never came to: the message is the
    failpoint's name only."""


_lock = threading.Lock()
_passes: dict[str, int] = {}


def _plan() -> dict[str, tuple[str, int, int]]:
    """name -> (action, processes to meet (``meet`` only), the pass it acts at)."""
    plan: dict[str, tuple[str, int, int]] = {}
    for item in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        action, _, parties = action.partition(":")
        meet = action == "meet" and parties.isdigit() and int(parties) > 0
        if not (meet or action in ("kill", "raise") and not parties) or (nth and not nth.isdigit()):
            raise ValueError(f"{ENV}: {item!r} is not name=kill|raise|meet:P[@N]")
        if action == "meet" and not os.environ.get(DIR_ENV):
            raise ValueError(f"{ENV}: {item!r} needs {DIR_ENV}, a directory every process sees")
        plan[name.strip()] = (action, int(parties or 0), int(nth or 1))
    return plan


def hit(name: str) -> None:
    """Fail here, or meet the other processes here, if the environment asks for it (see the module doc)."""
    if ENV not in os.environ:
        return
    wanted = _plan().get(name)
    if wanted is None:
        return
    action, parties, nth = wanted
    with _lock:
        _passes[name] = n = _passes.get(name, 0) + 1
    if n != nth:
        return
    if action == "meet":
        _meet(name, parties)
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointHit(name)


def _meet(name: str, parties: int) -> None:
    """Leave this process's file at ``name`` and wait until ``parties`` processes have left theirs."""
    folder = os.path.join(os.environ[DIR_ENV], name)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex}"), "x").close()
    deadline = time.monotonic() + MEET_SECONDS
    while len(os.listdir(folder)) < parties:
        if time.monotonic() > deadline:
            raise FailpointHit(name)
        time.sleep(MEET_POLL_SECONDS)


def reset() -> None:
    """Forget the pass counts (tests)."""
    with _lock:
        _passes.clear()

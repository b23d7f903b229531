"""Run the outbox sender in a process that kills itself (SIGKILL, no cleanup, no exception handler) right
after the payer accepted a submission and before it was recorded: ``python -m tests.crash_send DB ROOT URL``."""

from __future__ import annotations

import os
import signal
import sys

from retroauth import outbox
from retroauth.db import make_engine
from retroauth.storage import LocalStorage
from tests.test_outbox import ACTOR, SETTINGS, pas_channels, pas_library


def main(db_url: str, storage_root: str, sim_url: str) -> None:
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    outbox._record_sent = killed  # the payer has answered: die before a byte of it is recorded
    outbox.send_pending(make_engine(db_url), LocalStorage(storage_root), pas_library(sim_url), SETTINGS,
                        actor=ACTOR, channels=pas_channels())
    sys.exit("not killed")  # pragma: no cover - reaching here means nothing was sent


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Run the outbox sender as its own process: ``python -m tests.crash_send DB ROOT URL``. With
``RETROAUTH_FAILPOINTS=submit.before_record=kill`` it dies by SIGKILL (no cleanup, no exception handler)
right after the payer accepted a submission and before a byte of it was recorded."""

from __future__ import annotations

import sys

from retroauth import outbox
from retroauth.db import make_engine
from retroauth.storage import LocalStorage
from tests.test_outbox import ACTOR, SETTINGS, pas_channels, pas_library


def main(db_url: str, storage_root: str, sim_url: str) -> None:
    outbox.send_pending(make_engine(db_url), LocalStorage(storage_root), pas_library(sim_url), SETTINGS,
                        actor=ACTOR, channels=pas_channels())
    sys.exit("not killed")


if __name__ == "__main__":
    main(*sys.argv[1:4])

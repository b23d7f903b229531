"""What every task needs, built inside the task (never passed in: Prefect cannot hash an engine)."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from config.settings import Settings, load_settings
from retroauth.cases import Actor
from retroauth.db import make_engine
from retroauth.rules import RuleLibrary, load_rule_library


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load_settings()


_engines: dict[str, sa.Engine] = {}


def engine() -> sa.Engine:
    url = settings().database_url
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


def rule_library() -> RuleLibrary:
    return load_rule_library(settings().payer_rules_dir)


def aware(t: datetime) -> datetime:
    """A time from a person (the UI, the CLI) without a zone is meant in the facility's zone."""
    return t if t.tzinfo else t.replace(tzinfo=ZoneInfo(settings().facility_timezone))


def reset() -> None:
    """Forget cached settings and engines (tests change the environment between runs)."""
    for e in list(_engines.values()):
        e.dispose()
    _engines.clear()
    settings.cache_clear()


def actor() -> Actor:
    """The running flow run, for the audit trail (its id is not patient data)."""
    from prefect.runtime import flow_run

    return Actor(run_id=str(flow_run.id) if flow_run.id else None, name=f"flow:{flow_run.flow_name or 'local'}")

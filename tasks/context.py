"""What every task needs, built inside the task (never passed in: Prefect cannot hash an engine)."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import sqlalchemy as sa

from config.settings import Settings, in_facility_zone, load_settings
from retroauth.cases import Actor
from retroauth.db import make_engine
from retroauth.rules import RuleLibrary, load_rule_library
from retroauth.storage import Storage, open_storage


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load_settings()


_engines: dict[str, sa.Engine] = {}


def engine() -> sa.Engine:
    url = settings().database_url
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


_storages: dict[str, Storage] = {}


def storage() -> Storage:
    """The configured object storage; S3 options apply to s3:// URLs only. One per URL and process
    (an S3 client takes a fraction of a second to build and is safe to share across threads)."""
    s = settings()
    if s.storage_url not in _storages:
        options: dict[str, object] = {}
        if s.storage_url.startswith("s3://"):
            options = {"endpoint_url": s.s3_endpoint_url, "sse": s.s3_sse, "kms_key_id": s.s3_kms_key_id}
        _storages[s.storage_url] = open_storage(s.storage_url, **options)
    return _storages[s.storage_url]


def rule_library() -> RuleLibrary:
    return load_rule_library(settings().payer_rules_dir)


def aware(t: datetime) -> datetime:
    return in_facility_zone(t, settings())


def reset() -> None:
    """Forget cached settings and engines (tests change the environment between runs)."""
    for e in list(_engines.values()):
        e.dispose()
    _engines.clear()
    _storages.clear()
    settings.cache_clear()


def actor() -> Actor:
    """The running flow run, for the audit trail (its id is not patient data)."""
    from prefect.runtime import flow_run

    return Actor(run_id=str(flow_run.id) if flow_run.id else None, name=f"flow:{flow_run.flow_name or 'local'}")

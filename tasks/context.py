"""What every task needs, built inside the task (never passed in: Prefect cannot hash an engine)."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

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


_libraries: dict[tuple, RuleLibrary] = {}


def rule_library() -> RuleLibrary:
    """The payer rules, read once per process (reading and checking them takes ~0.1 s, and a day calls
    this in every batch) and again as soon as a file of the folder changes, is added or removed."""
    folder = Path(settings().payer_rules_dir)
    try:
        files = tuple(sorted((p.name, st.st_mtime_ns, st.st_size) for p in folder.iterdir() for st in [p.stat()]))
    except OSError:  # a folder that is not there: load_rule_library says so, naming it
        return load_rule_library(folder)
    key = (str(folder), files)
    library = _libraries.get(key)
    if library is None:
        library = load_rule_library(folder)
        _libraries.clear()  # the folder's earlier state
        _libraries[key] = library
    return library


def aware(t: datetime) -> datetime:
    return in_facility_zone(t, settings())


def reset() -> None:
    """Forget cached settings and engines (tests change the environment between runs)."""
    for e in list(_engines.values()):
        e.dispose()
    _engines.clear()
    _storages.clear()
    _libraries.clear()
    settings.cache_clear()


def actor() -> Actor:
    """The running flow run, for the audit trail (its id is not patient data)."""
    from prefect.runtime import flow_run

    return Actor(run_id=str(flow_run.id) if flow_run.id else None, name=f"flow:{flow_run.flow_name or 'local'}")


_PROCESS_OWNER = f"pid-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def claim_owner() -> str:
    """Who holds a claim (retroauth.claims): the running flow run, else this process."""
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else _PROCESS_OWNER


def claim_round() -> str:
    """A new round of claims for the running flow run and attempt (``<flow run id>#<run count>``): the runs
    that share a day get the round of the run that started them; a retry is a new round, which takes again
    what the failed attempt handed back. Outside a flow run: a round of its own."""
    from prefect.runtime import flow_run

    if flow_run.id:
        return f"{flow_run.id}#{flow_run.run_count}"
    return f"local-{uuid.uuid4().hex}"


def run_time() -> datetime:
    """When the running flow run was scheduled to start (now, outside a flow run). It stays the same
    when the run is retried, so "as of" dates and the batches' cache keys do not move between attempts."""
    from prefect.runtime import flow_run

    t = flow_run.scheduled_start_time if flow_run.id else None
    return datetime.fromtimestamp(t.timestamp(), timezone.utc) if t else datetime.now(timezone.utc)


def batch_cache_key(task_context: Any, parameters: dict[str, Any]) -> str | None:
    """Cache key of an expensive batch (assemble, render): the task, the top-level flow run, and the
    batch's case ids. A retried flow run (from the UI, or a parent's retry that starts a fresh subflow run)
    finds each completed batch's persisted result and skips it; any other run does its own work, and the
    database decides what is left to do. Ids only: the key is a file name in the result storage."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None  # a task called outside a flow run: no caching
    ids = ",".join(str(i) for i in sorted(parameters.get("case_ids") or []))
    digest = hashlib.sha256(ids.encode()).hexdigest()[:24]
    return f"{task_context.task.name}-{_root_flow_run_id(flow_run.id)}-{digest}"


@lru_cache(maxsize=256)
def _root_flow_run_id(flow_run_id: str) -> str:
    """The top-level run of the running flow run ``flow_run_id``: Prefect climbs the parents through the
    API (a few calls, each with a new client) every time it is asked, and a day asks once per batch."""
    from prefect.runtime import flow_run

    return flow_run.root_flow_run_id

"""Shared fixtures: databases on both backends, settings, paths to the real fixtures.

``db_url`` / ``engine`` are parametrized over SQLite and a real PostgreSQL that this suite starts
itself. Without PostgreSQL binaries the PostgreSQL half is skipped, and ``.ci/run`` fails the build
when that happens (it runs with RETROAUTH_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from retroauth.db import make_engine, migrate
from tests.pg import PostgresCluster, find_pg_bin

# Session-wide servers live here, so that every module shares one of each (imported into several
# modules, a session fixture would start once per module).
from tests.prefect_server import app_env, prefect_server  # noqa: E402,F401
from tests.s3server import aws_env, s3_bucket, s3_server  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():  # CI clones next to a copy of shared/
    SHARED = Path(os.environ.get("RETROAUTH_SHARED", "/work/shared"))
FIXTURES = SHARED / "fixtures"
SYNTHEA = FIXTURES / "synthea-10"
PAS = FIXTURES / "pas"
DATA = Path(__file__).resolve().parent / "data"

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster():
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get("RETROAUTH_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL binaries not found and RETROAUTH_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL binaries not found (set RETROAUTH_PG_BIN)")
    cluster = PostgresCluster(bin_dir).start()
    # One migrated template; each test gets a copy of it (CREATE DATABASE ... TEMPLATE is fast).
    cluster.execute("CREATE DATABASE retroauth_template")
    migrate(cluster.url("retroauth_template"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh, migrated database on each backend."""
    if request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        path = tmp_path / "retroauth.db"
        path.write_bytes(template.read_bytes())
        return f"sqlite:///{path}"
    cluster = request.getfixturevalue("pg_cluster")
    name = f"t{os.getpid()}_{next(_counter)}"
    cluster.execute(f"CREATE DATABASE {name} TEMPLATE retroauth_template")
    return cluster.url(name)


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def empty_db_url(request, tmp_path) -> str:
    """An empty database (no schema) on the backend named by the test's ``backend`` parameter."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    name = f"e{os.getpid()}_{next(_counter)}"
    cluster.execute(f"CREATE DATABASE {name}")
    return cluster.url(name)


def table_counts(engine: sa.Engine) -> dict[str, int]:
    """Row counts of every table: the quickest way to assert that nothing was written."""
    from sqlmodel import SQLModel

    with engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in SQLModel.metadata.sorted_tables
        }

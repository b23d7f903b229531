"""Engine, sessions and migrations. SQLite is the embedded default; PostgreSQL runs production."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import Session

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, **kw: object) -> sa.Engine:
    """An engine with the settings each backend needs to be a safe source of truth."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database))
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kw)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN and breaks SAVEPOINT: take it over.
        # IMMEDIATE takes the write lock up front, so a read-then-update (a state change) cannot
        # interleave with another writer's; readers are not blocked in WAL mode.
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **kw)


def _create_private_file(path: Path) -> None:
    """The embedded database holds patient data: readable and writable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API objects
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back whole when it raises."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str):  # noqa: ANN201 - alembic is imported late: the CLI starts faster
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database to ``revision``; running it again on an up-to-date database does nothing."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        _create_private_file(Path(parsed.database))
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# Tables whose statistics steer the sweep's plan (which side of a join to start from).
_PLANNED_TABLES = ("encounters", "service_lines", "coverages", "authorizations", "authorization_codes",
                   "payer_auth_rules", "payer_auth_partners", "retro_cases")


def refresh_statistics(engine: sa.Engine) -> None:
    """Sampled planner statistics, cheap enough for every sweep. Without them, after a bulk import,
    SQLite may start the sweep's join from the wrong table and take minutes instead of milliseconds."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
            for table in _PLANNED_TABLES:
                conn.exec_driver_sql(f"ANALYZE {table}")
        else:
            conn.exec_driver_sql("ANALYZE " + ", ".join(_PLANNED_TABLES))
        conn.commit()

"""Storage wrappers for tests: count what a run does, or make the store misbehave like a real one."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter

from retroauth.storage import Storage, StorageError, StoredObject

FAULTS = ("503", "reset", "slow", "lost_ack")


class CountingStorage:
    """Counts every call by operation (``calls["put"]``) and passes it through."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.put_concurrency = getattr(inner, "put_concurrency", 1)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        self.calls["put"] += 1
        return self.inner.put(key, data, content_type)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        self.calls["get"] += 1
        return self.inner.get(key, sha256)

    def exists(self, key: str) -> bool:
        self.calls["exists"] += 1
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)


class FlakyStorage:
    """Fails about ``rate`` of the calls, chosen by a seeded random, in the ways object stores fail:

    - ``503``: the service refuses (S3 SlowDown / ServiceUnavailable) - nothing happened;
    - ``reset``: the connection drops before the request gets through (ConnectionResetError);
    - ``slow``: the call takes longer but succeeds;
    - ``lost_ack``: a put is written but its answer is lost (TimeoutError): the caller must not
      assume it failed to write, nor that the bytes are wrong.

    With ``keyed``, whether a call fails depends on the seed, the operation, the key and how many times
    that operation was called on that key before, not on the order of all calls: the same faults hit the
    same calls when several threads call at once (letters are stored on S3 from a thread pool).
    """

    def __init__(self, inner: Storage, *, rate: float = 0.2, seed: int = 0, slow_seconds: float = 0.01,
                 keyed: bool = False):
        self.inner, self.rate, self.slow_seconds, self.keyed, self.seed = inner, rate, slow_seconds, keyed, seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._seen: Counter[tuple[str, str]] = Counter()
        self.faults: Counter[str] = Counter()
        self.put_concurrency = getattr(inner, "put_concurrency", 1)

    def _draw(self, op: str = "", key: str = "") -> str | None:
        with self._lock:
            if self.keyed:
                self._seen[op, key] += 1
                digest = hashlib.sha256(f"{self.seed}|{op}|{key}|{self._seen[op, key]}".encode()).digest()
                r = int.from_bytes(digest[:8], "big") / 2**64
            else:
                r = self._rng.random()
            if r >= self.rate:
                return None
            fault = FAULTS[min(int(r / self.rate * len(FAULTS)), len(FAULTS) - 1)]
            self.faults[fault] += 1
        return fault

    def _before(self, op: str, key: str, fault: str | None) -> None:
        if fault == "503":
            raise StorageError(f"S3 {op} of {key} failed: SlowDown")
        if fault == "reset" or (fault == "lost_ack" and op != "put"):
            raise ConnectionResetError(104, "Connection reset by peer")
        if fault == "slow":
            time.sleep(self.slow_seconds)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        fault = self._draw("put", key)
        self._before("put", key, fault)
        stored = self.inner.put(key, data, content_type)
        if fault == "lost_ack":
            raise TimeoutError("read timed out")
        return stored

    def get(self, key: str, sha256: str | None = None) -> bytes:
        self._before("get", key, self._draw("get", key))
        return self.inner.get(key, sha256)

    def exists(self, key: str) -> bool:
        self._before("head", key, self._draw("head", key))
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self._before("delete", key, self._draw("delete", key))
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        self._before("list", prefix, self._draw("list", prefix))
        return self.inner.list(prefix)


class FlakyDatabase:
    """Makes about ``rate`` of an engine's transactions fail, chosen by a seeded random, the ways a database
    fails under a running application:

    - ``statement``: a statement of the transaction fails (after 0 to 3 statements went through);
    - ``commit``: the commit fails: nothing of the transaction is written;
    - ``lost_commit`` (PostgreSQL): the commit is written but its answer is lost with the connection.

    On PostgreSQL the failure is real: the transaction's server process is terminated from another
    connection (``pg_terminate_backend``) right before the statement or the commit, as an operator or a
    failover would; the driver then raises its own error and SQLAlchemy invalidates the connection. On
    SQLite the driver's "database is locked" (``sqlite3.OperationalError``) is raised at that point,
    what a writer gets when another one holds the lock past the busy timeout; and ``lock`` lets
    another connection hold the write lock for ``lock_seconds`` while the transaction begins, which it
    waits out. The application sees SQLAlchemy's ``OperationalError`` either way.
    Transactions run in one thread at a time (the day does): the draws are in a reproducible order.
    """

    def __init__(self, engine, *, rate: float = 0.2, seed: int = 0, lock_seconds: float = 0.2):
        import sqlalchemy as sa

        self.engine, self.rate, self.lock_seconds = engine, rate, lock_seconds
        self.backend = engine.dialect.name
        self.kinds = ("statement", "commit", "lost_commit") if self.backend == "postgresql" else \
            ("statement", "commit", "lock")
        self._rng = random.Random(seed)
        self._plans: dict[int, list] = {}  # id(DBAPI connection) -> [kind, statements left before the fault]
        self.faults: Counter[str] = Counter()
        self._admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool) \
            if self.backend == "postgresql" else None
        sa.event.listen(engine, "begin", self._begin)
        sa.event.listen(engine, "rollback", self._end)
        sa.event.listen(engine, "before_cursor_execute", self._before_statement)
        for name in ("do_execute", "do_executemany", "do_execute_no_params"):
            sa.event.listen(engine, name, self._statement)
        self._real_commit = engine.dialect.do_commit
        engine.dialect.do_commit = self._commit

    def remove(self) -> None:
        import sqlalchemy as sa

        sa.event.remove(self.engine, "begin", self._begin)
        sa.event.remove(self.engine, "rollback", self._end)
        sa.event.remove(self.engine, "before_cursor_execute", self._before_statement)
        for name in ("do_execute", "do_executemany", "do_execute_no_params"):
            sa.event.remove(self.engine, name, self._statement)
        self.engine.dialect.do_commit = self._real_commit
        if self._admin is not None:
            self._admin.dispose()

    # -- the plan of each transaction

    def _draw(self, dbapi) -> None:  # noqa: ANN001
        if self._rng.random() >= self.rate:
            self._plans.pop(id(dbapi), None)
            return
        kind = self._rng.choice(self.kinds)
        self._plans[id(dbapi)] = [kind, self._rng.randint(0, 3)]

    def _begin(self, conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        if self.backend != "sqlite":  # SQLite: drawn at its BEGIN IMMEDIATE, which this event runs first
            self._draw(conn.connection.dbapi_connection)

    def _end(self, conn) -> None:  # noqa: ANN001
        if conn.connection.dbapi_connection is not None:
            self._plans.pop(id(conn.connection.dbapi_connection), None)

    def _before_statement(self, conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.startswith("BEGIN"):
            dbapi = conn.connection.dbapi_connection
            self._draw(dbapi)
            if self._plans.get(id(dbapi), [None])[0] == "lock":
                self._plans.pop(id(dbapi))
                self.faults["lock"] += 1
                self._hold_lock()

    def _statement(self, cursor, statement, *rest) -> bool:  # noqa: ANN001
        if statement.startswith("BEGIN"):
            return False
        plan = self._plans.get(id(cursor.connection))
        if not plan or plan[0] != "statement":
            return False
        if plan[1] > 0:
            plan[1] -= 1
            return False
        self._plans.pop(id(cursor.connection))
        self._fail(cursor.connection, "statement")
        return False  # PostgreSQL: the statement now meets the terminated connection

    def _commit(self, proxied) -> None:  # noqa: ANN001 - the pool's proxy of the DBAPI connection
        dbapi = getattr(proxied, "dbapi_connection", proxied)
        plan = self._plans.pop(id(dbapi), None)
        kind = plan[0] if plan else None
        if kind in ("commit", "statement"):  # a statement fault the transaction did not reach: at the commit
            self._fail(dbapi, "commit")
        self._real_commit(proxied)
        if kind == "lost_commit":
            self.faults["lost_commit"] += 1
            self._terminate(dbapi)
            dbapi.execute("SELECT 1")  # the driver's own error: the answer never came

    # -- failing

    def _fail(self, dbapi, kind: str) -> None:  # noqa: ANN001
        self.faults[kind] += 1
        if self.backend == "postgresql":
            self._terminate(dbapi)  # the statement or commit that follows fails in the driver
        else:
            import sqlite3

            raise sqlite3.OperationalError("database is locked")

    def _terminate(self, dbapi) -> None:  # noqa: ANN001 - a psycopg connection
        pid = dbapi.info.backend_pid
        with self._admin.connect() as admin:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            deadline = time.monotonic() + 5
            while admin.exec_driver_sql(f"SELECT 1 FROM pg_stat_activity WHERE pid = {int(pid)}").first():
                if time.monotonic() > deadline:
                    raise TimeoutError("backend still there")
                time.sleep(0.01)

    def _hold_lock(self) -> None:
        """Another writer takes the write lock now and keeps it for ``lock_seconds``."""
        import sqlite3

        other = sqlite3.connect(self.engine.url.database, timeout=30, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")

        def release() -> None:
            other.execute("COMMIT")
            other.close()

        threading.Timer(self.lock_seconds, release).start()

"""Set-based upsert over a natural key: one ``INSERT ... ON CONFLICT`` per batch, SQLite and PostgreSQL.

Every importer (FHIR, CSV, 835) writes through ``upsert`` so that a repeated import finds its rows by
their natural key (a unique constraint in ``retroauth.models``) instead of adding second copies, and
so that a row whose values did not change is not touched at all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from pydantic_core import PydanticUndefined
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel

Key = tuple[Any, ...]

# Bound parameters per statement: SQLite >= 3.32 allows 32766, psycopg 65535; stay below both.
_MAX_PARAMS = 30_000


class UpsertResult(dict[Key, int]):
    """``natural key tuple -> id`` for every row given, and which of them were inserted, updated or
    left as they were (their values already matched)."""

    def __init__(self) -> None:
        super().__init__()
        self.inserted: set[Key] = set()
        self.updated: set[Key] = set()
        self.unchanged: set[Key] = set()


def upsert(
    session: Session,
    model: type[SQLModel],
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str] = ("source_system", "source_id"),
    update: bool | Collection[str] = True,
) -> UpsertResult:
    """Insert ``rows`` into ``model``'s table, or update the rows already there with the same ``key``.

    - ``key``: the columns of one of the table's unique constraints; they must not be NULL.
    - ``update``: ``True`` updates every column the rows carry (except the key), a collection updates
      only those columns, ``False`` leaves existing rows alone. Columns the rows do not carry get the
      model's default on insert and are never overwritten, so a later step's values survive.
    - A row is only rewritten where a value differs (``IS DISTINCT FROM``), so a repeated import
      changes nothing, not even in the write-ahead log.
    - Rows repeating a key within ``rows``: the last one wins (PostgreSQL refuses to touch a row twice
      in one statement).

    Returns ``{key tuple: id}`` for every distinct key given (an ``UpsertResult``).
    """
    result = UpsertResult()
    if not rows:
        return result
    table: sa.Table = model.__table__  # type: ignore[attr-defined]
    supplied = set(rows[0])
    for row in rows:
        if set(row) != supplied:
            raise ValueError(f"upsert into {table.name}: every row must carry the same columns")
    if missing := [k for k in key if k not in supplied]:
        raise ValueError(f"upsert into {table.name}: rows lack key columns {missing}")
    if update is True:
        update_cols = sorted(supplied - set(key) - {"id"})
    elif update is False:
        update_cols = []
    else:
        update_cols = sorted(update)
        if unknown := [c for c in update_cols if c not in supplied or c in key]:
            raise ValueError(f"upsert into {table.name}: cannot update {unknown} (not supplied, or key)")

    by_key = {tuple(row[k] for k in key): row for row in rows}
    full_rows = [_with_defaults(model, table, row) for row in by_key.values()]
    chunk = max(1, _MAX_PARAMS // max(len(full_rows[0]), 1))
    for start in range(0, len(full_rows), chunk):
        _upsert_chunk(session, table, full_rows[start : start + chunk], list(key), update_cols, result)
    return result


def _upsert_chunk(
    session: Session,
    table: sa.Table,
    rows: list[dict[str, Any]],
    key: list[str],
    update_cols: list[str],
    result: UpsertResult,
) -> None:
    key_cols = [table.c[k] for k in key]
    keys = [tuple(row[k] for k in key) for row in rows]
    existing = select_ids(session, table, key, keys)

    params: list[dict[str, Any]] | None = None
    if session.get_bind().dialect.name == "postgresql":
        # One array per column, unnested server-side: a short statement whatever the batch size
        # (psycopg's client-side parsing of a many-row VALUES costs more than the insert itself).
        names = list(rows[0])
        arrays = [
            sa.bindparam(f"col_{i}", [row[name] for row in rows], type_=postgresql.ARRAY(_array_item(table.c[name])))
            for i, name in enumerate(names)
        ]
        values = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="v")
        stmt = postgresql.insert(table).from_select(names, sa.select(*(values.c[n] for n in names)))
    else:
        # Parameters passed alongside (not ``.values(rows)``): the statement compiles once, and
        # SQLAlchemy's "insertmanyvalues" sends the rows as one multi-row INSERT per page.
        stmt = sqlite.insert(table)
        params = rows
    if update_cols:
        excluded = stmt.excluded
        changed = sa.or_(*(_differs(table.c[c], excluded[c]) for c in update_cols))
        stmt = stmt.on_conflict_do_update(
            index_elements=key_cols, set_={c: excluded[c] for c in update_cols}, where=changed
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=key_cols)
    # RETURNING yields the inserted and the actually-updated rows; the rest were already right.
    for returned in session.execute(stmt.returning(*key_cols, table.c.id), params):
        k, row_id = tuple(returned[:-1]), returned[-1]
        result[k] = row_id
        (result.updated if k in existing else result.inserted).add(k)
    for k, row_id in existing.items():
        if k not in result:
            result[k] = row_id
            result.unchanged.add(k)


def select_ids(session: Session, table: sa.Table, key: Sequence[str], keys: Sequence[Key]) -> dict[Key, int]:
    """``{key tuple: id}`` of the rows of ``table`` whose ``key`` columns match one of ``keys``."""
    if not keys:
        return {}
    key_cols = [table.c[k] for k in key]
    if len(key_cols) == 1:
        where = key_cols[0].in_([k[0] for k in keys])
    else:
        where = sa.tuple_(*key_cols).in_(list(keys))
    return {tuple(r[:-1]): r[-1] for r in session.execute(sa.select(*key_cols, table.c.id).where(where))}


def _array_item(column: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    # text[], not varchar(n)[]: an explicit cast to varchar(n) would silently cut a too-long value,
    # the assignment to the column rejects it.
    return sa.Text() if isinstance(column.type, sa.String) else column.type


def _differs(column: sa.ColumnElement[Any], new: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    # PostgreSQL's json type has no equality operator: compare the text.
    if isinstance(column.type, sa.JSON):
        return sa.cast(column, sa.Text).is_distinct_from(sa.cast(new, sa.Text))
    return column.is_distinct_from(new)


def _with_defaults(model: type[SQLModel], table: sa.Table, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row plus the model's defaults for the columns it leaves out (a multi-row VALUES needs
    every row to name the same columns)."""
    full = dict(row)
    for name in table.c.keys():
        if name in full or table.c[name].primary_key:
            continue
        field = model.model_fields.get(name)
        if field is None:
            continue
        if field.default_factory is not None:
            full[name] = field.default_factory()  # type: ignore[call-arg]
        elif field.default is not PydanticUndefined:
            full[name] = field.default
        else:
            raise ValueError(f"upsert into {table.name}: rows lack required column {name!r}")
    return full


def too_long(model: type[SQLModel], row: Mapping[str, Any]) -> list[str]:
    """The columns whose string value is longer than the column allows (PostgreSQL would reject the
    whole statement; SQLite would silently keep it). Check rows before a batch goes in."""
    lengths = _string_lengths(model.__table__)  # type: ignore[attr-defined]
    return [
        name
        for name, value in row.items()
        if isinstance(value, str) and len(value) > lengths.get(name, len(value))
    ]


@lru_cache(maxsize=None)
def _string_lengths(table: sa.Table) -> dict[str, int]:
    return {c.name: c.type.length for c in table.c if getattr(c.type, "length", None) is not None}


# What one bad row makes the database raise (not a lost connection or a missing table: those are
# not a row's fault and end the import instead of turning every row into a problem).
ROW_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError)


def write_batch(
    engine: sa.Engine,
    items: Sequence[tuple[Any, Any]],
    write: Callable[[Session, list[tuple[Any, Any]]], UpsertResult],
    *,
    counted: Callable[[UpsertResult, list[tuple[Any, Any]]], None],
    rejected: Callable[[Any], None],
) -> None:
    """Write ``(source, row)`` items in one transaction; if the database rejects a row of them, again
    one transaction per item, so the bad one is reported (``rejected(source)``) and the rest go in.
    Each record is all-or-nothing; the database's own message is never passed on (PostgreSQL's
    DETAIL can quote values)."""
    from retroauth.db import session_scope

    if not items:
        return
    batches = [list(items)]
    try:
        with session_scope(engine) as session:
            result = write(session, batches[0])
        counted(result, batches[0])
        return
    except ROW_ERRORS:
        batches = [[item] for item in items]
    for batch in batches:
        try:
            with session_scope(engine) as session:
                result = write(session, batch)
            counted(result, batch)
        except ROW_ERRORS:
            rejected(batch[0][0])

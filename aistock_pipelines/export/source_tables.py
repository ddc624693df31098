"""Catalogue checks and SQLAlchemy Core handles for the research source tables (universes, benchmarks).

These tables are small (index constituents, universe spans, a few index histories), so they are read with
SQLAlchemy Core — every value a bound parameter, every identifier quoted by SQLAlchemy — on a connection
the caller owns: each read is one statement, so inside the caller's REPEATABLE READ transaction it sees
that transaction's view, and on its own it is consistent by itself.
"""

from __future__ import annotations

from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aistock_pipelines.export.mapping import MappingError, _check_table_name


class SourceTableError(ValueError):
    """A research source table or column is missing or malformed; the message names it and the fix."""


def checked_table_name(table: str) -> str:
    """``schema.table`` of plain identifiers (pydantic validators call this: ValueError on a bad name)."""
    try:
        _check_table_name(table)
    except MappingError as e:
        raise ValueError(str(e)) from None
    return table


def core_table(conn: Connection, table: str, needed: Iterable[str], what: str, fix: str) -> sa.TableClause:
    """A Core handle on ``table`` after checking it and ``needed`` columns exist; errors name ``what`` (the
    declaration reading it) and ``fix`` (the key to change)."""
    schema, name = checked_table_name(table).split(".")
    rows = conn.execute(sa.text("SELECT column_name FROM information_schema.columns "
                                "WHERE table_schema = :s AND table_name = :t"), {"s": schema, "t": name}).scalars().all()
    if not rows:
        raise SourceTableError(f"{what}: table {table} does not exist (or is not visible to this database user); "
                               f"create it or set {fix} to the table that holds these rows")
    missing = [c for c in needed if c not in rows]
    if missing:
        raise SourceTableError(f"{what}: table {table} has no column(s) {missing} (it has {sorted(rows)}); "
                               f"set {fix} to a table in this layout")
    return sa.table(name, *(sa.column(c) for c in rows), schema=schema)


def sample_values(conn: Connection, column: sa.ColumnClause, limit: int = 10) -> list[str]:
    """A few distinct values of ``column`` (for error messages naming what the table does hold)."""
    return [str(v) for v in conn.execute(sa.select(column).distinct().order_by(column).limit(limit)).scalars()]

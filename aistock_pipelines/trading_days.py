"""Which trading days a snapshot offers as partitions: the trade calendar's open days of its span that have
bars loaded (plus, for the post-close run, the day that just closed), and how to bring a registered,
ordered list of days to that set.

Plain Python over the AIstock database; the Dagster side is ``orchestration/trading_day_partitions.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import sqlalchemy as sa

from aistock_pipelines.export.mapping import ExportMapping, quote_table


@dataclass(frozen=True)
class OfferedDays:
    """The trading days of a span that a snapshot offers, and the last day with bars in the database."""

    days: list[date]
    last_loaded: date | None


def last_loaded_day(conn: sa.Connection, mapping: ExportMapping) -> date | None:
    """The last trade_date with any bar (an index probe)."""
    return conn.execute(sa.text(f"SELECT max(trade_date) FROM {quote_table(mapping.bars_table)}")).scalar()


def open_days(conn: sa.Connection, mapping: ExportMapping, start: date, end: date) -> list[date]:
    """The calendar's open days in [start, end], ascending."""
    rows = conn.execute(sa.text(f"SELECT cal_date FROM {quote_table(mapping.calendar_table)} "
                                "WHERE is_trading AND cal_date BETWEEN :s AND :e ORDER BY cal_date"),
                        {"s": start, "e": end})
    return [r[0] for r in rows]


def offered_days(conn: sa.Connection, mapping: ExportMapping, start: date, end: date | None,
                 through: date | None = None) -> OfferedDays:
    """Open days from ``start`` to the last loaded day (or ``through``, a closed day whose bars are due,
    when later), never past ``end``."""
    last = last_loaded_day(conn, mapping)
    until = max(d for d in (last, through) if d is not None) if (last or through) else None
    if until is None:
        return OfferedDays([], None)
    if end is not None:
        until = min(until, end)
    return OfferedDays(open_days(conn, mapping, start, until) if until >= start else [], last)


def partition_plan(registered: Sequence[str], wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """Keys to delete, then keys to add (in order), so that ``registered`` becomes ``wanted``.

    Dagster orders dynamic partitions by registration, and a ranged run covers the keys between its ends in
    that order, so the registered list must stay ascending: everything after the first difference is
    deleted and added again (in practice only new days are appended).
    """
    same = 0
    while same < min(len(registered), len(wanted)) and registered[same] == wanted[same]:
        same += 1
    return list(registered[same:]), list(wanted[same:])

"""Qlib market files (``instruments/<name>.txt``) from the universe tables AIstock has.

Two sources, declared under ``universes:`` in the snapshots YAML::

    universes:
      csi300: {index_weight: 000300.SH}      # Tushare index_weight rows (market.index_weight)
      hs_liquid: {spans: hs_liquid}          # AIstock PIT spans (market.stock_universe_pit_spans)

* **Index constituents** (``index_code, con_code, trade_date``): a stock is a member on a trading day when
  the latest weight date on or before that day lists it. Its span ends on the trading day before the first
  later weight date without it — or at its last bar in the snapshot, when that comes first (a delisting).
* **Point-in-time spans** (``universe_key, ts_code, eligible_start, eligible_end``): ``eligible_end``
  inclusive, NULL = still eligible; the same last-bar clip applies.

Spans are on the snapshot's calendar (a start on a weekend moves to the next trading day), one line per
contiguous span (spans with no trading day between them are one line), symbols in the snapshot's naming,
in the format of ``all.txt`` (written by :func:`qlib_format.write_instruments`).
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from sqlalchemy.engine import Connection

from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.source_tables import checked_table_name, core_table, sample_values

INDEX_WEIGHT_TABLE = "market.index_weight"
PIT_SPANS_TABLE = "market.stock_universe_pit_spans"
#: A universe name is a file name Qlib opens as ``instruments/<name>.txt``: lower case, no path parts.
UNIVERSE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESERVED = {"all"}  # all.txt is written from the bars

Span = tuple[str, date, date]


class UniverseError(ValueError):
    """A universe cannot be built as declared; the message names the universe and the fix."""


class UniverseDecl(BaseModel):
    """One entry of ``universes:``: exactly one of ``index_weight`` (an index code in the weight table) or
    ``spans`` (a ``universe_key`` in the PIT spans table); ``table`` overrides the source's default table."""

    model_config = ConfigDict(extra="forbid")
    index_weight: str | None = None
    spans: str | None = None
    table: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "UniverseDecl":
        if (self.index_weight is None) == (self.spans is None):
            raise ValueError("give exactly one of 'index_weight' (an index code, e.g. 000300.SH) "
                             "or 'spans' (a universe_key of the PIT spans table)")
        return self

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        return None if v is None else checked_table_name(v)

    @property
    def source_table(self) -> str:
        return self.table or (INDEX_WEIGHT_TABLE if self.index_weight is not None else PIT_SPANS_TABLE)


def check_universe_name(name: str) -> str:
    """``name`` if it is a safe, non-reserved market file name; else UniverseError naming the rule."""
    if not isinstance(name, str) or not UNIVERSE_NAME.match(name) or name in RESERVED:
        raise UniverseError(f"universe name {name!r}: use 1-64 lower-case letters, digits, '_' or '-' (it becomes "
                            f"instruments/<name>.txt, which Qlib opens by name); {sorted(RESERVED)} is reserved")
    return name


# ------------------------------------------------------------------------------------------------ reading


def read_index_weights(conn: Connection, name: str, decl: UniverseDecl, end: date) -> pd.DataFrame:
    """Weight rows (``trade_date``, ``ts_code``) of the declared index up to ``end``: one SELECT."""
    fix = f"universes.{name}.table"
    t = core_table(conn, decl.source_table, ["index_code", "con_code", "trade_date"], f"universe {name!r}", fix)
    day = sa.cast(t.c.trade_date, sa.Date)  # Tushare loads keep trade_date as text 'YYYYMMDD' in places
    rows = conn.execute(sa.select(day, t.c.con_code).distinct()
                        .where(t.c.index_code == decl.index_weight, day <= end)).all()
    if not rows and not conn.execute(sa.select(sa.literal(1)).where(t.c.index_code == decl.index_weight).limit(1)).first():
        raise UniverseError(f"universe {name!r}: {decl.source_table} has no rows for index_code "
                            f"{decl.index_weight!r} (it has e.g. {sample_values(conn, t.c.index_code)}); "
                            f"fix universes.{name}.index_weight")
    return pd.DataFrame(rows, columns=["trade_date", "ts_code"])


def read_pit_spans(conn: Connection, name: str, decl: UniverseDecl) -> pd.DataFrame:
    """Span rows (``ts_code``, ``start``, ``end`` — None: still eligible) of the declared key: one SELECT."""
    fix = f"universes.{name}.table"
    t = core_table(conn, decl.source_table, ["universe_key", "ts_code", "eligible_start", "eligible_end"],
                   f"universe {name!r}", fix)
    rows = conn.execute(sa.select(t.c.ts_code, sa.cast(t.c.eligible_start, sa.Date), sa.cast(t.c.eligible_end, sa.Date))
                        .where(t.c.universe_key == decl.spans)).all()
    if not rows:
        raise UniverseError(f"universe {name!r}: {decl.source_table} has no rows for universe_key {decl.spans!r} "
                            f"(it has e.g. {sample_values(conn, t.c.universe_key)}); fix universes.{name}.spans")
    return pd.DataFrame(rows, columns=["ts_code", "start", "end"])


# ------------------------------------------------------------------------------------------- computing


def _positions(sorted_days: Iterable, days: Iterable, side: str) -> np.ndarray:
    """``searchsorted`` of ``days`` in ``sorted_days`` (dates, Timestamps or datetime64), by day."""
    def as_days(values: Iterable) -> np.ndarray:
        return np.asarray(pd.to_datetime(list(values)), dtype="datetime64[D]")
    return np.searchsorted(as_days(sorted_days), as_days(days), side=side)


def weight_membership(weights: pd.DataFrame, calendar: Sequence[date]) -> tuple[np.ndarray, np.ndarray]:
    """(codes, member[day, code]): the members of the latest weight date on or before each calendar day."""
    codes, code_no = np.unique(weights["ts_code"].to_numpy(dtype=object).astype(str), return_inverse=True)
    dates, date_no = np.unique(np.asarray(pd.to_datetime(weights["trade_date"]), dtype="datetime64[D]"),
                               return_inverse=True)
    listed = np.zeros((len(dates) + 1, len(codes)), dtype=bool)  # row 0: before the first weight date
    listed[date_no + 1, code_no] = True
    effective = _positions(dates, calendar, "right")  # weight dates on or before each day, counted
    return codes, listed[effective]


def span_membership(spans: pd.DataFrame, calendar: Sequence[date]) -> tuple[np.ndarray, np.ndarray]:
    """(codes, member[day, code]) from inclusive date spans (end None = open) on the calendar."""
    codes, code_no = np.unique(spans["ts_code"].to_numpy(dtype=object).astype(str), return_inverse=True)
    n = len(calendar)
    first = _positions(calendar, spans["start"], "left")
    bounded = spans["end"].notna().to_numpy()
    last = np.full(len(spans), n - 1, dtype=np.int64)
    last[bounded] = _positions(calendar, spans["end"][bounded], "right") - 1
    keep = first <= last
    edges = np.zeros((n + 1, len(codes)), dtype=np.int32)
    np.add.at(edges, (first[keep], code_no[keep]), 1)
    np.add.at(edges, (last[keep] + 1, code_no[keep]), -1)
    return codes, np.cumsum(edges, axis=0)[:n] > 0


def member_spans(codes: np.ndarray, member: np.ndarray, calendar: Sequence[date], *, instruments: str = "qlib",
                 bar_spans: Iterable[Span] = ()) -> list[Span]:
    """One (symbol, first day, last day) per contiguous run of ``member[:, code]``, after ending each
    stock's membership at its last bar where ``bar_spans`` (``all.txt``'s lines, in the snapshot's naming)
    has one; symbols in the ``instruments`` naming; sorted by symbol, then start."""
    names = qlib_format.instrument_names(list(codes), instruments)
    last_bar = {name: b for name, _, b in bar_spans}
    cap = _positions(calendar, [last_bar.get(str(s), calendar[-1]) for s in names], "right") - 1
    member = member & (np.arange(len(calendar))[:, None] <= cap[None, :])
    padded = np.zeros((len(calendar) + 2, len(codes)), dtype=np.int8)
    padded[1:-1] = member
    step = np.diff(padded, axis=0)
    s_code, s_pos = np.nonzero(step.T == 1)  # ordered by code, then position
    _, e_pos = np.nonzero(step.T == -1)
    return sorted((str(names[c]), calendar[a], calendar[b - 1]) for c, a, b in zip(s_code, s_pos, e_pos))


def resolve_universe(conn: Connection, name: str, decl: UniverseDecl, calendar: Sequence[date], *,
                     instruments: str = "qlib", bar_spans: Iterable[Span] = ()) -> list[Span]:
    """The universe's lines for a snapshot with ``calendar`` (its trading days) whose instruments are named
    ``instruments`` and whose ``all.txt`` lines are ``bar_spans``; UniverseError if it has no member."""
    check_universe_name(name)
    if not calendar:
        raise UniverseError(f"universe {name!r}: the snapshot's calendar is empty")
    if decl.index_weight is not None:
        codes, member = weight_membership(read_index_weights(conn, name, decl, calendar[-1]), calendar)
    else:
        codes, member = span_membership(read_pit_spans(conn, name, decl), calendar)
    spans = member_spans(codes, member, calendar, instruments=instruments, bar_spans=bar_spans)
    if not spans:
        source = (f"{decl.source_table} index_code {decl.index_weight!r} (no weight date on or before "
                  f"{calendar[-1]} lists a stock trading by then)" if decl.index_weight is not None
                  else f"{decl.source_table} universe_key {decl.spans!r} (no span overlaps the calendar)")
        raise UniverseError(f"universe {name!r} has no member between {calendar[0]} and {calendar[-1]}: {source}; "
                            f"fix the declaration or leave universe {name!r} out of this snapshot")
    return spans


def write_universes(conn: Connection, universes: Mapping[str, UniverseDecl], instruments_dir: Path,
                    calendar: Sequence[date], *, instruments: str = "qlib",
                    bar_spans: Iterable[Span] = ()) -> dict[str, list[Span]]:
    """Resolve every declared universe first, then write ``instruments/<name>.txt`` for each: a bad
    declaration raises before any file is written. Returns the lines per universe."""
    bar_spans = list(bar_spans)
    resolved = {name: resolve_universe(conn, name, decl, calendar, instruments=instruments, bar_spans=bar_spans)
                for name, decl in universes.items()}
    for name, spans in resolved.items():
        qlib_format.write_instruments(Path(instruments_dir) / f"{name}.txt", spans)
    return resolved


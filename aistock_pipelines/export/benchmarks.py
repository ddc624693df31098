"""Benchmark indices as Qlib bins (``features/sh000300/close.day.bin``, …), so ``benchmark="SH000300"`` works.

Declared under ``benchmarks:`` in the snapshots YAML::

    benchmarks:
      table: market.index_daily          # Tushare layout: index points in yuan, vol in 手, amount in 千元
      codes: [000300.SH, 399006.SZ]

Fields ``open, high, low, close`` (yuan, not adjusted: an index has no factor), ``volume`` (shares),
``amount`` (yuan) — each ``column × scale`` exactly as the bars' :class:`mapping.FieldSpec` computes it —
and ``change`` = close / previous bar's close − 1, derived as the stocks' is (:func:`frames.merge_sorted`:
closes rounded to the snapshot's dtype first). Other layouts are a ``fields``/``code_column``/``code_style``
override, e.g. ``market.index_daily_tdx`` (``index_code`` like ``sh000300``, prices in 厘)::

    benchmarks:
      table: market.index_daily_tdx
      code_column: index_code
      code_style: prefix_lower
      codes: [000300.SH]
      fields: {open: {column: open_li, scale: 0.001}, …}

An index is a benchmark, not an instrument: it is in no instruments file and not in ``daily_pv.h5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import Connection

from aistock_pipelines.conventions import TS_CODE
from aistock_pipelines.export import frames, qlib_bins, qlib_format
from aistock_pipelines.export.mapping import FieldSpec
from aistock_pipelines.export.source_tables import checked_table_name, core_table, sample_values

BAR_FIELDS = ("open", "high", "low", "close", "volume", "amount")
BENCHMARK_FIELDS = (*BAR_FIELDS, "change")
#: Tushare's ``index_daily``: index points in yuan, ``vol`` in 手 (100 shares), ``amount`` in 千元.
TUSHARE_INDEX_FIELDS: dict[str, FieldSpec] = {
    "open": FieldSpec("open", 1.0, "yuan"),
    "high": FieldSpec("high", 1.0, "yuan"),
    "low": FieldSpec("low", 1.0, "yuan"),
    "close": FieldSpec("close", 1.0, "yuan"),
    "volume": FieldSpec("vol", 100.0, "shares"),
    "amount": FieldSpec("amount", 1000.0, "yuan"),
}


class BenchmarkError(ValueError):
    """The benchmark declaration does not match the database; the message names the cause and the fix."""


class BenchmarksDecl(BaseModel):
    """``benchmarks:``: the index table, the codes (ts_code form, e.g. 000300.SH) and the column mapping
    (``fields`` overrides :data:`TUSHARE_INDEX_FIELDS` per field)."""

    model_config = ConfigDict(extra="forbid")
    table: str = "market.index_daily"
    codes: list[str] = Field(min_length=1)
    code_column: str = "ts_code"
    date_column: str = "trade_date"
    #: how the table spells 000300.SH: ``ts_code`` (000300.SH), ``prefix_lower`` (sh000300), ``prefix_upper``
    code_style: Literal["ts_code", "prefix_lower", "prefix_upper"] = "ts_code"
    fields: dict[Literal["open", "high", "low", "close", "volume", "amount"], FieldSpec] = Field(default_factory=dict)

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str) -> str:
        return checked_table_name(v)

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not TS_CODE.match(c)]
        if bad:
            raise ValueError(f"codes {bad}: write index codes as ts_code, e.g. 000300.SH, 399006.SZ")
        if len(set(v)) != len(v):
            raise ValueError(f"codes {v}: a code is listed twice")
        return v

    def field_specs(self) -> dict[str, FieldSpec]:
        return {**TUSHARE_INDEX_FIELDS, **self.fields}

    def table_code(self, ts_code: str) -> str:
        """``ts_code`` as the table spells it (:attr:`code_style`)."""
        if self.code_style == "ts_code":
            return ts_code
        symbol = qlib_format.to_qlib_symbol(ts_code)
        return symbol.lower() if self.code_style == "prefix_lower" else symbol.upper()


@dataclass(frozen=True)
class IndexSeries:
    """One index on the snapshot's calendar: ``first`` = calendar position of its first bar; each field's
    float32 values from there to its last bar, NaN where a trading day has no bar (as in its bin)."""

    code: str
    first: int
    values: dict[str, np.ndarray]


def read_index_bars(conn: Connection, decl: BenchmarksDecl, calendar: Sequence[date], *,
                    dtype: str = "float32") -> pd.DataFrame:
    """The declared indices' bars over the calendar's range (one SELECT) as a snapshot-shaped frame:
    index (datetime, instrument = ts_code), columns :data:`BENCHMARK_FIELDS`, values rounded through
    ``dtype`` (the snapshot's), ``change`` from the rounded closes. BenchmarkError for an unknown table,
    column or code, a code without bars in the range, a bar on a closed day, a NULL or non-positive close."""
    specs = decl.field_specs()
    t = core_table(conn, decl.table, [decl.code_column, decl.date_column, *(s.column for s in specs.values())],
                   "benchmarks", "benchmarks.table (or the column mapping: code_column, date_column, fields)")
    code, day = t.c[decl.code_column], sa.cast(t.c[decl.date_column], sa.Date)
    wanted = {decl.table_code(c): c for c in decl.codes}
    query = sa.select(code, day, *(sa.cast(t.c[s.column], sa.Double) for s in specs.values())).where(
        code.in_(list(wanted)), day.between(calendar[0], calendar[-1])).order_by(day, code)
    rows = conn.execute(query).all()
    raw = pd.DataFrame(rows, columns=["code", "day", *specs])
    _check_codes(conn, decl, code, set(raw["code"]), wanted, calendar)
    bars = pd.DataFrame({name: spec.apply(raw[name].to_numpy(dtype=np.float64)) for name, spec in specs.items()})
    bars.index = pd.MultiIndex.from_arrays([pd.DatetimeIndex(pd.to_datetime(raw["day"])).as_unit("ns"),
                                            pd.Index([wanted[c] for c in raw["code"]], dtype=object)],
                                           names=frames.INDEX_NAMES)
    _check_bars(bars, decl, calendar)
    return frames.merge_sorted([(bars, None)], dtype=dtype, change=True)[list(BENCHMARK_FIELDS)]


def _check_codes(conn: Connection, decl: BenchmarksDecl, code: sa.ColumnClause, found: set[str],
                 wanted: dict[str, str], calendar: Sequence[date]) -> None:
    missing = [c for c in wanted if c not in found]
    if not missing:
        return
    known = set(conn.execute(sa.select(code).distinct().where(code.in_(missing))).scalars())
    unknown = [c for c in missing if c not in known]
    if unknown:
        raise BenchmarkError(f"benchmarks: {decl.table} has no rows for {decl.code_column} {unknown} (it has e.g. "
                             f"{sample_values(conn, code)}); fix benchmarks.codes (ts_code form, e.g. 000300.SH) "
                             "or benchmarks.code_style")
    raise BenchmarkError(f"benchmarks: {decl.table} has no bars for {missing} between {calendar[0]} and "
                         f"{calendar[-1]}; drop them from benchmarks.codes for this snapshot or load their bars")


def _check_bars(bars: pd.DataFrame, decl: BenchmarksDecl, calendar: Sequence[date]) -> None:
    def examples(mask: np.ndarray) -> str:
        return ", ".join(f"{d:%Y-%m-%d} {c}" for d, c in bars.index[mask][:5])

    if bars.index.duplicated().any():
        raise BenchmarkError(f"benchmarks: {decl.table} has several rows for one (code, day): "
                             f"{examples(bars.index.duplicated(keep=False))}; deduplicate the table")
    close = bars["close"].to_numpy()
    bad = ~(close > 0)
    if bad.any():
        raise BenchmarkError(f"benchmarks: NULL or non-positive close in {decl.table}: {examples(bad)}")
    open_days = pd.DatetimeIndex(pd.to_datetime(list(calendar))).as_unit("ns")
    closed = ~bars.index.get_level_values(0).isin(open_days)
    if closed.any():
        raise BenchmarkError(f"benchmarks: {decl.table} has bars on days the trade calendar marks closed: "
                             f"{examples(closed)}; fix the rows or the calendar")


def index_series(bars: pd.DataFrame, calendar: Sequence[date]) -> dict[str, IndexSeries]:
    """Per index (ts_code), its float32 values on the calendar from its first to its last bar."""
    cal = np.asarray(pd.DatetimeIndex(pd.to_datetime(list(calendar))), dtype="datetime64[ns]")
    out = {}
    for code, part in bars.groupby(level="instrument", sort=True):
        pos = np.searchsorted(cal, np.asarray(part.index.get_level_values(0), dtype="datetime64[ns]"))
        first, last = int(pos[0]), int(pos[-1])
        values = {}
        for field in part.columns:
            column = np.full(last - first + 1, np.nan, dtype=np.float32)
            column[pos - first] = part[field].to_numpy()
            values[field] = column
        out[str(code)] = IndexSeries(str(code), first, values)
    return out


def write_benchmark_bins(features_dir: Path, bars: pd.DataFrame, calendar: Sequence[date], *,
                         instruments: str = "qlib") -> int:
    """Each index's bins, written anew (never through an existing name), its folder named in the
    snapshot's ``instruments`` naming (``sh000300`` or ``000300.sh``); returns the number of files.
    Write them after the stocks' bins: a recycled features folder drops folders of no stock."""
    names = qlib_format.instrument_names(list(bars.index.levels[1]), instruments)
    renamed = bars.set_axis(bars.index.set_levels(pd.Index(names, dtype=object), level=1), axis=0)
    return qlib_bins.write_bins(Path(features_dir), renamed, list(calendar), list(bars.columns))

"""Latest-bar providers: today's bar before the close, optionally from a real-time quote feed such as TDX.

The contract is deliberately in **database units of the bars table** (the mapping's columns, e.g.
``open_li … close_li`` in 厘, ``volume_hand`` in 手, ``amount_li`` in 厘), **unadjusted**: a quote feed such as
TDX delivers raw prices, and the adapter then sends those numbers through the very same :class:`FieldSpec`
scaling and derivations as database rows, so a provided bar and the bar the vendor loads after the close
become the same row. A provider never scales, adjusts or renames anything itself.
"""

from __future__ import annotations

from datetime import date
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

#: Optional provider column: the exchange's previous close for ``trade_date`` (昨收 / ex-rights reference
#: price), in the unit of the bars table's close column. It lets the adapter detect an ex-date today.
PRE_CLOSE = "pre_close"


class LatestBarError(ValueError):
    """A provider returned bars the adapter must not use (stale date, duplicates, missing columns)."""


@runtime_checkable
class LatestBarProvider(Protocol):
    """Supplies the bar of ``trade_date`` (normally today, before the vendor's end-of-day load).

    ``latest_bars`` returns one row per instrument that trades on ``trade_date``, with columns:

    * ``ts_code`` — e.g. ``000001.SZ``;
    * every column of the bar mapping (``ExportMapping.fields``; by default ``open_li, high_li, low_li,
      close_li, volume_hand, amount_li``), raw (unadjusted) values in the bars table's units;
    * ``trade_date`` (recommended) — the day the quote belongs to; a row for any other day is refused, so
      a stale quote is an error instead of yesterday's bar dated today;
    * ``pre_close`` (optional) — the exchange's previous close for ``trade_date`` in the close column's
      unit; when it differs from the last close in the database the instrument has an ex-date today.

    Instruments without a quote (suspended today) are simply absent; extra columns are ignored. An empty
    answer (before the open) leaves the day out of the window. Called inside the adapter's read
    transaction: answer from memory or a quick local call.
    """

    def latest_bars(self, ts_codes: list[str], trade_date: date) -> pd.DataFrame: ...


class FrameLatestBarProvider:
    """A provider over an in-memory frame of bars (columns as in :class:`LatestBarProvider`, with
    ``trade_date``): replays, tests and documentation. A TDX client adapter has the same one method."""

    def __init__(self, bars: pd.DataFrame):
        if "ts_code" not in bars.columns or "trade_date" not in bars.columns:
            raise LatestBarError("FrameLatestBarProvider needs 'ts_code' and 'trade_date' columns")
        self.bars = bars.assign(trade_date=pd.to_datetime(bars["trade_date"]).dt.date)

    def latest_bars(self, ts_codes: list[str], trade_date: date) -> pd.DataFrame:
        b = self.bars
        return b[(b["trade_date"] == trade_date) & b["ts_code"].isin(ts_codes)].reset_index(drop=True)


def validate_latest_bars(bars: pd.DataFrame, columns: list[str], ts_codes: list[str], trade_date: date) -> pd.DataFrame:
    """Check a provider's answer and keep the requested codes: ``ts_code``, ``columns`` (float64) and
    ``pre_close`` when given. Errors name the provider's problem; nothing is guessed."""
    if not isinstance(bars, pd.DataFrame):
        raise LatestBarError(f"latest_bars must return a pandas DataFrame, got {type(bars).__name__}")
    missing = [c for c in ["ts_code", *columns] if c not in bars.columns]
    if missing:
        raise LatestBarError(f"latest bars lack column(s) {missing}; expected ts_code + the bars table's "
                             f"columns {columns} in database units (raw, unadjusted)")
    if "trade_date" in bars.columns and len(bars):
        days = set(pd.to_datetime(bars["trade_date"]).dt.date)
        if days != {trade_date}:
            stale = sorted(d for d in days if d != trade_date)
            raise LatestBarError(f"latest bars were requested for {trade_date} but rows are dated {stale[:3]} "
                                 "(a stale quote must not be used as today's bar)")
    rows = bars[bars["ts_code"].isin(ts_codes)]
    dup = rows["ts_code"][rows["ts_code"].duplicated()]
    if len(dup):
        raise LatestBarError(f"latest bars hold several rows for {sorted(set(dup))[:5]} on {trade_date}")
    keep = ["ts_code", *columns] + ([PRE_CLOSE] if PRE_CLOSE in rows.columns else [])
    out = rows[keep].reset_index(drop=True)
    for c in keep[1:]:
        try:
            out[c] = out[c].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise LatestBarError(f"latest bars column {c!r} is not numeric") from None
    out["ts_code"] = out["ts_code"].to_numpy(dtype=object)
    return out

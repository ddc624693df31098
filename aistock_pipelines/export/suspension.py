"""Suspended days in RD-Agent's upstream layout: a NaN row for every trading day inside each instrument's span.

RD-Agent's own ``daily_pv.h5`` is built from Qlib's ``D.features`` over the calendar, so it has a row for
every trading day between an instrument's first and last bar, NaN where it did not trade. Rolling factors
then count calendar days, as Qlib's operators do on the bins. :func:`with_suspension_rows` turns a snapshot
frame (one row per bar) into that layout, on index codes and one block copy — no per-row Python objects.
"""

from __future__ import annotations

from datetime import date
from typing import Collection, Sequence

import numpy as np
import pandas as pd

from aistock_pipelines.export.frames import first_last_dates
from aistock_pipelines.export.stored_snapshot import StoredBlock

_COMPACT_ROWS = 1 << 20  # rows moved per step when suspension rows are dropped in place


def with_suspension_rows(frame: pd.DataFrame, calendar: Sequence[date],
                         open_at_start: Collection[str] = ()) -> pd.DataFrame:
    """``frame`` (index (datetime, instrument), sorted, one float dtype) with a NaN row added for every
    trading day of ``calendar`` between each instrument's first and last row that has none — from the
    calendar's first day for the instruments in ``open_at_start`` (their span began before it). Existing rows
    keep their values bit for bit; the result is sorted by (datetime, instrument), its values one row-major
    block of the frame's dtype, its levels of the frame's types (the date level's unit, the instrument
    level's dtype — ``object`` in memory, ``str`` as pandas 3 reads it back) and names."""
    if frame.empty:
        return frame
    dtypes = set(frame.dtypes)
    if len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
        raise ValueError(f"suspension rows need one float dtype for all columns, got {sorted(map(str, dtypes))}")
    index = frame.index
    cal = np.asarray(pd.DatetimeIndex(pd.to_datetime(list(calendar))).as_unit("ns"), dtype="datetime64[ns]")
    level_days = np.asarray(index.levels[0], dtype="datetime64[ns]")
    level_pos = np.searchsorted(cal, level_days)
    used = np.bincount(index.codes[0], minlength=len(level_days)) > 0
    found = (level_pos < len(cal)) & (cal[np.minimum(level_pos, len(cal) - 1)] == level_days)
    if (used & ~found).any():
        raise ValueError(f"rows on days missing from the calendar: {list(level_days[used & ~found][:3])}")
    n_days, n_inst = len(cal), len(index.levels[1])
    names, first, last = first_last_dates(index)
    if len(open_at_start):
        first[np.isin(names, np.asarray(list(open_at_start), dtype=object))] = cal[0]
    inst = pd.Index(np.asarray(index.levels[1], dtype=object)).get_indexer(names)
    # Spans of one instrument never overlap, so the running sum is 0 or 1: int8 throughout.
    edges = np.zeros((n_days + 1, n_inst), dtype=np.int8)  # +1 at each span's first day, -1 after its last
    edges[np.searchsorted(cal, first), inst] = 1
    edges[np.searchsorted(cal, last) + 1, inst] = -1
    inside = np.cumsum(edges[:n_days], axis=0, dtype=np.int8).view(bool)
    per_day = inside.sum(axis=1)
    keys = np.flatnonzero(inside)  # (day position × instruments + instrument), ascending = sorted rows
    key_type = np.int32 if inside.size < 2**31 else np.int64
    row_key = level_pos.astype(key_type)[index.codes[0]] * key_type(n_inst) + np.asarray(index.codes[1], dtype=key_type)
    rank = np.cumsum(inside.ravel(), dtype=key_type) - 1
    out = _spread(frame.to_numpy(), rank[row_key], len(keys))
    days_used = np.flatnonzero(per_day)
    date_level = pd.DatetimeIndex(cal[days_used]).as_unit(index.levels[0].unit)
    new_index = pd.MultiIndex(levels=[date_level, index.levels[1]],
                              codes=[np.repeat(np.arange(len(days_used)), per_day[days_used]), keys % n_inst],
                              names=index.names, verify_integrity=False)
    return pd.DataFrame(out, index=new_index, columns=frame.columns, copy=False)


def _spread(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """An ``(n, columns)`` block with ``values[i]`` at row ``rows[i]`` and NaN elsewhere, each page written
    once: for ascending ``rows`` (a sorted frame) the runs between inserted rows are copied as slices —
    a scatter into a NaN-filled block touches every fresh page twice (at 5.6 M × 21: 1.1 s against 0.4 s)."""
    out = np.empty((n, values.shape[1]), dtype=values.dtype)
    filled = np.zeros(n, dtype=bool)
    filled[rows] = True
    out[~filled] = np.nan
    if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):
        out[rows] = values
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # where a run of consecutive target rows ends
    for a, b in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()):
        out[rows[a]:rows[a] + b - a] = values[a:b]
    return out


def bar_rows(values: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """Which rows are bars: a bar always has a close (the data gates refuse one without), a suspension row
    never has."""
    j = [str(c).lstrip("$") for c in columns].index("close")
    return ~np.isnan(values[:, j])


def without_suspension_rows(stored: StoredBlock) -> StoredBlock:
    """``stored`` with its suspension rows dropped in its own block: the bars move up over them, step by
    step (a bar never moves down, so no step overwrites a row a later one reads), the spare rows after them
    grow by as many."""
    n = len(stored.index)
    keep = bar_rows(stored.values[:n], stored.columns)
    if keep.all():
        return stored
    rows = np.flatnonzero(keep)
    for a in range(int(np.argmin(keep)), len(rows), _COMPACT_ROWS):
        b = min(a + _COMPACT_ROWS, len(rows))
        stored.values[a:b] = stored.values[rows[a:b]]
    return StoredBlock(stored.values, stored.index[keep].remove_unused_levels(), stored.columns)


def without_suspension_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A stored frame's bars (its suspension rows dropped)."""
    keep = bar_rows(frame.to_numpy(), list(frame.columns))
    return frame if keep.all() else frame[keep]

"""Qlib's native provider format: calendars, instruments, ``features/<sym>/<field>.day.bin``.

Format (what ``qlib.init(provider_uri=…)`` reads): a bin file is little-endian float32; element 0 is the
instrument's start position in ``calendars/day.txt`` (as a float32), followed by one value per calendar day
from that position on, NaN where the instrument has no row (suspension). Directory and file names are
lower-case. Values are placed by calendar position — never appended blindly, which is how Qlib's own
``dump_bin`` update mode shifts data after a missing bar.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

_EXCHANGES = ("SH", "SZ", "BJ")


def to_qlib_symbol(ts_code: str) -> str:
    """``000001.SZ`` → ``SZ000001`` (Qlib's own naming)."""
    code, _, exchange = ts_code.partition(".")
    return f"{exchange}{code}"


def from_qlib_symbol(symbol: str) -> str:
    return f"{symbol[2:]}.{symbol[:2]}" if symbol[:2] in _EXCHANGES else symbol


def instrument_names(ts_codes: pd.Index | list[str], style: str) -> np.ndarray:
    values = np.asarray(ts_codes, dtype=object)
    if style == "ts_code":
        return values
    if style == "qlib":
        return np.array([to_qlib_symbol(c) for c in values], dtype=object)
    raise ValueError(f"instrument naming must be 'ts_code' or 'qlib', got {style!r}")


def write_calendar(path: Path, days: list[date]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{d:%Y-%m-%d}\n" for d in days))


def read_calendar(path: Path) -> list[date]:
    return [date.fromisoformat(line) for line in path.read_text().split()]


def instrument_spans(frame: pd.DataFrame, calendar: list[date]) -> list[tuple[str, date, date]]:
    """One span per instrument: first and last trading day with a row (Qlib's ``all.txt``)."""
    if frame.empty:
        return []
    dates = frame.index.get_level_values("datetime")
    inst = frame.index.get_level_values("instrument")
    g = pd.Series(dates, index=inst).groupby(level=0)
    first, last = g.min(), g.max()
    return [(name, first[name].date(), last[name].date()) for name in sorted(first.index)]


def write_instruments(path: Path, spans: list[tuple[str, date, date]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\t{a:%Y-%m-%d}\t{b:%Y-%m-%d}\n" for name, a, b in spans))


def write_bins(features_dir: Path, frame: pd.DataFrame, calendar: list[date], fields: list[str]) -> int:
    """Write every instrument's bins; returns the number of files. ``frame`` is indexed (datetime,
    instrument) with plain logical column names."""
    cal_index = pd.DatetimeIndex(pd.to_datetime(calendar)).as_unit("ns")
    position = pd.Series(np.arange(len(cal_index)), index=cal_index)
    dates = frame.index.get_level_values("datetime")
    pos = position.reindex(dates).to_numpy()
    if np.isnan(pos).any():
        bad = dates[np.isnan(pos)][:3]
        raise ValueError(f"rows on days missing from the calendar: {list(bad)}")
    pos = pos.astype(np.int64)
    inst = frame.index.get_level_values("instrument").to_numpy(dtype=object)
    order = np.lexsort((pos, inst))  # by instrument, then calendar position
    inst_sorted, pos_sorted = inst[order], pos[order]
    values = {f: frame[f].to_numpy(dtype=np.float32)[order] for f in fields}
    boundaries = np.flatnonzero(inst_sorted[1:] != inst_sorted[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(inst_sorted)]])
    count = 0
    for a, b in zip(starts, ends):
        name = str(inst_sorted[a]).lower()
        target = features_dir / name
        target.mkdir(parents=True, exist_ok=True)
        p = pos_sorted[a:b]
        first, span = int(p[0]), int(p[-1] - p[0] + 1)
        buf = np.full(span + 1, np.nan, dtype="<f4")
        buf[0] = np.float32(first)
        for f in fields:
            buf[1:] = np.nan
            buf[1 + (p - first)] = values[f][a:b]
            _write_bytes(target / f"{f.lower()}.day.bin", buf.tobytes())
            count += 1
    return count


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_bin(path: Path) -> tuple[int, np.ndarray]:
    """Decode a bin (start position, values) straight from the format description above."""
    raw = np.fromfile(path, dtype="<f4")
    return int(raw[0]), raw[1:]

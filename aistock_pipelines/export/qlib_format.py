"""Qlib's native provider format around the bins: instrument naming, ``calendars/day.txt`` and
``instruments/<market>.txt`` (tab-separated ``SYMBOL<TAB>start<TAB>end``). The bins: :mod:`qlib_bins`."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from aistock_pipelines.conventions import EXCHANGES
from aistock_pipelines.export.frames import first_last_dates



def to_qlib_symbol(ts_code: str) -> str:
    """``000001.SZ`` → ``SZ000001`` (Qlib's own naming)."""
    code, _, exchange = ts_code.partition(".")
    return f"{exchange}{code}"


def from_qlib_symbol(symbol: str) -> str:
    return f"{symbol[2:]}.{symbol[:2]}" if symbol[:2] in EXCHANGES else symbol


def instrument_names(ts_codes: pd.Index | list[str], style: str) -> np.ndarray:
    """Per row, the instrument's name in ``style``. Renames each distinct code once (a frame repeats every
    code on each of its days)."""
    values = np.asarray(ts_codes, dtype=object)
    if style == "ts_code":
        return values
    if style == "qlib":
        positions, uniques = pd.factorize(values)
        renamed = np.array([to_qlib_symbol(c) for c in uniques], dtype=object)
        return renamed[positions] if len(values) else values
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
    names, first, last = first_last_dates(frame.index)
    spans = [(str(n), pd.Timestamp(a).date(), pd.Timestamp(b).date()) for n, a, b in zip(names, first, last)]
    return sorted(spans)


def write_instruments(path: Path, spans: list[tuple[str, date, date]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\t{a:%Y-%m-%d}\t{b:%Y-%m-%d}\n" for name, a, b in spans))

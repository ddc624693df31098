"""What every frame passes before a consumer sees it, exports and the live adapter alike: the data gates
and the finishing (rounding to the snapshot dtype, then ``change``)."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames

PRICE_COLUMNS = ["open", "high", "low", "close"]


class DataGateError(ValueError):
    """Source data a consumer must not receive; the message names examples. Nothing was written."""


class DataNotReady(RuntimeError):
    """The requested trading day has no bars yet (load the day, then retry)."""


def check_gates(frame: pd.DataFrame, trading_days: set[date], required_raw_table: str | None = None) -> None:
    """Refuse data Qlib/RD-Agent would silently mis-use. Examples in messages are (date, code).
    Works on columns and index codes (no per-row objects): cheap enough for every read.
    ``required_raw_table``: every bar must have a usable raw close there (``factor`` not NaN)."""
    if frame.empty:
        return
    # strictly sorted (every bulk read's index) means no key twice; only other frames are hashed
    dup = np.zeros(len(frame), dtype=bool) if frames.strictly_sorted(frame.index) else frame.index.duplicated(keep=False)
    if dup.any():
        raise DataGateError(f"duplicate (ts_code, trade_date) rows in the source: {_examples(frame, dup)}; "
                            "deduplicate the bars table (it should have a unique key on (ts_code, trade_date))")
    col = {c: frame[c].to_numpy(dtype=np.float64) for c in PRICE_COLUMNS}
    null = np.isnan(col["open"]) | np.isnan(col["high"]) | np.isnan(col["low"]) | np.isnan(col["close"])
    if null.any():
        raise DataGateError(f"NULL prices on trading rows: {_examples(frame, null)}")
    nonpos = col["close"] <= 0
    if nonpos.any():
        raise DataGateError(f"close <= 0 (subtractive qfq from the vendor?): {_examples(frame, nonpos)}")
    inverted = col["high"] < col["low"]
    if inverted.any():
        raise DataGateError(f"high < low: {_examples(frame, inverted)}")
    if required_raw_table is not None and "factor" in frame.columns:
        no_raw = np.isnan(frame["factor"].to_numpy(dtype=np.float64))
        if no_raw.any():
            raise DataGateError(f"bars without a usable raw close in {required_raw_table} (row missing, NULL or 0): "
                                f"{_examples(frame, no_raw)}; load those raw rows, or declare `missing_raw: nan` in "
                                "the snapshots file's mapping to export them with NaN factor, volume and vwap")
    level = pd.DatetimeIndex(frame.index.levels[0])
    closed = ~level.normalize().isin(pd.DatetimeIndex(sorted(trading_days)))
    if closed.any():
        off = closed[frame.index.codes[0]]
        if off.any():
            raise DataGateError(f"bars on days the trade calendar marks closed: {_examples(frame, off)}")


def _examples(frame: pd.DataFrame, mask: np.ndarray | pd.Series) -> str:
    idx = frame.index[np.asarray(mask)][:5]
    return ", ".join(f"{d:%Y-%m-%d} {c}" for d, c in idx)


def finalize(frame: pd.DataFrame, dtype: str) -> pd.DataFrame:
    """Round to the snapshot dtype first, then derive ``change`` from the rounded closes, so an incremental
    export (which starts from the stored, rounded values) produces exactly what a full export does.
    Returns a new sorted frame in one row-major float64 block (see :mod:`frames`)."""
    return frames.merge_sorted([(frame, None)], dtype=dtype, change=True)

"""Factor implementations as RD-Agent writes them into ``rd_factors_lib.generated`` (demo subset).

Contract (the catalog's ``interface_info``): each function takes a DataFrame indexed by
``(datetime, instrument)``, sorted by datetime then instrument, and returns a Series on the same index
named after the factor. Time-series steps group by the ``instrument`` level, because in that sort order
neighbouring rows belong to different instruments.

Columns may be RD-Agent's ``daily_pv.h5`` names (``$close``) or plain AIstock snapshot names (``close``):
the callers pass frames through unchanged, so the functions accept both.
"""

from __future__ import annotations

import pandas as pd


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """``$name`` if present, else ``name``, as float64."""
    for candidate in (f"${name}", name):
        if candidate in df.columns:
            return df[candidate].astype("float64")
    raise KeyError(f"factor input needs a ${name} or {name} column; got {list(df.columns)}")


def factor_mom_20d(df: pd.DataFrame) -> pd.Series:
    """20-day momentum: close over the close 20 rows earlier of the same instrument, minus one."""
    close = _column(df, "close")
    return (close / close.groupby(level="instrument").shift(20) - 1).rename("factor_mom_20d")


def factor_vol_ratio_5d(df: pd.DataFrame) -> pd.Series:
    """Volume ratio: volume over the 5-row rolling mean volume of the same instrument (NaN until 5 rows)."""
    volume = _column(df, "volume")
    mean_5 = volume.groupby(level="instrument").transform(lambda s: s.rolling(5, min_periods=5).mean())
    return (volume / mean_5).rename("factor_vol_ratio_5d")


def factor_hl_range(df: pd.DataFrame) -> pd.Series:
    """Intraday range: high over low, minus one."""
    return (_column(df, "high") / _column(df, "low") - 1).rename("factor_hl_range")


def factor_turnover_adj_mom_10d(df: pd.DataFrame) -> pd.Series:
    """Turnover-adjusted 10-day momentum: the 10-row momentum over the 10-row mean turnover rate."""
    close, turnover = _column(df, "close"), _column(df, "turnover_rate")
    by_instrument = close.groupby(level="instrument")
    mean_turnover = turnover.groupby(level="instrument").transform(lambda s: s.rolling(10, min_periods=10).mean())
    return ((close / by_instrument.shift(10) - 1) / mean_turnover).rename("factor_turnover_adj_mom_10d")

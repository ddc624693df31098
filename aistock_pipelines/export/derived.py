"""The derived columns of a logical frame (``change``; with a raw table ``volume`` adjusted and ``vwap``):
one definition for database rows and the live adapter's latest bars alike."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aistock_pipelines.export.frames import make_index, sort_order
from aistock_pipelines.export.mapping import ResolvedMapping


def logical_frame(frame: pd.DataFrame, resolved: ResolvedMapping) -> pd.DataFrame:
    """Rows shaped like the view ``market.daily_features`` (``trade_date, ts_code``, scaled base fields,
    ``factor``, factor fields) → the logical frame: derived columns, (datetime, instrument) index,
    ``logical_columns`` order, float64, sorted — how the live adapter's latest bars (rows that do not come
    from the database) get exactly the shape and derivations of database rows (:func:`derive`)."""
    date_codes, date_levels = pd.factorize(pd.DatetimeIndex(frame["trade_date"]).as_unit("ns").to_numpy(), sort=True)
    codes, levels = pd.factorize(frame["ts_code"].to_numpy(dtype=object), sort=True)
    block, index, columns = _assemble(date_codes, np.asarray(date_levels, dtype="datetime64[ns]"), codes,
                                      np.asarray(levels, dtype=object), lambda c: frame[c].to_numpy(dtype=np.float64),
                                      resolved)
    return pd.DataFrame(block, index=index, columns=columns, copy=False)


def _assemble(date_codes: np.ndarray, date_levels: np.ndarray, inst_codes: np.ndarray, inst_levels: np.ndarray,
              column, resolved: ResolvedMapping) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
    """The logical frame's parts from per-row codes into sorted date and instrument levels and
    ``column(name)`` → float64 values: rows sorted by (datetime, instrument) through the integer codes, one
    row-major float64 block (a row's values contiguous: pandas' fixed-format HDF5 writer stores it without
    a transposed copy)."""
    width = max(len(inst_levels), 1)
    perm = sort_order(date_codes.astype(np.int64) * width + inst_codes, len(date_levels) * width)
    names = list(resolved.logical_columns)
    at = {name: j for j, name in enumerate(names)}
    block = np.empty((len(perm), len(names)), dtype=np.float64)
    computed = set(written_columns(resolved)) - {"volume"}  # volume is read (raw shares), then adjusted
    for name in names:
        if name not in computed:
            block[:, at[name]] = column(name)[perm]
    derive(block, at, resolved)
    index = make_index(date_levels, np.asarray(date_codes)[perm], inst_levels, np.asarray(inst_codes)[perm])
    return block, index, names


def written_columns(resolved: ResolvedMapping) -> tuple[str, ...]:
    """The columns :func:`derive` writes: the derived fields but ``factor`` (read), and with a raw table
    ``volume`` (read as raw shares, then adjusted)."""
    derived = tuple(f for f in resolved.derived_fields if f != "factor")
    return (*derived, "volume") if resolved.mapping.has_factor else derived


def derive(block: np.ndarray, at: dict[str, int], resolved: ResolvedMapping) -> None:
    """The derived columns (:func:`written_columns`), in place, on a block whose ``volume`` still holds
    the SELECT's raw shares: the one definition for database and live rows alike."""
    block[:, at["change"]] = np.nan
    if resolved.mapping.has_factor:
        # Qlib convention: $volume × $factor = raw shares, $vwap is the adjusted average price.
        raw_shares = block[:, at["volume"]].copy()
        factor, amount = block[:, at["factor"]], block[:, at["amount"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            block[:, at["volume"]] = raw_shares / factor
            block[:, at["vwap"]] = amount / np.where(raw_shares > 0, raw_shares, np.nan) * factor

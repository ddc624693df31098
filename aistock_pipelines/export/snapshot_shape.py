"""The snapshot frame's shape: per-snapshot options, the file's column style, instrument naming and dtype,
and the RD-Agent views of a frame (its README and debug subset)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames, qlib_format

SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


class SnapshotError(RuntimeError):
    pass


@dataclass(frozen=True)
class SnapshotOptions:
    """Per-snapshot layout options (part of the snapshot's declaration)."""

    columns: Literal["plain", "dollar"] = "plain"
    instruments: Literal["ts_code", "qlib"] = "ts_code"
    dtype: Literal["float32", "float64"] = "float64"
    factor_tables: tuple[str, ...] | None = None
    qlib_bins: bool = True
    debug_years: int = 2
    debug_instruments: int = 100
    suspended_days: Literal["nan_rows", "omit"] = "nan_rows"

    def __post_init__(self) -> None:
        if self.columns not in ("plain", "dollar"):
            raise ValueError(f"columns must be 'plain' or 'dollar', got {self.columns!r}")
        if self.instruments not in ("ts_code", "qlib"):
            raise ValueError(f"instruments must be 'ts_code' or 'qlib', got {self.instruments!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.suspended_days not in ("nan_rows", "omit"):
            raise ValueError(f"suspended_days must be 'nan_rows' or 'omit', got {self.suspended_days!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["factor_tables"] = list(self.factor_tables) if self.factor_tables is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SnapshotOptions":
        d = {"suspended_days": "omit"} | dict(d)  # versions written before the option had no such rows
        if d.get("factor_tables") is not None:
            d["factor_tables"] = tuple(d["factor_tables"])
        return cls(**d)


def check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID.match(snapshot_id or ""):
        raise SnapshotError(f"snapshot id {snapshot_id!r} may only contain letters, digits, '_' and '-'")
    return snapshot_id


def external_frame(frame: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """Internal frame (plain names, ts_code, float64) → the file's shape (column style, naming, dtype).
    Index levels are plain datetime64[ns] / object: pandas' string dtype breaks ``to_hdf``. Renames the
    instrument level (not each row); the values stay in one row-major block — shared with ``frame`` when
    nothing changes (float64, ts_code), so writing the HDF5 file copies nothing."""
    prefix = "$" if options.columns == "dollar" else ""
    return frames.relabel(frame, lambda names: qlib_format.instrument_names(names, options.instruments),
                          [f"{prefix}{c}" for c in frame.columns], options.dtype, layout="C")


def in_file_shape(rows: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """Rows read from the database as the file holds them — rounded to its dtype, sorted, renamed — for
    :func:`frames.patch_sorted` (``change`` is left to it: it needs the stored closes)."""
    return external_frame(frames.merge_sorted([(rows, None)], dtype=options.dtype), options)


def by_field(ext: pd.DataFrame) -> pd.DataFrame:
    """The file's frame with plain field names (``$close`` → ``close``): bins are named by field."""
    return ext.set_axis([str(c).lstrip("$") for c in ext.columns], axis=1)


def read_view(frame: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """The snapshot frame exactly as a consumer gets it from ``pd.read_hdf(daily_pv.h5)``:
    :func:`external_frame`, with the instrument level re-inferred the way HDF read-back infers it (pandas ≥ 3:
    ``str``; ``object`` before). Frames built in memory from the same rows (the live adapter's) then compare
    equal to the file's with ``assert_frame_equal``, index dtypes included."""
    ext = external_frame(frame, options)
    levels = ext.index.levels[1]
    ext.index = ext.index.set_levels(pd.Index(levels.to_numpy(dtype=object)), level=1, verify_integrity=False)
    return ext


def internal_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Inverse of :func:`external_frame` (float64, plain names, ts_code instruments)."""
    return frames.relabel(frame, lambda names: np.array([qlib_format.from_qlib_symbol(s) for s in names], dtype=object),
                          [c.lstrip("$") for c in frame.columns], "float64", layout="K")


def debug_subset(ext: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """RD-Agent's debug file: the most recent ``debug_years`` years × the ``debug_instruments`` instruments
    with the most rows there (ties by name) — deterministic. Selected on the index codes, copied once."""
    if ext.empty:
        return ext
    dates = pd.DatetimeIndex(ext.index.levels[0])
    used = np.zeros(len(dates), dtype=bool)
    used[ext.index.codes[0]] = True
    cutoff = dates[used].max() - pd.DateOffset(years=options.debug_years)
    recent = np.asarray(dates >= cutoff)[ext.index.codes[0]]
    names = np.asarray(ext.index.levels[1], dtype=object)
    counts = np.bincount(np.asarray(ext.index.codes[1])[recent], minlength=len(names))
    present = np.flatnonzero(counts)
    ranked = sorted(present, key=lambda i: (-counts[i], names[i]))[:options.debug_instruments]
    keep = np.zeros(len(names), dtype=bool)
    keep[ranked] = True
    return ext[recent & keep[ext.index.codes[1]]]


_ROWS = {
    "nan_rows": "Every instrument has a row for every trading day from its first to its last bar: a day it did "
                "not trade (suspension) is a row of NaN, as in RD-Agent's own file built from Qlib's calendar.",
    "omit": "Rows exist for trading days on which the instrument traded; suspended days have no row.",
}


def rdagent_readme(snapshot_id: str, ext: pd.DataFrame, column_info: dict[str, dict], options: SnapshotOptions) -> str:
    lines = [
        f"# {snapshot_id}: A-share daily data (forward-adjusted, qfq)",
        "",
        "`daily_pv.h5`: pandas HDF5 (fixed format, key `data`). Index: MultiIndex `(datetime, instrument)`, "
        f"sorted and unique; instruments named like `{'SZ000001' if options.instruments == 'qlib' else '000001.SZ'}`. "
        f"Values are {options.dtype}. {_ROWS[options.suspended_days]}",
        "",
        "| column | unit | source |",
        "|---|---|---|",
    ]
    for col in ext.columns:
        info = column_info.get(col.lstrip("$"), {})
        lines.append(f"| `{col}` | {info.get('unit', '')} | {info.get('source', '')} |")
    lines += ["", "Prices are forward-adjusted to the latest ex-rights event; `factor` = adjusted / raw price, "
              "so raw price = price / factor and raw shares = volume × factor."]
    return "\n".join(lines) + "\n"

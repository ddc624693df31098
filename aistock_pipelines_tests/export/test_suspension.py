"""Suspended days as NaN rows (RD-Agent's upstream layout), exactly, on real snapshots and on edge cases."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.snapshot_shape import SnapshotOptions, external_frame
from aistock_pipelines.export.suspension import with_suspension_rows
from aistock_pipelines_tests.export.helpers import START, make_exporter


def reference(frame: pd.DataFrame, calendar: list[date]) -> pd.DataFrame:
    """The same layout the obvious pandas way: every (day, instrument) of the calendar, then the rows between
    each instrument's first and last row (running counts of its rows from both ends)."""
    days = pd.DatetimeIndex(pd.to_datetime(calendar)).as_unit(frame.index.levels[0].unit)
    names = pd.Index(sorted(set(frame.index.get_level_values("instrument"))), dtype=frame.index.levels[1].dtype)
    full = pd.MultiIndex.from_product([days, names], names=frame.index.names)
    has = pd.Series(full.isin(frame.index), index=full).astype(int)
    after_first = has.groupby(level="instrument").cumsum() > 0
    before_last = has.iloc[::-1].groupby(level="instrument").cumsum().iloc[::-1] > 0
    return frame.reindex(full[(after_first & before_last).to_numpy()])


def assert_identical(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    for level in (0, 1):  # the level types themselves (unit, object vs str), not only equal values
        assert got.index.levels[level].dtype == expected.index.levels[level].dtype
    assert got.to_numpy().flags.c_contiguous, "one row-major block: what the HDF5 writer stores as it is"


@pytest.mark.db
@pytest.mark.parametrize("options", [SnapshotOptions(), SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32")])
def test_nan_rows_on_a_demo_snapshot_equal_the_reference(market_db, market_template, tmp_path, options):
    ex = make_exporter(market_db, tmp_path)
    ex.export_full("demo", START, options=options)
    stored = pd.read_hdf(tmp_path / "demo" / "daily_pv.h5", key="data")  # as a consumer reads it (pandas 3: str level)
    calendar = qlib_format.read_calendar(tmp_path / "demo" / "calendars" / "day.txt")
    # the exporter's frame in memory has an object instrument level (external_frame); the file reads back as str
    in_memory = stored.set_axis(stored.index.set_levels(stored.index.levels[1].astype(object), level=1), axis=0)
    assert in_memory.index.levels[1].dtype == object != stored.index.levels[1].dtype
    for frame in (stored, in_memory):
        got = with_suspension_rows(frame, calendar)
        assert_identical(got, reference(frame, calendar))
        assert len(got) - len(frame) == market_template.summary.suspension_days, "a row per suspended day, no other"
    added = got[~got.index.isin(stored.index)]
    assert added.isna().all().all() and len(added)
    # Qlib's view is unchanged: the bins written from either layout are the same bytes
    for name, f in (("bars", stored), ("rows", with_suspension_rows(stored, calendar))):
        qlib_bins.write_bins(tmp_path / name, external_frame(f, SnapshotOptions()).set_axis(
            [c.lstrip("$") for c in f.columns], axis=1), calendar, ["close", "change"])
    for path in (tmp_path / "bars").rglob("*.bin"):
        assert path.read_bytes() == (tmp_path / "rows" / path.relative_to(tmp_path / "bars")).read_bytes()


def synthetic(dtype: str = "float64", object_level: bool = True) -> tuple[pd.DataFrame, list[date]]:
    calendar = list(pd.bdate_range("2024-01-01", periods=12).date)
    rows = [(0, "A"), (0, "B"), (1, "A"), (3, "A"), (3, "B"), (4, "C"), (7, "B"), (9, "A"), (11, "D")]
    idx = pd.MultiIndex.from_arrays([pd.DatetimeIndex([pd.Timestamp(calendar[d]) for d, _ in rows]).as_unit("ns"),
                                     pd.Index([n for _, n in rows], dtype=object if object_level else "str")],
                                    names=["datetime", "instrument"])
    values = np.arange(len(rows) * 2, dtype=dtype).reshape(-1, 2) + 0.5
    return pd.DataFrame(values, index=idx, columns=["$close", "$volume"]), calendar


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("object_level", [True, False])
def test_small_frames_exactly(dtype, object_level):
    frame, calendar = synthetic(dtype, object_level)
    got = with_suspension_rows(frame, calendar)
    assert_identical(got, reference(frame, calendar))
    spans = {"A": (0, 9), "B": (0, 7), "C": (4, 4), "D": (11, 11)}
    assert len(got) == sum(b - a + 1 for a, b in spans.values())
    assert got.loc[(pd.Timestamp(calendar[2]), "A")].isna().all() and got.dtypes.eq(dtype).all()
    # rows in any order give the same result (the scatter path)
    shuffled = frame.iloc[np.random.default_rng(1).permutation(len(frame))]
    assert_identical(with_suspension_rows(shuffled, calendar), got)
    # nothing to add: the same rows and values
    full = got.fillna(1.0)
    assert_identical(with_suspension_rows(full, calendar), full)


def test_bad_input():
    frame, calendar = synthetic()
    with pytest.raises(ValueError, match="missing from the calendar"):
        with_suspension_rows(frame, calendar[1:])
    with pytest.raises(ValueError, match="one float dtype"):
        with_suspension_rows(frame.astype({"$volume": np.int64}), calendar)
    empty = frame.iloc[:0]
    assert with_suspension_rows(empty, calendar) is empty

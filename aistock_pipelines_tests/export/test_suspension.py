"""Suspended days as NaN rows (RD-Agent's upstream layout), exactly, on real snapshots and on edge cases."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.snapshot_validation import check_row_parity, database_rows_per_day, validate_snapshot
from aistock_pipelines.export.suspension import with_suspension_rows
from aistock_pipelines_tests.export.helpers import DEMO_MAPPING, START, make_exporter, options_for, read_bins, read_h5


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


def assert_layouts_agree(root: Path, engine) -> int:
    """``rows`` (nan_rows) holds exactly ``bars`` (omit) plus the reference's NaN rows, in every file: the
    h5, RD-Agent's link to it, the debug file's rows, the bins byte for byte; both pass the checks. Returns
    the suspension rows."""
    bars, rows = read_h5(root / "bars"), read_h5(root / "rows")
    calendar = qlib_format.read_calendar(root / "rows" / "calendars" / "day.txt")
    assert calendar == qlib_format.read_calendar(root / "bars" / "calendars" / "day.txt")
    assert_identical_values(rows, reference(bars, calendar))
    assert_identical_values(rows, with_suspension_rows(bars, calendar))
    assert bars["$close"].notna().all()
    added = rows[rows["$close"].isna()]
    assert len(added) and added.isna().all().all()
    assert os.path.samefile(root / "rows" / "daily_pv.h5", root / "rows" / "rdagent" / "daily_pv.h5")
    debug = pd.read_hdf(root / "rows" / "rdagent_debug" / "daily_pv.h5", key="data")
    assert debug["$close"].isna().any() and debug["$close"].notna().sum() > 0
    assert read_bins(root / "rows") == read_bins(root / "bars"), "Qlib's view does not depend on the layout"
    for sid in ("bars", "rows"):
        meta = json.loads((root / sid / "meta.json").read_text())
        assert (meta["row_count"], meta["bar_count"]) == (len(read_h5(root / sid)), len(bars))
        outcomes = validate_snapshot(root / sid, engine, DEMO_MAPPING)
        assert all(o.passed for o in outcomes), [o.description for o in outcomes if not o.passed]
    return len(added)


def assert_identical_values(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


@pytest.mark.db
def test_both_layouts_after_full_and_incremental_exports(market_db, market_template, tmp_path):
    """The default layout (nan_rows) through a full export, two incrementals with restatements and an
    instrument resuming after a suspension at the snapshot's end (its NaN rows reach back before the
    previous export's end), against the omit layout and a fresh export."""
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        last = conn.exec_driver_sql("SELECT max(trade_date) FROM market.kline_daily_qfq").scalar_one()
        code = conn.exec_driver_sql("SELECT min(ts_code) FROM market.kline_daily_qfq WHERE trade_date = %(d)s",
                                    {"d": last}).scalar_one()
        gap = conn.exec_driver_sql("SELECT trade_date FROM market.kline_daily_qfq WHERE ts_code = %(c)s "
                                   "ORDER BY trade_date DESC LIMIT 2", {"c": code}).scalars().all()
        for table in ("kline_daily_qfq", "kline_daily_raw"):
            conn.exec_driver_sql(f"DELETE FROM market.{table} WHERE ts_code = %(c)s AND trade_date = ANY(%(d)s)",
                                 {"c": code, "d": gap})
    ex = make_exporter(market_db, tmp_path)
    layouts = {"rows": options_for("qlib"), "bars": replace(options_for("qlib"), suspended_days="omit")}
    assert layouts["rows"].suspended_days == "nan_rows", "upstream parity is the default"
    for sid, options in layouts.items():
        ex.export_full(sid, START, options=options)
    first = assert_layouts_agree(tmp_path, engine)
    assert first == market_template.summary.suspension_days, "a row per suspended day, no other"
    symbol = qlib_format.to_qlib_symbol(code)
    assert symbol not in set(read_h5(tmp_path / "rows").xs(pd.Timestamp(gap[0]), level="datetime").index)
    for _ in range(2):
        adv = advance_market(engine, events=4)
        results = {sid: ex.export_incremental(sid) for sid in layouts}
        assert {(r.mode, r.applied) for r in results.values()} == {("incremental", "in place")}
        assert results["rows"].restated == results["bars"].restated == sorted(adv.restated)
        assert_layouts_agree(tmp_path, engine)
    resumed = read_h5(tmp_path / "rows").xs(symbol, level="instrument")
    assert resumed.loc[[pd.Timestamp(d) for d in gap]].isna().all().all(), "the resumed instrument's gap is NaN rows"
    ex.export_full("fresh", START, options=layouts["rows"])
    assert_identical_values(read_h5(tmp_path / "rows"), read_h5(tmp_path / "fresh"))
    engine.dispose()


def test_the_row_parity_check_names_a_wrong_layout(market_db, tmp_path):
    """A snapshot whose suspension rows differ from its declaration fails the row parity check, naming them."""
    engine = create_db_engine(market_db)
    ex = make_exporter(market_db, tmp_path)
    ex.export_full("rows", START, options=options_for("qlib"))
    frame = read_h5(tmp_path / "rows")
    calendar = qlib_format.read_calendar(tmp_path / "rows" / "calendars" / "day.txt")
    meta = json.loads((tmp_path / "rows" / "meta.json").read_text())
    db_rows = database_rows_per_day(engine, DEMO_MAPPING, START, date.fromisoformat(meta["end"]), None)
    assert check_row_parity(frame, db_rows, calendar, "nan_rows").passed
    gaps = frame.index[frame["$close"].isna().to_numpy()]
    missing = check_row_parity(frame.drop(gaps[:3]), db_rows, calendar, "nan_rows")
    assert not missing.passed and "3 suspension rows missing" in missing.description
    assert not check_row_parity(frame, db_rows, calendar, "omit").passed
    valued = frame.copy()
    valued.loc[gaps[0], "$volume"] = 1.0
    assert "1 suspension rows hold values" in check_row_parity(valued, db_rows, calendar, "nan_rows").description
    engine.dispose()


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

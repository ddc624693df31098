"""Incremental exports: restatements detected and rewritten, in place or merged, equal to a fresh full export."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines_tests.export.helpers import START, make_exporter, read_bins, read_h5

pytestmark = pytest.mark.db



def test_restatement_then_incremental_equals_fresh_full_export(market_db, tmp_path):
    ex = make_exporter(market_db, tmp_path)
    options = SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32")
    ex.export_full("inc", START, options=options)
    folders = {d.name: d.stat().st_ino for d in (tmp_path / "inc" / "features").iterdir()}
    engine = create_db_engine(market_db)
    restated: set[str] = set()
    for _ in range(2):
        adv = advance_market(engine, events=5)
        result = ex.export_incremental("inc")
        assert result.mode == "incremental" and result.end == adv.trade_date and result.applied == "in place"
        assert set(result.restated) == set(adv.restated), "exactly the restated instruments are detected"
        assert result.rows_read < 10_000, "reads only the new day plus the restated histories"
        restated |= set(adv.restated)
    incremental = read_h5(tmp_path / "inc")
    ex.export_full("fresh", START, options=options)
    fresh = read_h5(tmp_path / "fresh")
    pd.testing.assert_frame_equal(incremental, fresh, check_exact=True)
    assert list(fresh.columns[:4]) == ["$open", "$high", "$low", "$close"] and fresh["$close"].dtype == np.float32
    assert fresh.index.get_level_values("instrument")[0][:2] in ("SH", "SZ", "BJ")
    # the bins follow the restatement too — every file byte for byte, though the second incremental export
    # recycled the instrument folders of the version the first one replaced
    inc_bins = read_bins(tmp_path / "inc")
    fresh_bins = read_bins(tmp_path / "fresh")
    assert inc_bins == fresh_bins and any(qlib_format.to_qlib_symbol(c).lower() in str(p) for c in restated for p in inc_bins)
    # a full export writes most bins beside its read, from the float64 block still in ts_code order; they
    # equal bins written in one go from the finished file's frame (float32, qlib names)
    plain = pd.DataFrame(np.ascontiguousarray(fresh.to_numpy()), index=fresh.index,
                         columns=[c.lstrip("$") for c in fresh.columns])
    calendar = qlib_format.read_calendar(tmp_path / "fresh" / "calendars" / "day.txt")
    qlib_bins.write_bins(tmp_path / "direct" / "features", plain, calendar, list(plain.columns))
    direct = read_bins(tmp_path / "direct")
    assert direct == fresh_bins
    assert len(list((tmp_path / ".versions").glob("inc@*"))) == 2, "the current version and the one it replaced"
    untouched = sorted(set(folders) - {qlib_format.to_qlib_symbol(c).lower() for c in restated})
    assert all((tmp_path / "inc" / "features" / d).stat().st_ino == folders[d] for d in untouched), \
        "the full export's folders, recycled by the second incremental export"
    engine.dispose()


def test_a_history_that_lost_a_day_is_merged_and_equals_a_fresh_export(exported, market_db, tmp_path):
    """A restatement usually changes values only (the stored rows are patched in place); a history that
    lost an old day (a corrected feed) cannot be patched: the incremental export merges instead, with the
    same result as a fresh full export."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    adv = advance_market(engine, events=1)
    with engine.begin() as conn:
        code, gone = conn.exec_driver_sql(
            "SELECT ts_code, min(trade_date) + 3 FROM market.kline_daily_qfq WHERE trade_date < %(d)s "
            "GROUP BY ts_code ORDER BY 1 LIMIT 1", {"d": adv.trade_date}).one()
        gone = conn.exec_driver_sql("SELECT min(trade_date) FROM market.kline_daily_qfq WHERE ts_code = %(c)s "
                                    "AND trade_date >= %(g)s", {"c": code, "g": gone}).scalar_one()
        conn.exec_driver_sql("DELETE FROM market.kline_daily_qfq WHERE ts_code = %(c)s AND trade_date = %(g)s",
                             {"c": code, "g": gone})
        conn.exec_driver_sql("DELETE FROM market.kline_daily_raw WHERE ts_code = %(c)s AND trade_date = %(g)s",
                             {"c": code, "g": gone})
    got = ex.export_incremental("demo")
    assert got.applied == "merge" and code in got.restated
    incremental = read_h5(path)
    assert incremental.loc[(pd.Timestamp(gone), code)].isna().all(), "the lost day is a suspension row now"
    ex.export_full("fresh", START)
    pd.testing.assert_frame_equal(incremental, read_h5(tmp_path / "fresh"), check_exact=True)
    for field in ("close", "change", "factor"):
        name = f"features/{code.lower()}/{field}.day.bin"
        assert (path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    engine.dispose()


def test_bins_written_before_the_restatements_are_known_leave_the_current_version_intact(exported, market_db, tmp_path):
    """An incremental export has every bin extended from the current version's files while the server still
    computes the fingerprints — restated instruments' too. The current version (which a backtest may be
    reading) keeps every byte; the new one has the restated values; an instrument gone from the database
    loses its folder."""
    ex, _, path = exported
    twin = ex.writer.map_values("demo", np.zeros((1, len(read_h5(path).columns))))
    assert twin is not None and not twin.flags.writeable, "the bins ahead read a second, read-only mapping"
    engine = create_db_engine(market_db)
    previous = path.resolve()
    before = read_h5(previous)
    old_bins = read_bins(previous)
    with engine.begin() as conn:
        gone = conn.exec_driver_sql("SELECT max(ts_code) FROM market.kline_daily_qfq").scalar_one()
        for table in ("kline_daily_qfq", "kline_daily_raw", "daily_basic", "moneyflow"):
            conn.exec_driver_sql(f"DELETE FROM market.{table} WHERE ts_code = %(c)s", {"c": gone})
    adv = advance_market(engine, events=3)
    got = ex.export_incremental("demo")
    assert set(adv.restated) <= set(got.restated) and gone in got.restated and got.applied == "merge"
    assert path.resolve() != previous and previous.exists()
    pd.testing.assert_frame_equal(read_h5(previous), before, check_exact=True)
    assert read_bins(previous) == old_bins, "the previous version's bins keep every byte"
    assert not (path / "features" / gone.lower()).exists() and gone not in (path / "instruments" / "all.txt").read_text()
    ex.export_full("fresh", START)
    fresh = read_bins(tmp_path / "fresh")
    assert read_bins(path) == fresh
    assert json.loads((path / "meta.json").read_text())["files"]["bins"] == len(fresh)
    engine.dispose()


def test_incremental_is_idempotent(exported, market_db):
    ex, result, path = exported
    advance_market(create_db_engine(market_db), events=2)
    first = ex.export_incremental("demo")
    version = path.resolve()
    second = ex.export_incremental("demo")
    assert second.mode == "unchanged" and second.sha256 == first.sha256
    assert path.resolve() == version, "nothing rewritten"
    assert read_h5(path).index.is_unique


def test_incremental_exports_never_write_into_files_older_versions_or_others_hold(exported, market_db, tmp_path):
    """Three incremental exports with restatements: each keeps the version it replaced byte for byte, the
    third extends the files of the first's version (recycled, their own inodes) — but never a file a
    second name holds (a release's hard link), which keeps its bytes — and equals a fresh full export."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    held = tmp_path / "held.bin"
    for i in range(3):
        advance_market(engine, events=4)
        previous = path.resolve()
        before_h5, before_bins = read_h5(previous), read_bins(previous)
        if i == 2:
            target = next((path / "features").iterdir()) / "close.day.bin"
            os.link(target, held)  # as a release holds a version's files
            held_bytes = held.read_bytes()
        assert ex.export_incremental("demo").mode == "incremental"
        pd.testing.assert_frame_equal(read_h5(previous), before_h5, check_exact=True)
        assert read_bins(previous) == before_bins
    assert held.read_bytes() == held_bytes
    ex.export_full("fresh", START)
    assert read_bins(path) == read_bins(tmp_path / "fresh")
    engine.dispose()


def test_a_stored_file_changed_by_hand_is_not_reused(exported, market_db):
    """Values of the stored daily_pv.h5 changed by hand: the incremental export finds the file differs from
    the sha256 its version recorded, reuses nothing, rebuilds in full (saying why) and leaves the changed
    version as it was; the result equals the database."""
    import tables

    ex, _, path = exported
    previous = path.resolve()
    with tables.open_file(previous / "daily_pv.h5", "r+") as f:
        values = f.root.data.block0_values
        values[3, 0] = values[3, 0] * 2
        values[7, 5] = 0.0
    tampered = (previous / "daily_pv.h5").read_bytes()
    advance_market(create_db_engine(market_db), events=2)
    result = ex.export_incremental("demo")
    assert result.mode == "rebuild" and "does not match the sha256" in result.errors[0]
    assert (previous / "daily_pv.h5").read_bytes() == tampered
    ex.export_full("fresh", START)
    pd.testing.assert_frame_equal(read_h5(path), read_h5(path.parent / "fresh"), check_exact=True)

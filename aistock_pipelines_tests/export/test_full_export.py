"""Full exports against the real database and real files: values, layout, bins, gates, declarations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import tables

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.exporter import DataGateError
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines_tests.export.helpers import DEMO_MAPPING, START, make_exporter, read_bars, read_h5

pytestmark = pytest.mark.db



def test_every_value_equals_the_database_after_unit_scaling(exported, market_db):
    ex, result, path = exported
    frame = read_bars(path)
    engine = create_db_engine(market_db)
    with engine.connect() as conn:  # an independent path: SQLAlchemy + psycopg, integers scaled in Python
        db = pd.read_sql(
            "SELECT q.trade_date, q.ts_code, q.open_li, q.high_li, q.low_li, q.close_li, q.volume_hand, q.amount_li,"
            " r.close_li AS raw_close_li, b.total_mv, b.pe_ttm, m.net_mf_amount, m.net_mf_vol"
            " FROM market.kline_daily_qfq q JOIN market.kline_daily_raw r USING (ts_code, trade_date)"
            " LEFT JOIN market.daily_basic b USING (ts_code, trade_date)"
            " LEFT JOIN market.moneyflow m USING (ts_code, trade_date)", conn)
    db.index = pd.MultiIndex.from_arrays([pd.to_datetime(db.trade_date), db.ts_code], names=["datetime", "instrument"])
    db = db.sort_index()
    assert frame.index.equals(db.index), "exactly the database's rows, delisted and IPO instruments included"
    assert frame.index.is_unique and frame.index.is_monotonic_increasing
    assert len(frame) == len(db) and result.instruments == 320
    assert result.rows == len(read_h5(path)) > len(frame), "rows in the file: the bars and the suspension rows"
    for col, li in (("open", "open_li"), ("high", "high_li"), ("low", "low_li"), ("close", "close_li"), ("amount", "amount_li")):
        np.testing.assert_array_equal(frame[col].to_numpy(), db[li].to_numpy(dtype=float) / 1000)
    factor = db.close_li.to_numpy(dtype=float) / db.raw_close_li.to_numpy(dtype=float)
    np.testing.assert_array_equal(frame["factor"].to_numpy(), factor)
    raw_shares = db.volume_hand.to_numpy(dtype=float) * 100
    np.testing.assert_array_equal(frame["volume"].to_numpy(), raw_shares / factor)
    np.testing.assert_allclose(frame["volume"] * frame["factor"], raw_shares, rtol=1e-12)
    np.testing.assert_allclose(frame["close"] / frame["factor"], db.raw_close_li / 1000, rtol=1e-12)
    np.testing.assert_array_equal(frame["vwap"].to_numpy(), db.amount_li.to_numpy(dtype=float) / 1000 / raw_shares * factor)
    np.testing.assert_array_equal(frame["db_total_mv"].to_numpy(), db.total_mv.astype(float).to_numpy())
    np.testing.assert_array_equal(frame["db_pe_ttm"].to_numpy(), db.pe_ttm.to_numpy(dtype=float))
    np.testing.assert_array_equal(frame["mf_net_amount"].to_numpy(), db.net_mf_amount.astype(float).to_numpy() * 10000.0)
    np.testing.assert_array_equal(frame["mf_net_vol"].to_numpy(), db.net_mf_vol.astype(float).to_numpy() * 100.0)
    assert frame["db_total_mv"].isna().sum() > 0, "missing factor rows stay NaN (left join: bars define the rows)"
    prev = frame["close"].groupby(level="instrument").shift(1)
    np.testing.assert_array_equal(frame["change"].to_numpy(), (frame["close"] / prev - 1).to_numpy())
    engine.dispose()


def test_layout_meta_calendar_instruments(exported, market_db):
    ex, result, path = exported
    assert path.is_symlink(), "the snapshot path is swapped atomically as a symlink"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["row_count"] == result.rows and meta["instrument_count"] == 320
    assert meta["start"] == "2021-01-04" and meta["end"] == result.end.isoformat()
    assert meta["daily_pv_sha256"] == result.sha256
    cols = {c["name"]: c for c in meta["columns"]}
    assert cols["close"]["source"] == "market.kline_daily_qfq.close_li" and cols["close"]["scale"] == 0.001
    engine = create_db_engine(market_db)
    with engine.connect() as conn:
        trading = [r[0] for r in conn.execute(sa.text(
            "SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date BETWEEN :a AND :b ORDER BY 1"),
            {"a": START, "b": result.end})]
    engine.dispose()
    assert qlib_format.read_calendar(path / "calendars" / "day.txt") == trading
    lines = (path / "instruments" / "all.txt").read_text().splitlines()
    assert len(lines) == 320 and all(len(line.split("\t")) == 3 for line in lines)
    spans = {line.split("\t")[0]: line.split("\t")[1:] for line in lines}
    frame = read_h5(path)
    dates = frame.reset_index().groupby("instrument").datetime.agg(["min", "max"])
    for code in list(spans)[:50]:
        assert spans[code] == [f"{dates.at[code, 'min']:%Y-%m-%d}", f"{dates.at[code, 'max']:%Y-%m-%d}"]
    # one dataset only, under key "data" (RD-Agent reads without a key)
    with tables.open_file(path / "daily_pv.h5") as h5:
        assert [g._v_name for g in h5.root._f_iter_nodes()] == ["data"]
    assert pd.read_hdf(path / "rdagent" / "daily_pv.h5").equals(frame)
    for folder in ("rdagent", "rdagent_debug"):
        assert sorted(p.name for p in (path / folder).iterdir()) == ["README.md", "daily_pv.h5"]
    debug = pd.read_hdf(path / "rdagent_debug" / "daily_pv.h5")
    assert debug.index.get_level_values("instrument").nunique() == 100
    assert debug.index.get_level_values("datetime").min() >= pd.Timestamp(result.end) - pd.DateOffset(years=2)
    assert "| `volume` |" in (path / "rdagent" / "README.md").read_text()


def test_bins_decode_to_the_h5_values(exported):
    _, result, path = exported
    frame = read_bars(path)
    calendar = pd.to_datetime(qlib_format.read_calendar(path / "calendars" / "day.txt"))
    # a suspended instrument (gaps inside its span) and an IPO
    counts = frame.groupby(level="instrument").size()
    spans = frame.reset_index().groupby("instrument").datetime.agg(["min", "max"])
    expected_days = spans.apply(lambda r: ((calendar >= r["min"]) & (calendar <= r["max"])).sum(), axis=1)
    suspended = (expected_days - counts)[lambda s: s > 0].index[0]
    ipo = spans[spans["min"] > calendar[0]].index[0]
    for code in (suspended, ipo, frame.index.get_level_values("instrument")[0]):
        sub = frame.xs(code, level="instrument")
        for field in ("close", "volume", "factor", "change", "db_total_mv"):
            file = path / "features" / code.lower() / f"{field}.day.bin"
            assert file.exists()
            raw = file.read_bytes()
            assert len(raw) % 4 == 0
            start, values = qlib_bins.read_bin(file)
            assert calendar[start] == sub.index[0], "element 0 is the calendar position of the first row"
            assert len(values) == len(calendar[(calendar >= sub.index[0]) & (calendar <= sub.index[-1])])
            on_calendar = pd.Series(values, index=calendar[start:start + len(values)])
            expected = sub[field].reindex(on_calendar.index).astype(np.float32).to_numpy()
            np.testing.assert_array_equal(on_calendar.to_numpy(), expected)
    assert np.isnan(qlib_bins.read_bin(path / "features" / suspended.lower() / "close.day.bin")[1]).any()


def test_changed_declaration_rebuilds_instead_of_mixing(exported):
    ex, result, path = exported
    rebuilt = ex.export_incremental("demo", options=SnapshotOptions(columns="dollar"))
    assert rebuilt.mode == "rebuild"
    frame = read_h5(path)
    assert all(c.startswith("$") for c in frame.columns) and len(frame) == result.rows


@pytest.mark.parametrize("corruption, message", [
    ("UPDATE market.kline_daily_qfq SET close_li = -5 WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "close <= 0"),
    ("UPDATE market.kline_daily_qfq SET high_li = low_li - 1 WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "high < low"),
    ("ALTER TABLE market.kline_daily_qfq ALTER COLUMN open_li DROP NOT NULL;"
     "UPDATE market.kline_daily_qfq SET open_li = NULL WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "NULL prices"),
    ("ALTER TABLE market.kline_daily_qfq DROP CONSTRAINT kline_daily_qfq_pkey;"
     "INSERT INTO market.kline_daily_qfq SELECT * FROM market.kline_daily_qfq LIMIT 1", "duplicate"),
    # a code that would be a path outside the version folder (it fits varchar(9))
    ("INSERT INTO market.kline_daily_qfq SELECT '../../../', trade_date, open_li, high_li, low_li, close_li, "
     "volume_hand, amount_li, adjust_type, source FROM market.kline_daily_qfq WHERE ts_code = "
     "(SELECT min(ts_code) FROM market.kline_daily_qfq)",
     r"malformed ts_code\(s\) \['\.\./\.\./\.\./'\] in market\.kline_daily_qfq"),
])
def test_data_gates_refuse_and_keep_the_previous_snapshot(exported, market_db, corruption, message):
    ex, result, path = exported
    before = (path / "daily_pv.h5").read_bytes()
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        conn.exec_driver_sql(corruption)
    with pytest.raises(DataGateError, match=message):
        ex.export_full("demo", START)
    assert (path / "daily_pv.h5").read_bytes() == before
    # the refused export's own version — bins written beside its read included — is gone, nothing else made
    assert list((path.parent / ".versions").iterdir()) == [path.resolve()]
    assert sorted(p.name for p in path.parent.iterdir()) == [".locks", ".versions", "demo"]
    engine.dispose()


def test_a_bar_without_its_raw_row_is_refused_unless_declared(exported, market_db, tmp_path):
    """A bar whose raw-table row is missing would get NaN factor, volume and vwap: refused, naming the
    table and the row, unless the mapping declares ``missing_raw: nan`` — then exported with exactly those NaN."""
    from dataclasses import replace

    ex, _, path = exported
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        code, day = conn.exec_driver_sql("DELETE FROM market.kline_daily_raw WHERE ctid IN (SELECT ctid FROM "
                                         "market.kline_daily_raw WHERE trade_date = '2022-03-02' LIMIT 1) "
                                         "RETURNING ts_code, trade_date").one()
    with pytest.raises(DataGateError, match=rf"without a usable raw close in market.kline_daily_raw .*: 2022-03-02 {code}"):
        ex.export_full("demo", START)
    lenient = make_exporter(market_db, tmp_path / "lenient", replace(DEMO_MAPPING, missing_raw="nan"))
    lenient.export_full("demo", START)
    row = read_h5(tmp_path / "lenient" / "demo").loc[(pd.Timestamp(day), code)]
    assert np.isnan(row[["factor", "volume", "vwap"]]).all() and row["close"] > 0
    engine.dispose()

"""Benchmark index bars and bins against the database, day by day."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.indices import MISSING_BAR
from aistock_pipelines.export import frames, qlib_bins
from aistock_pipelines.export.benchmarks import (BENCHMARK_FIELDS, BenchmarkError, BenchmarksDecl, index_series,
                                                 read_index_bars, write_benchmark_bins)
from aistock_pipelines.export.mapping import FieldSpec
from aistock_pipelines.export.source_tables import SourceTableError

pytestmark = pytest.mark.db

DECL = BenchmarksDecl(codes=["000300.SH", "399006.SZ"])


@pytest.fixture(scope="module")
def db(market_ro):
    engine = create_db_engine(market_ro)
    with engine.connect() as conn:
        calendar = list(conn.execute(sa.text(
            "SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date BETWEEN '2021-01-04' AND "
            "(SELECT max(trade_date) FROM market.kline_daily_qfq) ORDER BY 1")).scalars())
        rows = pd.read_sql("SELECT ts_code, trade_date, open, high, low, close, vol, amount FROM market.index_daily", conn)
    yield engine, calendar, rows
    engine.dispose()


def expected_on_calendar(rows: pd.DataFrame, code: str, calendar: list[date]) -> pd.DataFrame:
    """One index's fields per calendar day from its first bar on (NaN where no bar), computed here from the
    database's numerics in Python: the Tushare units scaled, change from the float32 closes of the bars."""
    part = rows[rows.ts_code == code].set_index("trade_date").sort_index()
    days = [d for d in calendar if d >= part.index[0]]
    close32 = part.close.astype(float).astype(np.float32).astype(np.float64)
    out = pd.DataFrame({
        "open": part.open.astype(float), "high": part.high.astype(float), "low": part.low.astype(float),
        "close": part.close.astype(float), "volume": part.vol.astype(float) * 100,
        "amount": part.amount.astype(float) * 1000, "change": close32 / close32.shift(1) - 1,  # previous *bar*
    }).reindex(days)
    return out.astype(np.float32)


def test_index_bars_equal_the_database_day_by_day(db, tmp_path):
    engine, calendar, rows = db
    with engine.connect() as conn:
        bars = read_index_bars(conn, DECL, calendar)
    assert list(bars.columns) == list(BENCHMARK_FIELDS) and frames.strictly_sorted(bars.index)
    assert list(bars.index.names) == ["datetime", "instrument"] and set(bars.index.levels[1]) == {"000300.SH", "399006.SZ"}
    series = index_series(bars, calendar)
    for code in ("000300.SH", "399006.SZ"):
        expected = expected_on_calendar(rows, code, calendar)
        s = series[code]
        assert calendar[s.first] == expected.index[0] and len(s.values["close"]) == len(expected)
        for field in BENCHMARK_FIELDS:
            np.testing.assert_array_equal(s.values[field], expected[field].to_numpy(), err_msg=f"{code} {field}")
            assert s.values[field].dtype == np.float32
    csi = series["000300.SH"]
    missing = calendar[MISSING_BAR]
    assert np.isnan(csi.values["close"][MISSING_BAR]) and missing not in set(rows[rows.ts_code == "000300.SH"].trade_date)
    assert series["399006.SZ"].first == 60
    # the bins: Qlib's format on the snapshot's calendar, folders in the snapshot's naming
    files = write_benchmark_bins(tmp_path / "features", bars, calendar)
    assert files == 14 and sorted(p.name for p in (tmp_path / "features").iterdir()) == ["sh000300", "sz399006"]
    for folder, code in (("sh000300", "000300.SH"), ("sz399006", "399006.SZ")):
        for field in BENCHMARK_FIELDS:
            start, values = qlib_bins.read_bin(tmp_path / "features" / folder / f"{field}.day.bin")
            assert start == series[code].first
            np.testing.assert_array_equal(values, series[code].values[field])
    write_benchmark_bins(tmp_path / "ts", bars, calendar, instruments="ts_code")
    assert sorted(p.name for p in (tmp_path / "ts").iterdir()) == ["000300.sh", "399006.sz"]


def test_a_window_of_the_calendar_starts_each_index_there(db):
    engine, calendar, rows = db
    window = calendar[200:260]
    with engine.connect() as conn:
        bars = read_index_bars(conn, DECL, window, dtype="float64")
    series = index_series(bars, window)
    assert {s.first for s in series.values()} == {0}
    assert np.isnan(series["000300.SH"].values["change"][0]), "no previous bar inside the snapshot, as for stocks"
    part = rows[rows.ts_code == "399006.SZ"].set_index("trade_date").close.astype(float)
    np.testing.assert_array_equal(series["399006.SZ"].values["close"], part.reindex(window).to_numpy(dtype=np.float32))
    close64 = part.reindex(window).to_numpy()
    np.testing.assert_array_equal(series["399006.SZ"].values["change"][1:], (close64[1:] / close64[:-1] - 1).astype(np.float32))


def test_a_tdx_layout_through_the_column_mapping(db, market_db):
    """market.index_daily_tdx: index_code like sh000300, prices in 厘 (bigint), volume in shares."""
    _, calendar, rows = db
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        conn.execute(sa.text("""
            CREATE TABLE market.index_daily_tdx AS
            SELECT lower(right(ts_code, 2)) || left(ts_code, 6) AS index_code, trade_date,
                   round(open * 1000)::int8 AS open_li, round(high * 1000)::int8 AS high_li, round(low * 1000)::int8 AS low_li,
                   round(close * 1000)::int8 AS close_li, (vol * 100)::int8 AS volume, amount * 1000 AS amount_yuan
            FROM market.index_daily"""))
        tdx = BenchmarksDecl.model_validate({
            "table": "market.index_daily_tdx", "codes": ["000300.SH"], "code_column": "index_code",
            "code_style": "prefix_lower", "fields": {
                **{f: {"column": f"{f}_li", "scale": 0.001, "unit": "yuan"} for f in ("open", "high", "low", "close")},
                "volume": {"column": "volume", "unit": "shares"}, "amount": {"column": "amount_yuan", "unit": "yuan"}}})
        bars = read_index_bars(conn, tdx, calendar)
        li = pd.read_sql("SELECT trade_date, close_li FROM market.index_daily_tdx WHERE index_code = 'sh000300'", conn)
    engine.dispose()
    assert tdx.field_specs()["close"] == FieldSpec("close_li", 0.001, "yuan") and tdx.table_code("000300.SH") == "sh000300"
    close = index_series(bars, calendar)["000300.SH"].values["close"]
    expected = (li.set_index("trade_date").close_li.reindex(calendar).to_numpy(dtype=float) / 1000).astype(np.float32)
    np.testing.assert_array_equal(close, expected)  # 厘 / 1000, like the bars
    np.testing.assert_allclose(close, rows[rows.ts_code == "000300.SH"].set_index("trade_date").close.astype(float)
                               .reindex(calendar), rtol=2e-7)


def test_bad_declarations_are_clear_errors(db, market_db):
    engine, calendar, _ = db
    with engine.connect() as conn:
        with pytest.raises(SourceTableError, match=r"benchmarks: table market\.index_daily_tdx does not exist.*benchmarks\.table"):
            read_index_bars(conn, BenchmarksDecl(table="market.index_daily_tdx", codes=["000300.SH"]), calendar)
        with pytest.raises(SourceTableError, match=r"has no column\(s\) \['close_li'\]"):
            read_index_bars(conn, BenchmarksDecl(codes=["000300.SH"], fields={"close": FieldSpec("close_li", 0.001)}), calendar)
        with pytest.raises(BenchmarkError, match=r"no rows for ts_code \['000905\.SH'\] \(it has e\.g\. \['000300\.SH', "
                                                 r"'399006\.SZ'\]\); fix benchmarks\.codes"):
            read_index_bars(conn, BenchmarksDecl(codes=["000300.SH", "000905.SH"]), calendar)
        with pytest.raises(BenchmarkError, match=r"no bars for \['399006\.SZ'\] between 2021-01-04 and 2021-01-29"):
            read_index_bars(conn, DECL, calendar[:20])
        with pytest.raises(BenchmarkError, match=r"no rows for ts_code \['sh000300'\].*code_style"):
            read_index_bars(conn, BenchmarksDecl(codes=["000300.SH"], code_style="prefix_lower"), calendar)
    for bad, message in (({"codes": []}, "at least 1"), ({"codes": ["000300"]}, "ts_code"),
                         ({"codes": ["000300.SH", "000300.SH"]}, "twice"), ({"codes": ["000300.SH"], "table": "x"}, "schema.table"),
                         ({"codes": ["000300.SH"], "fields": {"vwap": {"column": "x"}}}, "fields.vwap"),
                         ({"codes": ["000300.SH"], "fields": {"close": {"column": "close", "scale": 0}}}, "non-zero")):
        with pytest.raises(ValueError, match=message):
            BenchmarksDecl.model_validate(bad)
    writable = create_db_engine(market_db)
    with writable.begin() as conn:
        holiday = conn.execute(sa.text("SELECT min(cal_date) FROM market.trading_calendar WHERE NOT is_trading "
                                       "AND extract(isodow FROM cal_date) < 6 AND cal_date > '2021-01-04'")).scalar()
        conn.execute(sa.text("INSERT INTO market.index_daily (ts_code, trade_date, close, open, high, low, vol, amount) "
                             "VALUES ('000300.SH', :d, 1, 1, 1, 1, 1, 1)"), {"d": holiday})
        with pytest.raises(BenchmarkError, match=f"closed: {holiday:%Y-%m-%d} 000300.SH"):
            read_index_bars(conn, DECL, [d for d in calendar if d <= date(2021, 12, 31)])
        conn.execute(sa.text("DELETE FROM market.index_daily WHERE trade_date = :d"), {"d": holiday})
        conn.execute(sa.text("UPDATE market.index_daily SET close = NULL WHERE trade_date = :d AND ts_code = '399006.SZ'"),
                     {"d": calendar[100]})
        with pytest.raises(BenchmarkError, match=f"NULL or non-positive close.*{calendar[100]:%Y-%m-%d} 399006.SZ"):
            read_index_bars(conn, DECL, calendar)
    writable.dispose()

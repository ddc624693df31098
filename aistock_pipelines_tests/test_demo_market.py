"""The demo market really contains what real markets contain, deterministically, in the real schema."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.demo.market import DemoMarketError, MarketSpec, advance_market, seed_demo_market
from aistock_pipelines_tests.helpers import disposing_engine

pytestmark = pytest.mark.db

QFQ_MISMATCHES = """
WITH anchor AS (
    SELECT DISTINCT ON (ts_code) ts_code, adj_factor AS anchor
    FROM market.adj_factor ORDER BY ts_code, trade_date DESC)
SELECT count(*) AS rows,
       count(*) FILTER (WHERE q.open_li  <> floor(r.open_li::float8  * a.adj_factor / n.anchor + 0.5)
                           OR q.high_li  <> floor(r.high_li::float8  * a.adj_factor / n.anchor + 0.5)
                           OR q.low_li   <> floor(r.low_li::float8   * a.adj_factor / n.anchor + 0.5)
                           OR q.close_li <> floor(r.close_li::float8 * a.adj_factor / n.anchor + 0.5)
                           OR q.volume_hand <> r.volume_hand OR q.amount_li <> r.amount_li) AS bad
FROM market.kline_daily_qfq q
JOIN market.kline_daily_raw r USING (ts_code, trade_date)
JOIN market.adj_factor a USING (ts_code, trade_date)
JOIN anchor n USING (ts_code)
"""


@pytest.fixture(scope="module")
def frames(market_ro):
    with disposing_engine(market_ro) as engine, engine.connect() as conn:
        bars = pd.read_sql("SELECT ts_code, trade_date FROM market.kline_daily_qfq", conn)
        cal = pd.read_sql("SELECT cal_date, is_trading FROM market.trading_calendar ORDER BY cal_date", conn)
        basic = pd.read_sql("SELECT * FROM market.stock_basic", conn)
        af = pd.read_sql("SELECT ts_code, trade_date, adj_factor FROM market.adj_factor ORDER BY ts_code, trade_date", conn)
    return bars, cal, basic, af


def test_size_exchanges_and_span(market_template, frames):
    bars, cal, basic, _ = frames
    s = market_template.summary
    assert s.instruments == bars.ts_code.nunique() == len(basic) >= 300
    assert all(s.exchanges[ex] > 0 for ex in ("SH", "SZ", "BJ"))
    assert set(basic.ts_code.str[-2:]) == {"SH", "SZ", "BJ"}
    assert (s.last_date - s.first_date).days >= 3 * 365
    assert s.bars == len(bars)
    assert not bars.duplicated().any()


def test_calendar_has_weekday_holidays_and_matches_bars(market_template, frames):
    bars, cal, _, _ = frames
    s = market_template.summary
    in_span = cal[(cal.cal_date >= s.first_date) & (cal.cal_date <= s.last_date)]
    weekday_holidays = in_span[(~in_span.is_trading) & (pd.to_datetime(in_span.cal_date).dt.day_of_week < 5)]
    assert len(weekday_holidays) == s.holidays >= 3 * 10
    closed = set(weekday_holidays.cal_date)
    assert date(2022, 10, 3) in closed and date(2023, 1, 23) in closed and date(2024, 5, 1) in closed
    assert len(cal) == cal.cal_date.nunique() and (pd.Series(cal.cal_date).diff().dropna() == timedelta(days=1)).all()
    trading = set(in_span[in_span.is_trading].cal_date)
    assert set(bars.trade_date) == trading, "every trading day has bars and no bar falls on a closed day"
    assert cal.cal_date.max() > s.last_date + timedelta(days=300), "the calendar is published a year ahead"


def test_ipos_delistings_and_suspensions(market_template, frames):
    bars, cal, basic, _ = frames
    s = market_template.summary
    span = bars.groupby("ts_code").trade_date.agg(["min", "max", "count"])
    ipos = span[span["min"] > s.first_date]
    delisted = span[span["max"] < s.last_date]
    assert len(ipos) == s.ipos >= 10
    assert len(delisted) == s.delistings >= 5
    info = basic.set_index("ts_code")
    assert (info.loc[ipos.index, "list_date"] == ipos["min"]).all()
    assert (info.loc[delisted.index, "delist_date"] == delisted["max"] + timedelta(days=1)).all()
    assert info.drop(delisted.index).delist_date.isna().all()
    # suspensions: trading days inside an instrument's listed span without a row
    trading = pd.Index(sorted(cal[cal.is_trading].cal_date))
    expected_days = span.apply(lambda r: ((trading >= r["min"]) & (trading <= r["max"])).sum(), axis=1)
    missing = expected_days - span["count"]
    assert missing.sum() == s.suspension_days > 0
    assert (missing > 0).sum() == s.suspended_instruments >= 20


def test_corporate_actions_restate_history(market_ro, market_template, frames, make_engine):
    _, _, _, af = frames
    changes = af.groupby("ts_code").adj_factor.apply(lambda x: int((x.diff().fillna(0) != 0).sum()))
    assert changes.sum() == market_template.summary.events >= 200
    assert (changes > 0).sum() >= 150, "most instruments have at least one ex-date"
    engine = make_engine(market_ro)
    with engine.connect() as conn:
        rows, bad = conn.execute(sa.text(QFQ_MISMATCHES)).one()
        assert rows == market_template.summary.bars and bad == 0
        # qfq history before an ex-date differs from raw; on the latest day qfq equals raw
        differs = conn.execute(sa.text(
            "SELECT count(*) FROM market.kline_daily_qfq q JOIN market.kline_daily_raw r USING (ts_code, trade_date) "
            "WHERE q.close_li <> r.close_li")).scalar()
        assert differs > 10_000


def test_real_schema_units_and_types(market_ro, make_engine):
    engine = make_engine(market_ro)
    with engine.connect() as conn:
        types = dict(conn.execute(sa.text(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'market'")).all())
        assert types["kline_daily_qfq.close_li"] == "integer" and types["kline_daily_qfq.volume_hand"] == "bigint"
        assert types["kline_daily_qfq.amount_li"] == "bigint" and types["kline_daily_qfq.ts_code"] == "character varying"
        assert types["adj_factor.adj_factor"] == "double precision"
        assert types["trading_calendar.is_trading"] == "boolean"
        assert types["daily_basic.total_mv"] == "numeric" and types["moneyflow.net_mf_amount"] == "numeric"
        # amount (厘) = volume (手) × 100 × average price (元) × 1000, within the day's price range
        row = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE amount_li < volume_hand * 100 * low_li OR amount_li > volume_hand * 100 * high_li),"
            " min(close_li), count(*) FILTER (WHERE high_li < low_li OR open_li > high_li OR close_li < low_li)"
            " FROM market.kline_daily_raw")).one()
        assert row[0] == 0 and row[1] >= 2000 and row[2] == 0
        # 万元 market value = close (元) × total shares (万股)
        off = conn.execute(sa.text(
            "SELECT max(abs(b.total_mv - (r.close_li / 1000.0) * b.total_share::numeric) / b.total_mv) FROM market.daily_basic b "
            "JOIN market.kline_daily_raw r USING (ts_code, trade_date)")).scalar()
        assert off < 1e-6


def _fingerprint(url: str) -> dict[str, str]:
    out = {}
    with disposing_engine(url) as engine, engine.connect() as conn:
        for table, key in (("kline_daily_qfq", "ts_code, trade_date"), ("adj_factor", "ts_code, trade_date"),
                           ("moneyflow", "ts_code, trade_date"), ("trading_calendar", "cal_date"), ("stock_basic", "ts_code")):
            out[table] = conn.execute(sa.text(f"SELECT md5(string_agg(t::text, '|' ORDER BY {key})) FROM market.{table} t")).scalar()
    return out


def test_generator_is_deterministic(pg_server, make_engine):
    small = MarketSpec(n_instruments=40, n_trading_days=260, seed=7)
    a, b, c = (pg_server.create_database(f"det{i}") for i in range(3))
    seed_demo_market(make_engine(a), small)
    seed_demo_market(make_engine(b), small)
    seed_demo_market(make_engine(c), MarketSpec(n_instruments=40, n_trading_days=260, seed=8))
    fa, fb, fc = _fingerprint(a), _fingerprint(b), _fingerprint(c)
    assert fa == fb
    assert fa["kline_daily_qfq"] != fc["kline_daily_qfq"]


def test_advance_appends_next_trading_day_and_restates(market_db, market_template, make_engine):
    engine = make_engine(market_db)
    with engine.connect() as conn:
        before = pd.read_sql("SELECT ts_code, trade_date, close_li FROM market.kline_daily_qfq", conn)
    first = advance_market(engine, events=4)
    second = advance_market(engine, events=4)
    last = market_template.summary.last_date
    assert first.trade_date > last and second.trade_date > first.trade_date
    with engine.connect() as conn:
        closed_between = conn.execute(sa.text(
            "SELECT count(*) FROM market.trading_calendar WHERE is_trading AND cal_date > :a AND cal_date < :b"),
            {"a": last, "b": first.trade_date}).scalar()
        assert closed_between == 0, "advance moves to the very next trading day"
        assert len(first.restated) == 4
        assert conn.execute(sa.text("SELECT count(*) FROM market.kline_daily_qfq WHERE trade_date = :d"),
                            {"d": first.trade_date}).scalar() == first.bars > 250
        rows, bad = conn.execute(sa.text(QFQ_MISMATCHES)).one()
        assert bad == 0 and rows == market_template.summary.bars + first.bars + second.bars
        after = pd.read_sql("SELECT ts_code, trade_date, close_li FROM market.kline_daily_qfq", conn)
    merged = before.merge(after, on=["ts_code", "trade_date"], suffixes=("_before", "_after"))
    changed = set(merged[merged.close_li_before != merged.close_li_after].ts_code)
    assert changed == set(first.restated) | set(second.restated), "exactly the restated instruments change history"


def test_seeding_refuses_a_real_market(empty_db, make_engine):
    engine = make_engine(empty_db)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA market; CREATE TABLE market.kline_daily_qfq (ts_code text)"))
        conn.execute(sa.text("INSERT INTO market.kline_daily_qfq VALUES ('000001.SZ')"))
    with pytest.raises(DemoMarketError, match="not a demo market"):
        seed_demo_market(engine, MarketSpec(n_instruments=5, n_trading_days=30))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT ts_code FROM market.kline_daily_qfq")).scalar() == "000001.SZ"

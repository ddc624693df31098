"""The demo market's research tables: index bars, index constituents and PIT spans, in the real layouts."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.indices import CHINEXT, CSI300, HS_LIQUID, LATE_START, MISSING_BAR, index_bars
from aistock_pipelines.demo.market import advance_market

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def tables(market_ro):
    engine = create_db_engine(market_ro)
    with engine.connect() as conn:
        out = {
            "index": pd.read_sql("SELECT * FROM market.index_daily ORDER BY ts_code, trade_date", conn),
            "weight": pd.read_sql("SELECT * FROM market.index_weight ORDER BY trade_date, con_code", conn),
            "pit": pd.read_sql("SELECT * FROM market.stock_universe_pit_spans ORDER BY ts_code, eligible_start", conn),
            "days": pd.read_sql("SELECT DISTINCT trade_date FROM market.kline_daily_qfq ORDER BY 1", conn).trade_date.tolist(),
            "bars": pd.read_sql("SELECT ts_code, min(trade_date) AS first, max(trade_date) AS last "
                                "FROM market.kline_daily_qfq GROUP BY ts_code", conn).set_index("ts_code"),
            "basic": pd.read_sql("SELECT * FROM market.stock_basic", conn).set_index("ts_code"),
            "types": dict(conn.execute(sa.text(
                "SELECT table_name || '.' || column_name, data_type || coalesce('(' || character_maximum_length || ')', '') "
                "FROM information_schema.columns WHERE table_schema = 'market'")).all()),
        }
    engine.dispose()
    return out


def test_index_daily_is_tushare_layout_and_follows_the_calendar(tables):
    types, bars, days = tables["types"], tables["index"], tables["days"]
    assert types["index_daily.ts_code"] == "character varying(32)"
    assert all(types[f"index_daily.{c}"] == "numeric" for c in ("open", "high", "low", "close", "pre_close", "change", "pct_chg", "vol", "amount"))
    csi = bars[bars.ts_code == CSI300]
    assert list(csi.trade_date) == [d for i, d in enumerate(days) if i != MISSING_BAR], "every trading day but one"
    gem = bars[bars.ts_code == CHINEXT]
    assert list(gem.trade_date) == days[LATE_START:], "from its start on, every trading day"
    for part, gap in ((csi, MISSING_BAR), (gem, None)):
        close, pre = part.close.astype(float).to_numpy(), part.pre_close.astype(float).to_numpy()
        chained = pre[1:] == close[:-1]
        # a feed gap, not a closed day: the bar after the missing one refers to the missing day's close
        assert np.flatnonzero(~chained).tolist() == ([] if gap is None else [gap - 1])
        np.testing.assert_allclose(part.change.astype(float), close - pre, atol=1e-9)
        assert (part.high.astype(float) >= np.maximum(part.open.astype(float), close)).all()
        assert (part.low.astype(float) <= np.minimum(part.open.astype(float), close)).all()
        assert (part.vol.astype(float) > 1e7).all() and (part.amount.astype(float) > 1e7).all()  # 手, 千元


def test_a_short_demo_has_bars_of_every_index():
    """``bin/demo --days 45`` declares the same benchmarks: the late index starts half-way in instead."""
    days = pd.bdate_range("2021-01-04", periods=45)
    bars = index_bars(days, seed=7)
    late = bars[bars.ts_code == CHINEXT].trade_date.tolist()
    assert late == list(days[22:].date) and len(bars[bars.ts_code == CSI300]) == 45


def test_index_weight_has_monthly_snapshots_with_membership_changes(tables):
    w, days, bars, basic = tables["weight"], tables["days"], tables["bars"], tables["basic"]
    dates = sorted(set(w.trade_date))
    firsts = [d for i, d in enumerate(days) if i == 0 or (d.year, d.month) != (days[i - 1].year, days[i - 1].month)]
    assert dates == firsts, "one snapshot on the first trading day of each month"
    sums = w.groupby("trade_date").weight.sum()
    np.testing.assert_allclose(sums, 100, atol=0.01)
    assert set(w.con_code.str[-2:]) <= {"SH", "SZ"} and w.groupby("trade_date").size().eq(60).all()
    members = w.groupby("trade_date").con_code.apply(set)
    changes = sum(members.iloc[i] != members.iloc[i - 1] for i in range(1, len(members)))
    assert changes >= 6, "rebalances and delistings change the members"
    # a member that delists: in the weight date before its last bar, gone from the next one
    delisted = [c for c in set(w.con_code) if bars.loc[c, "last"] < days[-1]]
    assert delisted
    for code in delisted:
        listed_on = sorted(set(w[w.con_code == code].trade_date))
        assert listed_on[-1] <= bars.loc[code, "last"] < next(d for d in dates if d > listed_on[-1])
        assert basic.loc[code, "delist_date"] is not None
    # a member that joins after its IPO
    joins = [c for c in set(w.con_code) if bars.loc[c, "first"] > days[0]]
    assert joins and all(min(w[w.con_code == c].trade_date) > basic.loc[c, "list_date"] for c in joins)


def test_pit_spans_have_open_closed_and_reentering_members(tables):
    pit, days, bars = tables["pit"], tables["days"], tables["bars"]
    assert set(pit.universe_key) == {HS_LIQUID} and pit.ts_code.nunique() >= 80
    assert pit.eligible_end.isna().sum() >= 40 and pit.eligible_end.notna().sum() >= 20
    assert (pit.groupby("ts_code").size() >= 2).sum() >= 10, "members that leave and come back"
    assert (pit.eligible_start < days[0]).any(), "spans starting before the calendar"
    assert any(d.weekday() >= 5 for d in pit.eligible_start), "a span starting on a weekend"
    closed = pit.dropna(subset=["eligible_end"])
    assert (closed.eligible_end >= closed.eligible_start).all()
    ends = pit.groupby("ts_code").apply(lambda g: g.eligible_end.isna().any() or max(g.eligible_end) >= bars.loc[g.name, "last"],
                                        include_groups=False)
    assert ends.sum() >= 40
    touching = pit.assign(prev_end=pit.groupby("ts_code").eligible_end.shift())
    assert (touching.eligible_start == touching.prev_end + timedelta(days=1)).any(), "two spans that touch"


def test_advance_appends_index_bars_and_a_new_weight_date(market_db):
    engine = create_db_engine(market_db)
    with engine.connect() as conn:
        last_weight = conn.execute(sa.text("SELECT max(trade_date) FROM market.index_weight")).scalar()
        before = set(conn.execute(sa.text("SELECT con_code FROM market.index_weight WHERE trade_date = :d"), {"d": last_weight}).scalars())
    advanced = []
    while not advanced or advanced[-1].month == last_weight.month:
        advanced.append(advance_market(engine, events=0).trade_date)
    with engine.connect() as conn:
        for code in (CSI300, CHINEXT):
            got = conn.execute(sa.text("SELECT trade_date, pre_close, close FROM market.index_daily WHERE ts_code = :c "
                                       "ORDER BY trade_date DESC LIMIT :n"), {"c": code, "n": len(advanced) + 1}).all()[::-1]
            assert [r[0] for r in got[1:]] == advanced
            assert all(got[i][1] == got[i - 1][2] for i in range(1, len(got))), "pre_close = the previous close"
        weights = pd.read_sql(sa.text("SELECT trade_date, con_code, weight FROM market.index_weight WHERE trade_date > :d"),
                              conn, params={"d": last_weight})
    assert set(weights.trade_date) == {advanced[-1]}, "a weight date on the new month's first trading day"
    after = set(weights.con_code)
    assert len(after) == len(before) or len(after) < len(before)
    assert after != before and len(after - before) == 1, "one member swapped"
    assert abs(weights.weight.sum() - 100) < 0.01
    engine.dispose()

"""Universe files (instruments/<name>.txt) against the database, day by day."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.source_tables import SourceTableError
from aistock_pipelines.export.universes import (UniverseDecl, UniverseError, check_universe_name, resolve_universe,
                                                write_universes)

pytestmark = pytest.mark.db

CSI300 = UniverseDecl(index_weight="000300.SH")
HS_LIQUID = UniverseDecl(spans="hs_liquid")


@pytest.fixture(scope="module")
def db(market_ro):
    engine = create_db_engine(market_ro)
    with engine.connect() as conn:
        calendar = list(conn.execute(sa.text(
            "SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date BETWEEN '2021-01-04' AND "
            "(SELECT max(trade_date) FROM market.kline_daily_qfq) ORDER BY 1")).scalars())
        weights = pd.read_sql("SELECT trade_date, con_code FROM market.index_weight WHERE index_code = '000300.SH'", conn)
        pit = pd.read_sql("SELECT ts_code, eligible_start, eligible_end FROM market.stock_universe_pit_spans "
                          "WHERE universe_key = 'hs_liquid'", conn)
        bars = pd.read_sql("SELECT ts_code, trade_date FROM market.kline_daily_qfq", conn)
    yield engine, calendar, weights, pit, bars
    engine.dispose()


def bar_spans(bars: pd.DataFrame, calendar: list[date], style: str) -> list[tuple[str, date, date]]:
    """all.txt's lines of a snapshot over ``calendar`` (first and last bar per instrument)."""
    inside = bars[(bars.trade_date >= calendar[0]) & (bars.trade_date <= calendar[-1])]
    g = inside.groupby("ts_code").trade_date.agg(["min", "max"])
    return [(str(n), a, b) for n, a, b in zip(qlib_format.instrument_names(list(g.index), style), g["min"], g["max"])]


def expected_weight_days(weights: pd.DataFrame, calendar: list[date], last_bar: dict[str, date]) -> set:
    """(day, ts_code): the members of the latest weight date on or before each day, until their last bar."""
    days = pd.DataFrame({"day": pd.to_datetime(calendar)})
    dates = pd.DataFrame({"weight_date": pd.to_datetime(sorted(set(weights.trade_date)))})
    effective = pd.merge_asof(days, dates, left_on="day", right_on="weight_date", direction="backward").dropna()
    members = weights.assign(weight_date=pd.to_datetime(weights.trade_date)).merge(effective, on="weight_date")
    return {(d.date(), c) for d, c in zip(members.day, members.con_code) if d.date() <= last_bar.get(c, date.max)}


def expected_pit_days(pit: pd.DataFrame, calendar: list[date], last_bar: dict[str, date]) -> set:
    out = set()
    for code, start, end in pit.itertuples(index=False):
        end = date.max if pd.isna(end) else end
        out |= {(d, code) for d in calendar if start <= d <= end and d <= last_bar.get(code, date.max)}
    return out


def file_days(path: Path, calendar: list[date]) -> set:
    """(day, ts_code) read back from a written market file, expanded over the calendar."""
    out = set()
    for line in path.read_text().splitlines():
        symbol, a, b = line.split("\t")
        code = qlib_format.from_qlib_symbol(symbol)
        out |= {(d, code) for d in calendar if date.fromisoformat(a) <= d <= date.fromisoformat(b)}
    return out


@pytest.mark.parametrize("first", [date(2021, 1, 4), date(2023, 1, 16)])  # the second: mid-month
@pytest.mark.parametrize("style", ["qlib", "ts_code"])
def test_universe_files_equal_the_database_day_by_day(db, tmp_path, first, style):
    engine, calendar, weights, pit, bars = db
    calendar = [d for d in calendar if d >= first]
    spans = bar_spans(bars, calendar, style)
    last_bar = {qlib_format.from_qlib_symbol(n): b for n, _, b in spans}
    with engine.connect() as conn:
        written = write_universes(conn, {"csi300": CSI300, "hs_liquid": HS_LIQUID}, tmp_path / "instruments", calendar,
                                  instruments=style, bar_spans=spans)
    assert sorted(p.name for p in (tmp_path / "instruments").iterdir()) == ["csi300.txt", "hs_liquid.txt"]
    assert file_days(tmp_path / "instruments" / "csi300.txt", calendar) == expected_weight_days(weights, calendar, last_bar)
    assert file_days(tmp_path / "instruments" / "hs_liquid.txt", calendar) == expected_pit_days(pit, calendar, last_bar)
    for name, lines in written.items():
        text = (tmp_path / "instruments" / f"{name}.txt").read_text()
        assert text == "".join(f"{s}\t{a:%Y-%m-%d}\t{b:%Y-%m-%d}\n" for s, a, b in lines), "all.txt's format"
        assert lines == sorted(lines) and all(a in calendar and b in calendar and a <= b for _, a, b in lines)
        symbols = [s for s, _, _ in lines]
        assert all((s[:2] in ("SH", "SZ")) if style == "qlib" else s[-3:] in (".SH", ".SZ") for s in symbols)
        for s in set(symbols):  # one line per contiguous span: a trading day lies between two lines of a symbol
            mine = [(a, b) for x, a, b in lines if x == s]
            assert all(calendar.index(mine[i][0]) > calendar.index(mine[i - 1][1]) + 1 for i in range(1, len(mine)))
    assert len(written["csi300"]) > 60 and len({s for s, _, _ in written["hs_liquid"]}) >= 80


def test_spans_end_at_the_last_bar_and_start_on_trading_days(db):
    engine, calendar, weights, pit, bars = db
    spans = bar_spans(bars, calendar, "qlib")
    last_bar = {n: b for n, _, b in spans}
    with engine.connect() as conn:
        csi = resolve_universe(conn, "csi300", CSI300, calendar, bar_spans=spans)
        unclipped = resolve_universe(conn, "csi300", CSI300, calendar)
        liquid = resolve_universe(conn, "hs_liquid", HS_LIQUID, calendar, bar_spans=spans)
    delisted = {s for s, _, b in csi if b == last_bar[s] and b < calendar[-1]}
    assert delisted, "a member that delists ends at its last bar"
    for s in delisted:  # without the bars, it would stay a member until the next weight date drops it
        end = max(b for x, _, b in unclipped if x == s)
        assert end > last_bar[s] and qlib_format.to_qlib_symbol(qlib_format.from_qlib_symbol(s)) == s
        next_date = min(d for d in set(weights.trade_date) if d > last_bar[s])
        assert end == calendar[calendar.index(next_date) - 1]
    alone = pit.groupby("ts_code").ts_code.transform("size") == 1  # (a touching second span merges into the first)
    weekend = pit[alone.to_numpy() & np.array([d.weekday() >= 5 and d > calendar[0] for d in pit.eligible_start])]
    assert len(weekend)
    for code, start, _ in weekend.itertuples(index=False):
        [(_, first, _)] = [line for line in liquid if line[0] == qlib_format.to_qlib_symbol(code)]
        assert first == min(d for d in calendar if d > start)
    touching = pit.sort_values(["ts_code", "eligible_start"]).assign(prev=lambda f: f.groupby("ts_code").eligible_end.shift())
    joined = touching[touching.eligible_start == touching.prev + timedelta(days=1)].ts_code
    assert len(joined) and all(sum(s == qlib_format.to_qlib_symbol(c) for s, _, _ in liquid) == 1 for c in joined)
    assert max(len([1 for s, _, _ in liquid if s == x]) for x, _, _ in liquid) == 2, "re-entry: two lines"


def test_a_new_weight_date_and_a_changed_span_change_the_file(market_db):
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        calendar = list(conn.execute(sa.text("SELECT cal_date FROM market.trading_calendar WHERE is_trading AND "
                                             "cal_date BETWEEN '2024-01-02' AND '2024-06-19' ORDER BY 1")).scalars())
        last = conn.execute(sa.text("SELECT max(trade_date) FROM market.index_weight")).scalar()
        members = sorted(conn.execute(sa.text("SELECT con_code FROM market.index_weight WHERE trade_date = :d"), {"d": last}).scalars())
        before = resolve_universe(conn, "csi300", CSI300, calendar, instruments="ts_code")
        new_day, out, joiner = calendar[-3], members[0], "000001.SZ"
        conn.execute(sa.text("INSERT INTO market.index_weight (index_code, con_code, trade_date, weight) "
                             "SELECT '000300.SH', unnest(CAST(:codes AS text[])), :d, 1.0"),
                     {"codes": [c for c in members if c != out] + [joiner], "d": new_day})
        after = resolve_universe(conn, "csi300", CSI300, calendar, instruments="ts_code")
        code = conn.execute(sa.text("SELECT ts_code FROM market.stock_universe_pit_spans WHERE universe_key = 'hs_liquid' "
                                    "AND eligible_end IS NULL ORDER BY ts_code LIMIT 1")).scalar()
        conn.execute(sa.text("UPDATE market.stock_universe_pit_spans SET eligible_end = :d WHERE ts_code = :c "
                             "AND eligible_end IS NULL AND universe_key = 'hs_liquid'"), {"d": calendar[10], "c": code})
        liquid = resolve_universe(conn, "hs_liquid", HS_LIQUID, calendar, instruments="ts_code")
    engine.dispose()
    changed = set(after) ^ set(before)
    assert changed == {(out, calendar[0], calendar[-1]), (out, calendar[0], calendar[-4]), (joiner, new_day, calendar[-1])}
    assert [line for line in liquid if line[0] == code] == [(code, calendar[0], calendar[10])]


def test_text_trade_dates_and_a_configured_table(market_db):
    """Tushare loads often keep trade_date as 'YYYYMMDD' text; the table name comes from the declaration."""
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE market.tushare_weight AS SELECT index_code, con_code, "
                             "to_char(trade_date, 'YYYYMMDD') AS trade_date, weight FROM market.index_weight"))
        calendar = list(conn.execute(sa.text("SELECT cal_date FROM market.trading_calendar WHERE is_trading AND "
                                             "cal_date BETWEEN '2022-03-01' AND '2023-03-01' ORDER BY 1")).scalars())
        assert resolve_universe(conn, "csi300", UniverseDecl(index_weight="000300.SH", table="market.tushare_weight"),
                                calendar) == resolve_universe(conn, "csi300", CSI300, calendar)
    engine.dispose()


def test_bad_declarations_name_the_universe_and_the_fix(db, tmp_path):
    engine, calendar, *_ = db
    with engine.connect() as conn:
        with pytest.raises(SourceTableError, match=r"universe 'csi300': table market\.nope does not exist.*universes\.csi300\.table"):
            resolve_universe(conn, "csi300", UniverseDecl(index_weight="000300.SH", table="market.nope"), calendar)
        with pytest.raises(SourceTableError, match=r"market\.index_daily has no column\(s\) \['index_code', 'con_code'\]"):
            resolve_universe(conn, "csi300", UniverseDecl(index_weight="000300.SH", table="market.index_daily"), calendar)
        with pytest.raises(UniverseError, match=r"'csi500'.*no rows for index_code '000905\.SH' \(it has e\.g\. \['000300\.SH'\]\)"
                                                r".*universes\.csi500\.index_weight"):
            resolve_universe(conn, "csi500", UniverseDecl(index_weight="000905.SH"), calendar)
        with pytest.raises(UniverseError, match=r"no rows for universe_key 'hs_illiquid'.*\['hs_liquid'\].*universes\.x\.spans"):
            resolve_universe(conn, "x", UniverseDecl(spans="hs_illiquid"), calendar)
        with pytest.raises(UniverseError, match=r"universe name 'CSI/300'"):
            resolve_universe(conn, "CSI/300", CSI300, calendar)
        with pytest.raises(UniverseError, match=r"universe 'csi300' has no member between 2020-06-01 and 2020-12-31"):
            early = [date(2020, 6, 1) + timedelta(days=i) for i in range(214) if (date(2020, 6, 1) + timedelta(days=i)).weekday() < 5]
            resolve_universe(conn, "csi300", CSI300, early)
        with pytest.raises(UniverseError, match=r"'csi300'"):  # one bad universe: no file at all is written
            write_universes(conn, {"hs_liquid": HS_LIQUID, "csi300": UniverseDecl(index_weight="000301.SH")},
                            tmp_path / "instruments", calendar)
    assert not (tmp_path / "instruments").exists()
    for bad in ("all", "", "../x", "a.txt", "Csi300", "x" * 65):
        with pytest.raises(UniverseError):
            check_universe_name(bad)
    with pytest.raises(ValueError, match="exactly one of"):
        UniverseDecl.model_validate({"index_weight": "000300.SH", "spans": "hs_liquid"})
    with pytest.raises(ValueError, match="schema.table"):
        UniverseDecl.model_validate({"spans": "hs_liquid", "table": "index_weight; drop table x"})

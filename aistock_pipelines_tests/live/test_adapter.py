"""LiveDataAdapter against the real database: every live frame equals the slice of a fresh snapshot.

The two demo declarations cover both layouts: ``demo_allA`` (plain columns, ts_code names, float64, both
factor tables, start 2021-01-04) and ``demo_qlib`` (``$`` columns, SH600000 names, float32, bars only, start
2023-01-03 — mid-history, so a window reaching its start must show ``change`` NaN exactly like the file).
Snapshots are exported once per module and database state; the adapter is always compared with what
``pd.read_hdf`` returns, ``check_exact=True``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import AdvanceResult, advance_market
from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.gates import DataGateError, DataNotReady
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_writer import SnapshotWriter
from aistock_pipelines.live import (
    FrameLatestBarProvider,
    InsufficientHistoryError,
    LatestBarError,
    LiveDataAdapter,
    LiveDataError,
    NoDataError,
    UnknownSymbolError,
)
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.helpers import disposing_engine

pytestmark = pytest.mark.db

SNAPSHOTS = ("demo_allA", "demo_qlib")
#: a third snapshot: demo_qlib's declaration in the other suspended-days layout (the declared ones use the default)
OMIT = "demo_qlib_omit"


def declaration(sid: str):
    """The declared snapshot ``sid`` stands for, and its options (OMIT: demo_qlib's, with ``omit``)."""
    d = load_snapshots_file(DEMO_SNAPSHOTS_FILE).get("demo_qlib" if sid == OMIT else sid)
    return d, replace(d.options(), suspended_days="omit") if sid == OMIT else d.options()


@dataclass
class Exported:
    url: str
    frames: dict[str, pd.DataFrame]  # snapshot id → daily_pv.h5 as pd.read_hdf returns it
    calendars: dict[str, pd.DatetimeIndex]

    def adapter(self, sid: str, provider=None) -> LiveDataAdapter:
        if sid != OMIT:
            return LiveDataAdapter.for_snapshot(sid, self.url, DEMO_SNAPSHOTS_FILE, latest_bar_provider=provider)
        d, options = declaration(sid)
        reader = DBReader(create_db_engine(self.url), load_snapshots_file(DEMO_SNAPSHOTS_FILE).export_mapping(), self.url)
        return LiveDataAdapter(reader, provider, options=options, start=d.start, universe=d.ts_codes, snapshot_id=sid)


def export_declared(url: str, root: Path) -> Exported:
    """A fresh full export of each declared snapshot, by the exporter itself (the reference)."""
    declared = load_snapshots_file(DEMO_SNAPSHOTS_FILE)
    frames, calendars = {}, {}
    with disposing_engine(url) as engine:
        exporter = QlibDailyExporter(DBReader(engine, declared.export_mapping(), url), SnapshotWriter(root), MetaRepo(engine))
        for sid in (*SNAPSHOTS, OMIT):
            d, options = declaration(sid)
            # Qlib bins do not change daily_pv.h5 (the frame compared here); skipping them saves test time.
            exporter.export_full(sid, d.start, d.end, d.ts_codes, options=replace(options, qlib_bins=False))
            frames[sid] = pd.read_hdf(root / sid / "daily_pv.h5", key="data")
            calendars[sid] = pd.DatetimeIndex(pd.to_datetime(qlib_format.read_calendar(root / sid / "calendars" / "day.txt")))
    return Exported(url, frames, calendars)


def snapshot_slice(ex: Exported, sid: str, symbols: list[str], now: pd.Timestamp, window: int) -> pd.DataFrame:
    """The rows of the snapshot a live call for (symbols, now, window) must return, computed from the file:
    those of a snapshot exported up to the window's last day — the file's suspension rows after an
    instrument's last bar in the window are not there yet (nobody knows yet that it will trade again)."""
    cal = ex.calendars[sid]
    end = cal.searchsorted(now.normalize(), side="right")
    days = cal[max(0, end - window):end]
    snap = ex.frames[sid]
    names = qlib_format.instrument_names([qlib_format.from_qlib_symbol(s) for s in symbols],
                                         "ts_code" if sid == "demo_allA" else "qlib")
    rows = snap[snap.index.get_level_values("datetime").isin(days) & snap.index.get_level_values("instrument").isin(names)]
    close = rows[[c for c in rows.columns if c.lstrip("$") == "close"][0]]
    dates = pd.Series(rows.index.get_level_values("datetime"), index=rows.index)
    last_bar = dates.where(close.notna().to_numpy()).groupby(level="instrument").transform("max")
    return rows[(dates <= last_bar).to_numpy()]


def bars(frame: pd.DataFrame) -> pd.DataFrame:
    """A file's bars (its suspension rows dropped)."""
    return frame[frame[[c for c in frame.columns if c.lstrip("$") == "close"][0]].notna().to_numpy()]


@pytest.fixture(scope="module")
def base(pg_server, market_template, tmp_path_factory) -> Exported:
    """The seeded market (a private copy: exporting writes meta rows) with both snapshots exported."""
    url = pg_server.create_database("live_base", template=market_template.template_name)
    return export_declared(url, tmp_path_factory.mktemp("live_base"))


@pytest.fixture(scope="module")
def advanced(pg_server, market_template, tmp_path_factory) -> tuple[Exported, AdvanceResult]:
    """The same market one day later, with ex-dates that restated whole qfq histories, exported afresh."""
    url = pg_server.create_database("live_adv", template=market_template.template_name)
    with disposing_engine(url) as engine:
        adv = advance_market(engine, events=6)
    assert len(adv.restated) == 6
    return export_declared(url, tmp_path_factory.mktemp("live_adv")), adv


def hazards(frame: pd.DataFrame, cal: pd.DatetimeIndex) -> dict[str, list[str]]:
    """Instruments with suspensions, IPOs inside the range and delistings: where alignment bugs live."""
    inst = frame.index.get_level_values("instrument")
    spans = pd.Series(frame.index.get_level_values("datetime"), index=inst).groupby(level=0).agg(["min", "max", "size"])
    in_span = spans.apply(lambda r: int(((cal >= r["min"]) & (cal <= r["max"])).sum()), axis=1)
    return {"suspended": spans.index[in_span > spans["size"]][:15].tolist(),
            "ipo": spans.index[spans["min"] > cal[0]][:10].tolist(),
            "delisted": spans.index[spans["max"] < cal[-1]][:10].tolist()}


def random_picks(ex: Exported, sid: str, n: int, seed: int) -> list[tuple[list[str], pd.Timestamp, int]]:
    cal = ex.calendars[sid]
    insts = sorted(set(ex.frames[sid].index.get_level_values("instrument")))
    special = sorted({code for codes in hazards(bars(ex.frames[sid]), cal).values() for code in codes})
    rng = random.Random(seed)
    picks = []
    while len(picks) < n:
        symbols = rng.sample(insts, rng.randint(1, 40)) + rng.sample(special, rng.randint(0, 6))
        day = cal[rng.randrange(len(cal))] + pd.Timedelta(days=rng.choice([0, 0, 0, 1, 2]))  # weekends/holidays too
        now = day + pd.Timedelta(hours=rng.choice([9, 15, 20]), minutes=rng.choice([0, 30]))
        if now.normalize() > cal[-1]:
            continue  # past the last loaded day: the not-yet-loaded policy, tested separately
        window = rng.choice([1, 2, 5, 20, 21, 60, rng.randint(1, 250)])
        if cal.searchsorted(now.normalize(), side="right") < window:
            continue  # longer than the history: the error case, tested separately
        picks.append((symbols, now, window))
    return picks


@pytest.mark.parametrize("sid", (*SNAPSHOTS, OMIT))
def test_live_frames_equal_snapshot_slices(base, sid):
    adapter = base.adapter(sid)
    cal = base.calendars[sid]
    picks = random_picks(base, sid, 30, seed=len(sid))
    # edges: the snapshot's first day (change NaN), a window ending exactly at its start, the last day
    everything = sorted(set(base.frames[sid].index.get_level_values("instrument")))
    picks += [(everything[:30], cal[0] + pd.Timedelta(hours=15), 1), (everything[::7], cal[59], 60),
              (everything, cal[-1] + pd.Timedelta(hours=20), 60)]
    for symbols, now, window in picks:
        live = adapter.get_feature_df(symbols, now, window)
        expected = snapshot_slice(base, sid, symbols, now, window)
        pd.testing.assert_frame_equal(live, expected, check_exact=True, obj=f"{sid} {now} window={window}")
        assert live.attrs["trading_days"] == window and not live.attrs["partial"]
        assert live.attrs["live_rows"] == [] and live.attrs["live_date"] is None
    assert len(live) > 10_000, "the last pick is every instrument × 60 days"
    suspension_rows = int(live.iloc[:, 3].isna().sum())
    assert (suspension_rows > 0) == (sid != OMIT), "NaN rows for suspended days exactly when declared"


def test_first_row_change_comes_from_the_previous_bar_not_the_previous_day(base):
    """A window starting right after a suspension: ``change`` of its first row uses the last bar before
    the gap, as the snapshot does; at the snapshot's start (demo_qlib: 2023-01-03) it is NaN."""
    sid = "demo_allA"
    frame, cal = bars(base.frames[sid]), base.calendars[sid]
    code = hazards(frame, cal)["suspended"][0]
    rows = frame.xs(code, level="instrument")
    gap = np.flatnonzero(np.diff(cal.get_indexer(rows.index)) > 1)[0]
    resume = rows.index[gap + 1]
    live = bars(base.adapter(sid).get_feature_df([code], resume, 1))
    assert live["change"].iloc[0] == rows["change"].iloc[gap + 1] == rows["close"].iloc[gap + 1] / rows["close"].iloc[gap] - 1
    qlib_symbols = sorted(set(base.frames["demo_qlib"].index.get_level_values("instrument")))[:20]
    first = base.adapter("demo_qlib").get_feature_df(qlib_symbols, base.calendars["demo_qlib"][0], 1)
    assert first["$change"].isna().all() and len(first) > 0


@pytest.mark.parametrize("sid", SNAPSHOTS)
def test_right_after_a_qfq_restatement(base, advanced, sid):
    ex, adv = advanced
    adapter = ex.adapter(sid)
    cal = ex.calendars[sid]
    naming = "qlib" if sid == "demo_qlib" else "ts_code"
    restated = qlib_format.instrument_names(adv.restated, naming).tolist()
    others = sorted(set(ex.frames[sid].index.get_level_values("instrument")))[::9]
    for symbols, now, window in [(restated, cal[-1] + pd.Timedelta(hours=20), 60), (restated + others, cal[-1], 250),
                                 (restated[:3], cal[-2], 5), (restated, cal[-1], 1)]:
        live = adapter.get_feature_df(symbols, now, window)
        pd.testing.assert_frame_equal(live, snapshot_slice(ex, sid, symbols, now, window), check_exact=True)
    before = base.adapter(sid).get_feature_df(restated, cal[-2], 20)
    after = adapter.get_feature_df(restated, cal[-2], 20)
    close = "$close" if sid == "demo_qlib" else "close"
    assert not np.allclose(before[close], after[close]), "the restated history is what the live frame shows"


def test_both_namings_are_accepted_and_the_output_uses_the_snapshots(base):
    adapter = base.adapter("demo_qlib")
    now = base.calendars["demo_qlib"][-1]
    symbol = base.frames["demo_qlib"].index.get_level_values("instrument")[-1]  # e.g. SZ000011
    ts_code = qlib_format.from_qlib_symbol(symbol)
    a = adapter.get_feature_df([ts_code, symbol], now, 10)
    b = adapter.get_feature_df(symbol.lower(), now, 10)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert set(a.index.get_level_values("instrument")) == {symbol} and len(a) > 0
    assert list(a.columns) == adapter.columns and all(c.startswith("$") for c in a.columns)
    assert (a.dtypes == np.float32).all()


def test_momentum_factor_identical_on_snapshot_slice_and_live_frame(base):
    """The docs example (docs/design.md, "Live features"): one factor function, two data sources."""
    def momentum_20(df: pd.DataFrame) -> pd.Series:
        close = df["$close"] if "$close" in df else df["close"]
        return (close / close.groupby(level="instrument").shift(20) - 1).rename("mom20")

    sid = "demo_qlib"
    snapshot = base.frames[sid]
    now = base.calendars[sid][-1]
    window_days = base.calendars[sid][-60:]
    symbols = sorted(set(snapshot.index.get_level_values("instrument")))
    snapshot_slice_ = snapshot[snapshot.index.get_level_values("datetime").isin(window_days)]
    live = LiveDataAdapter.for_snapshot(sid, base.url, DEMO_SNAPSHOTS_FILE).get_feature_df(symbols, now, 60)
    a, b = momentum_20(snapshot_slice_), momentum_20(live)
    pd.testing.assert_series_equal(a, b, check_exact=True)
    assert a.notna().sum() > 1000


# ------------------------------------------------------------------------------- latest-bar provider


def day_bars(url: str, day: date) -> pd.DataFrame:
    """The raw (unadjusted) bars of ``day`` in database units, with the exchange's previous close
    (ex-rights reference price: last raw close × adj_factor(prev) / adj_factor(day)), as a quote feed
    such as TDX delivers them during the day."""
    with disposing_engine(url) as engine, engine.connect() as conn:
        bars = pd.read_sql(sa.text("""
            SELECT r.ts_code, r.trade_date, r.open_li, r.high_li, r.low_li, r.close_li, r.volume_hand, r.amount_li,
                   round(p.close_li * p.adj_factor / a.adj_factor)::int8 AS pre_close
            FROM market.kline_daily_raw r JOIN market.adj_factor a USING (ts_code, trade_date)
            CROSS JOIN LATERAL (SELECT pr.close_li, pa.adj_factor FROM market.kline_daily_raw pr
                                JOIN market.adj_factor pa USING (ts_code, trade_date)
                                WHERE pr.ts_code = r.ts_code AND pr.trade_date < r.trade_date
                                ORDER BY pr.trade_date DESC LIMIT 1) p
            WHERE r.trade_date = :d"""), conn, params={"d": day})
    return bars


@pytest.mark.parametrize("sid", SNAPSHOTS)
def test_latest_bar_provider_supplies_today_before_the_close(base, advanced, sid):
    """The database still ends yesterday (``base``); the provider delivers today's raw bars. The result
    equals tomorrow's snapshot (``advanced``): exactly for every instrument without an ex-date (factor-table
    columns are NaN on the live row, those tables have no row yet); for the ex-date instruments the history
    is rescaled to today's anchor and agrees up to the vendor's 1-厘 rounding."""
    ex, adv = advanced
    bars = day_bars(ex.url, adv.trade_date)
    adapter = base.adapter(sid, FrameLatestBarProvider(bars))
    naming = "qlib" if sid == "demo_qlib" else "ts_code"
    restated = set(qlib_format.instrument_names(adv.restated, naming))
    symbols = sorted(set(ex.frames[sid].index.get_level_values("instrument")))
    now = pd.Timestamp(adv.trade_date) + pd.Timedelta(hours=10, minutes=30)
    live = adapter.get_feature_df(symbols, now, 30)
    expected = snapshot_slice(ex, sid, symbols, now, 30)

    today = live.index.get_level_values("datetime") == pd.Timestamp(adv.trade_date)
    assert live.attrs["live_date"] == adv.trade_date.isoformat() == live.attrs["as_of"]
    assert live.attrs["live_rows"] == sorted(set(live[today].index.get_level_values("instrument")))
    assert len(live.attrs["live_rows"]) == adv.bars
    assert live.attrs["live_missing"] == sorted(qlib_format.instrument_names(adv.suspended, naming)), \
        "traded yesterday, no bar today: exactly the instruments suspended today"
    assert set(live.attrs["ex_date_rescaled"]) == restated
    factor_cols = [c for c in live.columns if c.lstrip("$").startswith(("db_", "mf_"))]
    assert live.loc[today, factor_cols].isna().all().all() if factor_cols else True
    assert live.index.equals(expected.index)

    plain = ~live.index.get_level_values("instrument").isin(list(restated))
    exact = expected[plain].copy()
    exact.loc[exact.index.get_level_values("datetime") == pd.Timestamp(adv.trade_date), factor_cols] = np.nan
    pd.testing.assert_frame_equal(live[plain], exact, check_exact=True)
    price_cols = [c for c in live.columns if c.lstrip("$") in ("open", "high", "low", "close", "vwap", "factor", "volume")]
    np.testing.assert_allclose(live.loc[~plain, price_cols], expected.loc[~plain, price_cols], rtol=2e-3)


def test_provider_policy_and_errors(base, advanced):
    ex, adv = advanced
    bars = day_bars(ex.url, adv.trade_date)
    today = pd.Timestamp(adv.trade_date)
    codes = sorted(bars["ts_code"])[:20]
    no_provider = base.adapter("demo_allA")
    # without a provider, today (not loaded yet) is not in the window: it ends at the last complete day
    morning = no_provider.get_feature_df(codes, today + pd.Timedelta(hours=10), 5)
    assert morning.attrs["as_of"] == base.calendars["demo_allA"][-1].date().isoformat()
    pd.testing.assert_frame_equal(morning, snapshot_slice(base, "demo_allA", codes, base.calendars["demo_allA"][-1], 5),
                                  check_exact=True)
    # a provider without any quote yet (before the open, feed down) leaves today out the same way
    empty = base.adapter("demo_allA", FrameLatestBarProvider(bars.iloc[:0]))
    before_open = empty.get_feature_df(codes, today + pd.Timedelta(hours=8), 5)
    assert before_open.attrs["live_date"] is None
    pd.testing.assert_frame_equal(before_open, morning, check_exact=True)
    # a past trading day without bars is a load that did not happen: an error, not a short window
    with pytest.raises(DataNotReady, match=f"{adv.trade_date}"):
        no_provider.get_feature_df(codes, today + pd.Timedelta(days=1, hours=10), 5)
    # a stale quote (yesterday's bar offered as today's) is refused
    stale = FrameLatestBarProvider(bars.assign(trade_date=adv.trade_date))
    stale.latest_bars = lambda ts_codes, trade_date: bars.assign(trade_date=adv.trade_date - timedelta(days=1))
    with pytest.raises(LatestBarError, match="stale"):
        base.adapter("demo_allA", stale).get_feature_df(codes, today, 5)
    with pytest.raises(LatestBarError, match="amount_li"):
        base.adapter("demo_allA", FrameLatestBarProvider(bars.drop(columns="amount_li"))).get_feature_df(codes, today, 5)
    dup = FrameLatestBarProvider(pd.concat([bars, bars.head(1)]))
    with pytest.raises(LatestBarError, match="several rows"):
        base.adapter("demo_allA", dup).get_feature_df(codes, today, 5)
    bad = FrameLatestBarProvider(bars.assign(close_li=np.where(bars["ts_code"] == codes[0], -1, bars["close_li"])))
    with pytest.raises(DataGateError, match="close <= 0"):
        base.adapter("demo_allA", bad).get_feature_df(codes, today, 5)
    # without pre_close the no-ex-date assumption is taken (documented) and nothing is rescaled
    plain = base.adapter("demo_allA", FrameLatestBarProvider(bars.drop(columns="pre_close")))
    assert plain.get_feature_df(codes, today, 5).attrs["ex_date_rescaled"] == []
    # once the vendor has loaded the day, the database wins and the provider is not asked
    asked = []
    loaded = ex.adapter("demo_allA", FrameLatestBarProvider(bars))
    loaded.provider.latest_bars = lambda *a: asked.append(a)
    assert loaded.get_feature_df(codes, today, 5).attrs["live_date"] is None and not asked


# ------------------------------------------------------------------------------------------ errors


def test_errors_are_clear(base):
    adapter = base.adapter("demo_allA")
    last = base.calendars["demo_allA"][-1]
    a, b = sorted(set(base.frames["demo_allA"].index.get_level_values("instrument")))[:2]
    assert "999999.SZ" not in (a, b)
    with pytest.raises(UnknownSymbolError, match=r"999999\.SZ") as err:
        adapter.get_feature_df([a, "999999.SZ"], last, 5)
    assert err.value.symbols == ["999999.SZ"]
    with pytest.raises(UnknownSymbolError, match="malformed"):
        adapter.get_feature_df([a, "foo", a[:6]], last, 5)
    with pytest.raises(NoDataError, match="2021-01-04"):
        adapter.get_feature_df([a], "2020-06-01", 5)
    with pytest.raises(NoDataError, match="demo_qlib"):
        base.adapter("demo_qlib").get_feature_df([a], "2022-06-01", 5)
    with pytest.raises(InsufficientHistoryError, match="window=30"):
        adapter.get_feature_df([a], "2021-01-20", 30)
    with pytest.raises(LiveDataError, match="freq"):
        adapter.get_feature_df([a], last, 5, freq="1min")
    with pytest.raises(LiveDataError, match="window"):
        adapter.get_feature_df([a], last, 0)
    declared = LiveDataAdapter(adapter.reader, universe=[a], snapshot_id="small")  # plain, ts_code, float64
    pd.testing.assert_frame_equal(declared.get_feature_df([a], last, 5), snapshot_slice(base, "demo_allA", [a], last, 5))
    with pytest.raises(UnknownSymbolError, match="universe"):
        declared.get_feature_df([a, b], last, 5)


def test_partial_window_is_explicit(base):
    adapter = base.adapter("demo_qlib")
    cal = base.calendars["demo_qlib"]
    symbols = sorted(set(base.frames["demo_qlib"].index.get_level_values("instrument")))[:25]
    short = adapter.get_feature_df(symbols, cal[9], 30, partial=True)
    assert short.attrs["partial"] and short.attrs["trading_days"] == 10
    assert short.attrs["window"] == [cal[0].date().isoformat(), cal[9].date().isoformat()]
    pd.testing.assert_frame_equal(short, snapshot_slice(base, "demo_qlib", symbols, cal[9], 30), check_exact=True)


def test_known_symbols_without_rows_are_reported_not_invented(base):
    """Delisted before the window, or listed after ``now``: no rows (as in the snapshot), named in attrs."""
    sid = "demo_allA"
    frame, cal = base.frames[sid], base.calendars[sid]
    spans = pd.Series(frame.index.get_level_values("datetime"), index=frame.index.get_level_values("instrument")).groupby(level=0).agg(["min", "max"])
    delisted = spans.index[spans["max"] < cal[-100]][0]
    late_ipo = spans.index[spans["min"] > cal[100]][0]
    late = base.adapter(sid).get_feature_df([late_ipo, delisted], cal[-1], 20)
    assert late.attrs["absent"] == [delisted] and set(late.index.get_level_values("instrument")) == {late_ipo}
    early = base.adapter(sid).get_feature_df([late_ipo], cal[99], 20)
    assert early.empty and early.attrs["absent"] == [late_ipo] and list(early.columns) == list(frame.columns)

"""A deterministic synthetic A-share market written into the real AIstock schema.

What it contains, because real markets contain it and the exporter must survive it:
SH/SZ/BJ codes, Chinese holidays in the trade calendar, IPOs inside the range, delisted instruments,
suspensions (trading days without a row), cash dividends and bonus-share splits whose ex-dates restate the
whole forward-adjusted (qfq) history of the instrument, and two factor tables in Tushare units (one with
``numeric`` columns).

Price model (per instrument, vectorised): raw close follows a log random walk with board price limits
(±10 %, ±20 % for 300/688, ±30 % for BJ). On an ex-date the reference price is
``prev_close * (1 - dividend_yield) / split_ratio``; the Tushare-style cumulative adjustment factor grows by
the inverse of that. qfq prices are ``floor(raw_li * adj_factor / adj_factor_latest + 0.5)`` — the same
integer formula the SQL restatement in :func:`advance_market` uses, so both paths agree to the 厘.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from aistock_pipelines.demo import cn_calendar
from aistock_pipelines.demo.bulk_load import copy_frame
from aistock_pipelines.demo.indices import Life, advance_research_tables, research_tables
from aistock_pipelines.demo.market_schema import DDL, DEMO_TABLES, INDEXES

SOURCE = "demo"


class DemoMarketError(RuntimeError):
    pass


@dataclass(frozen=True)
class MarketSpec:
    """Size and shape of the synthetic market. Defaults: the demo (≈ 320 × 850 days ≈ 0.26 M bars)."""

    n_instruments: int = 320
    start: date = date(2021, 1, 4)
    n_trading_days: int = 850
    seed: int = 20240601
    ipo_fraction: float = 0.10
    delist_fraction: float = 0.05
    suspended_fraction: float = 0.15
    dividend_probability: float = 0.6  # per instrument and year
    split_fraction: float = 0.12
    factor_tables: bool = True

    def to_json(self) -> dict:
        d = asdict(self)
        d["start"] = self.start.isoformat()
        return d


@dataclass
class SeedSummary:
    first_date: date
    last_date: date
    trading_days: int
    instruments: int
    bars: int
    holidays: int
    ipos: int
    delistings: int
    suspended_instruments: int
    suspension_days: int
    events: int
    exchanges: dict[str, int] = field(default_factory=dict)


@dataclass
class AdvanceResult:
    trade_date: date
    bars: int
    suspended: list[str]
    restated: list[str]


# --------------------------------------------------------------------------------------------- instruments

_PREFIXES = {
    "SH": [("600", 3), ("601", 3), ("603", 3), ("605", 3), ("688", 3)],
    "SZ": [("000", 3), ("001", 3), ("002", 3), ("300", 3)],
    "BJ": [("430", 3), ("83", 4), ("87", 4)],
}


def _limit(code: str) -> float:
    if code.endswith(".BJ"):
        return 0.30
    if code.startswith(("300", "688")):
        return 0.20
    return 0.10


def _make_codes(rng: np.random.Generator, n: int) -> list[str]:
    n_bj = max(1, round(n * 0.08))
    n_sz = max(1, round(n * 0.42))
    n_sh = max(1, n - n_bj - n_sz)
    codes: list[str] = []
    for exchange, count in (("SH", n_sh), ("SZ", n_sz), ("BJ", n_bj)):
        chosen: set[str] = set()
        prefixes = _PREFIXES[exchange]
        while len(chosen) < count:
            prefix, digits = prefixes[int(rng.integers(len(prefixes)))]
            chosen.add(f"{prefix}{int(rng.integers(10**digits)):0{digits}d}.{exchange}")
        codes.extend(sorted(chosen))
    return codes


# ------------------------------------------------------------------------------------------- generation


def _qfq(raw_li: np.ndarray, af: np.ndarray, anchor: float) -> np.ndarray:
    """Forward-adjusted 厘 from raw 厘: same IEEE operations as the SQL restatement."""
    return np.floor(raw_li.astype(np.float64) * af / anchor + 0.5).astype(np.int64)


def _instrument_frames(code: str, days: pd.DatetimeIndex, spec: MarketSpec, rng: np.random.Generator) -> dict:
    """Simulate one instrument over the trading days; returns its life cycle and per-row arrays."""
    n_days = len(days)
    first = 0
    if rng.random() < spec.ipo_fraction and n_days > 200:
        first = int(rng.integers(20, n_days - 120))
    last = n_days - 1
    if rng.random() < spec.delist_fraction and n_days > 300 and max(first + 100, 150) < n_days - 30:
        # (an IPO in the last ~130 days is not also delisted: it would not have 100 trading days)
        last = int(rng.integers(max(first + 100, 150), n_days - 30))
    active = np.zeros(n_days, dtype=bool)
    active[first : last + 1] = True
    suspended_days = 0
    if rng.random() < spec.suspended_fraction:
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.integers(1, 16))
            s = int(rng.integers(first + 1, max(first + 2, last - length)))
            active[s : s + length] = False
        active[first] = True
        active[last] = True
        suspended_days = int((~active[first : last + 1]).sum())
    idx = np.flatnonzero(active)
    n = len(idx)

    # Corporate actions on ex-dates (row positions, never the first row).
    div_yield = np.zeros(n)
    split = np.ones(n)
    row_dates = days[idx]
    for year in sorted(set(row_dates.year)):
        if rng.random() < spec.dividend_probability:
            season = np.flatnonzero((row_dates.year == year) & (row_dates.month >= 5) & (row_dates.month <= 7))
            season = season[season > 0]
            if len(season):
                div_yield[int(rng.choice(season))] = float(rng.uniform(0.008, 0.045))
    if rng.random() < spec.split_fraction and n > 10:
        split[int(rng.integers(1, n))] = float(rng.choice([1.2, 1.3, 1.5, 2.0]))
    event = (div_yield > 0) | (split != 1.0)

    limit = _limit(code)
    sigma = float(rng.uniform(0.012, 0.032))
    r = np.clip(rng.normal(0.0002, sigma, n), math.log(1 - limit) + 1e-3, math.log(1 + limit) - 1e-3)
    ref_step = np.log((1 - div_yield) / split)  # how the reference price moves on ex-dates
    log_close = np.cumsum(r + ref_step)
    log_close += math.log(float(rng.uniform(4, 60))) - log_close[0]
    lowest = log_close.min()
    if lowest < math.log(2.0):  # keep raw prices above 2 yuan: shift the whole path
        log_close += math.log(2.0) - lowest
    close = np.exp(log_close)
    ref = np.empty(n)
    ref[0] = close[0] / math.exp(r[0])
    ref[1:] = close[:-1] * (1 - div_yield[1:]) / split[1:]
    up, down = ref * (1 + limit), ref * (1 - limit)
    open_ = np.clip(ref * np.exp(rng.normal(0, sigma / 3, n)), down, up)
    high = np.minimum(np.maximum(open_, close) * (1 + np.abs(rng.normal(0, sigma / 2, n))), up)
    low = np.maximum(np.minimum(open_, close) * (1 - np.abs(rng.normal(0, sigma / 2, n))), down)

    raw = {k: np.floor(v * 1000 + 0.5).astype(np.int64) for k, v in
           (("open_li", open_), ("high_li", high), ("low_li", low), ("close_li", close))}
    raw["high_li"] = np.maximum.reduce([raw["high_li"], raw["open_li"], raw["close_li"]])
    raw["low_li"] = np.minimum.reduce([raw["low_li"], raw["open_li"], raw["close_li"]])
    base_volume = math.exp(rng.normal(math.log(60_000), 0.9))
    volume = np.maximum(1, (base_volume * np.exp(rng.normal(0, 0.45, n)) * (1 + 8 * np.abs(r))).astype(np.int64))
    vwap_yuan = (raw["open_li"] + raw["high_li"] + raw["low_li"] + raw["close_li"]) / 4000.0
    amount = np.floor(volume * 100 * vwap_yuan * 1000 + 0.5).astype(np.int64)

    af = np.cumprod(np.where(event, split / (1 - div_yield), 1.0))
    total_share = float(rng.uniform(2e4, 5e5)) * np.cumprod(split)  # 万股
    return {
        "code": code, "idx": idx, "raw": raw, "volume": volume, "amount": amount, "af": af,
        "first": first, "last": last, "suspended_days": suspended_days, "events": int(event.sum()),
        "total_share": total_share, "sigma": sigma, "r": r,
    }


def _factor_rows(sim: dict, dates: pd.DatetimeIndex, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tushare-unit factor rows for the instrument's bars (a few rows missing, as in real feeds)."""
    n = len(dates)
    close_yuan = sim["raw"]["close_li"] / 1000.0
    shares = sim["total_share"]
    float_share = shares * 0.7
    turnover = sim["volume"] * 100 / (float_share * 1e4) * 100  # %
    eps = float(rng.uniform(-0.5, 3.0))
    pe = np.where(eps > 0, close_yuan / max(eps, 1e-6), np.nan)
    basic = pd.DataFrame({
        "ts_code": sim["code"], "trade_date": dates.date,
        "turnover_rate": np.round(turnover, 4),
        "volume_ratio": np.round(np.exp(rng.normal(0, 0.3, n)), 2),
        "pe_ttm": np.round(pe, 4),
        "pb": np.round(close_yuan / float(rng.uniform(2, 20)), 4),
        "total_share": np.round(shares, 4),
        "float_share": np.round(float_share, 4),
        "total_mv": np.round(close_yuan * shares, 4),
        "circ_mv": np.round(close_yuan * float_share, 4),
    })
    amount_wan = sim["amount"] / 1000.0 / 1e4
    buy = amount_wan * rng.uniform(0.05, 0.3, n)
    sell = amount_wan * rng.uniform(0.05, 0.3, n)
    flow = pd.DataFrame({
        "ts_code": sim["code"], "trade_date": dates.date,
        "buy_lg_amount": np.round(buy, 2), "sell_lg_amount": np.round(sell, 2),
        "net_mf_amount": np.round(buy - sell, 2),
        "net_mf_vol": np.round((buy - sell) * 1e4 / np.maximum(close_yuan, 0.01) / 100).astype(np.int64),
    })
    return basic[rng.random(n) > 0.02], flow[rng.random(n) > 0.05]


def _ensure_demo_or_empty(conn: Connection) -> None:
    has_kline = conn.execute(sa.text("SELECT to_regclass('market.kline_daily_qfq') IS NOT NULL")).scalar()
    has_marker = conn.execute(sa.text("SELECT to_regclass('market.demo_market_info') IS NOT NULL")).scalar()
    if has_kline and not has_marker:
        raise DemoMarketError(
            "refusing to seed: market.kline_daily_qfq exists and is not a demo market "
            "(no market.demo_market_info). Point AISTOCK_DB_URL at an empty database or unset it for the embedded one."
        )


def seed_demo_market(engine: Engine, spec: MarketSpec = MarketSpec()) -> SeedSummary:
    """(Re)create the demo tables and fill them. Refuses to touch a database holding a real market."""
    rng = np.random.default_rng(spec.seed)
    days = pd.DatetimeIndex(cn_calendar.trading_days_from(spec.start, spec.n_trading_days))
    codes = _make_codes(rng, spec.n_instruments)
    children = np.random.SeedSequence(spec.seed).spawn(len(codes))

    bars, adj, basics, flows, basic_info, lives = [], [], [], [], [], []
    ipos = delistings = suspended_instruments = suspension_days = events = 0
    for code, child in zip(codes, children):
        irng = np.random.default_rng(child)
        sim = _instrument_frames(code, days, spec, irng)
        dates = days[sim["idx"]]
        anchor = float(sim["af"][-1])
        frame = pd.DataFrame({"ts_code": code, "trade_date": dates.date, **sim["raw"],
                              "volume_hand": sim["volume"], "amount_li": sim["amount"]})
        qfq = frame.copy()
        for col in ("open_li", "high_li", "low_li", "close_li"):
            qfq[col] = _qfq(frame[col].to_numpy(), sim["af"], anchor)
        bars.append((frame, qfq))
        adj.append(pd.DataFrame({"ts_code": code, "trade_date": dates.date, "adj_factor": sim["af"]}))
        if spec.factor_tables:
            b, f = _factor_rows(sim, dates, irng)
            basics.append(b)
            flows.append(f)
        delisted = sim["last"] < len(days) - 1
        lives.append(Life(code, sim["first"], sim["last"]))
        basic_info.append({
            "ts_code": code, "name": f"DEMO{code[:6]}", "exchange": {"SH": "SSE", "SZ": "SZSE", "BJ": "BSE"}[code[-2:]],
            "list_date": days[sim["first"]].date() if sim["first"] > 0 else spec.start - timedelta(days=int(irng.integers(400, 6000))),
            "delist_date": (days[sim["last"]] + pd.Timedelta(days=1)).date() if delisted else None,
        })
        ipos += sim["first"] > 0
        delistings += delisted
        suspended_instruments += sim["suspended_days"] > 0
        suspension_days += sim["suspended_days"]
        events += sim["events"]

    calendar = cn_calendar.calendar_days(spec.start - timedelta(days=10), days[-1].date() + timedelta(days=400))
    raw_all = pd.concat([b[0] for b in bars], ignore_index=True)
    qfq_all = pd.concat([b[1] for b in bars], ignore_index=True)
    with engine.begin() as conn:
        _ensure_demo_or_empty(conn)
        for table in DEMO_TABLES:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table} CASCADE"))
        conn.exec_driver_sql(DDL)
        copy_frame(conn, "market.trading_calendar", pd.DataFrame(calendar, columns=["cal_date", "is_trading"]))
        copy_frame(conn, "market.stock_basic", pd.DataFrame(basic_info))
        copy_frame(conn, "market.kline_daily_raw", raw_all.assign(adjust_type="none", source=SOURCE))
        copy_frame(conn, "market.kline_daily_qfq", qfq_all.assign(adjust_type="qfq", source=SOURCE))
        copy_frame(conn, "market.adj_factor", pd.concat(adj, ignore_index=True))
        if spec.factor_tables:
            copy_frame(conn, "market.daily_basic", pd.concat(basics, ignore_index=True))
            copy_frame(conn, "market.moneyflow", pd.concat(flows, ignore_index=True))
        for table, rows in research_tables(days, lives, spec.seed).items():
            copy_frame(conn, table, rows)
        conn.exec_driver_sql(INDEXES)
        conn.execute(sa.text("INSERT INTO market.demo_market_info (spec) VALUES (CAST(:spec AS jsonb))"),
                     {"spec": json.dumps(spec.to_json())})
    for table in ("market.kline_daily_qfq", "market.kline_daily_raw", "market.adj_factor"):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"ANALYZE {table}"))
    holidays = sum(1 for d, t in calendar if not t and d.weekday() < 5 and days[0].date() <= d <= days[-1].date())
    return SeedSummary(
        first_date=days[0].date(), last_date=days[-1].date(), trading_days=len(days), instruments=len(codes),
        bars=len(raw_all), holidays=holidays, ipos=ipos, delistings=delistings,
        suspended_instruments=suspended_instruments, suspension_days=suspension_days, events=events,
        exchanges={ex: sum(c.endswith(ex) for c in codes) for ex in ("SH", "SZ", "BJ")},
    )


# ------------------------------------------------------------------------------------------------ advance

_RESTATE_SQL = """
UPDATE market.kline_daily_qfq AS q
SET open_li  = floor(r.open_li::float8  * a.adj_factor / :anchor + 0.5)::int4,
    high_li  = floor(r.high_li::float8  * a.adj_factor / :anchor + 0.5)::int4,
    low_li   = floor(r.low_li::float8   * a.adj_factor / :anchor + 0.5)::int4,
    close_li = floor(r.close_li::float8 * a.adj_factor / :anchor + 0.5)::int4
FROM market.kline_daily_raw AS r
JOIN market.adj_factor AS a ON a.ts_code = r.ts_code AND a.trade_date = r.trade_date
WHERE q.ts_code = :code AND r.ts_code = :code AND r.trade_date = q.trade_date
"""


def advance_market(engine: Engine, events: int = 3, seed: int | None = None) -> AdvanceResult:
    """Append the next trading day: new bars for every live instrument (a few suspended), and for
    ``events`` instruments an ex-dividend/split on that day, which restates their whole qfq history.
    Deterministic for a given database state and seed."""
    with engine.begin() as conn:
        info = conn.execute(sa.text("SELECT spec FROM market.demo_market_info")).scalar()
        if info is None:
            raise DemoMarketError("no demo market here: run `aistock-pipelines demo seed` first")
        seed = int(info["seed"]) if seed is None else seed
        last = conn.execute(sa.text("SELECT max(trade_date) FROM market.kline_daily_raw")).scalar()
        day = conn.execute(sa.text(
            "SELECT min(cal_date) FROM market.trading_calendar WHERE is_trading AND cal_date > :d"), {"d": last}).scalar()
        if day is None:
            raise DemoMarketError(f"the trade calendar ends at {last}; extend market.trading_calendar")
        prev = pd.DataFrame(conn.execute(sa.text("""
            SELECT DISTINCT ON (r.ts_code) r.ts_code, r.close_li, r.volume_hand, a.adj_factor
            FROM market.kline_daily_raw r
            JOIN market.adj_factor a USING (ts_code, trade_date)
            JOIN market.stock_basic b USING (ts_code)
            WHERE b.delist_date IS NULL OR b.delist_date > :day
            ORDER BY r.ts_code, r.trade_date DESC"""), {"day": day}).all(),
            columns=["ts_code", "close_li", "volume_hand", "adj_factor"]).sort_values("ts_code", ignore_index=True)
        rng = np.random.default_rng([seed, day.toordinal()])
        n = len(prev)
        suspended = rng.random(n) < 0.01
        div_yield = np.zeros(n)
        split = np.ones(n)
        candidates = np.flatnonzero(~suspended)
        chosen = rng.choice(candidates, size=min(events, len(candidates)), replace=False) if events else []
        for i in chosen:
            div_yield[i] = float(rng.uniform(0.01, 0.04))
            if rng.random() < 0.3:
                split[i] = 1.3
        limit = np.array([_limit(c) for c in prev["ts_code"]])
        prev_close = prev["close_li"].to_numpy() / 1000.0
        ref = prev_close * (1 - div_yield) / split
        r = np.clip(rng.normal(0.0002, 0.02, n), np.log(1 - limit) + 1e-3, np.log(1 + limit) - 1e-3)
        close = ref * np.exp(r)
        open_ = np.clip(ref * np.exp(rng.normal(0, 0.007, n)), ref * (1 - limit), ref * (1 + limit))
        high = np.minimum(np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.01, n))), ref * (1 + limit))
        low = np.maximum(np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.01, n))), ref * (1 - limit))
        raw = pd.DataFrame({"ts_code": prev["ts_code"], "trade_date": day})
        for col, values in (("open_li", open_), ("high_li", high), ("low_li", low), ("close_li", close)):
            raw[col] = np.floor(values * 1000 + 0.5).astype(np.int64)
        raw["high_li"] = raw[["high_li", "open_li", "close_li"]].max(axis=1)
        raw["low_li"] = raw[["low_li", "open_li", "close_li"]].min(axis=1)
        raw["volume_hand"] = np.maximum(1, (prev["volume_hand"].to_numpy() * np.exp(rng.normal(0, 0.3, n))).astype(np.int64))
        vwap = (raw["open_li"] + raw["high_li"] + raw["low_li"] + raw["close_li"]) / 4000.0
        raw["amount_li"] = np.floor(raw["volume_hand"] * 100 * vwap * 1000 + 0.5).astype(np.int64)
        af = prev["adj_factor"].to_numpy() * np.where((div_yield > 0) | (split != 1), split / (1 - div_yield), 1.0)
        live = ~suspended
        raw, af_live = raw[live], af[live]
        copy_frame(conn, "market.kline_daily_raw", raw.assign(adjust_type="none", source=SOURCE))
        # On its own latest day a qfq price equals the raw price (the anchor is that day's factor).
        copy_frame(conn, "market.kline_daily_qfq", raw.assign(adjust_type="qfq", source=SOURCE))
        copy_frame(conn, "market.adj_factor", pd.DataFrame({"ts_code": raw["ts_code"], "trade_date": day, "adj_factor": af_live}))
        if conn.execute(sa.text("SELECT to_regclass('market.daily_basic') IS NOT NULL")).scalar():
            _advance_factor_tables(conn, raw, day, rng)
        advance_research_tables(conn, day, seed)
        restated = sorted(prev["ts_code"].to_numpy()[chosen].tolist()) if len(chosen) else []
        for code in restated:
            anchor = float(af[prev.index[prev["ts_code"] == code][0]])
            conn.execute(sa.text(_RESTATE_SQL), {"code": code, "anchor": anchor})
    return AdvanceResult(trade_date=day, bars=int(live.sum()), suspended=sorted(prev["ts_code"][suspended]), restated=restated)


def _advance_factor_tables(conn: Connection, raw: pd.DataFrame, day: date, rng: np.random.Generator) -> None:
    shares = pd.DataFrame(conn.execute(sa.text("""
        SELECT DISTINCT ON (ts_code) ts_code, total_share, float_share FROM market.daily_basic
        ORDER BY ts_code, trade_date DESC""")).all(), columns=["ts_code", "total_share", "float_share"])
    frame = raw.merge(shares, on="ts_code", how="inner")
    close = frame["close_li"] / 1000.0
    n = len(frame)
    basic = pd.DataFrame({
        "ts_code": frame["ts_code"], "trade_date": day,
        "turnover_rate": np.round(frame["volume_hand"] * 100 / (frame["float_share"] * 1e4) * 100, 4),
        "volume_ratio": np.round(np.exp(rng.normal(0, 0.3, n)), 2), "pe_ttm": np.nan,
        "pb": np.round(close / 5.0, 4), "total_share": frame["total_share"], "float_share": frame["float_share"],
        "total_mv": np.round(close * frame["total_share"], 4), "circ_mv": np.round(close * frame["float_share"], 4),
    })
    amount_wan = frame["amount_li"] / 1000.0 / 1e4
    buy, sell = amount_wan * rng.uniform(0.05, 0.3, n), amount_wan * rng.uniform(0.05, 0.3, n)
    flow = pd.DataFrame({
        "ts_code": frame["ts_code"], "trade_date": day, "buy_lg_amount": np.round(buy, 2),
        "sell_lg_amount": np.round(sell, 2), "net_mf_amount": np.round(buy - sell, 2),
        "net_mf_vol": np.round((buy - sell) * 1e4 / close / 100).astype(np.int64),
    })
    copy_frame(conn, "market.daily_basic", basic)
    copy_frame(conn, "market.moneyflow", flow)

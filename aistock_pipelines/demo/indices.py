"""The demo market's research tables: index bars, index constituents and a point-in-time universe.

What they contain, because Qlib's standard workflow (``market: csi300``, ``benchmark: SH000300``) and the
exporter's universe and benchmark code must handle it:

* ``market.index_daily`` (Tushare layout: index points as ``numeric(20,4)``, ``vol`` in 手, ``amount`` in
  千元): 000300.SH from the first day, with one trading day missing (:data:`MISSING_BAR`), and 399006.SZ
  from :data:`LATE_START` trading days in, or half-way in a shorter market (an index whose history starts
  inside the range).
* ``market.index_weight`` (Tushare layout): a monthly snapshot of 000300.SH's members on the first trading
  day of each month, rebalanced in June and December; a member that delists (kept in the weight date
  before its last bar, gone from the next) and an IPO that joins at a rebalance after its listing.
* ``market.stock_universe_pit_spans`` (AIstock's own table): universe ``hs_liquid`` with open spans
  (``eligible_end`` NULL), closed ones, a stock that leaves and re-enters, spans starting before the
  calendar and on weekends, and two spans that touch (no trading day between them).

Everything is drawn from generators of its own (``[seed, …]``), so the other demo tables stay exactly
what they were before these tables existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aistock_pipelines.demo.bulk_load import copy_frame

CSI300 = "000300.SH"
CHINEXT = "399006.SZ"
HS_LIQUID = "hs_liquid"
MISSING_BAR = 100  # 000300.SH has no bar on this trading day (position in the demo's days)
LATE_START = 60  # 399006.SZ's first bar (position)
INDEX_MEMBERS = 60
LIQUID_MEMBERS = 100
_INDICES = ((CSI300, 3900.0, 0.011, 0), (CHINEXT, 2400.0, 0.016, LATE_START))  # code, level, sigma, start


@dataclass(frozen=True)
class Life:
    """One demo instrument's life in positions of the demo's trading days (first and last bar)."""

    code: str
    first: int
    last: int


def research_tables(days: pd.DatetimeIndex, lives: list[Life], seed: int) -> dict[str, pd.DataFrame]:
    """The three tables' rows for a market with these trading days and instrument lives."""
    return {
        "market.index_daily": index_bars(days, seed),
        "market.index_weight": index_weights(days, lives, seed),
        "market.stock_universe_pit_spans": pit_spans(days, lives, seed),
    }


# --------------------------------------------------------------------------------------------- index bars


def _bar_rows(code: str, dates: pd.DatetimeIndex, pre_close0: float, sigma: float,
              rng: np.random.Generator) -> pd.DataFrame:
    """Tushare index bars for consecutive ``dates`` starting from the close before them."""
    n = len(dates)
    r = rng.normal(0.0003, sigma, n)
    close = np.round(pre_close0 * np.exp(np.cumsum(r)), 4)
    pre_close = np.concatenate([[round(pre_close0, 4)], close])[:n]
    open_ = np.round(pre_close * np.exp(rng.normal(0, sigma / 3, n)), 4)
    high = np.round(np.maximum(open_, close) * (1 + np.abs(rng.normal(0, sigma / 2, n))), 4)
    low = np.round(np.minimum(open_, close) * (1 - np.abs(rng.normal(0, sigma / 2, n))), 4)
    vol = np.round(np.exp(rng.normal(np.log(1.2e8), 0.3, n)), 2)  # 手
    amount = np.round(vol * 100 * rng.uniform(15, 25, n) / 1000, 3)  # 千元
    change = np.round(close - pre_close, 4)
    return pd.DataFrame({
        "ts_code": code, "trade_date": dates.date, "close": close, "open": open_, "high": high, "low": low,
        "pre_close": pre_close, "change": change, "pct_chg": np.round(change / pre_close * 100, 4),
        "vol": vol, "amount": amount,
    })


def index_bars(days: pd.DatetimeIndex, seed: int) -> pd.DataFrame:
    """Every index's bars on every trading day from its start (000300.SH lacks :data:`MISSING_BAR`)."""
    parts = []
    for k, (code, level, sigma, start) in enumerate(_INDICES):
        start = min(start, len(days) // 2)  # a short demo (bin/demo --days 45) still has bars of every index
        rows = _bar_rows(code, days[start:], level, sigma, np.random.default_rng([seed, 300, k]))
        if code == CSI300 and MISSING_BAR < len(days):
            rows = rows[rows.trade_date != days[MISSING_BAR].date()]
        parts.append(rows)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------ index weights


def _month_starts(days: pd.DatetimeIndex) -> list[int]:
    """Positions of the first trading day of each month."""
    month = days.year * 12 + days.month
    return [0] + [i for i in range(1, len(days)) if month[i] != month[i - 1]]


def _eligible(lives: list[Life], p: int, exclude: set[str], n_days: int) -> list[str]:
    """SH/SZ codes listed 20 trading days before position ``p`` (or from the start) and trading 20 more
    (or to the end)."""
    return sorted(x.code for x in lives if x.code[-2:] in ("SH", "SZ") and x.first <= max(p - 20, 0)
                  and x.last >= min(p + 20, n_days - 1) and x.code not in exclude)


def _draw(rng: np.random.Generator, candidates: list[str], k: int) -> set[str]:
    return set(rng.choice(candidates, size=min(k, len(candidates)), replace=False).tolist()) if k > 0 and candidates else set()


def _special(lives: list[Life], n_days: int) -> tuple[Life | None, Life | None]:
    """The member that delists (listed from the start, last bar mid-range) and the IPO that joins later."""
    delisting = [x for x in lives if x.code[-2:] in ("SH", "SZ") and x.first == 0 and 40 < x.last < n_days - 30]
    ipos = [x for x in lives if x.code[-2:] in ("SH", "SZ") and 0 < x.first < n_days - 150 and x.last == n_days - 1]
    return (delisting[0] if delisting else None), (min(ipos, key=lambda x: x.first) if ipos else None)


def _weights(rng: np.random.Generator, day: pd.Timestamp, members: set[str]) -> pd.DataFrame:
    codes = sorted(members)
    w = rng.lognormal(0, 0.6, len(codes))
    return pd.DataFrame({"index_code": CSI300, "con_code": codes, "trade_date": day.date(),
                         "weight": np.round(w / w.sum() * 100, 4)})


def index_weights(days: pd.DatetimeIndex, lives: list[Life], seed: int) -> pd.DataFrame:
    """Monthly member snapshots of 000300.SH (weights in percent, summing to 100 per date)."""
    rng = np.random.default_rng([seed, 301])
    last = {x.code: x.last for x in lives}
    delisting, ipo = _special(lives, len(days))
    keep = {delisting.code} if delisting is not None else set()  # stays until it delists
    pool = _eligible(lives, 0, set(), len(days))
    size = min(INDEX_MEMBERS, max(1, len(pool) // 3))
    members = keep | _draw(rng, [c for c in pool if c not in keep], size - len(keep))
    ipo_pending = ipo is not None
    rows = []
    for p in _month_starts(days):
        members = {c for c in members if last[c] >= p}  # delisted before this weight date: gone
        out: set[str] = set()
        if p > 0 and days[p].month in (6, 12) and len(members) > 6:  # the semiannual rebalance
            out = _draw(rng, sorted(members - keep), 3)
            members -= out
            if ipo_pending and ipo.first + 20 <= p:
                members.add(ipo.code)
                ipo_pending = False
        members |= _draw(rng, _eligible(lives, p, members | out, len(days)), size - len(members))
        rows.append(_weights(rng, days[p], members))
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------------------------------------ PIT spans


def pit_spans(days: pd.DatetimeIndex, lives: list[Life], seed: int) -> pd.DataFrame:
    """Universe ``hs_liquid``: spans in calendar dates, ``eligible_end`` inclusive (None = still eligible)."""
    rng = np.random.default_rng([seed, 302])
    candidates = sorted((x for x in lives if x.code[-2:] in ("SH", "SZ")), key=lambda x: x.code)
    chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), size=min(LIQUID_MEMBERS, len(candidates)),
                                                       replace=False))] if candidates else []
    n = len(days)
    rows: list[tuple[str, date, date | None]] = []
    for k, x in enumerate(chosen):
        start = days[x.first].date() if x.first else days[0].date() - timedelta(days=int(rng.integers(30, 900)))
        end = days[x.last].date() if x.last < n - 1 else None  # a delisted stock's eligibility ends with it
        kind = k % 5
        if kind == 1 and x.last - x.first > 200:  # left, then re-entered (two lines in the file)
            a = int(rng.integers(x.first + 40, x.first + (x.last - x.first) // 2))
            b = a + int(rng.integers(20, 60))
            rows += [(x.code, start, days[a].date()), (x.code, days[b].date(), end)]
        elif kind == 2 and x.last - x.first > 100:  # a closed span
            rows.append((x.code, start, days[int(rng.integers(x.first + 50, x.last))].date()))
        elif kind == 3 and x.last - x.first > 100:  # starts on a weekend, inside the range
            d = days[int(rng.integers(x.first + 10, x.first + 90))].date()
            rows.append((x.code, d - timedelta(days=(d.weekday() + 2) % 7 or 7), end))
        elif kind == 4 and x.last - x.first > 100:  # two spans that touch: no trading day between them
            a = int(rng.integers(x.first + 30, x.last - 30))
            rows += [(x.code, start, days[a].date()), (x.code, days[a].date() + timedelta(days=1), end)]
        else:
            rows.append((x.code, start, end))
    return pd.DataFrame(rows, columns=["ts_code", "eligible_start", "eligible_end"]).assign(universe_key=HS_LIQUID)[
        ["universe_key", "ts_code", "eligible_start", "eligible_end"]]


# --------------------------------------------------------------------------------------------------- advance


def advance_research_tables(conn: Connection, day: date, seed: int) -> None:
    """``advance_market``'s part: a bar for every index on ``day`` and, on a new month, a new weight date
    (the latest members without delisted ones, one swapped for a listed non-member)."""
    if not conn.execute(sa.text("SELECT to_regclass('market.index_daily') IS NOT NULL")).scalar():
        return  # a demo seeded before these tables existed
    last = conn.execute(sa.text("""
        SELECT DISTINCT ON (ts_code) ts_code, close FROM market.index_daily
        ORDER BY ts_code, trade_date DESC""")).all()
    for k, (code, close) in enumerate(sorted(last)):
        sigma = dict((c, s) for c, _, s, _ in _INDICES).get(code, 0.012)
        rows = _bar_rows(code, pd.DatetimeIndex([day]), float(close), sigma, np.random.default_rng([seed, day.toordinal(), 1, k]))
        copy_frame(conn, "market.index_daily", rows)
    latest = conn.execute(sa.text("SELECT max(trade_date) FROM market.index_weight WHERE index_code = :c"),
                          {"c": CSI300}).scalar()
    if latest is None or (latest.year, latest.month) == (day.year, day.month):
        return
    members = set(conn.execute(sa.text("""
        SELECT w.con_code FROM market.index_weight w JOIN market.stock_basic b ON b.ts_code = w.con_code
        WHERE w.index_code = :c AND w.trade_date = :d AND (b.delist_date IS NULL OR b.delist_date > :day)"""),
        {"c": CSI300, "d": latest, "day": day}).scalars())
    listed = conn.execute(sa.text("""
        SELECT ts_code FROM market.stock_basic WHERE list_date <= :day AND delist_date IS NULL
        AND right(ts_code, 2) IN ('SH', 'SZ') ORDER BY ts_code"""), {"day": day}).scalars().all()
    rng = np.random.default_rng([seed, day.toordinal(), 2])
    outside = [c for c in listed if c not in members]
    if members and outside:
        members.discard(sorted(members)[int(rng.integers(len(members)))])
        members.add(outside[int(rng.integers(len(outside)))])
    copy_frame(conn, "market.index_weight", _weights(rng, pd.Timestamp(day), members))

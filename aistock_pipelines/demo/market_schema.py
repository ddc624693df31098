"""DDL of the AIstock source tables, exactly as the real database lays them out (docs/design.md §Data model).

In production these tables already exist (TimescaleDB hypertables); the project never creates them there.
The demo market creates them in the embedded database so that the exporter reads the very same layout.
"""

from __future__ import annotations

KLINE_TABLES = ("kline_daily_qfq", "kline_daily_raw", "kline_daily_hfq")

_KLINE = """
CREATE TABLE market.{name} (
    ts_code     varchar(9) NOT NULL,
    trade_date  date       NOT NULL,
    open_li     int4       NOT NULL,
    high_li     int4       NOT NULL,
    low_li      int4       NOT NULL,
    close_li    int4       NOT NULL,
    volume_hand int8       NOT NULL,
    amount_li   int8       NOT NULL,
    adjust_type text       NOT NULL,
    source      text       NOT NULL
);
"""

DEMO_TABLES = (
    "market.kline_daily_qfq",
    "market.kline_daily_raw",
    "market.adj_factor",
    "market.trading_calendar",
    "market.stock_basic",
    "market.daily_basic",
    "market.moneyflow",
    "market.index_daily",
    "market.index_weight",
    "market.stock_universe_pit_spans",
    "market.demo_market_info",
)

DDL = (
    "CREATE SCHEMA IF NOT EXISTS market;"
    + _KLINE.format(name="kline_daily_qfq")
    + _KLINE.format(name="kline_daily_raw")
    + """
CREATE TABLE market.adj_factor (
    ts_code    text             NOT NULL,
    trade_date date             NOT NULL,
    adj_factor double precision NOT NULL
);
CREATE TABLE market.trading_calendar (
    cal_date   date    PRIMARY KEY,
    is_trading boolean NOT NULL
);
CREATE TABLE market.stock_basic (
    ts_code     varchar(9) PRIMARY KEY,
    name        text       NOT NULL,
    exchange    text       NOT NULL,
    list_date   date       NOT NULL,
    delist_date date
);
-- Tushare daily_basic units: turnover in percent, shares in 万股 (10k shares), market value in 万元 (10k yuan).
CREATE TABLE market.daily_basic (
    ts_code       varchar(9)       NOT NULL,
    trade_date    date             NOT NULL,
    turnover_rate double precision,
    volume_ratio  double precision,
    pe_ttm        double precision,
    pb            double precision,
    total_share   double precision,
    float_share   double precision,
    total_mv      numeric(20, 4),
    circ_mv       numeric(20, 4)
);
-- Tushare moneyflow units: amounts in 万元, volume in 手 (lots of 100 shares).
CREATE TABLE market.moneyflow (
    ts_code        varchar(9)       NOT NULL,
    trade_date     date             NOT NULL,
    buy_lg_amount  double precision,
    sell_lg_amount double precision,
    net_mf_amount  numeric(20, 2),
    net_mf_vol     int8
);
-- Tushare index_daily: index points (yuan) as numeric(20,4), vol in 手, amount in 千元. Not adjusted.
CREATE TABLE market.index_daily (
    ts_code    varchar(32) NOT NULL,
    trade_date date        NOT NULL,
    close      numeric(20, 4),
    open       numeric(20, 4),
    high       numeric(20, 4),
    low        numeric(20, 4),
    pre_close  numeric(20, 4),
    change     numeric(20, 4),
    pct_chg    numeric(20, 4),
    vol        numeric,
    amount     numeric
);
-- Tushare index_weight: one snapshot of an index's members per weight date (monthly); weight in percent.
CREATE TABLE market.index_weight (
    index_code varchar(32) NOT NULL,
    con_code   varchar(32) NOT NULL,
    trade_date date        NOT NULL,
    weight     double precision
);
-- AIstock's point-in-time universe membership: eligible_end inclusive, NULL = still eligible.
CREATE TABLE market.stock_universe_pit_spans (
    universe_key   text        NOT NULL,
    ts_code        varchar(32) NOT NULL,
    eligible_start date        NOT NULL,
    eligible_end   date
);
-- Marks a database as holding the synthetic market, so seeding never overwrites a real one.
CREATE TABLE market.demo_market_info (
    id        int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    spec      jsonb       NOT NULL,
    seeded_at timestamptz NOT NULL DEFAULT now()
);
"""
)

#: Keys and indexes, built after the bulk load (one sort per index instead of row-by-row maintenance).
INDEXES = """
ALTER TABLE market.kline_daily_qfq ADD PRIMARY KEY (ts_code, trade_date);
CREATE INDEX ON market.kline_daily_qfq (trade_date);
ALTER TABLE market.kline_daily_raw ADD PRIMARY KEY (ts_code, trade_date);
CREATE INDEX ON market.kline_daily_raw (trade_date);
ALTER TABLE market.adj_factor ADD PRIMARY KEY (ts_code, trade_date);
ALTER TABLE market.daily_basic ADD PRIMARY KEY (ts_code, trade_date);
ALTER TABLE market.moneyflow ADD PRIMARY KEY (ts_code, trade_date);
ALTER TABLE market.index_daily ADD PRIMARY KEY (ts_code, trade_date);
ALTER TABLE market.index_weight ADD PRIMARY KEY (index_code, trade_date, con_code);
ALTER TABLE market.stock_universe_pit_spans ADD PRIMARY KEY (universe_key, ts_code, eligible_start);
"""

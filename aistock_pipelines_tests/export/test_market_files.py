"""Universe files and benchmark bins written by the export itself: equal to the database day by day after a
full export and after incremental days (a new weight date, a restatement); bad declarations refused with
the previous snapshot intact."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.benchmarks import BenchmarksDecl
from aistock_pipelines.export.mapping import ExportMapping
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.export.helpers import make_exporter, read_h5
from aistock_pipelines_tests.export.test_universes import expected_pit_days, expected_weight_days, file_days

pytestmark = pytest.mark.db

START = date(2023, 1, 3)
OPTIONS = SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32", factor_tables=())


def assert_equal_to_the_database(engine, snapshot: Path) -> None:
    calendar = qlib_format.read_calendar(snapshot / "calendars" / "day.txt")
    with engine.connect() as conn:
        weights = pd.read_sql("SELECT trade_date, con_code FROM market.index_weight WHERE index_code = '000300.SH'", conn)
        pit = pd.read_sql("SELECT ts_code, eligible_start, eligible_end FROM market.stock_universe_pit_spans "
                          "WHERE universe_key = 'hs_liquid'", conn)
        last_bar = dict(conn.execute(sa.text("SELECT ts_code, max(trade_date) FROM market.kline_daily_qfq "
                                             "GROUP BY ts_code")).all())
        index = pd.read_sql(sa.text("SELECT ts_code, trade_date, close FROM market.index_daily WHERE trade_date "
                                    "BETWEEN :a AND :b"), conn, params={"a": calendar[0], "b": calendar[-1]})
    assert file_days(snapshot / "instruments" / "csi300.txt", calendar) == expected_weight_days(weights, calendar, last_bar)
    assert file_days(snapshot / "instruments" / "hs_liquid.txt", calendar) == expected_pit_days(pit, calendar, last_bar)
    position = {d: i for i, d in enumerate(calendar)}
    for code, folder in (("000300.SH", "sh000300"), ("399006.SZ", "sz399006")):
        start, values = qlib_bins.read_bin(snapshot / "features" / folder / "close.day.bin")
        rows = index[index.ts_code == code]
        expected = np.full(len(calendar) - start, np.nan, dtype=np.float32)
        expected[[position[d] - start for d in rows.trade_date]] = rows.close.astype(float).to_numpy(np.float32)
        np.testing.assert_array_equal(values, expected, err_msg=code)
    assert not any(line.startswith(("SH000300", "SZ399006"))
                   for line in (snapshot / "instruments" / "all.txt").read_text().splitlines())
    assert not {"SH000300", "SZ399006"} & set(read_h5(snapshot).index.get_level_values("instrument"))


def test_universes_and_benchmarks_follow_the_database(market_db, tmp_path):
    ex = make_exporter(market_db, tmp_path, ExportMapping(), load_snapshots_file(DEMO_SNAPSHOTS_FILE).market_files())
    engine = create_db_engine(market_db)
    ex.export_full("q", START, options=OPTIONS)
    assert_equal_to_the_database(engine, tmp_path / "q")
    before = (tmp_path / "q" / "instruments" / "csi300.txt").read_text()
    adv = advance_market(engine, events=3)
    with engine.begin() as conn:  # a new weight date on the new day: one member leaves the index
        conn.execute(sa.text(
            "INSERT INTO market.index_weight (index_code, con_code, trade_date, weight) SELECT index_code, con_code, "
            ":d, weight FROM market.index_weight WHERE index_code = '000300.SH' AND trade_date = (SELECT max(trade_date) "
            "FROM market.index_weight WHERE index_code = '000300.SH' AND trade_date < :d) AND con_code <> (SELECT "
            "min(con_code) FROM market.index_weight WHERE index_code = '000300.SH')"), {"d": adv.trade_date})
    result = ex.export_incremental("q")
    assert result.mode == "incremental" and set(adv.restated) <= set(result.restated)
    assert_equal_to_the_database(engine, tmp_path / "q")
    assert (tmp_path / "q" / "instruments" / "csi300.txt").read_text() != before
    engine.dispose()


@pytest.mark.parametrize("change, message", [
    (lambda f: replace(f, benchmarks=BenchmarksDecl(table="market.index_daily", codes=["000999.SH"])), "000999.SH"),
    (lambda f: replace(f, benchmarks=BenchmarksDecl(table="market.no_such_table", codes=["000300.SH"])), "no_such_table"),
    (lambda f: replace(f, universes={"empty": type(next(iter(f.universes.values())))(spans="nobody")}), "empty"),
])
def test_bad_declarations_are_refused_and_keep_the_previous_snapshot(market_db, tmp_path, change, message):
    declared = load_snapshots_file(DEMO_SNAPSHOTS_FILE).market_files()
    make_exporter(market_db, tmp_path, ExportMapping(), declared).export_full("q", START, options=OPTIONS)
    before = (tmp_path / "q").resolve()
    bad = make_exporter(market_db, tmp_path, ExportMapping(), change(declared))
    with pytest.raises(ValueError, match=message):
        bad.export_full("q", START, options=OPTIONS)
    assert (tmp_path / "q").resolve() == before and [p for p in (tmp_path / ".versions").iterdir()] == [before]

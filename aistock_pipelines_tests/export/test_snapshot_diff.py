"""The diff between versions and releases of a snapshot on the demo market: a restating day names the
restated instruments with their largest price change; rows matched by key either way; columns."""

from __future__ import annotations

import json

import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export.releases import ReleaseStore
from aistock_pipelines.export.snapshot_diff import diff_snapshot
from aistock_pipelines.export.snapshot_shape import SnapshotError, SnapshotOptions
from aistock_pipelines_tests.export.helpers import START

pytestmark = pytest.mark.db


def test_the_diff_of_a_restating_day_names_the_restated_instruments(exported, market_db, tmp_path):
    ex, result, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    store.create("demo", label="before")
    adv = advance_market(engine, events=5)
    got = ex.export_incremental("demo")
    d = diff_snapshot(store, "demo", "before", "live")
    assert {r.instrument for r in d.restated} == set(adv.restated) == set(got.restated)
    assert all(r.max_price_change > 0 for r in d.restated)
    assert d.restated == sorted(d.restated, key=lambda r: -r.max_price_change)
    assert d.rows_added == adv.bars and d.rows_removed == 0 and d.columns_added == d.columns_removed == []
    assert d.rows_b - d.rows_a == adv.bars and d.range_b[1] == adv.trade_date.isoformat()
    back = diff_snapshot(store, "demo", "live", "before")  # rows not aligned this way: matched by key
    assert back.rows_removed == adv.bars and {r.instrument for r in back.restated} == set(adv.restated)
    replaced = json.loads((path / "meta.json").read_text())["replaces"]
    assert diff_snapshot(store, "demo", replaced, "live").restated == d.restated
    text = "\n".join(d.lines(top=3))
    assert d.restated[0].instrument in text and f"+{adv.bars:,} added" in text
    for bad in ("demo@../../etc", "demo@20990101T000000000000"):
        with pytest.raises(SnapshotError, match="version"):  # not a version name; no such version
            diff_snapshot(store, "demo", bad, "live")
    # a declaration change: the factor tables dropped
    ex.export_full("demo", START, options=SnapshotOptions(factor_tables=()))
    cols = diff_snapshot(store, "demo", "before", "live")
    assert cols.columns_removed and all(c.startswith(("db_", "mf_")) for c in cols.columns_removed)
    assert cols.columns_added == [] and cols.rows_added == adv.bars
    engine.dispose()

"""Snapshot assets with real resources: ranged backfill in one run, daily partition, schedule."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from dagster import DagsterInstance, SkipReason, build_schedule_context, materialize

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import SnapshotConfigError, load_snapshots_file

pytestmark = pytest.mark.db
CONFIG = load_snapshots_file(DEMO_SNAPSHOTS_FILE)


def _materialize(asset, resources, instance, tags=None, partition_key=None):
    return materialize([asset], resources=resources, instance=instance, tags=tags, partition_key=partition_key)


def test_range_backfill_then_daily_partition_equals_full_export(market_db, tmp_path):
    assets = {a.key.path[-1]: a for a in snapshot_assets(CONFIG)}
    resources = {"aistock_db": AIstockDatabase(url=market_db), "snapshot_store": SnapshotStore(root=str(tmp_path))}
    instance = DagsterInstance.ephemeral()
    result = _materialize(assets["demo_qlib"], resources, instance, tags={
        "dagster/asset_partition_range_start": "2023-01-03", "dagster/asset_partition_range_end": "2024-06-19"})
    assert result.success
    md = result.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
    assert md["mode"].value == "full" and md["end"].value == "2024-06-19" and md["rows"].value > 80_000
    assert isinstance(md["seconds_total"].value, float)
    engine = create_db_engine(market_db)
    for _ in range(3):  # N post-close increments, each day restating some instruments' qfq history
        adv = advance_market(engine, events=3)
        daily = _materialize(assets["demo_qlib"], resources, instance, partition_key=adv.trade_date.isoformat())
        md = daily.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
        assert md["mode"].value == "incremental" and md["applied"].value == "in place" and md["restated_instruments"].value == len(adv.restated)
    engine.dispose()
    # a weekend partition does no work
    weekend = _materialize(assets["demo_qlib"], resources, instance, partition_key="2024-06-22")
    assert weekend.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata["mode"].value == "no trading day"
    incremental = pd.read_hdf(tmp_path / "demo_qlib" / "daily_pv.h5")
    full = _materialize(assets["demo_qlib"], {**resources, "snapshot_store": SnapshotStore(root=str(tmp_path / "b"))},
                        instance, tags={"dagster/asset_partition_range_start": "2023-01-03",
                                        "dagster/asset_partition_range_end": adv.trade_date.isoformat()})
    assert full.success
    pd.testing.assert_frame_equal(incremental, pd.read_hdf(tmp_path / "b" / "demo_qlib" / "daily_pv.h5"), check_exact=True)


@pytest.mark.parametrize("when, expect", [
    (datetime(2024, 6, 19, 18, 30), "run"),       # Wednesday, trading day
    (datetime(2024, 6, 22, 18, 30), "weekend"),   # Saturday (the cron never fires; evaluated anyway)
    (datetime(2024, 10, 2, 18, 30), "holiday"),   # National Day holiday, a Wednesday
])
def test_post_close_schedule(market_ro, when, expect):
    jobs = snapshot_jobs(CONFIG)
    schedule = post_close_schedules(CONFIG, jobs)[0]
    with build_schedule_context(scheduled_execution_time=when.replace(tzinfo=ZoneInfo("Asia/Shanghai")),
                                resources={"aistock_db": AIstockDatabase(url=market_ro)}) as ctx:
        out = schedule(ctx)
    if expect == "run":
        assert out.partition_key == "2024-06-19" and out.run_key == "demo_allA:2024-06-19"
    else:
        assert isinstance(out, SkipReason) and "not a trading day" in out.skip_message


def test_malformed_snapshots_file_names_snapshot_and_key(tmp_path):
    bad = tmp_path / "snapshots.yaml"
    bad.write_text("snapshots:\n  - id: good\n    start: 2021-01-04\n  - id: broken\n    start: 2021-01-04\n    columns: dollars\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'broken', key columns"):
        load_snapshots_file(bad)
    bad.write_text("snapshots:\n  - id: x\n    start: 2021-01-04\n    factor_tables: [nope]\n")
    with pytest.raises(SnapshotConfigError, match="unknown factor tables"):
        load_snapshots_file(bad)

"""Snapshot assets with real resources: ranged backfill in one run, then daily partitions."""

import pandas as pd
import pytest
from dagster import DagsterUnknownPartitionError, materialize

from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.orchestration.trading_day_partitions import register_trading_days
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.helpers import disposing_engine, instance_with_trading_days

pytestmark = pytest.mark.db
CONFIG = load_snapshots_file(DEMO_SNAPSHOTS_FILE)


def _materialize(asset, resources, instance, tags=None, partition_key=None):
    return materialize([asset], resources=resources, instance=instance, tags=tags, partition_key=partition_key)


def test_range_backfill_then_daily_partition_equals_full_export(market_db, tmp_path):
    assets = {a.key.path[-1]: a for a in snapshot_assets(CONFIG)}
    resources = {"aistock_db": AIstockDatabase(url=market_db), "snapshot_store": SnapshotStore(root=str(tmp_path))}
    instance = instance_with_trading_days(market_db, CONFIG)
    result = _materialize(assets["demo_qlib"], resources, instance, tags={
        "dagster/asset_partition_range_start": "2023-01-03", "dagster/asset_partition_range_end": "2024-06-19"})
    assert result.success
    md = result.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
    assert md["mode"].value == "full" and md["end"].value == "2024-06-19" and md["rows"].value > 80_000
    assert isinstance(md["seconds_total"].value, float)
    with disposing_engine(market_db) as engine:
        for _ in range(3):  # N post-close increments, each day restating some instruments' qfq history
            adv = advance_market(engine, events=3)
            assert register_trading_days(instance, engine, CONFIG)["demo_qlib"].add == [adv.trade_date.isoformat()]
            daily = _materialize(assets["demo_qlib"], resources, instance, partition_key=adv.trade_date.isoformat())
            md = daily.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
            assert md["mode"].value == "incremental" and md["applied"].value == "in place" and md["restated_instruments"].value == len(adv.restated)
    # a weekend is no partition: nothing to materialize
    assert not assets["demo_qlib"].partitions_def.has_partition_key("2024-06-22", dynamic_partitions_store=instance)
    with pytest.raises(DagsterUnknownPartitionError):
        _materialize(assets["demo_qlib"], resources, instance, partition_key="2024-06-22")
    incremental = pd.read_hdf(tmp_path / "demo_qlib" / "daily_pv.h5")
    full = _materialize(assets["demo_qlib"], {**resources, "snapshot_store": SnapshotStore(root=str(tmp_path / "b"))},
                        instance, tags={"dagster/asset_partition_range_start": "2023-01-03",
                                        "dagster/asset_partition_range_end": adv.trade_date.isoformat()})
    assert full.success
    pd.testing.assert_frame_equal(incremental, pd.read_hdf(tmp_path / "b" / "demo_qlib" / "daily_pv.h5"), check_exact=True)

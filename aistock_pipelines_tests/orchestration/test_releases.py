"""Releases in Dagster with real resources: the release and rollback jobs, the monthly release schedule
against the real trade calendar, and the diff metadata of an export."""

import json
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from dagster import DagsterEventType, DagsterInstance, Failure, SkipReason, build_schedule_context, materialize

from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export.releases import ReleaseStore
from aistock_pipelines.orchestration.releases import (_check_reached, ends_period, release_definitions, release_job,
                                                     release_schedules, rollback_job)
from aistock_pipelines.orchestration.snapshot_assets import build_exporter, snapshot_assets
from aistock_pipelines.orchestration.trading_day_partitions import register_trading_days
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.helpers import disposing_engine, instance_with_trading_days

pytestmark = pytest.mark.db
CONFIG = load_snapshots_file(DEMO_SNAPSHOTS_FILE)


def _output_metadata(result, node: str) -> dict:
    event = next(e for e in result.events_for_node(node) if e.event_type == DagsterEventType.STEP_OUTPUT)
    return {k: v.value for k, v in event.step_output_data.metadata.items()}


def test_release_and_rollback_jobs(market_db, tmp_path):
    decl = CONFIG.get("demo_allA")
    db, store_resource = AIstockDatabase(url=market_db), SnapshotStore(root=str(tmp_path))
    resources = {"aistock_db": db, "snapshot_store": store_resource}
    exporter = build_exporter(db, store_resource, CONFIG.export_mapping(), CONFIG.market_files())
    exported = exporter.export_full("demo_allA", decl.start, options=decl.options())
    instance = DagsterInstance.ephemeral()
    run_config = {"ops": {"release_snapshot": {"config": {"snapshot_id": "demo_allA", "label": "study-1", "keep": True}}}}
    result = release_job(CONFIG).execute_in_process(run_config=run_config, resources=resources, instance=instance)
    md = _output_metadata(result, "release_snapshot")
    path = tmp_path / "releases" / "demo_allA" / "study-1"
    assert md["release"] == "study-1" and md["path"] == str(path) and md["keep"] is True and md["created"] is True
    assert md["daily_pv_sha256"] == exported.sha256 and md["files"] > 1000 and 0 < md["bytes_added"] < 0.05 * md["bytes"]
    assert md["universes"] == ["csi300", "hs_liquid"] and md["benchmarks"] == ["000300.sh", "399006.sz"]
    declared = json.loads((path / "release.json").read_text())["declaration"]["declared"]
    assert declared["id"] == "demo_allA" and set(declared["universes"]) == {"csi300", "hs_liquid"}
    observed = result.asset_observations_for_node("release_snapshot")
    assert observed[0].asset_key.path == ["snapshots", "demo_allA"] and observed[0].metadata["release"].value == "study-1"
    with disposing_engine(market_db) as engine:
        advance_market(engine, events=3)
    exporter.export_incremental("demo_allA")
    rolled = rollback_job().execute_in_process(
        run_config={"ops": {"rollback_snapshot": {"config": {"snapshot_id": "demo_allA", "to": "study-1"}}}},
        resources=resources, instance=instance)
    md = _output_metadata(rolled, "rollback_snapshot")
    meta = json.loads((tmp_path / "demo_allA" / "meta.json").read_text())
    assert md["export_id"] == meta["export_id"] == exported.export_id and md["meta_rows_restored"] == exported.instruments
    store = ReleaseStore(tmp_path)  # reading needs no database
    with pytest.raises(Failure, match="before 2099-01-01: the day's export has not finished"):
        _check_reached(store, "demo_allA", "2099-01-01")
    _check_reached(store, "demo_allA", meta["end"])
    failed = rollback_job().execute_in_process(
        run_config={"ops": {"rollback_snapshot": {"config": {"snapshot_id": "demo_allA", "to": "nope"}}}},
        resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success and "no release 'nope'" in str(failed.all_events)


@pytest.mark.parametrize("when, expect", [
    (datetime(2024, 4, 30, 20, 30), "run"),        # Tuesday before the May holidays: April's last trading day
    (datetime(2024, 4, 29, 20, 30), "mid-month"),  # a trading day, not the last of April
    (datetime(2024, 5, 1, 20, 30), "holiday"),     # Labour Day, a Wednesday
])
def test_monthly_release_schedule(market_ro, when, expect):
    releases = release_job(CONFIG)
    (schedule,) = release_schedules(CONFIG, releases)
    assert schedule.name == "snapshot_demo_allA_release" and schedule.cron_schedule == "30 20 * * 1-5"
    with build_schedule_context(scheduled_execution_time=when.replace(tzinfo=ZoneInfo("Asia/Shanghai")),
                                resources={"aistock_db": AIstockDatabase(url=market_ro)}) as ctx:
        out = schedule(ctx)
    if expect == "run":
        assert out.run_key == "demo_allA:release:2024-04-30"
        assert out.run_config["ops"]["release_snapshot"]["config"] == {"snapshot_id": "demo_allA", "not_before": "2024-04-30"}
    elif expect == "mid-month":
        assert isinstance(out, SkipReason) and "not the last trading day of its month (next: 2024-04-30)" in out.skip_message
    else:
        assert isinstance(out, SkipReason) and "not a trading day" in out.skip_message


def test_periods_end_on_their_last_trading_day():
    friday, monday, tuesday = date(2024, 5, 31), date(2024, 6, 3), date(2024, 6, 4)
    assert ends_period("monthly", friday, monday) and not ends_period("monthly", monday, tuesday)
    assert ends_period("weekly", friday, monday) and not ends_period("weekly", monday, tuesday)
    assert ends_period("weekly", date(2024, 12, 31), date(2025, 1, 2)) is False, "ISO week 1 of 2025 holds both"
    assert ends_period("daily", monday, tuesday)


def test_an_export_carries_the_diff_of_what_it_changed(market_db, tmp_path):
    assets = {a.key.path[-1]: a for a in snapshot_assets(CONFIG)}
    resources = {"aistock_db": AIstockDatabase(url=market_db), "snapshot_store": SnapshotStore(root=str(tmp_path))}
    instance = instance_with_trading_days(market_db, CONFIG)
    full = materialize([assets["demo_qlib"]], resources=resources, instance=instance, tags={
        "dagster/asset_partition_range_start": "2023-01-03", "dagster/asset_partition_range_end": "2024-06-19"})
    assert "diff_restated" not in full.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
    with disposing_engine(market_db) as engine:
        adv = advance_market(engine, events=4)
        register_trading_days(instance, engine, CONFIG)
    daily = materialize([assets["demo_qlib"]], resources=resources, instance=instance,
                        partition_key=adv.trade_date.isoformat())
    md = daily.asset_materializations_for_node("snapshots__demo_qlib")[0].metadata
    assert md["diff_restated"].value == len(adv.restated) > 0 and md["diff_rows_added"].value == adv.bars
    assert md["diff_rows_removed"].value == 0 and md["diff_columns_added"].value == []
    table = md["diff_restated_largest"].value
    assert all(f"| {code[-2:]}{code[:6]} |" in table for code in adv.restated)


def test_release_definitions_are_a_domain_of_their_own():
    defs = release_definitions(CONFIG)
    assert {j.name for j in defs.jobs} == {"snapshot_release", "snapshot_rollback"}
    assert [s.name for s in defs.schedules] == ["snapshot_demo_allA_release"] and not defs.assets and not defs.resources

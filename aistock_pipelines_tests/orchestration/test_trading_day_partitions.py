"""Snapshot partitions are the trading days with bars: registration (sensor, on demand), and a day without
bars failing at once instead of retrying for minutes."""

import logging
import time
from datetime import date

import pytest
import sqlalchemy as sa
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.orchestration.trading_day_partitions import (
    TradingDayPartitions,
    partitions_name,
    register_trading_days,
    trading_days_sensor,
)
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines.trading_days import partition_plan

CONFIG = load_snapshots_file(DEMO_SNAPSHOTS_FILE)


def test_partition_plan_keeps_the_registered_order_ascending():
    assert partition_plan(["a", "b"], ["a", "b", "c"]) == ([], ["c"])  # the usual case: append
    assert partition_plan(["a", "c"], ["a", "b", "c"]) == (["c"], ["b", "c"])  # a day in between: re-added in order
    assert partition_plan(["a", "x", "b"], ["a", "b"]) == (["x", "b"], ["b"])
    assert partition_plan([], []) == ([], [])


def _open_days_with_bars(engine, start: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date >= :s "
            "AND cal_date <= (SELECT max(trade_date) FROM market.kline_daily_qfq) ORDER BY 1"), {"s": start})
        return [r[0].isoformat() for r in rows]


@pytest.mark.db
def test_registered_days_are_the_trading_days_with_bars(market_ro, make_engine):
    engine = make_engine(market_ro)
    instance = DagsterInstance.ephemeral()
    changes = register_trading_days(instance, engine, CONFIG)
    qlib = list(instance.get_dynamic_partitions(partitions_name("demo_qlib")))
    assert qlib == _open_days_with_bars(engine, "2023-01-03") and len(qlib) > 300
    assert qlib[0] == "2023-01-03" and qlib[-1] == "2024-06-19" == changes["demo_qlib"].last_loaded.isoformat()
    assert "2023-10-02" not in qlib and "2024-06-22" not in qlib  # National Day (a Monday), a Saturday
    assert all(date.fromisoformat(k).weekday() < 5 for k in qlib)
    assert register_trading_days(instance, engine, CONFIG)["demo_qlib"].add == []  # idempotent


@pytest.mark.db
def test_sensor_registers_new_days_and_drops_what_is_no_trading_day(market_db, make_engine):
    engine = make_engine(market_db)
    sensor = trading_days_sensor(CONFIG)
    with instance_for_test() as instance:
        def tick():
            with build_sensor_context(instance=instance, resources={"aistock_db": AIstockDatabase(url=market_db)}) as ctx:
                return sensor(ctx)

        first = tick()
        adds = {r.partitions_def_name: r.partition_keys for r in first.dynamic_partitions_requests}
        assert adds[partitions_name("demo_allA")] == _open_days_with_bars(engine, "2021-01-04")
        for request in first.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        assert isinstance(tick(), SkipReason)

        # a weekend and a typo added by hand in the UI, and a new day loaded by the vendor
        instance.add_dynamic_partitions(partitions_name("demo_qlib"), ["2024-06-22", "2024-6-24"])
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO market.kline_daily_qfq SELECT ts_code, '2024-06-20', open_li, high_li, "
                                 "low_li, close_li, volume_hand, amount_li, adjust_type, source "
                                 "FROM market.kline_daily_qfq WHERE trade_date = '2024-06-19'"))
        requests = tick().dynamic_partitions_requests
        qlib = [r for r in requests if r.partitions_def_name == partitions_name("demo_qlib")]
        assert [type(r) for r in qlib] == [DeleteDynamicPartitionsRequest, AddDynamicPartitionsRequest]
        assert qlib[0].partition_keys == ["2024-06-22", "2024-6-24"] and qlib[1].partition_keys == ["2024-06-20"]


@pytest.mark.db
def test_a_key_asked_for_registers_the_days_and_an_unloaded_day_names_the_last(market_ro, make_engine, caplog):
    engine = make_engine(market_ro)
    calls = []

    def register(instance, snapshot_id):
        calls.append(snapshot_id)
        return register_trading_days(instance, engine, CONFIG, only=snapshot_id)[snapshot_id]

    partitions = TradingDayPartitions("demo_qlib", register)
    instance = DagsterInstance.ephemeral()
    assert partitions.has_partition_key("2024-06-19", dynamic_partitions_store=instance)  # a fresh instance
    assert calls == ["demo_qlib"] and len(instance.get_dynamic_partitions(partitions_name("demo_qlib"))) > 300
    with caplog.at_level(logging.WARNING):
        assert not partitions.has_partition_key("2024-06-20", dynamic_partitions_store=instance)
    assert "2024-06-20 is not a partition of snapshots/demo_qlib" in caplog.text
    assert "the last loaded day is 2024-06-19" in caplog.text


@pytest.mark.db
def test_a_requested_day_without_bars_fails_at_once_naming_the_last_loaded_day(market_ro, make_engine, tmp_path):
    engine = make_engine(market_ro)
    instance = DagsterInstance.ephemeral()
    register_trading_days(instance, engine, CONFIG, through=date(2024, 6, 20))  # as the post-close run does
    asset = {a.key.path[-1]: a for a in snapshot_assets(CONFIG)}["demo_qlib"]
    started = time.monotonic()
    result = materialize([asset], instance=instance, partition_key="2024-06-20", raise_on_error=False,
                         resources={"aistock_db": AIstockDatabase(url=market_ro), "snapshot_store": SnapshotStore(root=str(tmp_path))})
    assert not result.success and time.monotonic() - started < 60  # no retry: the retry policy waits 120 s first
    error = str(result.failure_data_for_node("snapshots__demo_qlib").error)
    assert "2024-06-20" in error and "latest bar: 2024-06-19" in error
    assert not (tmp_path / "demo_qlib").exists()

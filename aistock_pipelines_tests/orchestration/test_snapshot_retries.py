"""Retry only what can heal: a day not loaded yet on the post-close schedule's run; anything else fails at
once, through Dagster, with its cause named and no password shown."""

from __future__ import annotations

import socket
from datetime import date

import pytest
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, RetryPolicy, materialize

from aistock_pipelines.orchestration.snapshot_assets import SCHEDULE_TAG, SNAPSHOT_RETRY, snapshot_asset
from aistock_pipelines.orchestration.trading_day_partitions import partitions_name
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.snapshot_config import SnapshotsFile
from aistock_pipelines_tests.helpers import disposing_engine

pytestmark = pytest.mark.db
QUICK_RETRY = RetryPolicy(max_retries=1, delay=0.1)  # the real policy's shape, without its minutes of waiting
PASSWORD = "S3cret-Pw0rd"
CONFIG = SnapshotsFile.model_validate({"snapshots": [{"id": "retry_probe", "start": "2024-06-03"}]})


def run(resources: dict, partition: str, tags: dict | None = None):
    asset = snapshot_asset(CONFIG.snapshots[0], CONFIG, retry_policy=QUICK_RETRY)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(partitions_name("retry_probe"), [partition])  # as the post-close schedule does
    result = materialize([asset], resources=resources, instance=instance, partition_key=partition, tags=tags,
                         raise_on_error=False)
    events = [e.event_type for e in result.all_events]
    (failure,) = result.get_step_failure_events()
    logs = "\n".join(str(record) for record in instance.all_logs(result.run_id))
    return events.count(DagsterEventType.STEP_UP_FOR_RETRY), failure.step_failure_data.error.to_string(), logs


@pytest.fixture(scope="module")
def days(market_ro: str) -> tuple[date, date]:
    """The last day with bars and the next trading day (not loaded yet)."""
    with disposing_engine(market_ro) as engine, engine.connect() as conn:
        last = conn.execute(sa.text("SELECT max(trade_date) FROM market.kline_daily_qfq")).scalar_one()
        after = conn.execute(sa.text("SELECT min(cal_date) FROM market.trading_calendar "
                                     "WHERE is_trading AND cal_date > :d"), {"d": last}).scalar_one()
    return last, after


def test_the_real_policy_still_waits_minutes_between_tries() -> None:
    assert SNAPSHOT_RETRY.max_retries == 3 and SNAPSHOT_RETRY.delay == 120


def test_a_day_not_loaded_is_retried_only_on_the_scheduled_run(market_ro, tmp_path, days) -> None:
    resources = {"aistock_db": AIstockDatabase(url=market_ro), "snapshot_store": SnapshotStore(root=str(tmp_path))}
    partition = days[1].isoformat()
    retries, error, _ = run(resources, partition, tags={SCHEDULE_TAG: "snapshot_retry_probe_post_close"})
    assert retries == 1 and f"trading day(s) {partition}…{partition} have no bars yet" in error
    retries, error, _ = run(resources, partition)  # a person's run: the message at once
    assert retries == 0 and "have no bars yet" in error and "snapshot retry_probe" in error


def test_a_database_on_the_wrong_port_fails_at_once_without_its_password(tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://aistock:{PASSWORD}@127.0.0.1:{port}/aistock"
    resources = {"aistock_db": AIstockDatabase(url=url), "snapshot_store": SnapshotStore(root=str(tmp_path))}
    retries, error, logs = run(resources, "2024-06-19", tags={SCHEDULE_TAG: "snapshot_retry_probe_post_close"})
    assert retries == 0
    assert "snapshot retry_probe: OperationalError" in error and f"port {port} failed" in error
    assert PASSWORD not in error and PASSWORD not in logs


def test_a_file_system_error_fails_at_once_naming_the_path(market_ro, tmp_path, days) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the snapshot root should be")
    resources = {"aistock_db": AIstockDatabase(url=market_ro),
                 "snapshot_store": SnapshotStore(root=str(blocker / "snapshots"))}
    retries, error, _ = run(resources, days[0].isoformat(), tags={SCHEDULE_TAG: "snapshot_retry_probe_post_close"})
    assert retries == 0 and "NotADirectoryError" in error and str(blocker) in error

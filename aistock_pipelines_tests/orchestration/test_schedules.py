"""The post-close schedule against the real trade calendar: a run on trading days, a reason otherwise."""

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest
from dagster import SkipReason, build_schedule_context, instance_for_test

from aistock_pipelines.db import libpq_url
from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
from aistock_pipelines.orchestration.trading_day_partitions import partitions_name
from aistock_pipelines.resources import AIstockDatabase
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file

pytestmark = pytest.mark.db
CONFIG = load_snapshots_file(DEMO_SNAPSHOTS_FILE)


@pytest.mark.parametrize("when, expect", [
    (datetime(2024, 6, 19, 18, 30), "run"),       # Wednesday, trading day
    (datetime(2024, 6, 22, 18, 30), "weekend"),   # Saturday (the cron never fires; evaluated anyway)
    (datetime(2024, 10, 2, 18, 30), "holiday"),   # National Day holiday, a Wednesday
])
def test_post_close_schedule(market_ro, when, expect):
    jobs = snapshot_jobs(CONFIG)
    schedule = post_close_schedules(CONFIG, jobs)[0]
    with instance_for_test() as instance, build_schedule_context(
            scheduled_execution_time=when.replace(tzinfo=ZoneInfo("Asia/Shanghai")),
            resources={"aistock_db": AIstockDatabase(url=market_ro)}, instance=instance) as ctx:
        out = schedule(ctx)
        registered = instance.get_dynamic_partitions(partitions_name("demo_allA"))
    if expect == "run":
        assert out.partition_key == "2024-06-19" and out.run_key == "demo_allA:2024-06-19"
        assert registered[-1] == "2024-06-19" and registered[0] == "2021-01-04"
    else:
        assert isinstance(out, SkipReason) and "not a trading day" in out.skip_message
        assert registered == []


def test_post_close_schedule_registers_the_closed_day_before_its_bars(market_ro):
    """The day that just closed is the run's partition even while its bars are still being loaded."""
    schedule = post_close_schedules(CONFIG, snapshot_jobs(CONFIG))[0]
    when = datetime(2024, 6, 20, 18, 30, tzinfo=ZoneInfo("Asia/Shanghai"))  # the day after the last bars
    with instance_for_test() as instance, build_schedule_context(
            scheduled_execution_time=when, resources={"aistock_db": AIstockDatabase(url=market_ro)},
            instance=instance) as ctx:
        out = schedule(ctx)
        registered = instance.get_dynamic_partitions(partitions_name("demo_allA"))
    assert out.partition_key == "2024-06-20"
    assert list(registered[-2:]) == ["2024-06-19", "2024-06-20"]


def test_a_preview_of_an_upcoming_tick_registers_nothing(market_db):
    """The UI evaluates upcoming ticks to preview them: no future day may become a partition that way."""
    schedule = post_close_schedules(CONFIG, snapshot_jobs(CONFIG))[0]
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    day = today + timedelta(days=7 - today.weekday() + 1)  # a Tuesday, next week
    with psycopg.connect(libpq_url(market_db)) as conn:  # the seeded calendar ends a year after its bars
        conn.execute("INSERT INTO market.trading_calendar (cal_date, is_trading) VALUES (%s, true) "
                     "ON CONFLICT (cal_date) DO UPDATE SET is_trading = true", (day,))
    when = datetime.combine(day, time(18, 30), ZoneInfo("Asia/Shanghai"))
    with instance_for_test() as instance, build_schedule_context(
            scheduled_execution_time=when, resources={"aistock_db": AIstockDatabase(url=market_db)},
            instance=instance) as ctx:
        out = schedule(ctx)
        registered = instance.get_dynamic_partitions(partitions_name("demo_allA"))
    assert isinstance(out, SkipReason) and f"it will register {day.isoformat()}" in out.skip_message
    assert registered == []

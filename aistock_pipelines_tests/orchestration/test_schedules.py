"""The post-close schedule against the real trade calendar: a run on trading days, a reason otherwise."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from dagster import SkipReason, build_schedule_context

from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
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
    with build_schedule_context(scheduled_execution_time=when.replace(tzinfo=ZoneInfo("Asia/Shanghai")),
                                resources={"aistock_db": AIstockDatabase(url=market_ro)}) as ctx:
        out = schedule(ctx)
    if expect == "run":
        assert out.partition_key == "2024-06-19" and out.run_key == "demo_allA:2024-06-19"
    else:
        assert isinstance(out, SkipReason) and "not a trading day" in out.skip_message

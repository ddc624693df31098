"""Post-close schedule: 18:30 Asia/Shanghai on weekdays, today's partition of every open-ended snapshot.

A custom ``@schedule`` rather than ``build_schedule_from_partitioned_job``: the latter targets the previous
day for daily partitions and refuses hour/minute on weekday crons. Holidays that fall on
weekdays are skipped with a reason, read from the database's own trade calendar. On a trading day the
schedule registers the day as a partition first (its bars may not be loaded yet: the run retries). A tick
evaluated before its time (the UI's preview of upcoming ticks) registers nothing and says what it will do,
so a preview never puts a future day among the partitions.
"""


from datetime import date, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE
from aistock_pipelines.export.mapping import quote_table
from aistock_pipelines.orchestration.trading_day_partitions import register_trading_days
from aistock_pipelines.resources import AIstockDatabase
from aistock_pipelines.snapshot_config import SnapshotsFile, snapshot_name

POST_CLOSE_CRON = "30 18 * * 1-5"


def snapshot_job_name(snapshot_id: str) -> str:
    return f"snapshot_{snapshot_name(snapshot_id)}_job"


def snapshot_jobs(config: SnapshotsFile):
    return [define_asset_job(snapshot_job_name(d.id), selection=AssetSelection.assets(["snapshots", d.id]),
                             tags={"aistock/job": "snapshot", "aistock/snapshot": d.id})
            for d in config.snapshots]


def is_trading_day(db: AIstockDatabase, day: date, calendar_table: str) -> bool | None:
    with db.engine().connect() as conn:
        return conn.execute(sa.text(f"SELECT is_trading FROM {quote_table(calendar_table)} WHERE cal_date = :d"),
                            {"d": day}).scalar()


def trading_day_closed(context: ScheduleEvaluationContext, db: AIstockDatabase,
                       calendar_table: str) -> date | SkipReason:
    """The exchange-local day of a schedule's tick, or why the tick skips (not a trading day, no calendar)."""
    today = context.scheduled_execution_time.astimezone(ZoneInfo(EXCHANGE_TIMEZONE)).date()
    trading = is_trading_day(db, today, calendar_table)
    if trading is None:
        return SkipReason(f"{today} is not in {calendar_table}: extend the trade calendar")
    if not trading:
        return SkipReason(f"{today} is not a trading day ({calendar_table})")
    return today


def post_close_schedule(decl, job, config: SnapshotsFile) -> ScheduleDefinition:
    """One schedule per open-ended snapshot (a schedule targets one job; snapshot partitions differ)."""

    @schedule(name=f"{job.name.removesuffix('_job')}_post_close", cron_schedule=POST_CLOSE_CRON,
              execution_timezone=EXCHANGE_TIMEZONE, job=job, default_status=DefaultScheduleStatus.RUNNING,
              description=f"After the close on trading days: today's partition of snapshots/{decl.id}.")
    def _post_close(context: ScheduleEvaluationContext, aistock_db: AIstockDatabase):
        today = trading_day_closed(context, aistock_db, config.mapping.calendar_table)
        if isinstance(today, SkipReason):
            return today
        key = today.isoformat()
        if context.scheduled_execution_time > datetime.now(ZoneInfo(EXCHANGE_TIMEZONE)):
            return SkipReason(f"preview of an upcoming tick: it will register {key} as a partition of "
                              f"snapshots/{decl.id} and request it")
        register_trading_days(context.instance, aistock_db.engine(), config, through=today, only=decl.id)
        return RunRequest(run_key=f"{decl.id}:{key}", partition_key=key, tags={"aistock/snapshot": decl.id})

    return _post_close


def post_close_schedules(config: SnapshotsFile, jobs) -> list[ScheduleDefinition]:
    by_name = {j.name: j for j in jobs}
    return [post_close_schedule(d, by_name[snapshot_job_name(d.id)], config)
            for d in config.snapshots if d.open_ended]

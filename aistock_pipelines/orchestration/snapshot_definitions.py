"""The snapshot domain's Definitions: ``snapshots/<id>`` assets, their checks, jobs and post-close schedules."""

from dagster import Definitions

from aistock_pipelines.orchestration.adhoc_export import adhoc_export_job
from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.orchestration.snapshot_checks import all_snapshot_checks
from aistock_pipelines.orchestration.trading_day_partitions import Register, trading_days_sensor
from aistock_pipelines.snapshot_config import SnapshotsFile


def snapshot_definitions(config: SnapshotsFile, register: Register | None = None) -> Definitions:
    """Every declared snapshot's asset, checks, job and schedule, plus the ad-hoc export job and the sensor
    registering trading days; ``register`` registers them on demand (``TradingDayPartitions``)."""
    jobs = snapshot_jobs(config)
    return Definitions(
        assets=snapshot_assets(config, register),
        asset_checks=all_snapshot_checks(config),
        jobs=[*jobs, adhoc_export_job(config)],
        schedules=post_close_schedules(config, jobs),
        sensors=[trading_days_sensor(config)],
    )

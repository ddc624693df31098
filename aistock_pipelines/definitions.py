"""The Dagster code location: every asset, check, job, schedule and sensor is assembled here."""

from __future__ import annotations

from dagster import DefaultSensorStatus, Definitions

from aistock_pipelines.orchestration.adhoc_export import adhoc_export_job
from aistock_pipelines.orchestration.market_assets import (
    daily_features_asset,
    market_source_assets,
    observation_schedule,
)
from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.orchestration.snapshot_checks import all_snapshot_checks
from aistock_pipelines.rdagent.dagster_assets import rdagent_definitions
from aistock_pipelines.resources import resources_for
from aistock_pipelines.settings import Settings
from aistock_pipelines.snapshot_config import load_snapshots_file


def build_definitions(settings: Settings) -> Definitions:
    config = load_snapshots_file(settings.snapshots_file)
    jobs = snapshot_jobs(config)
    snapshots = Definitions(
        assets=[market_source_assets(config), daily_features_asset(config), *snapshot_assets(config)],
        asset_checks=all_snapshot_checks(config),
        jobs=[*jobs, adhoc_export_job(config)],
        schedules=[*post_close_schedules(config, jobs), observation_schedule(config)],
        resources=resources_for(settings),
    )
    # The results sensor runs by default: with no RD-Agent server it only records a skip with the reason.
    rdagent = rdagent_definitions(factor_packages=settings.factor_packages, sensor_status=DefaultSensorStatus.RUNNING)
    return Definitions.merge(snapshots, rdagent)


defs = build_definitions(Settings.from_env())

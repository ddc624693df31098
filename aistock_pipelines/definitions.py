"""The Dagster code location: every asset, check, job, schedule and sensor is assembled here."""

from __future__ import annotations

from dagster import Definitions

from aistock_pipelines.orchestration.schedules import post_close_schedules, snapshot_jobs
from aistock_pipelines.orchestration.snapshot_assets import snapshot_assets
from aistock_pipelines.resources import resources_for
from aistock_pipelines.settings import Settings
from aistock_pipelines.snapshot_config import load_snapshots_file


def build_definitions(settings: Settings) -> Definitions:
    config = load_snapshots_file(settings.snapshots_file)
    jobs = snapshot_jobs(config)
    return Definitions(
        assets=snapshot_assets(config),
        jobs=jobs,
        schedules=post_close_schedules(config, jobs),
        resources=resources_for(settings),
    )


defs = build_definitions(Settings.from_env())

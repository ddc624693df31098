"""The Dagster code location: each domain's Definitions (market, snapshots, releases, RD-Agent) merged with the
resources."""

from __future__ import annotations

from dagster import DefaultSensorStatus, Definitions

from aistock_pipelines.orchestration.market_assets import market_definitions
from aistock_pipelines.orchestration.rdagent_assets import rdagent_definitions
from aistock_pipelines.orchestration.releases import release_definitions
from aistock_pipelines.orchestration.snapshot_definitions import snapshot_definitions
from aistock_pipelines.orchestration.trading_day_partitions import SettingsRegistrar
from aistock_pipelines.resources import resources_for
from aistock_pipelines.settings import Settings
from aistock_pipelines.snapshot_config import load_snapshots_file


def build_definitions(settings: Settings) -> Definitions:
    config = load_snapshots_file(settings.snapshots_file)
    # The results sensor runs by default: with no RD-Agent server it only records a skip with the reason.
    rdagent = rdagent_definitions(factor_packages=settings.factor_packages, sensor_status=DefaultSensorStatus.RUNNING)
    return Definitions.merge(
        market_definitions(config),
        snapshot_definitions(config, SettingsRegistrar(settings, config)),
        release_definitions(config),
        rdagent,
        Definitions(resources=resources_for(settings)),
    )


defs = build_definitions(Settings.from_env())

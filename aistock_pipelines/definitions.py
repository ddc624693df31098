"""The Dagster code location: every asset, check, job, schedule and sensor is assembled here."""

from __future__ import annotations

from dagster import Definitions

from aistock_pipelines.resources import resources_for
from aistock_pipelines.settings import Settings


def build_definitions(settings: Settings) -> Definitions:
    return Definitions(resources=resources_for(settings))


defs = build_definitions(Settings.from_env())

"""Dagster resources, and the one place that chooses them per deployment.

``local``: the AIstock database defaults to the embedded server (started on first use, not at load time,
so ``dagster definitions validate`` stays instant). ``production``: the database URL, the one secret, comes
from the environment as an ``EnvVar`` (Dagster shows and stores the variable's name, never the password);
every other setting is the value :class:`Settings` resolved, defaults included, exactly as in ``local``
(an ``EnvVar`` of an unset variable would fail every run and sensor tick instead of using the default).
A URL that carries a password is passed as ``EnvVar`` in every deployment (:func:`secret_aware`): Dagster
shows resource config in the UI and stores it in every run's job snapshot.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from sqlalchemy.engine import Engine

from aistock_pipelines.conventions import RESULTS_API_URL
from aistock_pipelines.db import engine_for, libpq_url, passwords, redact
from aistock_pipelines.embedded_db import resolve_db_url
from aistock_pipelines.settings import Settings, SettingsError


class AIstockDatabase(ConfigurableResource):
    """The AIstock PostgreSQL database (source tables, export meta, RD-Agent registries).

    ``url`` empty means the embedded server under ``home``.
    """

    url: str = ""
    home: str = ""

    def resolved_url(self) -> str:
        settings = Settings.from_env({"AISTOCK_DB_URL": self.url, "AISTOCK_HOME": self.home})
        return resolve_db_url(settings)

    def engine(self) -> Engine:
        return engine_for(self.resolved_url())

    def libpq_url(self) -> str:
        return libpq_url(self.resolved_url())

    def display_url(self) -> str:
        return redact(self.resolved_url())


class SnapshotStore(ConfigurableResource):
    """Where snapshot directories live (``AISTOCK_SNAPSHOT_ROOT``)."""

    root: str

    @property
    def path(self) -> Path:
        return Path(self.root)


class RDAgentResultsApi(ConfigurableResource):
    """RD-Agent's read-only results API (``RDAGENT_RESULTS_URL``)."""

    base_url: str = RESULTS_API_URL
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 15.0
    request_deadline_s: float = 60.0  # whole request, retries included (a dripping server is cut off)


def secret_aware(variable: str, value: str | None) -> str | EnvVar:
    """``value`` as resource config: itself, or ``EnvVar(variable)`` when it carries a password.

    A password that does not come from ``variable`` has no secret-aware form and is refused.
    """
    if value is None or not passwords(value):
        return value or ""
    if os.environ.get(variable, "").strip().rstrip("/") == value.rstrip("/"):
        return EnvVar(variable)
    raise SettingsError(
        f"{variable} {redact(value)} carries a password but is not the {variable} environment variable: "
        f"set it in the environment (Dagster then shows the variable's name, never the password)"
    )


def resources_for(settings: Settings) -> dict[str, ConfigurableResource]:
    """Resources for the deployment named in ``settings``."""
    if settings.deployment == "production":
        return {
            "aistock_db": AIstockDatabase(url=EnvVar("AISTOCK_DB_URL"), home=str(settings.home)),
            "snapshot_store": SnapshotStore(root=str(settings.snapshot_root)),
            "rdagent_api": RDAgentResultsApi(
                base_url=secret_aware("RDAGENT_RESULTS_URL", settings.rdagent_results_url)
            ),
        }
    return {
        "aistock_db": AIstockDatabase(url=secret_aware("AISTOCK_DB_URL", settings.db_url), home=str(settings.home)),
        "snapshot_store": SnapshotStore(root=str(settings.snapshot_root)),
        "rdagent_api": RDAgentResultsApi(base_url=secret_aware("RDAGENT_RESULTS_URL", settings.rdagent_results_url)),
    }

"""Deployment settings, read from environment variables in one place.

Every setting the project reads is listed in ``ENV_VARS`` (the operations guide renders the same table),
so there is exactly one answer to "what can I configure and what is the default?".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping
from urllib.parse import urlsplit

from aistock_pipelines.conventions import RESULTS_API_URL

Deployment = Literal["local", "production"]

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_SNAPSHOTS_FILE = PACKAGE_DIR / "demo" / "snapshots.yaml"

#: name -> (default, meaning). Kept as data so docs and ``aistock-pipelines settings`` print the same thing.
ENV_VARS: dict[str, tuple[str, str]] = {
    "AISTOCK_DEPLOYMENT": ("local", "`local` (embedded database allowed) or `production` (AISTOCK_DB_URL required)"),
    "AISTOCK_DB_URL": ("unset = embedded PostgreSQL", "AIstock database, e.g. `postgresql://user:pw@host:5432/aistock`"),
    "AISTOCK_HOME": ("`./.aistock`", "project-local state: embedded database, Dagster home of the demo, locks"),
    "AISTOCK_SNAPSHOT_ROOT": ("`$AISTOCK_HOME/snapshots`", "directory holding one folder per snapshot"),
    "AISTOCK_SNAPSHOTS_FILE": ("packaged `demo/snapshots.yaml`", "YAML file declaring the snapshots"),
    "RDAGENT_RESULTS_URL": (f"`{RESULTS_API_URL}`", "RD-Agent read-only results API"),
    "AISTOCK_FACTOR_PACKAGES": ("`rd_factors_lib` (the demo run: the bundled copy)",
                                "comma-separated packages factor pointers may import: `prefix` or "
                                "`prefix=importable.package` (e.g. `rd_factors_lib=aistock_pipelines.demo.rd_factors_lib`)"),
    "AISTOCK_TEST_DB_URL": ("unset = embedded", "tests only: run the database tests against this server"),
    "AISTOCK_KEEP_TEST_DB": ("unset", "bin/test: `1` keeps the test server it started running afterwards"),
}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


def _check_db_url(url: str) -> None:
    """Refuse a URL libpq and SQLAlchemy cannot use, naming it with its password masked."""
    parts = urlsplit(url)
    why = ""
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        why = f"scheme {parts.scheme or '(none)'!r} is not postgresql"
    else:
        try:
            parts.port
        except ValueError:
            why = "its port is not a number"
    if why:
        from aistock_pipelines.db import redact  # SQLAlchemy only when the URL is wrong

        raise SettingsError(f"AISTOCK_DB_URL {redact(url)} is not a usable PostgreSQL URL ({why}); expected "
                            "postgresql://user:password@host:5432/database")


@dataclass(frozen=True)
class Settings:
    deployment: Deployment
    db_url: str | None
    home: Path
    snapshot_root: Path
    snapshots_file: Path
    rdagent_results_url: str
    factor_packages: tuple[str, ...]

    @property
    def uses_embedded_db(self) -> bool:
        return self.db_url is None

    @property
    def embedded_pgdata(self) -> Path:
        return self.home / "pgdata"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        deployment = env.get("AISTOCK_DEPLOYMENT", "local").strip() or "local"
        if deployment not in ("local", "production"):
            raise SettingsError(f"AISTOCK_DEPLOYMENT must be 'local' or 'production', got {deployment!r}")
        db_url = env.get("AISTOCK_DB_URL", "").strip() or None
        if deployment == "production" and db_url is None:
            raise SettingsError(
                "AISTOCK_DEPLOYMENT=production needs AISTOCK_DB_URL (the AIstock PostgreSQL database); "
                "the embedded database is for local use only"
            )
        if db_url is not None:
            _check_db_url(db_url)
        home = Path(env.get("AISTOCK_HOME", "") or Path.cwd() / ".aistock").expanduser().resolve()
        snapshot_root = Path(env.get("AISTOCK_SNAPSHOT_ROOT", "") or home / "snapshots").expanduser().resolve()
        snapshots_file = Path(env.get("AISTOCK_SNAPSHOTS_FILE", "") or DEMO_SNAPSHOTS_FILE).expanduser().resolve()
        results_url = (env.get("RDAGENT_RESULTS_URL", "") or RESULTS_API_URL).rstrip("/")
        packages = tuple(
            p.strip() for p in (env.get("AISTOCK_FACTOR_PACKAGES", "") or "rd_factors_lib").split(",") if p.strip()
        )
        return cls(deployment, db_url, home, snapshot_root, snapshots_file, results_url, packages)  # type: ignore[arg-type]

"""The README's main command: a working installation end to end on the embedded default.

Steps: start the database, seed the demo market (once), start the demo RD-Agent results API and sync it,
materialize the demo snapshots through Dagster (so the runs appear in the UI's history), then serve the
Dagster UI on 127.0.0.1 until interrupted. ``serve=False`` stops after materializing, for scripts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine, redact, resolve_db_url
from aistock_pipelines.settings import PACKAGE_DIR, Settings

log = logging.getLogger(__name__)

#: Instance config of the demo's Dagster home: local SQLite storage, one writer per snapshot pool.
DEMO_INSTANCE_YAML = """\
# Written by `aistock-pipelines demo run`: the local demo instance (SQLite under this directory).
# Production uses the repository's dagster.yaml (PostgreSQL storage); see docs/operations.md.
concurrency:
  pools:
    default_limit: 1
    granularity: run
telemetry:
  enabled: false
"""


def prepare_dagster_home(settings: Settings) -> Path:
    """A persistent Dagster home for the demo, so runs and schedule state survive restarts.

    Always set: with DAGSTER_HOME unset the Dagster CLI would read ./dagster.yaml, the production file.
    """
    home = settings.home / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DEMO_INSTANCE_YAML)
    return home


def ensure_demo_market(settings: Settings, reseed: bool) -> None:
    from aistock_pipelines.demo.market import MarketSpec, seed_demo_market

    url = resolve_db_url(settings)
    engine = create_db_engine(url)
    with engine.connect() as conn:
        seeded = conn.execute(sa.text("SELECT to_regclass('market.demo_market_info') IS NOT NULL")).scalar()
        real = conn.execute(sa.text("SELECT to_regclass('market.kline_daily_qfq') IS NOT NULL")).scalar()
    if real and not seeded:
        log.info("database %s holds a real market: not seeding", redact(url))
    elif reseed or not seeded:
        log.info("seeding the demo market into %s", redact(url))
        summary = seed_demo_market(engine, MarketSpec())
        log.info("demo market: %s instruments, %s bars, %s .. %s", summary.instruments, summary.bars,
                 summary.first_date, summary.last_date)
    else:
        log.info("demo market already present in %s", redact(url))
    engine.dispose()


def _workspace_args() -> list[str]:
    workspace = PACKAGE_DIR.parent / "workspace.yaml"
    if workspace.exists():
        return ["-w", str(workspace)]
    return ["-m", "aistock_pipelines.definitions"]


def run_demo(settings: Settings, serve: bool = True, reseed: bool = False, port: int = 3000) -> int:
    dagster_home = prepare_dagster_home(settings)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ.setdefault("AISTOCK_HOME", str(settings.home))
    ensure_demo_market(settings, reseed)
    for step in demo_steps():
        step(settings)
    if not serve:
        log.info("demo ready (not serving: --no-serve / AISTOCK_DEMO_NO_SERVE)")
        return 0
    log.info("serving the Dagster UI on http://127.0.0.1:%s (Ctrl-C to stop)", port)
    cmd = [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port), *_workspace_args()]
    try:
        return subprocess.call(cmd, cwd=PACKAGE_DIR.parent)
    except KeyboardInterrupt:
        return 0


def materialize_demo_snapshots(settings: Settings) -> None:
    """Backfill every declared snapshot over its whole span, one run each, recorded in the demo instance."""
    from dagster import DagsterInstance, materialize

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.snapshot_config import load_snapshots_file

    config = load_snapshots_file(settings.snapshots_file)
    defs = build_definitions(settings)
    engine = create_db_engine(resolve_db_url(settings))
    with engine.connect() as conn:
        last = conn.execute(sa.text("SELECT max(trade_date) FROM market.kline_daily_qfq")).scalar()
    engine.dispose()
    instance = DagsterInstance.get()
    for decl in config.snapshots:
        end = min(decl.end or last, last)
        asset = defs.get_assets_def(["snapshots", decl.id])
        log.info("materializing snapshots/%s over %s..%s", decl.id, decl.start, end)
        result = materialize([asset], instance=instance, resources=defs.resources, tags={
            "dagster/asset_partition_range_start": decl.start.isoformat(),
            "dagster/asset_partition_range_end": end.isoformat()})
        if not result.success:
            raise RuntimeError(f"materializing snapshots/{decl.id} failed; see the run in the Dagster UI")
        log.info("snapshot %s ready at %s", decl.id, settings.snapshot_root / decl.id)


def demo_steps() -> list:
    """The demo's steps after the market is seeded, in order."""
    return [materialize_demo_snapshots]

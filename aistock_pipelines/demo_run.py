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
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine, redact
from aistock_pipelines.embedded_db import resolve_db_url
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES
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
    from aistock_pipelines.export.mapping import ExportMapping

    url = resolve_db_url(settings)
    engine = create_db_engine(url)
    with engine.connect() as conn:
        seeded = conn.execute(sa.text("SELECT to_regclass('market.demo_market_info') IS NOT NULL")).scalar()
        real = conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": ExportMapping().bars_table}).scalar()
        # a demo seeded before the index and universe tables existed is seeded anew, so the UI shows them
        outdated = seeded and not conn.execute(sa.text("SELECT to_regclass('market.index_daily') IS NOT NULL")).scalar()
    if real and not seeded:
        log.info("database %s holds a real market: not seeding", redact(url))
    elif reseed or not seeded or outdated:
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
    # The demo's factor pointers name ``rd_factors_lib``; answer them from the bundled demo copy.
    os.environ.setdefault("AISTOCK_FACTOR_PACKAGES", ",".join(DEMO_FACTOR_PACKAGES))
    ensure_demo_market(settings, reseed)
    with ExitStack() as stack:
        # The results API must outlive the steps: ``dagster dev`` below polls it with the sensor.
        os.environ["RDAGENT_RESULTS_URL"] = ensure_results_api(settings, stack)
        settings = Settings.from_env()
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


def ensure_results_api(settings: Settings, stack: ExitStack) -> str:
    """The RD-Agent results API the demo syncs from: the one at ``RDAGENT_RESULTS_URL`` if it is a results
    API serving the demo catalogs, otherwise the demo results directory served from this process (at that
    address when it is local and free, else on an ephemeral local port)."""
    from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir
    from aistock_pipelines.rdagent.results_server import serve_in_thread

    url = settings.rdagent_results_url
    problem = demo_api_problem(url)
    if problem is None:
        log.info("using the demo RD-Agent results API already answering at %s", url)
        return url
    log.info("not syncing from %s (%s): serving the demo's own results API", url, problem)
    results_dir = build_demo_results_dir(settings.home / "rdagent_results")
    parts = urlsplit(url)
    local = parts.hostname in ("127.0.0.1", "localhost")
    try:
        served = stack.enter_context(serve_in_thread(results_dir, "127.0.0.1", (parts.port or 80) if local else 0))
    except OSError:  # the configured port is taken by something that is not the demo's results API
        served = stack.enter_context(serve_in_thread(results_dir, "127.0.0.1", 0))
    log.info("serving the demo RD-Agent results (%s) at %s", results_dir, served)
    return served


#: Catalogs compared with the bundled demo files: (kind, file, list key).
_DEMO_CATALOG_PROBES = (("factors", "factor_catalog.json", "factors"), ("loops", "loop_catalog.json", "loops"))


def demo_api_problem(url: str) -> str | None:
    """Why ``url`` is not a results API serving the demo catalogs, or None when it is.

    ``/health`` alone proves nothing: any service may answer it, and the demo would sync its answers.
    """
    from aistock_pipelines.demo.rdagent_results_builder import load_demo_catalog
    from aistock_pipelines.rdagent.json_values import sanitize_json
    from aistock_pipelines.rdagent.results_client import RDAgentResultsClient, ResultsApiError

    with RDAgentResultsClient(url, connect_timeout=1.0, read_timeout=2.0, retries=0, request_deadline=5.0) as client:
        if not client.health():
            return "no results API answers there"
        for kind, file_name, list_key in _DEMO_CATALOG_PROBES:
            demo = load_demo_catalog(file_name)
            try:
                served = client.fetch_catalog(kind)
            except ResultsApiError as exc:
                return f"it answers /health, but /catalog/{kind} is unusable: {exc}"
            if served is None or (served.generated_at_utc, served.records) != (
                    demo["generated_at_utc"], sanitize_json(demo[list_key])):
                return f"it answers /health, but its {kind} catalog is not the demo's"
    return None


def sync_demo_rdagent_results(settings: Settings) -> None:
    """Run ``rdagent_sync_job`` once (recorded in the demo instance), so the registries are filled
    before the UI opens; afterwards ``rdagent_results_sensor`` syncs whatever changes."""
    from dagster import DagsterInstance

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.orchestration.rdagent_assets import JOB_NAME

    job = build_definitions(settings).resolve_job_def(JOB_NAME)
    result = job.execute_in_process(instance=DagsterInstance.get(), raise_on_error=False)
    if not result.success:
        raise RuntimeError(f"{JOB_NAME} failed against {settings.rdagent_results_url}; see the run in the Dagster UI")
    counts = ("inserted", "updated", "unchanged", "deactivated")
    for event in result.get_asset_materialization_events():
        meta = event.materialization.metadata
        if all(k in meta for k in counts):  # the registry listings carry other figures ("not offered", …)
            log.info("%s: inserted %s, updated %s, unchanged %s, deactivated %s", event.asset_key.to_user_string(),
                     *(meta[k].value for k in counts))


def materialize_demo_snapshots(settings: Settings) -> None:
    """Bring every declared snapshot up to date through Dagster, one run each, recorded in the demo instance.

    A snapshot not yet exported is backfilled over its whole span (the full export); an exported one gets
    the partition range from its last exported day to the database's last day, i.e. an incremental export
    that also catches restatements and declaration changes (a few seconds instead of a full rebuild).
    """
    from dagster import DagsterInstance, materialize

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.export.mapping import quote_table
    from aistock_pipelines.export.snapshot_writer import SnapshotWriter
    from aistock_pipelines.snapshot_config import load_snapshots_file

    config = load_snapshots_file(settings.snapshots_file)
    defs = build_definitions(settings)
    writer = SnapshotWriter(settings.snapshot_root)
    engine = create_db_engine(resolve_db_url(settings))
    with engine.connect() as conn:
        last = conn.execute(sa.text(f"SELECT max(trade_date) FROM {quote_table(config.mapping.bars_table)}")).scalar()
    engine.dispose()
    instance = DagsterInstance.get()
    for decl in config.snapshots:
        end = min(decl.end or last, last)
        meta = writer.read_meta(decl.id) or {}
        start = max(decl.start, min(date.fromisoformat(meta["end"]), end)) if meta.get("end") else decl.start
        asset = defs.get_assets_def(["snapshots", decl.id])
        log.info("materializing snapshots/%s over %s..%s", decl.id, start, end)
        result = materialize([asset], instance=instance, resources=defs.resources, tags={
            "dagster/asset_partition_range_start": start.isoformat(),
            "dagster/asset_partition_range_end": end.isoformat()})
        if not result.success:
            raise RuntimeError(f"materializing snapshots/{decl.id} failed; see the run in the Dagster UI")
        log.info("snapshot %s ready at %s", decl.id, writer.path(decl.id))


def demo_steps() -> list:
    """The demo's steps after the market is seeded, in order."""
    return [sync_demo_rdagent_results, materialize_demo_snapshots]

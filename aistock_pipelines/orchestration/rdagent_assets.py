"""Dagster wiring of the RD-Agent results sync: assets, an asset check, a job and a polling sensor.

Deliberately thin: every asset calls :mod:`aistock_pipelines.rdagent.sync`, which knows nothing of Dagster
and is what the CLI uses too. Resources are not defined here; the code location supplies ``aistock_db``
(:class:`AIstockDatabase`) and ``rdagent_api`` (:class:`RDAgentResultsApi`) and merges
:func:`rdagent_definitions` in with ``Definitions.merge``.

The sensor exists because the results API has no push, ETag or paging: the only way to notice a new
export is to fetch each catalog and compare a fingerprint. A tick therefore GETs five catalogs, the three
registry listings (404 while the server does not offer them) and, for the loops the loop catalog lists,
each loop's artifacts (what the artifacts sync depends on, so an artifact-only change is seen), with short
timeouts, no retries, an overall budget and a deadline per request and one for the whole tick (every
request is cut off at it), well inside Dagster's 60 s sensor limit, and asks for one run of just the assets
whose fingerprint changed.

Each catalog asset's materialization also carries a glance at the results library
(:func:`aistock_pipelines.rdagent.library.glance`): a table with its schema (top factors by IC, newest
loops with their KPIs, artifacts with files and sizes, …) and numbers the asset's Plots tab draws over
syncs (best IC, loops with a positive decision, …).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    AssetsDefinition,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    asset_check,
    define_asset_job,
    sensor,
)

from aistock_pipelines.rdagent.factor_impl import FactorPackages, alignment_report, registry_pointers
from aistock_pipelines.rdagent.library import Glance, ImplRecord, glance, record_factor_impl
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient, ResultsApiError
from aistock_pipelines.rdagent.sync import (
    CATALOGS,
    LOOP_ARTIFACTS,
    POLL_KINDS,
    RUN_REGISTRY_KINDS,
    CatalogName,
    SyncError,
    SyncStats,
    poll_fingerprints,
    registry_table,
    sync_catalog,
    sync_loop_artifacts,
    sync_run_registry,
)
from aistock_pipelines.resources import AIstockDatabase, RDAgentResultsApi

GROUP = "rdagent"
KEY_PREFIX = "rdagent"
JOB_NAME = "rdagent_sync_job"
SENSOR_NAME = "rdagent_results_sensor"
CHECK_NAME = "factor_package_aligned"
JOB_TAGS = {"aistock/job": "rdagent_sync"}

#: catalog -> asset name under ``rdagent/``.
CATALOG_ASSET_NAMES: dict[CatalogName, str] = {
    "factors": "factor_catalog",
    "strategies": "strategy_catalog",
    "loops": "loop_catalog",
    "models": "model_catalog",
    "alpha158": "alpha158_meta",
}
LOOP_ARTIFACTS_ASSET_NAME = "loop_artifacts"
RUN_REGISTRY_ASSET_NAME = "run_registry"

#: Sensor tick limits: per operation and per request, the time after which no further catalog is
#: fetched, and the tick's deadline, at which any request still running is cut off (Dagster: 60 s).
SENSOR_CONNECT_TIMEOUT_S = 2.0
SENSOR_READ_TIMEOUT_S = 5.0
SENSOR_REQUEST_DEADLINE_S = 20.0
SENSOR_POLL_BUDGET_S = 30.0
SENSOR_TICK_DEADLINE_S = 45.0


def asset_key(name: str) -> AssetKey:
    return AssetKey([KEY_PREFIX, name])


def catalog_asset_key(kind: CatalogName) -> AssetKey:
    return asset_key(CATALOG_ASSET_NAMES[kind])


def results_client(api: RDAgentResultsApi, *, for_sensor: bool = False, deadline_at: float | None = None
                   ) -> RDAgentResultsClient:
    """A client from the resource; the sensor's is capped so that a tick cannot hang (``deadline_at``:
    the tick's end, a ``time.monotonic()`` instant)."""
    if for_sensor:
        return RDAgentResultsClient(
            api.base_url,
            connect_timeout=min(api.connect_timeout_s, SENSOR_CONNECT_TIMEOUT_S),
            read_timeout=min(api.read_timeout_s, SENSOR_READ_TIMEOUT_S),
            request_deadline=min(api.request_deadline_s, SENSOR_REQUEST_DEADLINE_S),
            deadline_at=deadline_at,
            retries=0,
        )
    return RDAgentResultsClient(api.base_url, connect_timeout=api.connect_timeout_s, read_timeout=api.read_timeout_s,
                                request_deadline=api.request_deadline_s)


def sync_metadata(stats: SyncStats) -> dict[str, Any]:
    """Materialization metadata: the counts as ints, plus what identifies the synced catalog."""
    return {
        "published": stats.published,
        "inserted": stats.inserted,
        "updated": stats.updated,
        "unchanged": stats.unchanged,
        "deactivated": stats.deactivated,
        "reactivated": stats.reactivated,
        "records": stats.records,
        "duplicates_merged": stats.duplicates_merged,
        "generated_at_utc": stats.generated_at_utc or "",
        "fingerprint": stats.fingerprint,
    }


def glance_metadata(view: Glance | None) -> dict[str, Any]:
    """A library glance as Dagster metadata: the table with its schema, and the numbers (plotted over syncs)."""
    if view is None:
        return {}
    schema = TableSchema(columns=[TableColumn(name, kind) for name, kind in view.columns])
    numbers = {name: MetadataValue.float(float(value)) if isinstance(value, float) else MetadataValue.int(int(value))
               for name, value in view.numbers.items()}
    return {view.key: MetadataValue.table([TableRecord(row) for row in view.rows], schema=schema), **numbers}


def impl_metadata(record: ImplRecord) -> dict[str, Any]:
    """What the recording of the factor pointers found (the ``factor_library.impl_resolves`` column)."""
    return {
        "impl_pointers": record.pointers,
        "impl_resolving": record.resolving,
        "impl_not_resolving": record.not_resolving,
        "factor_package_versions": json.dumps(record.versions, sort_keys=True),
    }


def _synced(run: Callable[[], SyncStats]) -> SyncStats:
    try:
        return run()
    except SyncError as exc:
        raise Failure(description=str(exc), metadata={"kind": exc.kind}) from exc


def _catalog_asset(kind: CatalogName, factor_packages: Sequence[str] | None = None) -> AssetsDefinition:
    @asset(
        key=catalog_asset_key(kind),
        group_name=GROUP,
        kinds={"postgres"},
        description=(
            f"RD-Agent's {kind} catalog mirrored into rdagent.{registry_table(kind).name}: upserted, rows gone "
            "upstream deactivated; a 404 (not published) leaves the table as it was."
            + (" Each factor's pointer is checked against the installed factor package (factor_library."
               "impl_resolves) and the package version recorded." if kind == "factors" else "")
        ),
    )
    def _sync(aistock_db: AIstockDatabase, rdagent_api: RDAgentResultsApi) -> MaterializeResult:
        engine = aistock_db.engine()
        with results_client(rdagent_api) as client:
            metadata = sync_metadata(_synced(lambda: sync_catalog(engine, client, kind)))
        if kind == "factors":  # before the glance, which shows impl_resolves
            packages = FactorPackages.from_env() if factor_packages is None else FactorPackages.parse(factor_packages)
            metadata.update(impl_metadata(record_factor_impl(engine, packages)))
        return MaterializeResult(metadata={**metadata, **glance_metadata(glance(engine, kind))})

    return _sync


CATALOG_ASSETS: dict[CatalogName, AssetsDefinition] = {kind: _catalog_asset(kind) for kind in CATALOGS}


@asset(
    key=asset_key(LOOP_ARTIFACTS_ASSET_NAME),
    group_name=GROUP,
    kinds={"postgres"},
    deps=[CATALOG_ASSETS["loops"]],
    description=(
        "Artifacts of every active loop in rdagent.loop_result (one API call per loop), mirrored into "
        "rdagent.loop_artifacts; refreshed whenever the loop catalog or the artifacts' own fingerprint changes."
    ),
)
def loop_artifacts(aistock_db: AIstockDatabase, rdagent_api: RDAgentResultsApi) -> MaterializeResult:
    engine = aistock_db.engine()
    with results_client(rdagent_api) as client:
        metadata = sync_metadata(_synced(lambda: sync_loop_artifacts(engine, client)))
    return MaterializeResult(metadata={**metadata, **glance_metadata(glance(engine, LOOP_ARTIFACTS))})


@asset(
    key=asset_key(RUN_REGISTRY_ASSET_NAME),
    group_name=GROUP,
    kinds={"postgres"},
    description=(
        "The results API's /task_runs, /loops and /workspaces (Phase 2 design) mirrored into "
        "rdagent.task_run_registry, loop_registry and workspace_registry when the server offers them; "
        "the real API does not (404): recorded as not offered, nothing fails."
    ),
)
def run_registry(aistock_db: AIstockDatabase, rdagent_api: RDAgentResultsApi) -> MaterializeResult:
    engine = aistock_db.engine()
    metadata: dict[str, Any] = {}
    with results_client(rdagent_api) as client:
        for kind in RUN_REGISTRY_KINDS:
            stats = _synced(lambda: sync_run_registry(engine, client, kind))  # noqa: B023 - called at once
            metadata.update({f"{kind}_offered": stats.published, f"{kind}_inserted": stats.inserted,
                             f"{kind}_updated": stats.updated, f"{kind}_deactivated": stats.deactivated})
    return MaterializeResult(metadata={**metadata, **glance_metadata(glance(engine, "run_registry"))})


def rdagent_assets(factor_packages: Sequence[str] | None = None) -> list[AssetsDefinition]:
    """The RD-Agent assets; ``factor_packages`` (default: ``AISTOCK_FACTOR_PACKAGES`` when the run starts)
    is what the factor catalog asset checks pointers against, as the ``factor_package_aligned`` check."""
    catalogs = CATALOG_ASSETS if factor_packages is None else {
        **CATALOG_ASSETS, "factors": _catalog_asset("factors", factor_packages)}
    return [*catalogs.values(), loop_artifacts, run_registry]


RDAGENT_ASSETS: list[AssetsDefinition] = rdagent_assets()

_PROBLEMS_SHOWN = 50


def factor_package_check(factor_packages: Sequence[str] | None = None) -> Any:
    """The ``factor_package_aligned`` check; ``factor_packages`` defaults to ``AISTOCK_FACTOR_PACKAGES``
    read when the check runs (entries as in :meth:`FactorPackages.parse`)."""

    @asset_check(
        asset=CATALOG_ASSETS["factors"],
        name=CHECK_NAME,
        description=(
            "Every active factor's impl_module/impl_func resolves inside the allowed packages and the "
            "installed shared package is not older than its impl_version (WARN otherwise)."
        ),
    )
    def _check(aistock_db: AIstockDatabase) -> AssetCheckResult:
        packages = FactorPackages.from_env() if factor_packages is None else FactorPackages.parse(factor_packages)
        report = alignment_report(registry_pointers(aistock_db.engine()), packages)
        problems = [
            {"name": e.name, "source": e.source, "status": e.status.value, "impl_version": e.impl_version,
             "installed_version": e.installed_version, "detail": e.detail}
            for e in report.problems[:_PROBLEMS_SHOWN]
        ]
        return AssetCheckResult(
            passed=report.aligned,
            severity=AssetCheckSeverity.WARN,
            metadata={
                **report.counts,
                "pointers": len(report.entries),
                "installed_versions": json.dumps(report.installed_versions, sort_keys=True),
                "allowed_packages": ", ".join(packages.prefixes),
                "problems": problems,
            },
        )

    return _check


rdagent_sync_job = define_asset_job(
    JOB_NAME,
    selection=AssetSelection.groups(GROUP),
    tags=JOB_TAGS,
    description="Sync every RD-Agent catalog and the loop artifacts into the AIstock registry.",
)


# ------------------------------------------------------------------------------------------ sensor
def _load_cursor(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        loaded = json.loads(cursor)
    except ValueError:
        return {}
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(loaded, dict) else {}


def assets_for_changes(changed: Sequence[str]) -> list[AssetKey]:
    """Assets to refresh for the changed kinds; loop artifacts follow the loop catalog and their own
    fingerprint, the run registry any of its three listings."""
    keys = [catalog_asset_key(kind) for kind in CATALOGS if kind in changed]
    if "loops" in changed or LOOP_ARTIFACTS in changed:
        keys.append(asset_key(LOOP_ARTIFACTS_ASSET_NAME))
    if any(kind in changed for kind in RUN_REGISTRY_KINDS):
        keys.append(asset_key(RUN_REGISTRY_ASSET_NAME))
    return keys


def evaluate_results_sensor(cursor: str | None, api: RDAgentResultsApi, log: Any = None, *,
                            tick_deadline_s: float = SENSOR_TICK_DEADLINE_S) -> SensorResult | SkipReason:
    """One tick: poll, compare with the cursor's fingerprints, request a run of the changed assets.

    The cursor (``{catalog: fingerprint}``) only advances for catalogs that are part of the requested
    run; a catalog whose body was unusable keeps its old fingerprint and is looked at again next tick.
    As usual for cursor sensors, the cursor advances when the run is *requested*: a run that then fails
    is not requested again for the same fingerprints (the ``run_key`` dedupes them too) — re-run
    ``rdagent_sync_job`` by hand, or wait for the next export. Every request ends by ``tick_deadline_s``
    after the tick started; catalogs it cut off are looked at next tick.
    """
    previous = _load_cursor(cursor)
    try:
        with results_client(api, for_sensor=True, deadline_at=time.monotonic() + tick_deadline_s) as client:
            poll = poll_fingerprints(client, POLL_KINDS, budget_s=min(SENSOR_POLL_BUDGET_S, tick_deadline_s))
    except ResultsApiError as exc:
        return SkipReason(f"RD-Agent results API at {api.base_url} is not usable right now: {exc}")
    if log is not None:
        for kind, error in poll.errors.items():
            log.warning(f"RD-Agent {kind} catalog could not be read: {error}")
    changed = [kind for kind, fingerprint in poll.fingerprints.items() if previous.get(kind) != fingerprint]
    notes = []
    if poll.errors:
        notes.append(f"unreadable: {', '.join(sorted(poll.errors))}")
    if poll.not_polled:
        notes.append(f"not polled (time budget): {', '.join(poll.not_polled)}")
    if not changed:
        return SkipReason("no RD-Agent catalog changed" + (f" ({'; '.join(notes)})" if notes else ""))
    updated = {**previous, **{kind: poll.fingerprints[kind] for kind in changed}}
    digest = hashlib.sha256(json.dumps({k: updated[k] for k in changed}, sort_keys=True).encode()).hexdigest()
    request = RunRequest(
        run_key=f"rdagent-{digest[:20]}",
        asset_selection=assets_for_changes(changed),
        tags={**JOB_TAGS, "rdagent/changed": ",".join(changed)},
    )
    return SensorResult(run_requests=[request], cursor=json.dumps(updated, sort_keys=True))


def results_sensor(status: DefaultSensorStatus = DefaultSensorStatus.STOPPED) -> Any:
    @sensor(
        name=SENSOR_NAME,
        job=rdagent_sync_job,
        minimum_interval_seconds=60,
        default_status=status,
        description="Polls the RD-Agent results API and syncs only the catalogs whose fingerprint changed.",
    )
    def _sensor(context: SensorEvaluationContext, rdagent_api: RDAgentResultsApi) -> SensorResult | SkipReason:
        return evaluate_results_sensor(context.cursor, rdagent_api, context.log)

    return _sensor


rdagent_results_sensor = results_sensor()


def rdagent_definitions(
    *,
    factor_packages: Sequence[str] | None = None,
    sensor_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> Definitions:
    """The RD-Agent sync definitions, without resources (merge them into the code location)."""
    return Definitions(
        assets=RDAGENT_ASSETS if factor_packages is None else rdagent_assets(factor_packages),
        asset_checks=[factor_package_check(factor_packages)],
        jobs=[rdagent_sync_job],
        sensors=[rdagent_results_sensor if sensor_status == DefaultSensorStatus.STOPPED else results_sensor(sensor_status)],
    )

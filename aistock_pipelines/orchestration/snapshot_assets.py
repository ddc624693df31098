"""One partitioned asset per declared snapshot: ``snapshots/<id>``.

Partitions are the trading days of the snapshot's span that have bars (``trading_day_partitions.py``), so
the UI offers exactly the days there is something to export. A range backfill is one run
(``BackfillPolicy.single_run``): a range starting at the snapshot's start is the full export, any other range merges into the snapshot with restatement handling. Each snapshot has its own pool, so two
runs never write one snapshot (the exporter's file lock is the second line of defence).
"""


import hashlib
import logging
import traceback
import warnings
from datetime import date

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Backoff,
    BetaWarning,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from aistock_pipelines.db import passwords, scrub
from aistock_pipelines.export.exporter import DataGateError, DataNotReady, ExportResult, QlibDailyExporter
from aistock_pipelines.export.mapping import ExportMapping, MappingError
from aistock_pipelines.export.market_files import MarketFilesDecl
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_shape import SnapshotError
from aistock_pipelines.export.snapshot_writer import SnapshotWriter
from aistock_pipelines.orchestration.market_assets import DAILY_FEATURES_KEY
from aistock_pipelines.orchestration.releases import export_diff_metadata
from aistock_pipelines.orchestration.trading_day_partitions import Register, TradingDayPartitions
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.snapshot_config import SnapshotDecl, SnapshotsFile

# Single-run backfills are the point of these assets; the beta notice would only repeat at every load.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=BetaWarning)
#: Phase messages for a console following the run (the demo shows them as progress); plain Python logging.
progress = logging.getLogger("aistock_pipelines.progress")
#: Only a day not loaded yet heals by waiting, and only the post-close schedule's run waits for it (the
#: vendor may load late); every other error fails at once with its message (:func:`export_failure`).
SNAPSHOT_RETRY = RetryPolicy(max_retries=3, delay=120, backoff=Backoff.EXPONENTIAL)
#: The run tag Dagster puts on runs its schedules start.
SCHEDULE_TAG = "dagster/schedule_name"
#: Errors whose message is the whole story; anything else is reported with its type.
_EXPORT_ERRORS = (DataGateError, DataNotReady, MappingError, SnapshotError)


def partitions_for(decl: SnapshotDecl, register: Register | None = None) -> TradingDayPartitions:
    """The snapshot's trading days; ``register`` (the code location's) registers them when asked for a key."""
    return TradingDayPartitions(decl.id, register)


def build_exporter(db: AIstockDatabase, store: SnapshotStore, mapping: ExportMapping,
                   market_files: MarketFilesDecl = MarketFilesDecl()) -> QlibDailyExporter:
    engine = db.engine()
    return QlibDailyExporter(DBReader(engine, mapping, db.resolved_url()), SnapshotWriter(store.path), MetaRepo(engine),
                             market_files)


def run_snapshot_export(exporter: QlibDailyExporter, decl: SnapshotDecl, range_start: date, range_end: date) -> ExportResult | None:
    """Export [range_start, range_end] of ``decl``: full when the range starts at the snapshot's start or the
    snapshot does not exist yet, otherwise an incremental merge. None when the range has no trading day."""
    with exporter.reader.session() as s:
        if not s.trading_days(range_start, range_end):
            return None
    if range_start <= decl.start or not exporter.writer.exists(decl.id):
        return exporter.export_full(decl.id, decl.start, range_end, decl.ts_codes, options=decl.options())
    return exporter.export_incremental(decl.id, range_end, decl.ts_codes, options=decl.options(), start=decl.start)


def result_metadata(result: ExportResult) -> dict:
    frame_preview = pd.read_hdf(result.path / "daily_pv.h5", key="data", stop=5) if (result.path / "daily_pv.h5").exists() else None
    meta = {
        "mode": result.mode,
        "rows": result.rows,
        "instruments": result.instruments,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
        "restated_instruments": len(result.restated),
        "restated_sample": MetadataValue.json(result.restated[:20]),
        "rows_added": result.rows_added,
        "rows_rewritten": result.rows_rewritten,
        "rows_read": result.rows_read,
        "sha256": result.sha256,
        "path": MetadataValue.path(str(result.path)),
    }
    if result.applied:
        meta["applied"] = result.applied  # incremental: "in place" or "merge"
    meta.update({f"seconds_{k}": float(round(v, 4)) for k, v in result.timings.items()})
    if frame_preview is not None:
        meta["columns"] = MetadataValue.json(list(frame_preview.columns))
        meta["daily_pv_bytes"] = (result.path / "daily_pv.h5").stat().st_size
        meta["preview"] = MetadataValue.md(frame_preview.iloc[:, :8].to_markdown())  # tabulate ships with dagster
    meta.update(export_diff_metadata(result))  # what this run changed, against the version it replaced
    return meta


def partition_range(context: AssetExecutionContext) -> tuple[date, date]:
    """The run's first and last day (a key added by hand in the UI may be no day at all)."""
    keys = context.partition_key_range
    try:
        return date.fromisoformat(keys.start), date.fromisoformat(keys.end)
    except ValueError:
        raise Failure(description=f"partition keys {keys.start}..{keys.end} are not days (YYYY-MM-DD)",
                      allow_retries=False) from None


def export_failure(snapshot_id: str, exc: Exception, db_url: str | None) -> Failure:
    """A Failure that is not retried, carrying the cause's message with any database password masked.

    The cause stays chained (its traceback shows in the run's log) unless its text would show a password.
    """
    text = str(exc) if isinstance(exc, _EXPORT_ERRORS) else f"{type(exc).__name__}: {exc}"
    failure = Failure(description=f"snapshot {snapshot_id}: {scrub(text, db_url)}", allow_retries=False)
    shown = "".join(traceback.format_exception(exc))
    failure.__cause__ = None if any(secret in shown for secret in passwords(db_url)) else exc
    failure.__suppress_context__ = True
    return failure


def declaration_version(decl: SnapshotDecl, mapping: ExportMapping) -> str:
    """Code version of a snapshot asset: its declaration and the mapping, so editing either shows it stale."""
    doc = decl.model_dump_json() + mapping.fingerprint()
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def snapshot_asset(decl: SnapshotDecl, config: SnapshotsFile, register: Register | None = None,
                   retry_policy: RetryPolicy = SNAPSHOT_RETRY) -> AssetsDefinition:
    mapping = config.export_mapping()

    @asset(
        key=["snapshots", decl.id],
        group_name="snapshots",
        deps=[DAILY_FEATURES_KEY],
        code_version=declaration_version(decl, mapping),
        partitions_def=partitions_for(decl, register),
        backfill_policy=BackfillPolicy.single_run(),
        retry_policy=retry_policy,
        pool=f"snapshot_{decl.id}",
        kinds={"hdf5", "qlib"},
        description=f"Qlib/RD-Agent snapshot {decl.id}: {decl.columns} columns, {decl.instruments} names, "
                    f"{decl.dtype}, from {decl.start}" + (f" to {decl.end}" if decl.end else " (open-ended)"),
        metadata={"declaration": MetadataValue.json(decl.model_dump(mode="json"))},
    )
    def _snapshot(context: AssetExecutionContext, aistock_db: AIstockDatabase, snapshot_store: SnapshotStore) -> MaterializeResult:
        range_start, range_end = partition_range(context)
        progress.info("exporting %s..%s", range_start, range_end)
        try:
            exporter = build_exporter(aistock_db, snapshot_store, mapping, config.market_files(decl.universes))
            result = run_snapshot_export(exporter, decl, range_start, range_end)
        except DataNotReady as e:
            if SCHEDULE_TAG in context.run.tags:
                context.log.warning("snapshot %s: %s; retried by the post-close schedule's run", decl.id, e)
                raise
            raise export_failure(decl.id, e, aistock_db.url)
        except Exception as e:  # noqa: BLE001 - waiting heals nothing else: fail now, with the cause
            raise export_failure(decl.id, e, aistock_db.url)
        if result is None:
            context.log.info("no trading day in %s..%s: nothing to do", range_start, range_end)
            return MaterializeResult(metadata={"mode": "no trading day", "start": range_start.isoformat(),
                                               "end": range_end.isoformat()})
        context.log.info("snapshot %s: %s, %s rows, %s restated", decl.id, result.mode, result.rows, len(result.restated))
        progress.info("%s export: %s rows written; recording the partitions, then the checks", result.mode,
                      f"{result.rows:,}")
        return MaterializeResult(metadata=result_metadata(result))

    return _snapshot


def snapshot_assets(config: SnapshotsFile, register: Register | None = None) -> list[AssetsDefinition]:
    return [snapshot_asset(decl, config, register) for decl in config.snapshots]

"""The ad-hoc export job: a one-off export started from the Launchpad instead of an HTTP request.

Its run config is the request body of AIstock's export endpoint ``POST /api/v1/qlib/snapshots/daily``
(``snapshot_id``, ``mode``, ``codes``, ``start``, ``end``) plus the layout options a declaration has; the
run page takes the place of that API's job status (``GET /jobs/{job_id}``). It is for one-off snapshots: a declared snapshot belongs to its asset (``snapshots/<id>``) and is refused here, so
the two never fight over one directory. Files land under the same snapshot root, with the same atomic
versions, lock, materialization-style metadata and ``meta.json``. The six snapshot checks run on every
ad-hoc export too: their results are in the output's metadata, and a failed check fails the run.
"""


from datetime import date
from typing import Literal

from dagster import Config, Failure, OpExecutionContext, Output, job, op
from pydantic import Field

from aistock_pipelines.export.snapshot_validation import validate_snapshot
from aistock_pipelines.orchestration.snapshot_assets import build_exporter, export_failure, result_metadata
from aistock_pipelines.orchestration.snapshot_checks import checks_metadata
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.snapshot_config import SnapshotLayout, SnapshotsFile

JOB_NAME = "adhoc_snapshot_export"


class AdhocExportConfig(Config, SnapshotLayout):
    """The request body (id, mode, codes, range) plus a declaration's layout options, with the YAML's defaults."""

    snapshot_id: str = Field(description="[A-Za-z0-9_-]+; must not be declared in the snapshots file")
    mode: Literal["full", "incremental"] = Field(default="full", description="full: (re)write [start, end]; incremental: bring up to end")
    codes: list[str] | None = Field(default=None, description="ts_codes; null = every instrument, delisted included")
    start: str | None = Field(default=None, description="YYYY-MM-DD, required for mode=full")
    end: str | None = Field(default=None, description="YYYY-MM-DD; null = the last day with bars")
    overwrite: bool = Field(default=False, description="mode=full: replace an existing snapshot of this id")


def _day(value: str | None, what: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Failure(description=f"{what} must be a date YYYY-MM-DD, got {value!r}", allow_retries=False) from None


def adhoc_export_job(config: SnapshotsFile):
    declared = {d.id for d in config.snapshots}
    mapping, market_files = config.export_mapping(), config.market_files()

    @op(name="export_snapshot", pool="adhoc_snapshot_export",
        description="Export one ad-hoc snapshot with the exporter (full or incremental).")
    def export_snapshot(context: OpExecutionContext, config: AdhocExportConfig, aistock_db: AIstockDatabase,
                        snapshot_store: SnapshotStore) -> Output[None]:
        if config.snapshot_id in declared:
            raise Failure(description=f"snapshot {config.snapshot_id!r} is declared in the snapshots file: "
                                      f"materialize snapshots/{config.snapshot_id} instead", allow_retries=False)
        start, end = _day(config.start, "start"), _day(config.end, "end")
        try:
            exporter = build_exporter(aistock_db, snapshot_store, mapping, market_files)
            if config.mode == "full":
                if start is None:
                    raise Failure(description="mode=full needs start (YYYY-MM-DD)", allow_retries=False)
                result = exporter.export_full(config.snapshot_id, start, end, config.codes, options=config.options(),
                                              if_exists="overwrite" if config.overwrite else "refuse")
            else:
                result = exporter.export_incremental(config.snapshot_id, end, config.codes)
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001 - every cause named, any database password masked
            raise export_failure(config.snapshot_id, e, aistock_db.url)
        context.log.info("snapshot %s: %s, %s rows", config.snapshot_id, result.mode, result.rows)
        outcomes = validate_snapshot(result.path, aistock_db.engine(), mapping)
        failed = [f"{o.name}: {o.description}" for o in outcomes if not o.passed]
        metadata = {**result_metadata(result), **checks_metadata(outcomes)}
        if failed:
            raise Failure(description=f"snapshot {config.snapshot_id} written, but checks failed: " + "; ".join(failed),
                          metadata=metadata, allow_retries=False)
        return Output(None, metadata=metadata)

    @job(name=JOB_NAME, tags={"aistock/job": "adhoc_snapshot_export"},
         description="One-off snapshot export; run config mirrors the body of POST /api/v1/qlib/snapshots/daily.")
    def _job():
        export_snapshot()

    return _job

"""Releases in Dagster (thin wiring over :mod:`aistock_pipelines.export.releases`): the Launchpad jobs
``snapshot_release`` and ``snapshot_rollback``, a release schedule per snapshot that declares one
(``release: {schedule: monthly, keep_last: 12}``) — together :func:`release_definitions` — and the diff
metadata each export carries.

The schedule runs at 20:30 Asia/Shanghai on weekdays, two hours after the post-close export (18:30, retried
meanwhile), and requests a release only on the last trading day of its period by the database's trade
calendar. The run waits for the snapshot to reach that day: a live version that ends earlier (the export
still retrying) fails the run, and its retry policy tries again later.
"""


import json
from datetime import date

import sqlalchemy as sa
from dagster import (AssetObservation, Backoff, Config, DefaultScheduleStatus, Definitions, Failure, JobDefinition,
                     MetadataValue, OpExecutionContext, Output, RetryPolicy, RunRequest, ScheduleDefinition,
                     ScheduleEvaluationContext, SkipReason, job, op, schedule)
from pydantic import Field

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE
from aistock_pipelines.export.build import ExportResult
from aistock_pipelines.export.mapping import quote_table
from aistock_pipelines.export.releases import ReleaseResult, ReleaseStore
from aistock_pipelines.export.rollback import rollback
from aistock_pipelines.export.snapshot_diff import diff_folders
from aistock_pipelines.export.snapshot_shape import SnapshotError
from aistock_pipelines.export.versions import SnapshotLocked, SnapshotVersions
from aistock_pipelines.orchestration.schedules import trading_day_closed
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.snapshot_config import SnapshotDecl, SnapshotsFile, snapshot_name

RELEASE_JOB = "snapshot_release"
ROLLBACK_JOB = "snapshot_rollback"
RELEASE_CRON = "30 20 * * 1-5"
#: A release waiting for the day's export, or for the writer lock, tries again later.
RELEASE_RETRY = RetryPolicy(max_retries=4, delay=300, backoff=Backoff.EXPONENTIAL)


class ReleaseConfig(Config):
    snapshot_id: str = Field(description="the snapshot to release (declared or ad hoc)")
    label: str | None = Field(default=None, description="release name; null = the snapshot's last day")
    keep: bool = Field(default=False, description="retention never deletes this release")
    not_before: str | None = Field(default=None, description="YYYY-MM-DD the live snapshot must have reached "
                                                              "(the schedule's trading day); earlier: fail and retry")


class RollbackConfig(Config):
    snapshot_id: str = Field(description="the snapshot whose live version is rolled back")
    to: str = Field(description="the release the live version becomes again")


def release_metadata(made: ReleaseResult) -> dict:
    r = made.release
    held = r.doc.get("contents", {})
    return {"release": r.name, "path": MetadataValue.path(str(r.path)), "created": made.created,
            "files": r.doc["manifest"]["files"], "bytes": r.doc["manifest"]["bytes"],
            "bytes_added": r.doc["bytes_added"], "daily_pv_sha256": r.doc["daily_pv_sha256"],
            "end": r.doc["database"]["end"], "export_id": r.export_id, "keep": r.keep,
            "universes": MetadataValue.json(held.get("universes", [])),
            "benchmarks": MetadataValue.json(held.get("benchmarks", [])),
            "deleted_by_retention": MetadataValue.json(made.deleted), "seconds": float(round(made.seconds, 3))}


def _check_reached(store: ReleaseStore, snapshot_id: str, not_before: str | None) -> None:
    meta = store.versions.read_meta(snapshot_id)
    if not_before and (meta is None or meta["end"] < not_before):
        raise Failure(description=f"snapshot {snapshot_id} ends {meta and meta['end']}, before {not_before}: the "
                                  "day's export has not finished; the release retries later")


def release_job(snapshots: SnapshotsFile) -> JobDefinition:
    declared: dict[str, SnapshotDecl] = {d.id: d for d in snapshots.snapshots}

    @op(name="release_snapshot", retry_policy=RELEASE_RETRY,
        description="Pin the live version of a snapshot as a named, immutable release; apply its retention.")
    def release_snapshot(context: OpExecutionContext, config: ReleaseConfig, aistock_db: AIstockDatabase,
                         snapshot_store: SnapshotStore) -> Output[None]:
        decl = declared.get(config.snapshot_id)
        policy = decl.release if decl is not None else None
        store = ReleaseStore(snapshot_store.path, aistock_db.engine())
        _check_reached(store, config.snapshot_id, config.not_before)
        try:
            made = store.create(config.snapshot_id, label=config.label, keep=config.keep,
                                keep_last=policy.keep_last if policy else None,
                                declaration=snapshots.declaration_doc(config.snapshot_id))
        except SnapshotLocked:
            raise  # an export holds the snapshot: retried
        except SnapshotError as e:
            raise Failure(description=f"snapshot {config.snapshot_id}: {e}", allow_retries=False) from e
        metadata = release_metadata(made)
        if decl is not None:  # the release appears on the snapshot asset's page too
            context.log_event(AssetObservation(asset_key=["snapshots", decl.id], metadata=metadata))
        context.log.info("release %s of %s at %s", made.release.name, config.snapshot_id, made.release.path)
        return Output(None, metadata=metadata)

    @job(name=RELEASE_JOB, tags={"aistock/job": "snapshot_release"},
         description="Release a snapshot: hard links of its live version plus a sha256 manifest (Launchpad or schedule).")
    def _job():
        release_snapshot()

    return _job


def rollback_job() -> JobDefinition:
    @op(name="rollback_snapshot",
        description="Make a snapshot's live version equal to one of its releases; exports continue from it.")
    def rollback_snapshot(context: OpExecutionContext, config: RollbackConfig, aistock_db: AIstockDatabase,
                          snapshot_store: SnapshotStore) -> Output[None]:
        try:
            done = rollback(ReleaseStore(snapshot_store.path, aistock_db.engine()), config.snapshot_id, config.to)
        except SnapshotError as e:
            raise Failure(description=f"snapshot {config.snapshot_id}: {e}", allow_retries=False) from e
        context.log.info("%s rolled back to release %s", config.snapshot_id, config.to)
        return Output(None, metadata={
            "release": config.to, "path": MetadataValue.path(str(done.path)), "version": done.version.name,
            "replaced": done.replaced or "", "meta_rows_restored": done.meta_rows if done.meta_rows is not None else -1,
            "export_id": done.release.export_id, "daily_pv_sha256": done.release.doc["daily_pv_sha256"],
            "seconds": float(round(done.seconds, 3))})

    @job(name=ROLLBACK_JOB, tags={"aistock/job": "snapshot_rollback"},
         description="Roll a snapshot back to a release (run config: snapshot_id, to).")
    def _job():
        rollback_snapshot()

    return _job


def next_trading_day(db: AIstockDatabase, day: date, calendar_table: str) -> date | None:
    with db.engine().connect() as conn:
        return conn.execute(sa.text(f"SELECT min(cal_date) FROM {quote_table(calendar_table)} "
                                    "WHERE cal_date > :d AND is_trading"), {"d": day}).scalar()


def ends_period(schedule_kind: str, day: date, following: date) -> bool:
    """Whether ``day`` is the last trading day of its period when ``following`` is the next trading day."""
    if schedule_kind == "monthly":
        return (following.year, following.month) != (day.year, day.month)
    if schedule_kind == "weekly":
        return following.isocalendar()[:2] != day.isocalendar()[:2]
    return True


def release_schedule(decl: SnapshotDecl, target: JobDefinition, calendar_table: str) -> ScheduleDefinition:
    kind = decl.release.schedule

    @schedule(name=f"snapshot_{snapshot_name(decl.id)}_release", cron_schedule=RELEASE_CRON,
              execution_timezone=EXCHANGE_TIMEZONE, job=target, default_status=DefaultScheduleStatus.RUNNING,
              description=f"A {kind} release of snapshots/{decl.id} after the close of the period's last trading day.")
    def _release(context: ScheduleEvaluationContext, aistock_db: AIstockDatabase):
        today = trading_day_closed(context, aistock_db, calendar_table)
        if isinstance(today, SkipReason):
            return today
        following = next_trading_day(aistock_db, today, calendar_table)
        if following is None:
            return SkipReason(f"{calendar_table} has no trading day after {today}: extend the trade calendar")
        if not ends_period(kind, today, following):
            period = {"monthly": "month", "weekly": "week"}[kind]
            return SkipReason(f"{today} is not the last trading day of its {period} (next: {following})")
        run_config = {"ops": {"release_snapshot": {"config": {"snapshot_id": decl.id, "not_before": today.isoformat()}}}}
        return RunRequest(run_key=f"{decl.id}:release:{today}", run_config=run_config,
                          tags={"aistock/snapshot": decl.id})

    return _release


def release_schedules(config: SnapshotsFile, target: JobDefinition) -> list[ScheduleDefinition]:
    return [release_schedule(d, target, config.mapping.calendar_table)
            for d in config.snapshots if d.release is not None and d.release.schedule is not None]


def release_definitions(config: SnapshotsFile) -> Definitions:
    """The release and rollback jobs, and a release schedule per snapshot that declares one."""
    releases = release_job(config)
    return Definitions(jobs=[releases, rollback_job()], schedules=release_schedules(config, releases))


def export_diff_metadata(result: ExportResult) -> dict:
    """What an export changed: its version against the one it replaced (still on disk until the next
    export), as ``diff_*`` metadata; nothing when there is no such version."""
    if result.mode == "unchanged":
        return {}
    try:
        meta = json.loads((result.path / "meta.json").read_text())
        if not meta.get("replaces"):
            return {}
        previous = SnapshotVersions(result.path.parent).version(meta["replaces"])
        if not (previous / "meta.json").is_file():
            return {}
        d = diff_folders(previous, result.path.resolve(), meta["replaces"], "live")
    except (OSError, ValueError, KeyError, SnapshotError) as e:  # a diff must not fail the export
        return {"diff_error": str(e)}
    return {"diff_against": meta["replaces"], "diff_rows_added": d.rows_added, "diff_rows_removed": d.rows_removed,
            "diff_instruments_added": MetadataValue.json(d.instruments_added[:50]),
            "diff_instruments_removed": MetadataValue.json(d.instruments_removed[:50]),
            "diff_restated": len(d.restated), "diff_restated_largest": MetadataValue.md(d.markdown(top=20)),
            "diff_columns_added": MetadataValue.json(d.columns_added),
            "diff_columns_removed": MetadataValue.json(d.columns_removed)}

"""Asset checks on every snapshot: the consumer-facing validation of :mod:`export.snapshot_validation`.

All checks are blocking: a snapshot that fails one of them would mislead Qlib or RD-Agent, so a run that
materializes it stops there (downstream assets are not materialized) and the UI shows which check failed
and why. One multi-check per snapshot reads ``daily_pv.h5`` once for all six.
"""

import logging

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetChecksDefinition,
    AssetKey,
    multi_asset_check,
)

from aistock_pipelines.export.snapshot_validation import CheckOutcome, validate_snapshot
from aistock_pipelines.resources import AIstockDatabase, SnapshotStore
from aistock_pipelines.snapshot_config import SnapshotDecl, SnapshotsFile, snapshot_name

CHECKS: dict[str, str] = {
    "index_unique_sorted": "daily_pv.h5 index (datetime, instrument) is unique and sorted",
    "ohlc_sane": "close > 0 and low <= open, close <= high on every row",
    "calendar_matches_trade_calendar": "calendars/day.txt equals the trade calendar's open days over the span",
    "row_parity_with_database": "one row per database bar over the exported range, day by day",
    "bins_match_h5": "Qlib bins of a sample of instruments decode to the values in daily_pv.h5",
    "rdagent_folders_clean": "rdagent/ and rdagent_debug/ hold only .h5 and .md files",
}


def _result(key, outcome: CheckOutcome) -> AssetCheckResult:
    return AssetCheckResult(asset_key=key, check_name=outcome.name, passed=outcome.passed,
                            severity=AssetCheckSeverity.ERROR, description=outcome.description,
                            metadata=outcome.metadata)


def snapshot_checks(decl: SnapshotDecl, config: SnapshotsFile) -> AssetChecksDefinition:
    key = AssetKey(["snapshots", decl.id])
    mapping = config.export_mapping().select(decl.factor_tables)

    @multi_asset_check(
        name=f"snapshot_{snapshot_name(decl.id)}_checks",
        specs=[AssetCheckSpec(name, asset=key, description=text, blocking=True) for name, text in CHECKS.items()],
    )
    def _checks(aistock_db: AIstockDatabase, snapshot_store: SnapshotStore):
        directory = snapshot_store.path / decl.id
        if not (directory / "meta.json").exists():
            for name in CHECKS:
                yield AssetCheckResult(asset_key=key, check_name=name, passed=False,
                                       description=f"snapshot {decl.id} has not been exported to {directory} yet")
            return
        logging.getLogger("aistock_pipelines.progress").info("running the %s checks", len(CHECKS))
        for outcome in validate_snapshot(directory, aistock_db.engine(), mapping):
            yield _result(key, outcome)

    return _checks


def checks_metadata(outcomes: list[CheckOutcome]) -> dict[str, str]:
    """The checks' results as materialization metadata (the ad-hoc job's snapshots have no asset to check):
    ``check_<name>`` = ``passed`` or ``FAILED: <why>``, plus ``checks_passed`` = ``n/6``."""
    meta = {f"check_{o.name}": "passed" if o.passed else f"FAILED: {o.description}" for o in outcomes}
    meta["checks_passed"] = f"{sum(o.passed for o in outcomes)}/{len(outcomes)}"
    return meta


def all_snapshot_checks(config: SnapshotsFile) -> list[AssetChecksDefinition]:
    return [snapshot_checks(decl, config) for decl in config.snapshots]

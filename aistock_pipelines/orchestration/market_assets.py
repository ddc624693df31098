"""The market side of the asset graph: observed source tables and ``market/daily_features``.

* ``market/kline_daily_qfq`` and one asset per factor table are *external* assets (AIstock's own jobs
  write them). An observation reads the latest trade_date and its row count, which become the data version,
  so the UI shows when each source last moved; a schedule observes them every 30 minutes on weekdays.
* ``market/daily_features`` is the mapping + factor joins, published as the view ``market.daily_features``
  (:mod:`aistock_pipelines.export.daily_features`). Its code version is the mapping's fingerprint: change a
  column, a scale or a factor table and every snapshot downstream shows as stale in the UI.
"""


import warnings

import sqlalchemy as sa
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    AssetSpec,
    BetaWarning,
    DataVersion,
    DefaultScheduleStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    ScheduleDefinition,
    asset,
    define_asset_job,
    multi_observable_source_asset,
)

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE
from aistock_pipelines.export.daily_features import VIEW_NAME, create_view
from aistock_pipelines.export.mapping import ExportMapping, quote_table, resolve_mapping
from aistock_pipelines.resources import AIstockDatabase
from aistock_pipelines.snapshot_config import SnapshotsFile

warnings.filterwarnings("ignore", message=".*multi_observable_source_asset.*", category=BetaWarning)

GROUP = "market"
DAILY_FEATURES_KEY = AssetKey(["market", "daily_features"])
OBSERVE_JOB = "observe_market_sources_job"
OBSERVE_CRON = "*/30 * * * 1-5"


def source_key(table: str) -> AssetKey:
    """``market.kline_daily_qfq`` → ``market/kline_daily_qfq``."""
    return AssetKey(table.split("."))


def source_tables(mapping: ExportMapping) -> list[str]:
    tables = [mapping.bars_table, *([mapping.raw_table] if mapping.raw_table else [])]
    return list(dict.fromkeys(tables + [t.table for t in mapping.factor_tables]))


def observe_table(engine: sa.Engine, table: str) -> tuple[str | None, int]:
    """Latest trade_date and the rows on it (two index probes on ``trade_date``)."""
    q = quote_table(table)
    with engine.connect() as conn:
        latest = conn.execute(sa.text(f"SELECT max(trade_date) FROM {q}")).scalar()
        rows = conn.execute(sa.text(f"SELECT count(*) FROM {q} WHERE trade_date = :d"), {"d": latest}).scalar() if latest else 0
    return (latest.isoformat() if latest else None), int(rows or 0)


def market_source_assets(config: SnapshotsFile):
    mapping = config.export_mapping()
    tables = source_tables(mapping)
    specs = [AssetSpec(source_key(t), group_name=GROUP, kinds={"postgres"},
                       description=f"AIstock table {t} (written by AIstock, observed here)") for t in tables]

    @multi_observable_source_asset(name="observe_market_sources", specs=specs, can_subset=True,
                                   description="Latest trade_date and its row count of each source table.")
    def _observe(context, aistock_db: AIstockDatabase):
        engine = aistock_db.engine()
        for table in tables:
            key = source_key(table)
            if key not in context.selected_asset_keys:
                continue
            latest, rows = observe_table(engine, table)
            yield ObserveResult(asset_key=key, data_version=DataVersion(f"{latest}:{rows}"),
                                metadata={"latest_trade_date": latest or "empty", "rows_on_latest_day": rows})

    return _observe


def daily_features_asset(config: SnapshotsFile):
    mapping = config.export_mapping()

    @asset(key=DAILY_FEATURES_KEY, group_name=GROUP, kinds={"postgres"},
           deps=[source_key(t) for t in source_tables(mapping)],
           code_version=mapping.fingerprint(),
           description=f"View {VIEW_NAME}: bars with mapped, unit-scaled fields joined with the factor tables; "
                       "the definition every snapshot and the live adapter read.")
    def _daily_features(context: AssetExecutionContext, aistock_db: AIstockDatabase) -> MaterializeResult:
        engine = aistock_db.engine()
        resolved = resolve_mapping(engine, mapping)
        columns = create_view(engine, resolved)
        context.log.info("created %s with %s columns", VIEW_NAME, len(columns))
        return MaterializeResult(metadata={
            "view": VIEW_NAME,
            "columns": MetadataValue.json(columns),
            "column_count": len(columns),
            "mapping_fingerprint": resolved.fingerprint(),
            "units": MetadataValue.json(resolved.describe()),
        })

    return _daily_features


def observation_schedule(config: SnapshotsFile) -> ScheduleDefinition:
    keys = [source_key(t) for t in source_tables(config.export_mapping())]
    job = define_asset_job(OBSERVE_JOB, selection=AssetSelection.assets(*keys),
                           description="Observe the AIstock source tables (latest day, rows).")
    return ScheduleDefinition(name="observe_market_sources", job=job, cron_schedule=OBSERVE_CRON,
                              execution_timezone=EXCHANGE_TIMEZONE, default_status=DefaultScheduleStatus.RUNNING,
                              description="Source freshness for the UI, every 30 minutes on weekdays.")


def market_definitions(config: SnapshotsFile) -> Definitions:
    """The market domain: observed source tables, ``market/daily_features`` and the observation schedule."""
    return Definitions(assets=[market_source_assets(config), daily_features_asset(config)],
                       schedules=[observation_schedule(config)])

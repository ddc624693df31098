"""Partitions of ``snapshots/<id>``: the trading days of its span that have bars, as Dagster dynamic partitions.

Why dynamic partitions: the open days live in the database's trade calendar (holidays fall on weekdays,
and the exchange publishes them a year ahead at most) and a day is worth offering only once its bars are
loaded. A time-window definition would list weekends or holidays and every day up to now as "missing".
Each snapshot has its own named set (``trading_days_<id>``), kept equal to :func:`trading_days.offered_days`:

* the ``snapshot_trading_days`` sensor registers new loaded days (and drops days the calendar closed);
* the post-close schedule registers the day that just closed before it requests that partition;
* the demo registers them before it materializes;
* a key asked for but not registered (a fresh Dagster instance, e.g. ``dagster asset materialize
  --partition-range`` before any sensor tick) registers them on the spot (:class:`TradingDayPartitions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    DynamicPartitionsDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    partition_loading_context,
    sensor,
)

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE
from aistock_pipelines.db import create_db_engine
from aistock_pipelines.embedded_db import resolve_db_url
from aistock_pipelines.resources import AIstockDatabase
from aistock_pipelines.settings import Settings
from aistock_pipelines.snapshot_config import SnapshotDecl, SnapshotsFile, snapshot_name
from aistock_pipelines.trading_days import offered_days, open_days, partition_plan

log = logging.getLogger(__name__)
SENSOR_NAME = "snapshot_trading_days"
SENSOR_INTERVAL_S = 120


def partitions_name(snapshot_id: str) -> str:
    return f"trading_days_{snapshot_name(snapshot_id)}"


@dataclass(frozen=True)
class DayChanges:
    """What registering one snapshot's trading days changes, and the last day with bars."""

    name: str
    delete: list[str]
    add: list[str]
    last_loaded: date | None


def day_changes(conn: sa.Connection, registered: list[str], decl: SnapshotDecl, config: SnapshotsFile,
                through: date | None = None) -> DayChanges:
    """The changes that make ``registered`` the days ``decl`` offers. A registered day after the last loaded
    one stays while the calendar has it open and it is not in the future (the post-close run registered it:
    its bars are due); anything else (a key added by hand in the UI: a weekend, a typo) is dropped."""
    mapping = config.export_mapping()
    offered = offered_days(conn, mapping, decl.start, decl.end, through)
    keys = [d.isoformat() for d in offered.days]
    last_offered, latest = (keys[-1] if keys else ""), min(decl.end or date.max, exchange_today())
    pending = {d for d in map(_as_day, registered) if d and d.isoformat() > last_offered and decl.start <= d <= latest}
    if pending:
        keys += [d.isoformat() for d in open_days(conn, mapping, min(pending), max(pending)) if d in pending]
    delete, add = partition_plan(registered, keys)
    return DayChanges(partitions_name(decl.id), delete, add, offered.last_loaded)


def _as_day(key: str) -> date | None:
    """The day a key names, if it is one in ``YYYY-MM-DD`` form."""
    try:
        day = date.fromisoformat(key)
    except ValueError:
        return None
    return day if day.isoformat() == key else None


def exchange_today() -> date:
    return datetime.now(ZoneInfo(EXCHANGE_TIMEZONE)).date()


#: Registers one snapshot's trading days in an instance (the code location's: :class:`SettingsRegistrar`).
Register = Callable[[DagsterInstance, str], DayChanges]


def register_trading_days(instance: DagsterInstance, engine: sa.Engine, config: SnapshotsFile,
                          through: date | None = None, only: str | None = None) -> dict[str, DayChanges]:
    """Bring every snapshot's (or only ``only``'s) registered days to what it offers; the changes by id."""
    changes = {}
    with engine.connect() as conn:
        for decl in config.snapshots:
            if only is None or decl.id == only:
                change = day_changes(conn, list(instance.get_dynamic_partitions(partitions_name(decl.id))), decl,
                                     config, through)
                for key in change.delete:
                    instance.delete_dynamic_partition(change.name, key)
                if change.add:
                    instance.add_dynamic_partitions(change.name, change.add)
                changes[decl.id] = change
    return changes


class TradingDayPartitions(DynamicPartitionsDefinition):
    """The named dynamic partitions of one snapshot; asked for a key it lacks, with an instance at hand and
    a ``register`` callback, it registers the snapshot's trading days first (once per missing key)."""

    def __new__(cls, snapshot_id: str, register: Register | None = None):
        partitions = super().__new__(cls, name=partitions_name(snapshot_id))
        partitions._snapshot_id, partitions._register = snapshot_id, register
        return partitions

    def has_partition_key(self, partition_key: str, current_time: datetime | None = None,
                          dynamic_partitions_store=None) -> bool:
        with partition_loading_context(current_time, dynamic_partitions_store) as ctx:
            if super().has_partition_key(partition_key):
                return True
            store = ctx.dynamic_partitions_store
            if self._register is None or not isinstance(store, DagsterInstance):
                return False
            change = self._register(store, self._snapshot_id)
            if super().has_partition_key(partition_key):
                return True
            log.warning("%s is not a partition of snapshots/%s: it is not a trading day of its span with bars "
                        "loaded (the last loaded day is %s)", partition_key, self._snapshot_id, change.last_loaded)
            return False


class SettingsRegistrar:
    """``register`` for :class:`TradingDayPartitions` in the code location: the database the settings name."""

    def __init__(self, settings: Settings, config: SnapshotsFile):
        self.settings, self.config = settings, config

    def __call__(self, instance: DagsterInstance, snapshot_id: str) -> DayChanges:
        engine = create_db_engine(resolve_db_url(self.settings))
        try:
            return register_trading_days(instance, engine, self.config, only=snapshot_id)[snapshot_id]
        finally:
            engine.dispose()


def trading_days_sensor(config: SnapshotsFile):
    """Keeps each snapshot's partitions equal to its trading days with bars (new days within two minutes)."""

    @sensor(name=SENSOR_NAME, minimum_interval_seconds=SENSOR_INTERVAL_S, default_status=DefaultSensorStatus.RUNNING,
            description="Registers each snapshot's trading days with bars as its partitions (from the trade "
                        "calendar and the bars table); drops days the calendar no longer has open.")
    def _sensor(context: SensorEvaluationContext, aistock_db: AIstockDatabase) -> SensorResult | SkipReason:
        requests = []
        with aistock_db.engine().connect() as conn:
            for decl in config.snapshots:
                registered = list(context.instance.get_dynamic_partitions(partitions_name(decl.id)))
                change = day_changes(conn, registered, decl, config)
                if change.delete:
                    requests.append(DeleteDynamicPartitionsRequest(change.name, change.delete))
                if change.add:
                    requests.append(AddDynamicPartitionsRequest(change.name, change.add))
        if not requests:
            return SkipReason("every snapshot's trading days are registered")
        return SensorResult(dynamic_partitions_requests=requests)

    return _sensor

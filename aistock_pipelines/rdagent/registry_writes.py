"""Registry rows written: the batched upsert with deactivation, the sync state, one transaction per sync."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.json_values import JsonTooDeep, sanitize_json
from aistock_pipelines.rdagent.registry_rows import ROW_SPECS, Key, RowSpec, registry_table
from aistock_pipelines.rdagent.results_client import ResultsApiError
from aistock_pipelines.rdagent.sync_types import DETAIL_CHARS, SyncError, SyncStats

_KEYS_PER_STATEMENT = 5000
T = TypeVar("T")


@dataclass
class Counts:
    """What an upsert did to the rows (see :class:`SyncStats`)."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deactivated: int = 0
    reactivated: int = 0


def apply_rows(
    conn: Connection,
    spec: RowSpec,
    batches: Iterable[dict[Key, dict[str, Any]]],
    *,
    now: datetime,
    generated_at_utc: str | None,
    scope: ColumnElement[bool],
) -> Counts:
    """Upsert the rows batch by batch, then deactivate the active rows within ``scope`` not received.

    Each batch looks up only its own keys' stored rows, so memory follows the batch, not the table; a
    received row stored outside ``scope`` (an artifact now reported under another loop) counts as an
    update. Every received row leaves with ``last_seen_at = now``: the older active rows in scope are
    exactly the ones gone upstream.
    """
    table = spec.table
    counts = Counts()
    for rows in batches:
        _apply_batch(conn, spec, rows, counts, now=now, generated_at_utc=generated_at_utc)
        del rows  # released before the next batch is read, so only one is ever held
    gone = (update(table).where(scope, table.c.active, table.c.last_seen_at < now)
            .values(active=False, deactivated_at=now))
    counts.deactivated = conn.execute(gone).rowcount
    return counts


def _stored_rows(conn: Connection, spec: RowSpec, keys: list[Key]) -> dict[Key, tuple[dict[str, Any], bool]]:
    """Content columns and ``active`` of the stored rows with these keys."""
    table = spec.table
    key_cols = [table.c[k] for k in spec.key]
    content = [c.name for c in table.columns if c.name not in rs.TRACKING_COLUMNS]
    stored: dict[Key, tuple[dict[str, Any], bool]] = {}
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):  # stay far below PostgreSQL's 65535 binds
        query = select(*(table.c[c] for c in content), table.c.active).where(
            tuple_(*key_cols).in_(keys[start:start + _KEYS_PER_STATEMENT]))
        for row in conn.execute(query).mappings():
            stored[tuple(row[k] for k in spec.key)] = ({c: row[c] for c in content}, row["active"])
    return stored


def _apply_batch(
    conn: Connection,
    spec: RowSpec,
    rows: dict[Key, dict[str, Any]],
    counts: Counts,
    *,
    now: datetime,
    generated_at_utc: str | None,
) -> None:
    """Insert new rows, rewrite changed or inactive ones, move only ``last_seen_at`` of unchanged ones."""
    table = spec.table
    key_cols = [table.c[k] for k in spec.key]
    has_generated = "catalog_generated_at_utc" in table.c
    stored = _stored_rows(conn, spec, list(rows))
    writes: list[dict[str, Any]] = []
    unchanged: list[Key] = []
    for key, row in rows.items():
        previous = stored.get(key)
        if previous is None:
            counts.inserted += 1
        elif previous[0] == row and previous[1]:
            counts.unchanged += 1
            unchanged.append(key)
            continue
        else:
            counts.updated += 1
            counts.reactivated += not previous[1]
        tracking = {"active": True, "first_seen_at": now, "changed_at": now, "last_seen_at": now,
                    "deactivated_at": None}
        if has_generated:
            tracking["catalog_generated_at_utc"] = generated_at_utc
        writes.append({**row, **tracking})

    if writes:
        stmt = pg_insert(table)
        refreshed = {c: stmt.excluded[c] for c in writes[0] if c not in spec.key and c != "first_seen_at"}
        conn.execute(stmt.on_conflict_do_update(index_elements=key_cols, set_=refreshed), writes)
    seen: dict[str, Any] = {"last_seen_at": now}
    if has_generated:
        seen["catalog_generated_at_utc"] = generated_at_utc
    for start in range(0, len(unchanged), _KEYS_PER_STATEMENT):
        conn.execute(update(table).where(tuple_(*key_cols).in_(unchanged[start:start + _KEYS_PER_STATEMENT]))
                     .values(**seen))


def write_state(conn: Connection, stats: SyncStats, *, now: datetime, envelope: dict[str, Any] | None) -> None:
    values = {
        "kind": stats.kind,
        "published": stats.published,
        "fingerprint": stats.fingerprint,
        "generated_at_utc": stats.generated_at_utc,
        "record_count": stats.records,
        "envelope": sanitize_json(envelope) if envelope is not None else None,
        "stats": stats.as_dict(),
        "last_synced_at": now,
        "last_published_at": now if stats.published else None,
    }
    stmt = pg_insert(rs.sync_state).values(**values)
    refreshed = {c: stmt.excluded[c] for c in values if c not in ("kind", "last_published_at")}
    if stats.published:
        refreshed["last_published_at"] = stmt.excluded.last_published_at
    else:  # keep what was last published, and when
        for column in ("generated_at_utc", "envelope", "record_count"):
            refreshed.pop(column)
    conn.execute(stmt.on_conflict_do_update(index_elements=[rs.sync_state.c.kind], set_=refreshed))


def db_detail(exc: SQLAlchemyError) -> str:
    """The driver's message (first line), never SQLAlchemy's rendering with bound parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else type(exc).__name__).strip().splitlines()
    return f"{type(orig or exc).__name__}: {text[0] if text else ''}"[:DETAIL_CHARS]


def transaction(engine: Engine, kind: str, work: Callable[[Connection, datetime], T]) -> T:
    """Run ``work`` in one transaction holding the kind's advisory lock; errors roll everything back."""
    try:
        rs.ensure_registry_schema(engine)
        with engine.begin() as conn:
            conn.execute(select(func.pg_advisory_xact_lock(rs.ADVISORY_LOCK_CLASS, ROW_SPECS[kind].lock_id)))
            now = conn.execute(select(func.now())).scalar_one()  # one timestamp for the whole sync
            return work(conn, now)
    except SQLAlchemyError as exc:
        raise SyncError(
            kind,
            f"sync of {kind} failed in the database ({db_detail(exc)}); the transaction was rolled back "
            f"and {registry_table(kind).fullname} keeps its previous rows",
        ) from exc


def fetch_failed(kind: str, exc: ResultsApiError) -> SyncError:
    return SyncError(
        kind,
        f"sync of {kind} failed while fetching ({exc}); nothing was written, "
        f"{registry_table(kind).fullname} keeps its previous rows",
    )


def too_deep(kind: str, exc: JsonTooDeep) -> SyncError:
    return SyncError(
        kind,
        f"sync of {kind} refused: the response is nested too deeply ({exc}); nothing was written, "
        f"{registry_table(kind).fullname} keeps its previous rows — fix the file on the RD-Agent side",
    )

"""The loop artifacts sync: every loop's listing fetched, parked on disk, written in bounded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import ColumnElement, false, select, true, tuple_
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.fingerprints import artifacts_digest, artifacts_fingerprint
from aistock_pipelines.rdagent.json_values import JsonTooDeep
from aistock_pipelines.rdagent.registry_rows import ROW_SPECS, keyed_row
from aistock_pipelines.rdagent.registry_writes import (
    apply_rows,
    db_detail,
    fetch_failed,
    too_deep,
    transaction,
    write_state,
)
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient, ResultsApiError
from aistock_pipelines.rdagent.row_spool import RowSpool
from aistock_pipelines.rdagent.sync_types import LOOP_ARTIFACTS, SyncError, SyncStats


def active_loops(engine: Engine) -> list[tuple[str, int]]:
    """Distinct ``(task_run_id, loop_id)`` of the active ``loop_result`` rows, sorted."""
    rs.ensure_registry_schema(engine)
    t = rs.loop_result
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.c.task_run_id, t.c.loop_id).where(t.c.active).distinct().order_by(t.c.task_run_id, t.c.loop_id)
        ).all()
    return [(row.task_run_id, row.loop_id) for row in rows]


def sync_loop_artifacts(
    engine: Engine,
    client: RDAgentResultsClient,
    loops: Sequence[tuple[str, int]] | None = None,
) -> SyncStats:
    """Fetch ``/loops/{task_run_id}/{loop_id}/artifacts`` per loop and mirror them into ``loop_artifacts``.

    ``loops=None`` means every active loop of ``loop_result`` (a full sync: artifacts of loops that are
    no longer active are deactivated too); an explicit list only touches those loops' artifacts. All
    loops are fetched before the single transaction starts, parked on disk (:class:`RowSpool`) and
    written in bounded batches, so memory does not grow with the number of loops; one failing loop fails
    the whole sync.
    """
    full = loops is None
    try:
        wanted = active_loops(engine) if loops is None else list(dict.fromkeys(loops))
    except SQLAlchemyError as exc:
        raise SyncError(LOOP_ARTIFACTS, f"could not read the active loops ({db_detail(exc)}); nothing was "
                                        "fetched or written") from exc
    for task_run_id, loop_id in wanted:
        if not isinstance(task_run_id, str) or isinstance(loop_id, bool) or not isinstance(loop_id, int):
            raise SyncError(
                LOOP_ARTIFACTS,
                f"loop ids must be (str task_run_id, int loop_id), got ({task_run_id!r}, {loop_id!r}); "
                "nothing was fetched or written",
            )

    t = rs.loop_artifacts
    if full:
        scope: ColumnElement[bool] = true()
    elif wanted:
        scope = tuple_(t.c.task_run_id, t.c.loop_id).in_(wanted)
    else:
        scope = false()
    with RowSpool() as spool:
        digests = _spool_loop_artifacts(client, wanted, spool)
        fingerprint = artifacts_fingerprint(digests)

        def write(conn: Connection, now: datetime) -> SyncStats:
            counts = apply_rows(conn, ROW_SPECS[LOOP_ARTIFACTS], spool.batches(), now=now, generated_at_utc=None,
                            scope=scope)
            stats = SyncStats(
                kind=LOOP_ARTIFACTS,
                published=True,
                fingerprint=fingerprint,
                records=spool.received,
                duplicates_merged=spool.duplicates,
                **asdict(counts),
            )
            write_state(conn, stats, now=now, envelope={"loops": len(wanted), "full": full})
            return stats

        return transaction(engine, LOOP_ARTIFACTS, write)


def _spool_loop_artifacts(client: RDAgentResultsClient, wanted: list[tuple[str, int]], spool: RowSpool) -> list[str]:
    """Fetch each loop's artifacts into ``spool`` (one loop's listing in memory at a time); their digests."""
    digests: list[str] = []
    spec = ROW_SPECS[LOOP_ARTIFACTS]
    for task_run_id, loop_id in wanted:
        try:
            answer = client.fetch_loop_artifacts(task_run_id, loop_id)
        except ResultsApiError as exc:
            raise fetch_failed(LOOP_ARTIFACTS, exc) from exc
        if (answer.task_run_id, answer.loop_id) != (task_run_id, loop_id):
            raise SyncError(
                LOOP_ARTIFACTS,
                f"artifacts asked for loop ({task_run_id}, {loop_id}) came back labelled "
                f"({answer.task_run_id}, {answer.loop_id}); nothing was written — check the results API",
            )
        digests.append(artifacts_digest(task_run_id, loop_id, answer.sha256))
        try:
            for artifact in answer.artifacts:
                record = {**artifact.model_dump(), "task_run_id": task_run_id, "loop_id": loop_id}
                spool.add(*keyed_row(spec, record, spool.received + 1))
        except JsonTooDeep as exc:
            raise too_deep(LOOP_ARTIFACTS, exc) from None
    return digests

"""Sync RD-Agent's published results into the AIstock registry tables (plain Python, no Dagster).

The rules, and why:

* **Fetch first, then one short transaction per catalog.** Everything is downloaded and validated
  before ``BEGIN``; a bad or unreachable server therefore never leaves a half-written catalog, and no
  transaction stays open while waiting on the network. Any error inside the transaction rolls it back,
  so the previous rows stay exactly as they were (:class:`SyncError` says so).
* **Duplicates inside one response: the last occurrence wins, whole record.** RD-Agent's exporters
  append in registry order, so a later record with the same key is the newer evolution (the demo's two
  ``Price_Volume_Divergence_5D`` records are 2025-12-15 and 2025-12-18). Field-wise merging was rejected:
  it would store a record that never existed upstream (an expression from one run, a description from
  another). Note that ``GET /factors/{name}`` upstream returns the *first* match; the registry keeps the
  last. The number of dropped records is reported as ``duplicates_merged``.
* **Change detection compares the stored row with the incoming one** (``raw`` plus every derived
  column, so a new derivation rule also rewrites old rows). Unchanged rows are not rewritten; only their
  ``last_seen_at`` (and ``catalog_generated_at_utc``) move, because "seen" means "present upstream".
* **Rows missing upstream are deactivated, never deleted, and reactivated when they return.**
* **Not published (404) is not "empty".** RD-Agent answers 404 for a missing *or* half-written file,
  and most installations publish no model catalog: the registry rows are left untouched and the state
  is recorded as not published.
* **Concurrent syncs of one catalog are serialised** by a transaction-scoped advisory lock, so the
  inserted/updated/unchanged/deactivated counts are exact.
* Bodies are never logged; database errors are reported by their driver message only (SQLAlchemy's own
  message would include the bound parameters, i.e. catalog contents).

This module syncs catalogs and registry listings and runs them all (:func:`sync_all`); the parts live
beside it: ``sync_types`` (kinds, :class:`SyncError`, :class:`SyncStats`), ``fingerprints`` (the poll),
``record_values`` and ``kpis`` (derived columns), ``registry_rows`` (records to rows), ``registry_writes``
(the batched upsert and the transaction) and ``artifacts_sync`` (the loop artifacts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import true
from sqlalchemy.engine import Connection, Engine

from aistock_pipelines.rdagent.artifacts_sync import active_loops, sync_loop_artifacts
from aistock_pipelines.rdagent.catalog_models import Alpha158Meta
from aistock_pipelines.rdagent.fingerprints import (
    NOT_OFFERED,
    NOT_PUBLISHED,
    POLL_KINDS,
    PollResult,
    artifacts_digest,
    artifacts_fingerprint,
    catalog_fingerprint,
    fetch_envelope,
    poll_fingerprints,
    run_registry_fingerprint,
)
from aistock_pipelines.rdagent.json_values import JsonTooDeep, sanitize_json
from aistock_pipelines.rdagent.kpis import KPI_COLUMNS, factor_performance, normalise_kpis
from aistock_pipelines.rdagent.registry_rows import ROW_SPECS, merge_duplicates, registry_table, strategy_segments
from aistock_pipelines.rdagent.registry_writes import (
    Counts,
    apply_rows,
    fetch_failed,
    too_deep,
    transaction,
    write_state,
)
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient, ResultsApiError, ResultsApiUnavailable
from aistock_pipelines.rdagent.sync_types import (
    CATALOGS,
    LOOP_ARTIFACTS,
    RUN_REGISTRY_ENDPOINTS,
    RUN_REGISTRY_KINDS,
    SYNC_KINDS,
    CatalogName,
    SyncError,
    SyncStats,
)

#: The sync's public names, wherever they are defined, so callers import them from one place.
__all__ = [
    "CATALOGS", "KPI_COLUMNS", "LOOP_ARTIFACTS", "NOT_OFFERED", "NOT_PUBLISHED", "POLL_KINDS", "RUN_REGISTRY_ENDPOINTS",
    "RUN_REGISTRY_KINDS", "SYNC_KINDS", "CatalogName", "PollResult", "SyncAllError", "SyncError", "SyncStats",
    "active_loops", "artifacts_digest", "artifacts_fingerprint", "catalog_fingerprint", "factor_performance",
    "normalise_kpis", "poll_fingerprints", "registry_table", "run_registry_fingerprint", "strategy_segments",
    "sync_all", "sync_catalog", "sync_loop_artifacts", "sync_run_registry",
]

log = logging.getLogger(__name__)


class SyncAllError(SyncError):
    """Some kinds of :func:`sync_all` failed; ``results`` holds the ones that were committed."""

    def __init__(self, results: dict[str, SyncStats], errors: dict[str, SyncError]) -> None:
        detail = "; ".join(f"{kind}: {err}" for kind, err in errors.items())
        super().__init__(",".join(errors), f"{len(errors)} of {len(results) + len(errors)} syncs failed: {detail}")
        self.results = results
        self.errors = errors


def sync_catalog(engine: Engine, client: RDAgentResultsClient, kind: CatalogName) -> SyncStats:
    """Fetch one catalog and mirror it into its registry table in a single transaction."""
    if kind not in CATALOGS:
        raise ValueError(f"unknown catalog {kind!r}; expected one of {', '.join(CATALOGS)}")
    spec = ROW_SPECS[kind]
    try:
        response = fetch_envelope(client, kind)
    except ResultsApiError as exc:
        raise fetch_failed(kind, exc) from exc

    if response is None:
        stats = SyncStats(kind=kind, published=False, fingerprint=NOT_PUBLISHED)

        def record_absence(conn: Connection, now: datetime) -> SyncStats:
            write_state(conn, stats, now=now, envelope=None)
            return stats

        log.warning("RD-Agent %s catalog is not published (404); registry rows left as they were", kind)
        return transaction(engine, kind, record_absence)

    if isinstance(response, Alpha158Meta):
        records = [factor.model_dump() for factor in response.factors]
        envelope = response.model_dump(exclude={"factors", "sha256", "generated_at_utc"})
    else:
        records = response.records
        envelope = {"version": response.version, "source": response.source, **response.envelope_extra}
    try:
        rows, duplicates = merge_duplicates(kind, records)
        envelope = sanitize_json(envelope)
    except JsonTooDeep as exc:
        raise too_deep(kind, exc) from None

    def write(conn: Connection, now: datetime) -> SyncStats:
        counts = apply_rows(conn, spec, [rows], now=now, generated_at_utc=response.generated_at_utc, scope=true())
        stats = SyncStats(
            kind=kind,
            published=True,
            fingerprint=catalog_fingerprint(response),
            generated_at_utc=response.generated_at_utc,
            records=len(records),
            duplicates_merged=duplicates,
            **asdict(counts),
        )
        write_state(conn, stats, now=now, envelope=envelope)
        return stats

    stats = transaction(engine, kind, write)
    log.info("RD-Agent %s synced: %s", kind, {k: v for k, v in stats.as_dict().items() if isinstance(v, int)})
    return stats


def sync_run_registry(engine: Engine, client: RDAgentResultsClient, kind: str) -> SyncStats:
    """Mirror one registry listing (``task_runs``, ``run_loops``, ``workspaces``) into its table.

    A server that does not offer the endpoint (404) is normal: the state says ``published = false``
    (fingerprint ``not-offered``), the table is left as it was, nothing fails.
    """
    if kind not in RUN_REGISTRY_ENDPOINTS:
        raise ValueError(f"unknown registry listing {kind!r}; expected one of {', '.join(RUN_REGISTRY_KINDS)}")
    endpoint = RUN_REGISTRY_ENDPOINTS[kind]
    try:
        response = client.fetch_run_registry(endpoint)
    except ResultsApiError as exc:
        raise fetch_failed(kind, exc) from exc
    if response is None:
        log.info("RD-Agent results API does not offer /%s (404); %s left as it was", endpoint, kind)
    try:
        rows, duplicates = merge_duplicates(kind, response.records if response is not None else [])
    except JsonTooDeep as exc:
        raise too_deep(kind, exc) from None

    def write(conn: Connection, now: datetime) -> SyncStats:
        counts = Counts() if response is None else apply_rows(
            conn, ROW_SPECS[kind], [rows], now=now, generated_at_utc=None, scope=true())
        stats = SyncStats(kind=kind, published=response is not None, fingerprint=run_registry_fingerprint(response),
                          records=0 if response is None else len(response.records), duplicates_merged=duplicates,
                          **asdict(counts))
        write_state(conn, stats, now=now, envelope=None if response is None else {"endpoint": f"/{endpoint}"})
        return stats

    return transaction(engine, kind, write)


def sync_all(engine: Engine, client: RDAgentResultsClient, kinds: Iterable[str] | None = None) -> dict[str, SyncStats]:
    """Sync several kinds (default: every catalog, then loop artifacts), each in its own transaction.

    A failing kind does not stop the others (their commits stand), except that once the server is
    unreachable the remaining kinds are not attempted; the committed results and every error are then
    raised together as :class:`SyncAllError`.
    """
    selected = set(SYNC_KINDS if kinds is None else kinds)
    unknown = selected - set(SYNC_KINDS)
    if unknown:
        raise ValueError(f"unknown sync kinds {sorted(unknown)}; expected some of {', '.join(SYNC_KINDS)}")
    results: dict[str, SyncStats] = {}
    errors: dict[str, SyncError] = {}
    unreachable: SyncError | None = None
    for kind in SYNC_KINDS:
        if kind not in selected:
            continue
        if unreachable is not None:
            errors[kind] = SyncError(kind, f"sync of {kind} not attempted: the results API was unreachable "
                                           f"during the {unreachable.kind} sync")
            continue
        try:
            if kind == LOOP_ARTIFACTS:
                results[kind] = sync_loop_artifacts(engine, client)
            elif kind in RUN_REGISTRY_ENDPOINTS:
                results[kind] = sync_run_registry(engine, client, kind)
            else:
                results[kind] = sync_catalog(engine, client, kind)  # type: ignore[arg-type]
        except SyncError as exc:
            log.error("RD-Agent sync of %s failed: %s", kind, exc)
            errors[kind] = exc
            if isinstance(exc.__cause__, ResultsApiUnavailable):
                unreachable = exc
    if errors:
        raise SyncAllError(results, errors)
    return results

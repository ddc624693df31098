"""The results library's Python side (no Dagster): what the views cannot compute, and what a UI shows.

* :func:`record_factor_impl` — whether each active factor's pointer resolves in the installed factor
  package (the rules of :mod:`.factor_impl`), written to ``rdagent.factor_impl_resolution`` for the
  ``factor_library`` view to join (a view cannot import Python), and the installed package versions to
  ``rdagent.factor_package_version``: a new row with its time whenever a package's version changes.
* :func:`glance` — per sync kind, a small table and the numbers worth plotting over syncs, read from the
  library views (the Dagster assets turn them into materialization metadata).

A re-run with nothing changed rewrites nothing: only ``checked_at`` / ``last_checked_at`` move.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.factor_impl import (
    FactorImplCheck,
    FactorPackages,
    ImplStatus,
    alignment_report,
    installed_version,
    registry_pointers,
)
from aistock_pipelines.rdagent.sync import RUN_REGISTRY_KINDS, registry_table

#: Advisory lock id (second int4, under ``registry_schema.ADVISORY_LOCK_CLASS``) of the recording; the
#: sync kinds use 1-9.
IMPL_LOCK_ID = 10

#: ``impl_resolves`` per status: resolves at (or after) the recorded version; does not; cannot tell.
RESOLVES: dict[ImplStatus, bool | None] = {
    ImplStatus.ALIGNED: True,
    ImplStatus.PACKAGE_NEWER: True,
    ImplStatus.PACKAGE_OLDER: False,
    ImplStatus.MISSING: False,
    ImplStatus.NOT_ALLOWED: False,
    ImplStatus.VERSION_UNKNOWN: None,
}

_RESOLUTION_CONTENT = ("impl_module", "impl_func", "impl_version", "package", "installed_version", "status",
                       "resolves", "detail")


@dataclass(frozen=True)
class ImplRecord:
    """What :func:`record_factor_impl` found and wrote."""

    pointers: int
    resolving: int
    not_resolving: int
    changed: int
    removed: int
    versions: dict[str, str | None]
    new_version_rows: tuple[str, ...] = ()


def _resolution_row(entry: FactorImplCheck, packages: FactorPackages) -> dict[str, Any]:
    module = entry.impl_module
    return {
        "name": entry.name, "source": entry.source,
        "impl_module": module if isinstance(module, str) else None,
        "impl_func": entry.impl_func if isinstance(entry.impl_func, str) else None,
        "impl_version": entry.impl_version,
        "package": packages.package_of(module) if isinstance(module, str) else None,
        "installed_version": entry.installed_version, "status": entry.status.value,
        "resolves": RESOLVES[entry.status], "detail": entry.detail,
    }


def record_factor_impl(engine: Engine, packages: FactorPackages | None = None) -> ImplRecord:
    """Check every active pointer against the installed packages and record the outcome (see module doc).

    ``packages`` defaults to ``AISTOCK_FACTOR_PACKAGES``. The checks import the factor package (outside
    the transaction); the writes are one short transaction under an advisory lock.
    """
    packages = packages or FactorPackages.from_env()
    report = alignment_report(registry_pointers(engine), packages)
    rows = {(e.name, e.source): _resolution_row(e, packages) for e in report.entries}
    versions = {prefix: installed_version(prefix, packages) for prefix in packages.prefixes}
    with engine.begin() as conn:
        conn.execute(select(func.pg_advisory_xact_lock(rs.ADVISORY_LOCK_CLASS, IMPL_LOCK_ID)))
        now = conn.execute(select(func.now())).scalar_one()
        changed, removed = _write_resolutions(conn, rows, now)
        new_rows = tuple(p for p, v in versions.items() if _write_version(conn, p, packages.import_name(p), v, now))
    resolves = [row["resolves"] for row in rows.values()]
    return ImplRecord(len(rows), resolves.count(True), resolves.count(False), changed, removed, versions, new_rows)


def _write_resolutions(conn: Connection, rows: Mapping[tuple[str, str], dict[str, Any]], now: datetime) -> tuple[int, int]:
    t = rs.factor_impl_resolution
    stored = {(r.name, r.source): {c: r._mapping[c] for c in _RESOLUTION_CONTENT}
              for r in conn.execute(select(t.c.name, t.c.source, *(t.c[c] for c in _RESOLUTION_CONTENT)))}
    writes = [{**row, "changed_at": now, "checked_at": now} for key, row in rows.items()
              if stored.get(key) != {c: row[c] for c in _RESOLUTION_CONTENT}]
    if writes:
        stmt = pg_insert(t)
        refreshed = {c: stmt.excluded[c] for c in (*_RESOLUTION_CONTENT, "changed_at", "checked_at")}
        conn.execute(stmt.on_conflict_do_update(index_elements=[t.c.name, t.c.source], set_=refreshed), writes)
    gone = [key for key in stored if key not in rows]
    for name, source in gone:
        conn.execute(delete(t).where(t.c.name == name, t.c.source == source))
    conn.execute(update(t).where(t.c.checked_at < now).values(checked_at=now))
    return len(writes), len(gone)


def _write_version(conn: Connection, package: str, import_name: str, version: str | None, now: datetime) -> bool:
    """A new row when the package's latest one differs (version or import root); True when written."""
    t = rs.factor_package_version
    latest = conn.execute(select(t.c.recorded_at, t.c.import_name, t.c.installed_version)
                          .where(t.c.package == package).order_by(t.c.recorded_at.desc()).limit(1)).first()
    if latest is not None and (latest.import_name, latest.installed_version) == (import_name, version):
        conn.execute(update(t).where(t.c.package == package, t.c.recorded_at == latest.recorded_at)
                     .values(last_checked_at=now))
        return False
    conn.execute(t.insert().values(package=package, recorded_at=now, import_name=import_name,
                                   installed_version=version, last_checked_at=now))
    return True


# ---------------------------------------------------------------------------------------- glances
@dataclass(frozen=True)
class Glance:
    """A small table (columns as ``(name, type)`` with type string/int/float/bool) and numbers to plot;
    ``key`` names the table in the asset's metadata."""

    key: str
    columns: tuple[tuple[str, str], ...]
    rows: list[dict[str, Any]]
    numbers: dict[str, int | float] = field(default_factory=dict)


GLANCE_ROWS = 15
ARTIFACT_LOOPS = 20
SUMMARY_CHARS = 400

_FACTORS = Glance("top_factors", (
    ("name", "string"), ("source", "string"), ("ic", "float"), ("ic_ir", "float"), ("rank_ic", "float"),
    ("annualized_return", "float"), ("max_drawdown", "float"), ("impl_version", "string"),
    ("impl_resolves", "bool")), [])
_LOOPS = Glance("newest_loops", (
    ("task_run_id", "string"), ("loop_id", "int"), ("workspace_id", "string"), ("action", "string"),
    ("decision", "bool"), ("annualized_return", "float"), ("annualized_return_basis", "string"),
    ("max_drawdown", "float"), ("information_ratio", "float"), ("ic", "float"), ("ic_ir", "float"),
    ("rank_ic", "float"), ("factor_count", "int")), [])
_STRATEGIES = Glance("top_strategies", (
    ("strategy_id", "string"), ("model_type", "string"), ("market", "string"), ("benchmark", "string"),
    ("feature_count", "int"), ("loop_count", "int"), ("positive_decisions", "int"),
    ("best_annualized_return", "float")), [])
_MODELS = Glance("newest_models", (
    ("model_id", "string"), ("model_type", "string"), ("task_run_id", "string"), ("loop_id", "int"),
    ("market", "string"), ("benchmark", "string"), ("train_start", "string"), ("test_end", "string"),
    ("feature_count", "int"), ("decision", "bool"), ("annualized_return", "float")), [])
_ALPHA158 = Glance("alpha158_sample", (("name", "string"), ("expression", "string"), ("tags", "string")), [])
_ARTIFACTS = Glance("artifacts_by_loop", (
    ("task_run_id", "string"), ("loop_id", "int"), ("artifact", "string"), ("type", "string"),
    ("status", "string"), ("primary", "bool"), ("files", "string"), ("total_bytes", "int"),
    ("summary", "string")), [])
_REGISTRY = Glance("registry_listings", (("listing", "string"), ("offered", "bool"), ("rows", "int")), [])


def _select_rows(conn: Connection, template: Glance, sql: str, **params: Any) -> list[dict[str, Any]]:
    names = [name for name, _ in template.columns]
    return [{n: row._mapping[n] for n in names} for row in conn.execute(text(sql), params)]


def _numbers(conn: Connection, sql: str) -> dict[str, int | float]:
    """The query's one row, NULLs left out (a plot has no point for "none yet")."""
    row = conn.execute(text(sql)).one()
    return {k: v for k, v in row._mapping.items() if v is not None}


def _factor_glance(conn: Connection) -> Glance:
    rows = _select_rows(conn, _FACTORS, "SELECT * FROM rdagent.factor_library WHERE catalog = 'factor_catalog' "
                        "ORDER BY ic DESC NULLS LAST, name, source LIMIT :n", n=GLANCE_ROWS)
    numbers = _numbers(conn, """
        SELECT count(*) AS factors, count(ic) AS factors_with_ic, max(ic) AS best_ic,
               count(*) FILTER (WHERE impl_module IS NOT NULL OR impl_func IS NOT NULL) AS factors_with_pointer,
               count(*) FILTER (WHERE impl_resolves) AS pointers_resolving,
               count(*) FILTER (WHERE impl_resolves IS FALSE) AS pointers_not_resolving
        FROM rdagent.factor_library WHERE catalog = 'factor_catalog'""")
    return Glance(_FACTORS.key, _FACTORS.columns, rows, numbers)


def _loop_glance(conn: Connection) -> Glance:
    rows = _select_rows(conn, _LOOPS, "SELECT * FROM rdagent.loop_leaderboard "
                        "ORDER BY first_seen_at DESC, task_run_id DESC, loop_id DESC, workspace_id LIMIT :n",
                        n=GLANCE_ROWS)
    numbers = _numbers(conn, """
        SELECT count(*) AS loops, count(*) FILTER (WHERE decision) AS loops_positive_decision,
               count(*) FILTER (WHERE has_result) AS loops_with_result,
               max(annualized_return) AS best_annualized_return, max(ic) AS best_ic
        FROM rdagent.loop_leaderboard""")
    return Glance(_LOOPS.key, _LOOPS.columns, rows, numbers)


def _strategy_glance(conn: Connection) -> Glance:
    rows = _select_rows(conn, _STRATEGIES, "SELECT * FROM rdagent.strategy_library "
                        "ORDER BY best_annualized_return DESC NULLS LAST, strategy_id LIMIT :n", n=GLANCE_ROWS)
    numbers = _numbers(conn, """
        SELECT count(*) AS strategies, count(*) FILTER (WHERE positive_decisions > 0) AS strategies_with_positive_loop
        FROM rdagent.strategy_library""")
    return Glance(_STRATEGIES.key, _STRATEGIES.columns, rows, numbers)


def _model_glance(conn: Connection) -> Glance:
    rows = _select_rows(conn, _MODELS, """
        SELECT model_id, model_type, task_run_id, loop_id, market, benchmark, train_start::text AS train_start,
               test_end::text AS test_end, feature_count, decision, annualized_return
        FROM rdagent.model_library ORDER BY first_seen_at DESC, model_id LIMIT :n""", n=GLANCE_ROWS)
    numbers = _numbers(conn, "SELECT count(*) AS models, count(DISTINCT model_type) AS model_types "
                             "FROM rdagent.model_library")
    return Glance(_MODELS.key, _MODELS.columns, rows, numbers)


def _alpha158_glance(conn: Connection) -> Glance:
    rows = [{**row, "tags": ", ".join(t for t in row["tags"] if isinstance(t, str))
             if isinstance(row["tags"], list) else None}
            for row in _select_rows(conn, _ALPHA158, "SELECT name, expression, tags FROM rdagent.alpha158_meta "
                                    "WHERE active ORDER BY name LIMIT :n", n=GLANCE_ROWS)]
    numbers = _numbers(conn, "SELECT count(*) AS alpha158_factors FROM rdagent.alpha158_meta WHERE active")
    return Glance(_ALPHA158.key, _ALPHA158.columns, rows, numbers)


def glance(engine: Engine, kind: str) -> Glance | None:
    """What the asset syncing ``kind`` shows at a glance; None for a kind without one."""
    build = _GLANCES.get(kind)
    if build is None:
        return None
    rs.ensure_registry_schema(engine)
    with engine.connect() as conn:
        return build(conn)


# --------------------------------------------------------------------------------- loop artifacts
def _size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _files_text(files: Any) -> tuple[str, int]:
    """``"ret.pkl (48,213 B), qlib_res.csv (1,932 B)"`` and the total bytes, from an artifact's ``files``."""
    listed, total = [], 0
    for item in files if isinstance(files, list) else []:
        if not isinstance(item, dict):
            continue
        size = _size(item.get("size_bytes"))
        total += size or 0
        path = item.get("path") if isinstance(item.get("path"), str) else "?"
        listed.append(f"{path} ({size:,} B)" if size is not None else f"{path} (size unknown)")
    return ", ".join(listed), total


def _summary_text(summary: Any) -> str | None:
    """The summary as JSON when the API gave one and it is small; a note when it is too big to show."""
    if summary in (None, {}, [], ""):
        return None
    shown = json.dumps(summary, ensure_ascii=False, sort_keys=True)
    return shown if len(shown) <= SUMMARY_CHARS else f"({len(shown):,} characters, not shown)"


def _artifact_glance(conn: Connection) -> Glance:
    """Artifacts of the newest loops (by the first sync that saw them), each with files, sizes, summary."""
    result = conn.execute(text("""
        WITH newest AS (
            SELECT task_run_id, loop_id FROM rdagent.loop_artifacts WHERE active
            GROUP BY task_run_id, loop_id ORDER BY max(first_seen_at) DESC, task_run_id DESC, loop_id DESC LIMIT :n)
        SELECT a.task_run_id, a.loop_id, coalesce(a.name, a.artifact_id) AS artifact, a.type, a.status,
               a.primary_flag, a.files, a.summary
        FROM rdagent.loop_artifacts AS a JOIN newest USING (task_run_id, loop_id)
        WHERE a.active ORDER BY a.task_run_id, a.loop_id, a.primary_flag DESC, a.type, a.artifact_id"""),
        {"n": ARTIFACT_LOOPS})
    rows = []
    for row in result.mappings():
        files, total = _files_text(row["files"])
        rows.append({"task_run_id": row["task_run_id"], "loop_id": row["loop_id"], "artifact": row["artifact"],
                     "type": row["type"], "status": row["status"], "primary": row["primary_flag"], "files": files,
                     "total_bytes": total, "summary": _summary_text(row["summary"])})
    numbers = _numbers(conn, """
        SELECT count(*) AS artifacts, count(DISTINCT (task_run_id, loop_id)) AS loops_with_artifacts,
               coalesce(sum(f.bytes), 0) AS artifact_bytes
        FROM rdagent.loop_artifacts AS a
        CROSS JOIN LATERAL (SELECT sum(CASE WHEN jsonb_typeof(e->'size_bytes') = 'number'
                                            THEN (e->>'size_bytes')::numeric END) AS bytes
                            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(a.files) = 'array'
                                                           THEN a.files ELSE '[]'::jsonb END) AS e) AS f
        WHERE a.active""")
    numbers = {k: int(v) for k, v in numbers.items()}
    return Glance(_ARTIFACTS.key, _ARTIFACTS.columns, rows, numbers)


def _registry_glance(conn: Connection) -> Glance:
    rows, numbers = [], {}
    offered = dict(conn.execute(select(rs.sync_state.c.kind, rs.sync_state.c.published)
                                .where(rs.sync_state.c.kind.in_(RUN_REGISTRY_KINDS))).all())
    for kind in RUN_REGISTRY_KINDS:
        table = registry_table(kind)
        count = conn.execute(select(func.count()).select_from(table).where(table.c.active)).scalar_one()
        rows.append({"listing": kind, "offered": offered.get(kind), "rows": count})
        numbers[kind] = count
    return Glance(_REGISTRY.key, _REGISTRY.columns, rows, numbers)


_GLANCES = {
    "factors": _factor_glance,
    "loops": _loop_glance,
    "strategies": _strategy_glance,
    "models": _model_glance,
    "alpha158": _alpha158_glance,
    "loop_artifacts": _artifact_glance,
    "run_registry": _registry_glance,
}

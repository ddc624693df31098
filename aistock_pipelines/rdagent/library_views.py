"""The results library: SQL views over the registry tables, shaped for AIstock's front end and SQL users.

Four views in schema ``rdagent`` (documented in docs/researchers.md, "RD-Agent results library"):
``factor_library``, ``loop_leaderboard``, ``strategy_library`` and ``model_library``. They only select,
join and rename: every typed column already exists in a registry table, derived from the ``raw`` JSONB
by the sync (:mod:`.sync`, one Python definition per field, odd values becoming NULL), so a view never
parses JSON and cannot fail on a record. The few scalars read from ``raw`` here are guarded by
``jsonb_typeof``. Only active rows appear.

Plain views rather than materialized ones: they are always current, need no refresh, and the tables
behind them hold thousands of rows. :func:`ensure_library_views` (called by
``registry_schema.ensure_registry_schema``, i.e. by every sync) creates a view only when its definition
changed: the SQL's hash ends the view's comment, so an unchanged view is never dropped while readers use it.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import text
from sqlalchemy.engine import Connection

SCHEMA = "rdagent"

FACTOR_LIBRARY = """
SELECT f.name, f.source, 'factor_catalog'::text AS catalog, f.expression, f.formula_hint,
       f.description_cn AS description, f.tags, f.region,
       f.ic, f.icir AS ic_ir, f.rank_ic, f.annualized_return, f.max_drawdown, f.sharpe,
       f.impl_module, f.impl_func, f.impl_version,
       r.resolves AS impl_resolves, r.status AS impl_status, r.installed_version AS impl_installed_version,
       r.checked_at AS impl_checked_at,
       f.first_seen_at, f.last_seen_at, f.changed_at
FROM rdagent.factor_registry AS f
LEFT JOIN rdagent.factor_impl_resolution AS r
       ON r.name = f.name AND r.source = f.source
      AND r.impl_module IS NOT DISTINCT FROM f.impl_module
      AND r.impl_func IS NOT DISTINCT FROM f.impl_func
      AND r.impl_version IS NOT DISTINCT FROM f.impl_version
WHERE f.active
UNION ALL
SELECT a.name, coalesce(a.source, 'qlib_alpha158'), 'alpha158_meta'::text, a.expression, NULL::text,
       NULL::text, a.tags, a.region,
       NULL::float8, NULL::float8, NULL::float8, NULL::float8, NULL::float8, NULL::float8,
       NULL::text, NULL::text, NULL::text, NULL::boolean, NULL::text, NULL::text, NULL::timestamptz,
       a.first_seen_at, a.last_seen_at, a.changed_at
FROM rdagent.alpha158_meta AS a
WHERE a.active AND NOT EXISTS (
    SELECT 1 FROM rdagent.factor_registry AS f
    WHERE f.active AND f.name = a.name AND f.source = coalesce(a.source, 'qlib_alpha158'))
"""

LOOP_LEADERBOARD = """
SELECT l.task_run_id, l.loop_id, l.workspace_id, l.strategy_id,
       CASE WHEN jsonb_typeof(l.raw->'action') = 'string' THEN l.raw->>'action' END AS action,
       CASE WHEN jsonb_typeof(l.raw->'step_name') = 'string' THEN l.raw->>'step_name' END AS step_name,
       l.status, l.has_result, l.decision,
       l.annualized_return, l.annualized_return_basis, l.max_drawdown, l.information_ratio, l.sharpe,
       l.ic, l.icir AS ic_ir, l.rank_ic, l.win_rate,
       l.factor_names AS factors,
       CASE WHEN jsonb_typeof(l.factor_names) = 'array' THEN jsonb_array_length(l.factor_names) END AS factor_count,
       l.summary_texts AS feedback, l.paths,
       (SELECT count(*) FROM rdagent.loop_artifacts AS a
         WHERE a.active AND a.task_run_id = l.task_run_id AND a.loop_id = l.loop_id) AS loop_artifacts,
       l.first_seen_at, l.last_seen_at, l.changed_at
FROM rdagent.loop_result AS l
WHERE l.active
"""

STRATEGY_LIBRARY = """
SELECT s.strategy_id, s.step_name, s.action, s.model_type, s.market, s.benchmark, s.features,
       CASE WHEN jsonb_typeof(s.features) = 'array' THEN jsonb_array_length(s.features) END AS feature_count,
       s.train_start, s.train_end, s.valid_start, s.valid_end, s.test_start, s.test_end,
       s.data_config, s.dataset_config, s.model_config, s.portfolio_config, s.backtest_config,
       lp.loop_count, lp.positive_decisions, lp.best_annualized_return, lp.loops,
       s.first_seen_at, s.last_seen_at, s.changed_at
FROM rdagent.strategy_registry AS s
CROSS JOIN LATERAL (
    SELECT count(*) AS loop_count, count(*) FILTER (WHERE l.decision) AS positive_decisions,
           max(l.annualized_return) AS best_annualized_return,
           jsonb_agg(jsonb_build_object('task_run_id', l.task_run_id, 'loop_id', l.loop_id,
                                        'workspace_id', l.workspace_id)
                     ORDER BY l.task_run_id COLLATE "C", l.loop_id, l.workspace_id COLLATE "C") AS loops
    FROM rdagent.loop_result AS l
    WHERE l.active AND l.strategy_id = s.strategy_id) AS lp
WHERE s.active
"""

MODEL_LIBRARY = """
SELECT m.model_id, m.model_type, m.task_run_id, m.loop_id, m.workspace_id,
       m.train_start, m.train_end, m.valid_start, m.valid_end, m.test_start, m.test_end,
       coalesce(m.market, st.market) AS market, st.benchmark, m.features,
       CASE WHEN jsonb_typeof(m.features) = 'array' THEN jsonb_array_length(m.features) END AS feature_count,
       m.model_config, m.dataset_config, m.model_artifacts,
       l.strategy_id, l.workspace_id IS NOT NULL AS loop_in_leaderboard, l.decision,
       l.annualized_return, l.annualized_return_basis, l.ic, l.icir AS ic_ir,
       m.first_seen_at, m.last_seen_at, m.changed_at
FROM rdagent.model_registry AS m
LEFT JOIN rdagent.loop_result AS l
       ON l.active AND l.task_run_id = m.task_run_id AND l.loop_id = m.loop_id AND l.workspace_id = m.workspace_id
LEFT JOIN rdagent.strategy_registry AS st ON st.active AND st.strategy_id = l.strategy_id
WHERE m.active
"""

#: view name -> (SELECT, what it is; the comment a SQL user sees with ``\\d+``).
VIEWS: dict[str, tuple[str, str]] = {
    "factor_library": (FACTOR_LIBRARY, "One row per active factor (factor catalog, plus Alpha158 factors it "
                                       "lacks): metadata, best performance, implementation pointer and whether "
                                       "it resolves in the installed factor package."),
    "loop_leaderboard": (LOOP_LEADERBOARD, "One row per active loop workspace: decision and KPIs; "
                                           "annualized_return_basis says which return annualized_return is."),
    "strategy_library": (STRATEGY_LIBRARY, "One row per active strategy: model, segments, market, benchmark, "
                                           "features and its loops."),
    "model_library": (MODEL_LIBRARY, "One row per active model: type, segments, market, benchmark, features "
                                     "and the loop it belongs to."),
}


def _marker(sql: str) -> str:
    return f"[definition sha256:{hashlib.sha256(sql.encode()).hexdigest()[:16]}]"


def ensure_library_views(conn: Connection) -> list[str]:
    """Create the views whose definition changed (or that are missing); returns their names.

    Runs inside the caller's DDL transaction. A view is dropped and created rather than replaced because
    ``CREATE OR REPLACE VIEW`` cannot drop or reorder columns; an object of AIstock's own built on a view
    makes that ``DROP`` fail with PostgreSQL's message naming it (never ``CASCADE``).
    """
    created = []
    for name, (sql, about) in VIEWS.items():
        marker = _marker(sql)
        comment = conn.execute(text("SELECT obj_description(to_regclass(:name), 'pg_class')"),
                               {"name": f"{SCHEMA}.{name}"}).scalar()
        if comment is not None and comment.endswith(marker):
            continue
        conn.exec_driver_sql(f"DROP VIEW IF EXISTS {SCHEMA}.{name}")
        conn.exec_driver_sql(f"CREATE VIEW {SCHEMA}.{name} AS {sql}")
        quoted = f"{about} {marker}".replace("'", "''")  # COMMENT takes a literal, not a bind parameter
        conn.exec_driver_sql(f"COMMENT ON VIEW {SCHEMA}.{name} IS '{quoted}'")
        created.append(name)
    return created

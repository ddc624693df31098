"""DDL of the AIstock-side registry of RD-Agent results (PostgreSQL schema ``rdagent``).

Why a schema of its own: the AIstock database already holds the market data (schema ``market``) and
AIstock's own tables; the RD-Agent mirror is a separate concern with generic names (``loop_result``,
``model_registry``) that must not collide with anything there, and a schema can be granted read-only to
the UI or dropped and re-synced on its own.

Every registry table has the same bookkeeping columns (see :func:`_tracking`):

* ``raw`` — the upstream record exactly as validated (unknown fields kept, NaN stored as JSON ``null``);
  the typed columns next to it are *derived* from ``raw`` and exist for querying only.
* ``active`` / ``deactivated_at`` — a row that disappears upstream is marked inactive, never deleted,
  and is reactivated if it comes back.
* ``first_seen_at`` — the sync that inserted the row.
* ``changed_at`` — the last sync that wrote the row's content (insert, content change, reactivation).
* ``last_seen_at`` — the last sync whose response contained the row. It is the *only* column a re-sync
  of an unchanged catalog writes: "seen" means present upstream, and a UI needs that to tell a stale row
  from a current one; everything else stays byte-identical.

``sync_state`` keeps one row per catalog (fingerprint, publication state, last counts) so a reader can
tell when each catalog was last synced and whether it is currently published at all.

Tables are created idempotently by :func:`ensure_registry_schema`; there is no migration tool: a nullable
column added to a table here is added to an existing database by the same call (``_add_missing_columns``),
anything else (a type change, a dropped column) needs an ``ALTER TABLE`` by hand. The same call creates the
results library's views (:mod:`.library_views`) when their definition changed.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine

from aistock_pipelines.rdagent.library_views import ensure_library_views

SCHEMA = "rdagent"

#: Key of the transaction-scoped advisory locks this module and :mod:`.sync` take (first int4 of the
#: two-argument form; the second one names the object). Arbitrary but fixed: "RDAG" in ASCII.
ADVISORY_LOCK_CLASS = 0x52444147
DDL_LOCK_ID = 0

metadata = MetaData(schema=SCHEMA)


def _json() -> JSONB:
    """JSONB where Python ``None`` is SQL NULL (SQLAlchemy's default would store the JSON ``null``)."""
    return JSONB(none_as_null=True)


def _tracking(*, generated_at: bool = True) -> list[Column]:
    columns = [
        Column("raw", JSONB, nullable=False),
        Column("active", Boolean, nullable=False, server_default=text("true")),
        Column("first_seen_at", DateTime(timezone=True), nullable=False),
        Column("changed_at", DateTime(timezone=True), nullable=False),
        Column("last_seen_at", DateTime(timezone=True), nullable=False),
        Column("deactivated_at", DateTime(timezone=True)),
    ]
    if generated_at:
        # The catalog's own ``generated_at_utc`` string (upstream format, kept verbatim) of the response
        # that last contained the row; moves together with ``last_seen_at``.
        columns.append(Column("catalog_generated_at_utc", Text))
    return columns


factor_registry = Table(
    "factor_registry",
    metadata,
    Column("name", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("expression", Text),
    Column("formula_hint", Text),
    Column("description_cn", Text),
    Column("tags", _json()),
    Column("region", Text),
    Column("impl_module", Text),
    Column("impl_func", Text),
    Column("impl_version", Text),
    # best_performance flattened (sync.factor_performance); NULL where the record does not report it
    Column("ic", Float),
    Column("icir", Float),
    Column("rank_ic", Float),
    Column("annualized_return", Float),
    Column("max_drawdown", Float),
    Column("sharpe", Float),
    *_tracking(),
    PrimaryKeyConstraint("name", "source", name="factor_registry_pkey"),
)

strategy_registry = Table(
    "strategy_registry",
    metadata,
    Column("strategy_id", Text, primary_key=True),
    Column("step_name", Text),
    Column("action", Text),
    Column("workspace_example", _json()),
    Column("template_files", _json()),
    Column("data_config", _json()),
    Column("dataset_config", _json()),
    Column("portfolio_config", _json()),
    Column("backtest_config", _json()),
    Column("model_config", _json()),
    Column("model_type", Text),
    Column("train_start", Date),
    Column("train_end", Date),
    Column("valid_start", Date),
    Column("valid_end", Date),
    Column("test_start", Date),
    Column("test_end", Date),
    Column("market", Text),
    Column("benchmark", Text),
    Column("features", _json()),
    *_tracking(),
)

loop_result = Table(
    "loop_result",
    metadata,
    Column("task_run_id", Text, nullable=False),
    Column("loop_id", Integer, nullable=False),
    Column("workspace_id", Text, nullable=False),
    Column("status", Text),
    Column("has_result", Boolean),
    Column("decision", Boolean),
    Column("factor_names", _json()),
    Column("strategy_id", Text),
    Column("metrics", _json()),
    Column("annualized_return", Float),
    Column("max_drawdown", Float),
    Column("sharpe", Float),
    Column("ic", Float),
    Column("icir", Float),
    Column("win_rate", Float),
    Column("rank_ic", Float),
    Column("information_ratio", Float),
    # which figure annualized_return is: excess_return_with_cost | excess_return_without_cost | unspecified
    Column("annualized_return_basis", Text),
    Column("model_run_id", Text),
    Column("factor_impl_version", Text),
    Column("summary_texts", _json()),
    Column("paths", _json()),
    *_tracking(),
    PrimaryKeyConstraint("task_run_id", "loop_id", "workspace_id", name="loop_result_pkey"),
    Index("ix_loop_result_strategy", "strategy_id"),
)

model_registry = Table(
    "model_registry",
    metadata,
    Column("model_id", Text, primary_key=True),
    Column("task_run_id", Text),
    Column("loop_id", Integer),
    Column("workspace_id", Text),
    Column("model_type", Text),
    Column("model_config", _json()),
    Column("dataset_config", _json()),
    Column("feature_schema", _json()),
    Column("model_artifacts", _json()),
    Column("train_start", Date),
    Column("train_end", Date),
    Column("valid_start", Date),
    Column("valid_end", Date),
    Column("test_start", Date),
    Column("test_end", Date),
    Column("market", Text),
    Column("features", _json()),
    *_tracking(),
    Index("ix_model_registry_loop", "task_run_id", "loop_id"),
)

alpha158_meta = Table(
    "alpha158_meta",
    metadata,
    Column("name", Text, primary_key=True),
    Column("expression", Text),
    Column("source", Text),
    Column("region", Text),
    Column("tags", _json()),
    *_tracking(),
)

loop_artifacts = Table(
    "loop_artifacts",
    metadata,
    Column("artifact_id", Text, primary_key=True),
    Column("task_run_id", Text, nullable=False),
    Column("loop_id", Integer, nullable=False),
    # The upstream endpoint does not say which workspace an artifact belongs to; filled only when a
    # (newer) server sends ``workspace_id`` on the artifact.
    Column("workspace_id", Text),
    Column("type", Text),
    Column("name", Text),
    Column("status", Text),
    Column("primary_flag", Boolean),
    Column("entry_path", Text),
    Column("summary", _json()),
    Column("files", _json()),
    *_tracking(generated_at=False),
    Index("ix_loop_artifacts_loop", "task_run_id", "loop_id"),
)

# The results API's /task_runs, /loops and /workspaces (Phase 2 design: registry.sqlite's own tables; not
# served by the real API today). Synced when a server offers them; the typed columns are the design's.
task_run_registry = Table(
    "task_run_registry",
    metadata,
    Column("task_run_id", Text, primary_key=True),
    Column("scenario", Text),
    Column("status", Text),
    Column("created_at_utc", Text),
    Column("updated_at_utc", Text),
    *_tracking(generated_at=False),
)

loop_registry = Table(
    "loop_registry",
    metadata,
    Column("task_run_id", Text, nullable=False),
    Column("loop_id", Integer, nullable=False),
    Column("action", Text),
    Column("status", Text),
    Column("has_result", Boolean),
    Column("best_workspace_id", Text),
    Column("started_at_utc", Text),
    Column("ended_at_utc", Text),
    *_tracking(generated_at=False),
    PrimaryKeyConstraint("task_run_id", "loop_id", name="loop_registry_pkey"),
)

workspace_registry = Table(
    "workspace_registry",
    metadata,
    Column("workspace_id", Text, primary_key=True),
    Column("task_run_id", Text),
    Column("loop_id", Integer),
    Column("workspace_role", Text),
    Column("experiment_type", Text),
    Column("step_name", Text),
    Column("status", Text),
    Column("workspace_path", Text),
    *_tracking(generated_at=False),
    Index("ix_workspace_registry_loop", "task_run_id", "loop_id"),
)

# Whether each active factor's implementation pointer resolves in the installed factor package
# (rdagent.factor_impl), recorded by the sync because a view cannot import Python. Keyed like the
# factor; the pointer it was checked for is kept so a view never shows a result for another pointer.
factor_impl_resolution = Table(
    "factor_impl_resolution",
    metadata,
    Column("name", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("impl_module", Text),
    Column("impl_func", Text),
    Column("impl_version", Text),
    Column("package", Text),
    Column("installed_version", Text),
    Column("status", Text, nullable=False),
    Column("resolves", Boolean),
    Column("detail", Text, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("name", "source", name="factor_impl_resolution_pkey"),
)

# The factor package versions in effect, one row per (package, version) as it was first seen: the
# history AIstock shows as "implemented at X, installed Y". installed_version NULL = not installed.
factor_package_version = Table(
    "factor_package_version",
    metadata,
    Column("package", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("import_name", Text, nullable=False),
    Column("installed_version", Text),
    Column("last_checked_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("package", "recorded_at", name="factor_package_version_pkey"),
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("kind", Text, primary_key=True),
    Column("published", Boolean, nullable=False),
    Column("fingerprint", Text, nullable=False),
    Column("generated_at_utc", Text),
    Column("record_count", Integer, nullable=False),
    Column("envelope", _json()),
    Column("stats", _json()),
    Column("last_synced_at", DateTime(timezone=True), nullable=False),
    Column("last_published_at", DateTime(timezone=True)),
)

#: The registry tables whose rows are synced (``sync_state`` is bookkeeping).
REGISTRY_TABLES: tuple[Table, ...] = (
    factor_registry,
    strategy_registry,
    loop_result,
    model_registry,
    alpha158_meta,
    loop_artifacts,
    task_run_registry,
    loop_registry,
    workspace_registry,
)

#: Columns maintained by the sync itself rather than derived from the upstream record.
TRACKING_COLUMNS = frozenset(
    {"active", "first_seen_at", "changed_at", "last_seen_at", "deactivated_at", "catalog_generated_at_utc"}
)


def ensure_registry_schema(engine: Engine) -> None:
    """Create the ``rdagent`` schema and its tables if missing; safe to call from concurrent runs.

    Two Dagster steps materialising at the same time on a fresh database would otherwise race on
    ``CREATE TABLE`` (PostgreSQL raises a unique violation on ``pg_type``); a transaction-scoped advisory
    lock serialises them, and DDL being transactional makes the whole creation all-or-nothing.
    """
    with engine.begin() as conn:
        conn.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK_CLASS, DDL_LOCK_ID)))
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        metadata.create_all(conn, checkfirst=True)
        _add_missing_columns(conn)
        ensure_library_views(conn)


def _add_missing_columns(conn: Connection) -> None:
    """``ALTER TABLE … ADD COLUMN`` for columns added to a table after it was created (all nullable).

    Only missing columns are added, so an up-to-date schema takes no table lock. Rows synced before keep
    NULL there until the sync rewrites them (its change detection compares the derived columns too).
    """
    present = {(t, c) for t, c in conn.execute(
        text("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = :s"), {"s": SCHEMA})}
    for table in metadata.sorted_tables:
        for column in table.columns:
            if (table.name, column.name) not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.fullname} ADD COLUMN {column.name} {kind}"))

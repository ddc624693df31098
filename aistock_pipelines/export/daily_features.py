"""``market.daily_features``: the field mapping and factor joins, as SQL, in one place.

:func:`source_selects` is the only place that turns a :class:`ResolvedMapping` into SQL: one SELECT per source
table (bars, raw bars, each factor table), keyed by ``(ts_code, trade_date)``, with the scaled columns; their
left join (:func:`joined_select`) is the view ``market.daily_features`` that the ``market/daily_features``
asset publishes, so SQL users, notebooks and AIstock see exactly the rows a snapshot is built from. The
reader runs the same SELECTs bounded by a read's dates and codes: over a date range one per table, joined on
the key in Python — the server then only scans and converts, about half its work for the SQL join — and for
a list of codes the joined form per code. The per-row derivations that need Python (adjusted volume, vwap,
change) are in :mod:`aistock_pipelines.export.derived`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from aistock_pipelines.export.mapping import ResolvedMapping, quote_table

VIEW_NAME = "market.daily_features"
PACKED_COLUMN = "packed_float8"


@dataclass(frozen=True)
class SourceSelect:
    """One source table's part of the feature definition, or (``joined``) several left-joined in SQL.

    ``columns``: (logical name, scaled SQL expression). The ``factor`` column is a ratio of two tables: the
    bars carry its numerator (qfq close) and the raw bars its denominator (raw close, 0 → NULL, ``divides``);
    a joined select computes the ratio itself."""

    table: str
    alias: str
    columns: tuple[tuple[str, str], ...]
    divides: bool = False  # its columns are denominators of the bars' columns of the same name
    joined: tuple["SourceSelect", ...] = ()  # left-joined on (ts_code, trade_date): the view's shape

    RATIO = "factor"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]

    @property
    def label(self) -> str:
        """The table(s), for messages."""
        return self.table + (f" left-joined with {', '.join(j.table for j in self.joined)}" if self.joined else "")

    def sql(self, where: str = "", join_filter: Callable[[str], str] | None = None) -> str:
        """``SELECT trade_date, ts_code, <columns> FROM table alias [LEFT JOIN …] <where>``; ``join_filter(alias)``
        may add predicates (SQL starting with `` AND``) to each joined table's ``ON`` clause."""
        a, extra = self.alias, join_filter or (lambda alias: "")
        cols = ", ".join([f"{a}.trade_date", f"{a}.ts_code", *(f'{expr} AS "{name}"' for name, expr in self.columns)])
        joins = [f"LEFT JOIN {quote_table(j.table)} {j.alias} ON {j.alias}.ts_code = {a}.ts_code "
                 f"AND {j.alias}.trade_date = {a}.trade_date{extra(j.alias)}" for j in self.joined]
        return " ".join(filter(None, [f"SELECT {cols} FROM {quote_table(self.table)} {a}", *joins, where]))

    def packed_sql(self, where: str = "") -> str:
        """:meth:`sql`'s rows with the value columns sent as one ``bytea`` per row: the big-endian float8s
        (``float8send``) of the columns in order, NULL sent as NaN (which it becomes in the frame anyway).

        Why: a bulk read's client cost is per field, not per byte — the ADBC driver decodes each field of
        each row through a chain of calls; packed, the client decodes a row at once and the server runs
        fewer output functions. The packed bytes are one ``numpy.frombuffer`` (:mod:`arrow_batches`)."""
        if self.joined:
            raise ValueError("packed_sql renders one table's SELECT, not a join")
        a = self.alias
        packed = " || ".join(f"float8send(coalesce(({expr})::float8, 'NaN'))" for _, expr in self.columns)
        return " ".join(filter(None, [f"SELECT {a}.trade_date, {a}.ts_code, {packed} AS {PACKED_COLUMN} "
                                      f"FROM {quote_table(self.table)} {a}", where]))


def source_selects(resolved: ResolvedMapping) -> list[SourceSelect]:
    """The bars first (they define the rows), then the raw bars (when ``factor`` is configured), then the
    factor tables in mapping order."""
    m = resolved.mapping
    bars = [(name, spec.sql("b")) for name, spec in m.fields.items()]
    out = []
    if m.has_factor:
        close = m.fields["close"].column
        bars.append((SourceSelect.RATIO, f'b."{close}"::float8'))
        out.append(SourceSelect(m.raw_table, "r", ((SourceSelect.RATIO, f'NULLIF(r."{close}", 0)::float8'),), divides=True))
    out += [SourceSelect(table.table, f"f{i}", tuple((name, spec.sql(f"f{i}")) for name, spec in resolved.factor_columns[table.name].items()))
            for i, table in enumerate(m.factor_tables)]
    return [SourceSelect(m.bars_table, "b", tuple(bars)), *out]


def joined_select(resolved: ResolvedMapping) -> SourceSelect:
    """:func:`source_selects` left-joined on ``(ts_code, trade_date)`` in SQL (the bars define the rows)."""
    bars, *joined = source_selects(resolved)
    expr = dict(bars.columns)
    for s in joined:
        for name, sql in s.columns:
            expr[name] = f"{expr[name]} / {sql}" if s.divides else sql
    return SourceSelect(bars.table, bars.alias, tuple(expr.items()), joined=tuple(joined))


def feature_select_sql(resolved: ResolvedMapping) -> str:
    """The view: ``SELECT trade_date, ts_code, <scaled fields>[, factor], <factor fields> FROM bars LEFT JOIN …``."""
    return joined_select(resolved).sql()


def create_view(engine: Engine, resolved: ResolvedMapping, view: str = VIEW_NAME) -> list[str]:
    """(Re)create the view in one transaction; returns its column names.

    Dropped and created rather than ``CREATE OR REPLACE``: PostgreSQL refuses to rename or reorder the
    columns of a replaced view, which is exactly what a mapping change does. A database object that
    depends on the view makes the drop fail with PostgreSQL's own message naming it; nothing changes then.
    """
    comment = (f"aistock_pipelines feature definition {resolved.fingerprint()}: "
               f"{resolved.mapping.bars_table} + {', '.join(t.table for t in resolved.mapping.factor_tables) or 'no factor tables'}")
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_table(view).split('.')[0]}"))
        conn.execute(sa.text(f"DROP VIEW IF EXISTS {quote_table(view)}"))
        conn.execute(sa.text(f"CREATE VIEW {quote_table(view)} AS {feature_select_sql(resolved)}"))
        # Utility statements take no bind parameters; the text is made of validated names and a hex digest.
        conn.exec_driver_sql(f"COMMENT ON VIEW {quote_table(view)} IS '{comment.replace(chr(39), chr(39) * 2)}'")
        names = conn.execute(sa.text(f"SELECT * FROM {quote_table(view)} LIMIT 0")).keys()
    return list(names)

"""``market.daily_features``: the field mapping and factor joins as one SQL definition.

:func:`feature_select_sql` is the only place that turns a :class:`ResolvedMapping` into SQL: the reader
(snapshots and the live adapter) runs it with range/universe predicates added, and the ``market/daily_features``
asset publishes it unfiltered as a database view, so SQL users, notebooks and AIstock see exactly the rows a
snapshot is built from. The view carries the database-side part of the definition (scaled columns, the
``factor`` ratio, factor-table columns); the per-row derivations that need Python (adjusted volume, vwap,
change) are :func:`aistock_pipelines.export.reader.logical_frame`.

Why the reader does not simply ``SELECT … FROM market.daily_features``: PostgreSQL does not carry the bars'
date range across the joins of an inlined view, and repeating it on every joined table is what keeps a
60-day window fast (see the reader). Same SQL text, two uses.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from aistock_pipelines.export.mapping import ResolvedMapping, quote_table

VIEW_NAME = "market.daily_features"


def feature_select_sql(resolved: ResolvedMapping, join_filter: Callable[[str], str] | None = None,
                       where: str = "") -> str:
    """``SELECT trade_date, ts_code, <scaled fields>[, factor], <factor fields> FROM bars LEFT JOIN …``.

    ``join_filter(alias)`` may add predicates to each joined table's ``ON`` clause (it gets the alias and
    returns SQL starting with `` AND``); ``where`` filters the bars (``WHERE …``)."""
    m = resolved.mapping
    extra = join_filter or (lambda alias: "")
    cols = ["b.trade_date", "b.ts_code"] + [f'{spec.sql("b")} AS "{name}"' for name, spec in m.fields.items()]
    joins = []
    if m.has_factor:
        close = m.fields["close"].column
        cols.append(f'b."{close}"::float8 / NULLIF(r."{close}", 0)::float8 AS "factor"')
        joins.append(f"LEFT JOIN {quote_table(m.raw_table)} r "
                     f"ON r.ts_code = b.ts_code AND r.trade_date = b.trade_date{extra('r')}")
    for i, table in enumerate(m.factor_tables):
        alias = f"f{i}"
        joins.append(f"LEFT JOIN {quote_table(table.table)} {alias} "
                     f"ON {alias}.ts_code = b.ts_code AND {alias}.trade_date = b.trade_date{extra(alias)}")
        cols += [f'{spec.sql(alias)} AS "{name}"' for name, spec in resolved.factor_columns[table.name].items()]
    return " ".join(filter(None, [f"SELECT {', '.join(cols)} FROM {quote_table(m.bars_table)} b", *joins, where]))


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

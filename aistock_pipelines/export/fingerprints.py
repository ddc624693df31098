"""Per-instrument fingerprints of the exported rows: how an incremental export finds restated histories.

One definition, evaluated two ways:

* by the server, in SQL, without shipping rows (:func:`weighted_sums`, :func:`bar_sums`) — every incremental
  export, and a full export whose rows cannot be fingerprinted on the client;
* by the client, from the rows a full export reads anyway (:mod:`row_fingerprints`) — the server then
  only scans and converts, which matters because a full export is CPU-bound on the server and the client
  together.

Either way the result is a :class:`Fingerprints`, and comparisons with what was stored happen in one place
(:meth:`Fingerprints.restated`).

Definition: Σ over the instrument's bar rows of (1·open + 3·high + 7·low + 13·close + 17·x₅ + 19·x₆ + … )
× (days since 1990-01-01 + 1), plus 41 × Σ over its raw-table rows (bar or not) of raw close × the same
day, where x₅… are the other bar fields in mapping order, each the stored integer (OHLC and raw close cast
to int8, the others exactly) and a NULL counting 0. A qfq restatement rescales every price of the
instrument, so its fingerprint changes; exact integer arithmetic makes it deterministic, and any grouping
of the rows gives the same number — which is what lets the client add it up batch by batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Protocol

import pandas as pd
import pyarrow as pa

from aistock_pipelines.export.mapping import ExportMapping, MappingError, ResolvedMapping, quote_table
from aistock_pipelines.export.meta_repo import InstrumentState

EPOCH = date(1990, 1, 1)
EPOCH_SQL = "DATE '1990-01-01'"
PRIMES = [1, 3, 7, 13, 17, 19, 23, 29, 31, 37, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97]
RAW_WEIGHT = 41
INTEGER_TYPES = ("smallint", "integer")
_TWO32 = 4294967296


def field_order(mapping: ExportMapping) -> list[str]:
    """The bar fields in the definition's order: OHLC, then the others in mapping order (weights PRIMES)."""
    ohlc = ["open", "high", "low", "close"]
    order = ohlc + [n for n in mapping.fields if n not in ohlc]
    if len(order) > len(PRIMES):
        raise MappingError(f"{mapping.bars_table}: {len(order)} bar fields, at most {len(PRIMES)} can be fingerprinted")
    return order


def weighted_sums(terms: list[tuple[int, str, str, bool]], day: str) -> str:
    """SQL: Σ over the group's rows of (Σ weight × column) × ``day``, exactly, for ``terms`` of (weight,
    column SQL, data type, cast to int8), in as few aggregates as exactness allows: each aggregate costs the
    server per row.

    * int2/int4 columns: the weighted row value is added up in int8 and multiplied by the day, one sum;
    * int8 columns (and columns cast to int8): split into 32-bit halves, whose weighted row values are two
      int8 sums (high × 2³² + low);
    * anything else: one numeric sum per column.
    PostgreSQL sums int8 exactly (into a numeric), and no per-row product can overflow int8 for a date
    before year 7000 (Σ weights ≤ 1002, |half| < 2³², day < 2.2·10⁶); an overflow would be an error, never a
    wrong value. A NULL adds nothing — as ``sum`` skips it — so every value is ``coalesce``d to 0."""
    small, halves, numeric = [], [], []
    for weight, column, data_type, as_int8 in terms:
        if data_type in INTEGER_TYPES:
            small.append(f"{weight} * coalesce({column}::int8, 0)")
        elif as_int8 or data_type == "bigint":
            halves.append((weight, f"coalesce({column}::int8, 0)"))
        else:
            numeric.append(f"{weight} * coalesce(sum({column}::numeric * {day}), 0)")
    sums = [f"coalesce(sum(({' + '.join(small)}) * {day}), 0)"] if small else []
    if halves:
        high = " + ".join(f"{w} * ({x} >> 32)" for w, x in halves)
        low = " + ".join(f"{w} * ({x} & {_TWO32 - 1})" for w, x in halves)
        sums += [f"{_TWO32} * coalesce(sum(({high}) * {day}), 0)", f"coalesce(sum(({low}) * {day}), 0)"]
    return "(" + " + ".join(sums + numeric) + ")" if sums or numeric else "0"


def bar_sums(mapping: ExportMapping, bar_types: dict[str, str], alias: str = "b") -> str:
    """SQL: the bars' part of the fingerprint over a group of ``alias``'s rows (see :func:`weighted_sums`)."""
    day = f"({alias}.trade_date - {EPOCH_SQL} + 1)"
    terms = [(w, f'{alias}."{mapping.fields[n].column}"', bar_types.get(mapping.fields[n].column, ""), i < 4)
             for i, (w, n) in enumerate(zip(PRIMES, field_order(mapping)))]
    return weighted_sums(terms, day)




@dataclass(frozen=True)
class Fingerprints:
    """Per instrument (index ``ts_code``, sorted): ``rows_old``/``sum_old`` over the range already exported,
    ``rows_all``/``sum_all`` over the whole range (sums as decimal text: exact integers of any size),
    ``first_date``/``last_date``; and the seconds it took to compute them."""

    table: pd.DataFrame
    seconds: float = 0.0

    def rows(self) -> int:
        return int(self.table["rows_all"].sum())

    def row_counts(self) -> dict[str, int]:
        """Rows per instrument with rows in the whole range."""
        return {c: int(n) for c, n in self.table["rows_all"].items() if n > 0}

    def restated(self, stored: dict[str, InstrumentState]) -> set[str]:
        """Instruments whose rows up to the previous end differ from what was exported (or vanished)."""
        out = set()
        for code, rows_old, sum_old in zip(self.table.index, self.table["rows_old"], self.table["sum_old"]):
            st = stored.get(code)
            if st is None:
                if rows_old > 0:
                    out.add(code)
            elif rows_old != st.rows or str(sum_old) != st.checksum:
                out.add(code)
        return out | (set(stored) - set(self.table.index))

    def states(self, codes: list[str], export_id: str) -> list[InstrumentState]:
        """What the meta repo stores for ``codes`` after an export ``export_id``."""
        rows = self.table.loc[codes, ["first_date", "last_date", "rows_all", "sum_all"]]
        return [InstrumentState(c, first, last, int(n), str(checksum), export_id)
                for c, first, last, n, checksum in zip(rows.index, rows["first_date"], rows["last_date"],
                                                       rows["rows_all"], rows["sum_all"])]


class _Session(Protocol):
    resolved: ResolvedMapping

    def arrow(self, query: str, params: tuple) -> pa.Table: ...

    def column_types(self, table: str) -> dict[str, str]: ...

    def universe_clause(self, ts_codes: list[str] | None, param_no: int, alias: str = "b") -> tuple[str, tuple]: ...


def server_fingerprints(s: _Session, start: date, split: date | None, end: date,
                        ts_codes: list[str] | None) -> Fingerprints:
    """The server's fingerprints, in ``s``'s view: "old" over [start, split], "all" over [start, end].

    Each row is aggregated once: the old part and the part after ``split`` are separate GROUP BYs and "all"
    is their exact (numeric) sum — the part after ``split`` is the new days, an index range scan. The raw
    table's term is aggregated on its own and joined per instrument, not per row — the same value whenever
    each raw row in the range has its bar; a raw row without a bar only makes the instrument count as
    changed."""
    t = time.perf_counter()
    m = s.resolved.mapping
    universe, uparams = s.universe_clause(ts_codes, 4)
    split = max(split or start - timedelta(days=1), start - timedelta(days=1))
    parts = {"o": "BETWEEN $1 AND $2", "n": "> $2 AND {a}.trade_date BETWEEN $1 AND $3"}
    types = s.column_types(m.bars_table)
    ctes = [f"b{part} AS (SELECT b.ts_code, count(*) AS n, {bar_sums(m, types)} AS s, min(b.trade_date) AS "
            f"first_date, max(b.trade_date) AS last_date FROM {quote_table(m.bars_table)} b WHERE b.trade_date "
            f"{parts[part].format(a='b')}{universe} GROUP BY b.ts_code)" for part in ("o", "n")]
    raw_old = raw_all = "0"
    joins = ""
    if m.raw_table:
        close = m.fields["close"].column
        raw_type = s.column_types(m.raw_table).get(close, "")
        raw_universe, _ = s.universe_clause(ts_codes, 4, alias="r")
        term = weighted_sums([(1, f'r."{close}"', raw_type, True)], f"(r.trade_date - {EPOCH_SQL} + 1)")
        ctes += [f"r{part} AS (SELECT r.ts_code, {term} AS s FROM {quote_table(m.raw_table)} r WHERE r.trade_date "
                 f"{parts[part].format(a='r')}{raw_universe} GROUP BY r.ts_code)" for part in ("o", "n")]
        joins = "LEFT JOIN ro ON ro.ts_code = k.ts_code LEFT JOIN rn ON rn.ts_code = k.ts_code"
        raw_old, raw_all = "coalesce(ro.s, 0)", "coalesce(ro.s, 0) + coalesce(rn.s, 0)"
    q = (f"WITH {', '.join(ctes)} SELECT k.ts_code, coalesce(bo.n, 0) AS rows_old, "
         f"(coalesce(bo.s, 0) + {RAW_WEIGHT} * {raw_old})::text AS sum_old, coalesce(bo.n, 0) + coalesce(bn.n, 0) AS rows_all, "
         f"(coalesce(bo.s, 0) + coalesce(bn.s, 0) + {RAW_WEIGHT} * ({raw_all}))::text AS sum_all, "
         f"least(bo.first_date, bn.first_date) AS first_date, greatest(bo.last_date, bn.last_date) AS last_date "
         f"FROM (SELECT ts_code FROM bo UNION SELECT ts_code FROM bn) k "
         f"LEFT JOIN bo ON bo.ts_code = k.ts_code LEFT JOIN bn ON bn.ts_code = k.ts_code {joins} ORDER BY k.ts_code")
    table = s.arrow(q, (start, split, end, *uparams)).to_pandas().set_index("ts_code")
    return Fingerprints(table, time.perf_counter() - t)

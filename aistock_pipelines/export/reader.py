"""DBReader (seed §5.3): bars + factor joins → logical frames, read in bulk through ADBC.

Why ADBC: the PostgreSQL ADBC driver streams ``COPY … (FORMAT binary)`` into Arrow record batches, 6×
faster than ``pandas.read_sql`` (REFERENCE §5). Scaling and casts run in SQL, one SELECT per source table;
the join on ``(ts_code, trade_date)`` runs on arrays here (:class:`_KeyJoin`), which halves the server's work
against a SQL join. Codes and dates are always bound parameters, never SQL text: the bulk SELECT of
:meth:`ReadSession.load_daily` reads them from settings of its transaction, set by a bound ``set_config``
(see :data:`READ_BOUNDS`), because the driver streams ``COPY`` only for a statement without parameters.
Identifiers come from the validated mapping and are quoted. One ``ReadSession`` is one REPEATABLE READ
transaction, so the rows an export reads and the checksums it records describe the same database state.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable, Iterable, Iterator, TypeVar

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Engine

from aistock_pipelines.db import libpq_url
from aistock_pipelines.export.daily_features import PACKED_COLUMN, SourceSelect, joined_select, source_selects
from aistock_pipelines.export.fingerprints import EPOCH_SQL, INTEGER_TYPES, RAW_WEIGHT, RowFingerprints, bar_sums, weighted_sums
from aistock_pipelines.export.frames import INDEX_NAMES, finish_in_place, make_index, sort_order
from aistock_pipelines.export.mapping import ExportMapping, ResolvedMapping, quote_table, resolve_mapping

log = logging.getLogger(__name__)
T = TypeVar("T")
_CODE = re.compile(r"^[A-Za-z0-9]{1,12}\.[A-Za-z]{2,4}$")
_SNAPSHOT_ID = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]+)+$")  # pg_export_snapshot(): e.g. 00000003-0000001B-1
#: The bulk read's bounds as settings of the read's transaction. The ADBC driver streams a statement's
#: rows through ``COPY (FORMAT binary)`` only when it has no parameters — with ``$n`` it buffers the whole
#: result in libpq (measured at 5.6 M rows: 3.9 GB before the first row). So :meth:`ReadSession.bind_bounds`
#: binds the dates and codes as parameters of ``set_config(…, is_local => true)``, and the SELECT reads
#: them back (:func:`_bound_dates`).
READ_BOUNDS = {"start": "aistock.read_start", "end": "aistock.read_end", "codes": "aistock.read_codes"}
_CODES = f"string_to_array(current_setting('{READ_BOUNDS['codes']}'), ',')"

#: Session functions that read the date bounds and are declared IMMUTABLE so that the planner folds each
#: call into a constant: the statement is then planned *and executed* as if the dates were literals. Read
#: directly, ``current_setting(…)::date`` is estimated right (the planner folds stable calls when it
#: estimates) but evaluated for every row a scan filters — measured 1.4 s → 4.0 s for one 5.6 M-row table.
#: The declaration is true for the only statements that call them: one-shot SELECTs, planned after
#: :meth:`ReadSession.bind_bounds` in the same transaction and never cached. Created by
#: :meth:`DBReader.connect`; where a session cannot create temporary objects (a hot standby) the reader
#: falls back to the direct form — same rows, slower scans.
_FOLDED_BOUNDS = {key: f"pg_temp.aistock_read_{key}()" for key in ("start", "end")}
BOUND_FUNCTIONS_DDL = [f"CREATE OR REPLACE FUNCTION {fn} RETURNS date LANGUAGE sql IMMUTABLE PARALLEL SAFE "
                       f"AS $$ SELECT current_setting('{READ_BOUNDS[key]}')::date $$" for key, fn in _FOLDED_BOUNDS.items()]


def _bound_dates(folded: bool) -> tuple[str, str]:
    """SQL for the bulk read's first and last date (see :data:`_FOLDED_BOUNDS`)."""
    if folded:
        return _FOLDED_BOUNDS["start"], _FOLDED_BOUNDS["end"]
    return tuple(f"current_setting('{READ_BOUNDS[key]}')::date" for key in ("start", "end"))


class ReaderError(RuntimeError):
    pass


class DataGateError(ValueError):
    """Source data a consumer must not receive; the message names examples. Nothing was written."""


def check_codes(ts_codes: list[str]) -> list[str]:
    bad = [c for c in ts_codes if not isinstance(c, str) or not _CODE.match(c)]
    if bad:
        raise ReaderError(f"malformed ts_code(s) {bad[:5]}: expected e.g. 000001.SZ, 600000.SH, 430047.BJ")
    return sorted(set(ts_codes))


@dataclass
class ReadSession:
    """One consistent (REPEATABLE READ) view of the database."""

    conn: adbc.Connection
    resolved: ResolvedMapping
    rows_read: int = 0
    #: The view's exported snapshot id (``pg_export_snapshot``) when the session was opened ``shared``: a
    #: session on another connection opened with it sees exactly this database state (None: not shared, or
    #: the server refused to export it).
    snapshot: str | None = None

    # ---------------------------------------------------------------------------------- queries

    def _arrow(self, query: str, params: tuple) -> pa.Table:
        with self.conn.cursor() as cur:
            cur.execute(query, parameters=params)
            return cur.fetch_arrow_table()

    def _universe_clause(self, ts_codes: list[str] | None, param_no: int, alias: str = "b") -> tuple[str, tuple]:
        if ts_codes is None:
            return "", ()
        return f" AND {alias}.ts_code = ANY(string_to_array(${param_no}, ','))", (",".join(check_codes(ts_codes)),)

    def count_bars(self, after: date, end: date, ts_codes: list[str] | None) -> int:
        """Bars in (after, end] — an index range count (the exporter sizes the stored block's spare rows)."""
        m = self.resolved.mapping
        universe, uparams = self._universe_clause(ts_codes, 3)
        t = self._arrow(f"SELECT count(*) FROM {quote_table(m.bars_table)} b "
                        f"WHERE b.trade_date > $1 AND b.trade_date <= $2{universe}", (after, end, *uparams))
        return int(t.column(0)[0].as_py())

    def trading_days(self, start: date, end: date) -> list[date]:
        m = self.resolved.mapping
        t = self._arrow(f"SELECT cal_date FROM {quote_table(m.calendar_table)} "
                        "WHERE is_trading AND cal_date BETWEEN $1 AND $2 ORDER BY cal_date", (start, end))
        return t.column(0).to_pylist()

    def all_ts_codes(self, start: date | None = None, end: date | None = None) -> list[str]:
        """Every code with a bar in [start, end] — delisted ones included (no survivorship bias)."""
        m = self.resolved.mapping
        t = self._arrow(f"SELECT DISTINCT ts_code FROM {quote_table(m.bars_table)} "
                        "WHERE trade_date BETWEEN $1 AND $2 ORDER BY ts_code",
                        (start or date(1900, 1, 1), end or date(2999, 12, 31)))
        return t.column(0).to_pylist()

    def bar_date_range(self, not_before: date, on_or_before: date) -> tuple[date | None, date | None]:
        """First and last day with any bar in [not_before, on_or_before] (index lookups on trade_date)."""
        bars = quote_table(self.resolved.mapping.bars_table)
        t = self._arrow(f"SELECT (SELECT min(trade_date) FROM {bars} WHERE trade_date BETWEEN $1 AND $2), "
                        f"(SELECT max(trade_date) FROM {bars} WHERE trade_date BETWEEN $1 AND $2)",
                        (not_before, on_or_before))
        return t.column(0)[0].as_py(), t.column(1)[0].as_py()

    def trading_days_back(self, end: date, count: int, not_before: date) -> list[date]:
        """The last ``count`` trading days on or before ``end`` and not before ``not_before``, ascending
        (fewer when the calendar has fewer)."""
        m = self.resolved.mapping
        t = self._arrow(f"SELECT cal_date FROM {quote_table(m.calendar_table)} "
                        "WHERE is_trading AND cal_date BETWEEN $1 AND $2 ORDER BY cal_date DESC LIMIT $3",
                        (not_before, end, count))
        return sorted(t.column(0).to_pylist())

    def previous_close(self, ts_codes: list[str], before: date, not_before: date) -> pd.DataFrame:
        """Per code, the close (scaled as in :meth:`load_daily`) and date of its last bar in
        [not_before, before): the row ``change`` of a window's first row is computed from. A bar, not a
        trading day — after a suspension it lies further back. One index probe per code (LATERAL … LIMIT 1)."""
        m = self.resolved.mapping
        close = m.fields["close"].sql("b")
        q = (f"SELECT c.code AS ts_code, p.trade_date, p.close FROM unnest(string_to_array($1, ',')) AS c(code) "
             f"CROSS JOIN LATERAL (SELECT b.trade_date, {close} AS close FROM {quote_table(m.bars_table)} b "
             "WHERE b.ts_code = c.code AND b.trade_date >= $2 AND b.trade_date < $3 "
             "ORDER BY b.trade_date DESC LIMIT 1) p")
        return self._arrow(q, (",".join(check_codes(ts_codes)), not_before, before)).to_pandas()

    def codes_with_bars(self, ts_codes: list[str], not_before: date) -> list[str]:
        """The subset of ``ts_codes`` with any bar on or after ``not_before`` (one index probe per code)."""
        m = self.resolved.mapping
        q = (f"SELECT c.code FROM unnest(string_to_array($1, ',')) AS c(code) WHERE EXISTS (SELECT 1 FROM "
             f"{quote_table(m.bars_table)} b WHERE b.ts_code = c.code AND b.trade_date >= $2) ORDER BY 1")
        return self._arrow(q, (",".join(check_codes(ts_codes)), not_before)).column(0).to_pylist()

    def checksums(self, start: date, split: date | None, end: date, ts_codes: list[str] | None) -> pd.DataFrame:
        """Per instrument: rows and fingerprint over [start, split] ("old") and [start, end] ("all").

        Each row is aggregated once: the old part and the part after ``split`` are separate GROUP BYs and
        "all" is their exact (numeric) sum — the part after ``split`` is the new days, an index range scan;
        aggregating every row twice (once under a FILTER) cost the server 40 % more. The raw table's term is
        aggregated on its own and joined per instrument, not per row — the same value whenever each raw row
        in the range has its bar (the layout); a raw row without a bar only makes the instrument count as
        changed."""
        m = self.resolved.mapping
        universe, uparams = self._universe_clause(ts_codes, 4)
        split = max(split or start - timedelta(days=1), start - timedelta(days=1))
        types = self._column_types(m.bars_table)
        parts = {"o": "BETWEEN $1 AND $2", "n": "> $2 AND {a}.trade_date BETWEEN $1 AND $3"}

        def bars(part: str) -> str:
            return (f"SELECT b.ts_code, count(*) AS n, {bar_sums(m, types)} AS s, "
                    f"min(b.trade_date) AS first_date, max(b.trade_date) AS last_date FROM {quote_table(m.bars_table)} b "
                    f"WHERE b.trade_date {parts[part].format(a='b')}{universe} GROUP BY b.ts_code")

        ctes = [f"bo AS ({bars('o')})", f"bn AS ({bars('n')})"]
        raw_old = raw_all = "0"
        if m.raw_table:
            close = m.fields["close"].column
            raw_type = self._column_types(m.raw_table).get(close, "")
            rday = f"(r.trade_date - {EPOCH_SQL} + 1)"
            raw_universe, _ = self._universe_clause(ts_codes, 4, alias="r")
            column = 'r."' + close + '"'
            for part in ("o", "n"):
                ctes.append(f"r{part} AS (SELECT r.ts_code, {weighted_sums([(1, column, raw_type, True)], rday)} AS s "
                            f"FROM {quote_table(m.raw_table)} r WHERE r.trade_date {parts[part].format(a='r')}{raw_universe} "
                            f"GROUP BY r.ts_code)")
            joins = "LEFT JOIN ro ON ro.ts_code = k.ts_code LEFT JOIN rn ON rn.ts_code = k.ts_code"
            raw_old, raw_all = "coalesce(ro.s, 0)", "coalesce(ro.s, 0) + coalesce(rn.s, 0)"
        else:
            joins = ""
        q = (f"WITH {', '.join(ctes)} SELECT k.ts_code, coalesce(bo.n, 0) AS rows_old, "
             f"(coalesce(bo.s, 0) + {RAW_WEIGHT} * {raw_old})::text AS sum_old, coalesce(bo.n, 0) + coalesce(bn.n, 0) AS rows_all, "
             f"(coalesce(bo.s, 0) + coalesce(bn.s, 0) + {RAW_WEIGHT} * ({raw_all}))::text AS sum_all, "
             f"least(bo.first_date, bn.first_date) AS first_date, greatest(bo.last_date, bn.last_date) AS last_date "
             f"FROM (SELECT ts_code FROM bo UNION SELECT ts_code FROM bn) k "
             f"LEFT JOIN bo ON bo.ts_code = k.ts_code LEFT JOIN bn ON bn.ts_code = k.ts_code {joins} ORDER BY k.ts_code")
        return self._arrow(q, (start, split, end, *uparams)).to_pandas().set_index("ts_code")

    def row_fingerprints(self, ts_codes: list[str] | None) -> RowFingerprints | None:
        """What :meth:`checksums` computes over a bulk read's whole range, counted by the client from the
        rows read (pass it to :meth:`load_daily_block`), or None where the client cannot count it: a read of
        listed codes (its raw close arrives divided into ``factor``) or a bar field or raw close stored in a
        column that is not an integer type."""
        m = self.resolved.mapping
        if ts_codes is not None:
            return None
        integer = (*INTEGER_TYPES, "bigint")
        types = self._column_types(m.bars_table)
        if any(types.get(spec.column) not in integer for spec in m.fields.values()):
            return None
        if m.has_factor and self._column_types(m.raw_table).get(m.fields["close"].column) not in integer:
            return None
        return RowFingerprints(m, source_selects(self.resolved)[0].names, raw=m.has_factor)

    def _column_types(self, table: str) -> dict[str, str]:
        schema, name = table.split(".")
        t = self._arrow("SELECT column_name::text, data_type::text FROM information_schema.columns "
                        "WHERE table_schema = $1 AND table_name = $2", (schema, name))
        return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))

    def load_daily(self, ts_codes: list[str] | None, start: date, end: date) -> pd.DataFrame:
        """Logical frame for [start, end]: MultiIndex (datetime, instrument=ts_code), float64 columns in
        ``resolved.logical_columns`` order, ``change`` NaN (cross-row: :func:`frames.finish_in_place`)."""
        block, index, columns = self.load_daily_block(ts_codes, start, end)
        return pd.DataFrame(block, index=index, columns=columns, copy=False)

    def load_daily_block(self, ts_codes: list[str] | None, start: date, end: date, *,
                         expected_rows: int | Callable[[], int | None] | None = None,
                         on_ready: Callable[[pd.DataFrame, list[str]], None] | None = None,
                         fingerprints: RowFingerprints | None = None) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
        """:meth:`load_daily` as its parts: a writable row-major float64 block owned by the caller (who may
        finish it in place — the exporter does), the sorted index and the column names.

        The SELECTs of :meth:`_plan` (over a date range: one per source table), run one after the other on
        this session's connection by a second thread (:func:`_prefetched`) while this one places the rows
        (:class:`_KeyJoin`): the server only scans and converts, and the key join costs the client a few
        array operations per batch. ``expected_rows`` (the bars in the range, when the caller knows them —
        the exporter's fingerprints count them) lets the block be allocated and its memory faulted in
        while the bars arrive, instead of after them; a callable is asked at each of the bars' batches
        until it returns a number (the fingerprints, computed on a second connection beside this read).
        ``on_ready(frame, names)`` is called (in this thread) each time columns of the block become final,
        while the read goes on: ``frame`` is the block under the final index, ``names`` the columns that
        will not change again in this read — ``change`` never (it is computed from the rounded closes of a
        finished frame). A full export writes their Qlib bins meanwhile. ``fingerprints`` (from
        :meth:`row_fingerprints`, a read of all codes only) is given every row as it arrives."""
        if fingerprints is not None and ts_codes is not None:
            raise ValueError("row fingerprints count a read of all codes, not of listed ones")
        folded = self.bind_bounds(start, end, ts_codes)
        plan = self._plan(ts_codes is not None, folded)
        join = _KeyJoin(self.resolved, [select for select, _ in plan], expected_rows, on_ready, fingerprints)
        for i, batch in _prefetched(_statement_batches(self.conn, [sql for _, sql in plan]), depth=16):
            join.add(i, batch)
        self.rows_read += join.rows
        return join.result()

    def bind_bounds(self, start: date, end: date, ts_codes: list[str] | None) -> bool:
        """Set :data:`READ_BOUNDS` for the rest of this transaction, the values as bound parameters.
        Returns whether this connection has the folding functions (:data:`_FOLDED_BOUNDS`)."""
        codes = ",".join(check_codes(ts_codes)) if ts_codes is not None else ""
        t = self._arrow("SELECT set_config($1, $2::date::text, true), set_config($3, $4::date::text, true), "
                        "set_config($5, $6, true), to_regprocedure($7) IS NOT NULL",
                        (READ_BOUNDS["start"], start, READ_BOUNDS["end"], end, READ_BOUNDS["codes"], codes,
                         _FOLDED_BOUNDS["end"]))
        return bool(t.column(3)[0].as_py())

    # -------------------------------------------------------------------------------- internals

    def statements(self, filtered: bool, folded: bool = True) -> list[str]:
        """The bulk read's SQL (see :meth:`_plan`)."""
        return [sql for _, sql in self._plan(filtered, folded)]

    def _plan(self, filtered: bool, folded: bool) -> list[tuple[SourceSelect, str]]:
        """The bulk read's SELECTs, bounded by :data:`READ_BOUNDS`: over all codes one per source table
        (:func:`source_selects`, joined in Python); for listed codes the tables joined in SQL, per code."""
        first, last = _bound_dates(folded)
        if filtered:
            # Per requested code, range scans on every table's (ts_code, trade_date) key, merge-joined in key
            # order — the planner picks that shape inside a LATERAL. Measured with the live adapter's read
            # (5,000 codes × 60 days): per-table SELECTs joined in Python took 20 % more CPU on both sides.
            # ``check_codes`` de-duplicates, so no row repeats.
            def per_code(alias: str) -> str:
                return f" AND {alias}.trade_date BETWEEN {first} AND {last} AND {alias}.ts_code = c.code"

            joined = joined_select(self.resolved)
            inner = joined.sql(f"WHERE b.ts_code = c.code AND b.trade_date BETWEEN {first} AND {last}", per_code)
            return [(joined, f"SELECT x.* FROM unnest({_CODES}) AS c(code) CROSS JOIN LATERAL ({inner}) x")]
        return [(s, s.packed_sql(f"WHERE {s.alias}.trade_date BETWEEN {first} AND {last}")) for s in source_selects(self.resolved)]


def _statement_batches(conn: adbc.Connection, statements: list[str]) -> Iterator[tuple[int, pa.RecordBatch | None]]:
    """``(i, batch)`` for each Arrow batch of statement ``i``, then ``(i, None)`` when it is done: the
    statements one after another on one cursor (one transaction, one view of the database)."""
    with conn.cursor() as cur:
        for i, sql in enumerate(statements):
            cur.execute(sql)
            for batch in cur.fetch_record_batch():
                yield i, batch
            yield i, None


def _prefetched(items: Iterable[T], depth: int = 3) -> Iterator[T]:
    """``items``, produced by a second thread while the caller works on the previous ones.

    Without it the socket is drained only between the caller's copies, so the server waits on a full
    socket buffer while the client copies, and the client waits while the server produces (measured at
    5.6 M × 21: reads of 37–40 s became 29–34 s). PyArrow releases the GIL while the ADBC driver reads and
    decodes the next batch. If the caller stops early, the thread stops after its current item, closes
    ``items`` (a generator's cursor closes in the thread that used it) and is joined."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                slots.put(item)
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as e:  # handed to the caller, raised there
            slots.put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=pump, name="adbc-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pending put, then wait for the thread to return
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def logical_frame(frame: pd.DataFrame, resolved: ResolvedMapping) -> pd.DataFrame:
    """Rows shaped like the view ``market.daily_features`` (``trade_date, ts_code``, scaled base fields,
    ``factor``, factor fields) → the logical frame: derived columns, (datetime, instrument) index,
    ``logical_columns`` order, float64, sorted — how the live adapter's latest bars (rows that do not come
    from the database) get exactly the shape and derivations of database rows (:func:`_derive`)."""
    date_codes, date_levels = pd.factorize(pd.DatetimeIndex(frame["trade_date"]).as_unit("ns").to_numpy(), sort=True)
    codes, levels = pd.factorize(frame["ts_code"].to_numpy(dtype=object), sort=True)
    block, index, columns = _assemble(date_codes, np.asarray(date_levels, dtype="datetime64[ns]"), codes,
                                      np.asarray(levels, dtype=object), lambda c: frame[c].to_numpy(dtype=np.float64),
                                      resolved)
    return pd.DataFrame(block, index=index, columns=columns, copy=False)


def _batch_keys(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, list[str], pa.RecordBatch]:
    """A batch's trade_date as int32 days since 1970, its ts_code as indices into a per-batch dictionary (no
    Python object per row), and the batch itself without the rows whose key is NULL (they join nothing)."""
    if batch.column(0).null_count or batch.column(1).null_count:
        batch = batch.filter(pc.and_(pc.is_valid(batch.column(0)), pc.is_valid(batch.column(1))))
    codes = pc.dictionary_encode(batch.column(1))
    return (batch.column(0).cast(pa.int32()).to_numpy(zero_copy_only=False),
            codes.indices.to_numpy(zero_copy_only=False), codes.dictionary.to_pylist(), batch)


def _value_block(select: SourceSelect, batch: pa.RecordBatch) -> np.ndarray:
    """A batch's value columns (after trade_date and ts_code) as one float64 ``(rows, len(names))`` array:
    for the packed column of :meth:`SourceSelect.packed_sql` (rows of ``8 × len(names)`` bytes of big-endian
    float8s) a big-endian view of the batch's own buffer — swapped where it is copied into the block, so
    no batch-sized array is allocated (fresh pages cost this VM's kernel ≈ 2 s per GB to zero) — else the
    plain columns stacked."""
    column = batch.column(2)
    if batch.num_columns == 3 and batch.schema.field(2).name == PACKED_COLUMN:
        width, n = len(select.names), len(column)
        if column.null_count or not pa.types.is_binary(column.type):
            raise DataGateError(f"{select.label}: the packed read returned NULL or {column.type} values")
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * column.offset)
        if int(offsets[-1] - offsets[0]) != 8 * width * n:
            raise DataGateError(f"{select.label}: the packed read returned rows of unexpected length")
        packed = np.frombuffer(column.buffers()[2], dtype=">f8", count=width * n, offset=int(offsets[0]))
        return packed.reshape(n, width)
    return np.column_stack([c.to_numpy(zero_copy_only=False).astype(np.float64, copy=False) for c in batch.columns[2:]])


class _KeyJoin:
    """The left join of ``selects`` on ``(ts_code, trade_date)``, done on arrays as the batches of the bulk
    read arrive (statement 0: the bars — alone, or already joined in SQL with the other tables; then the
    tables still to join).

    The bars' batches are kept until their statement ends; then every bar gets its row in the sorted
    (datetime, instrument) order, read off a dense grid of days × instruments (a row number per cell, −1
    where an instrument has no bar that day), and the bars' columns are written into one row-major block of
    exactly that many rows. A joined table's batch then costs a grid lookup per row and a scatter per column
    straight into the block — no sort, no second copy of the block. Rows of a joined table without a bar are
    dropped; bars without a row there get NaN. Two rows with one key in any table (which SQL's join would
    turn into duplicate bars) are refused with examples, as a :class:`DataGateError`."""

    def __init__(self, resolved: ResolvedMapping, selects: list[SourceSelect],
                 expected_rows: int | Callable[[], int | None] | None = None,
                 on_ready: Callable[[pd.DataFrame, list[str]], None] | None = None,
                 fingerprints: RowFingerprints | None = None) -> None:
        self.resolved = resolved
        self.on_ready = on_ready
        self.fingerprints = fingerprints
        self.reported: set[str] = {"change"}  # columns final so far (change: never, in a read)
        self.derived = False  # _derive ran (once the ratio's denominator is in)
        self.index: pd.MultiIndex | None = None
        self.selects = selects
        self.names = list(resolved.logical_columns)
        self.at = {name: j for j, name in enumerate(self.names)}
        self.bars: list[tuple[np.ndarray, np.ndarray, list[str], np.ndarray]] = []  # keys and values per batch
        self.rows = 0
        self.block: np.ndarray | None = None
        # The block, allocated up front when its size is known, and faulted in as the bars arrive: a first
        # write to fresh memory costs a page fault per page (measured 0.3–3 s per GB; the upper end on a VM
        # whose host reclaims freed memory), which then overlaps with the server and the decoding thread.
        self.expected_rows = expected_rows if callable(expected_rows) else lambda: expected_rows
        self.early: np.ndarray | None = None
        self.faulted = 0
        self.arrived = 0  # the bars' rows so far
        self.stamp: np.ndarray | None = None  # per row: the last joined-table row placed there (−1: none yet)
        self.stamped = 0
        self.duplicates: list[np.ndarray] = []  # row numbers with a duplicate key in the current table
        self.errors: list[str] = []

    def add(self, i: int, batch: pa.RecordBatch | None) -> None:
        if i == 0:
            if batch is None:
                self._place_bars()
                self._statement_done(0)
            elif batch.num_rows:
                days, codes, dictionary, batch = _batch_keys(batch)
                values = _value_block(self.selects[0], batch)
                if self.fingerprints is not None:
                    self.fingerprints.add_bars(days, codes, dictionary, values)
                self.bars.append((days, codes, dictionary, values))
                self.arrived += batch.num_rows
                self._fault_in()
        elif batch is None:
            self._finish_joined(self.selects[i])
            self._statement_done(i)
        elif batch.num_rows and self.rows:
            self._add_joined(self.selects[i], batch)

    def _statement_done(self, i: int) -> None:
        """Derive once the ratio's denominator (the raw bars) is in; tell ``on_ready`` what became final."""
        if not self.derived and (self.selects[i].divides or not any(s.divides for s in self.selects)):
            _derive(self.block, self.at, self.resolved)
            self.derived = True
        if self.on_ready is None or self.errors or not self.rows:
            return
        done = {name for s in self.selects[:i + 1] for name in s.names}
        if self.derived:
            done |= set(self.resolved.derived_fields)
        else:  # the ratio is a numerator still, and what _derive writes is not written yet
            done -= {SourceSelect.RATIO, *_derived_columns(self.resolved)}
        ready = [name for name in self.names if name in done and name not in self.reported]
        if ready:
            self.reported.update(ready)
            self.on_ready(pd.DataFrame(self.block, index=self._index(), columns=self.names, copy=False), ready)

    def _index(self) -> pd.MultiIndex:
        if self.index is None:
            width = max(len(self.levels), 1)
            self.index = make_index(self.day_levels.astype("datetime64[D]").astype("datetime64[ns]"),
                                    self.cells // width, np.asarray(self.levels, dtype=object), self.cells % width)
        return self.index

    def _fault_in(self) -> None:
        """Allocate the block once its size is known, and fault in as many rows as have arrived."""
        if self.expected_rows is not None:
            rows = self.expected_rows()
            if rows is not None:
                self.expected_rows = None
                self.early = np.empty((rows, len(self.names))) if rows else None
        if self.early is not None and self.faulted < len(self.early):
            upto = min(self.arrived, len(self.early))
            self.early[self.faulted:upto] = 0.0
            self.faulted = upto

    def _place_bars(self) -> None:
        bars, self.bars = self.bars, []
        days = np.concatenate([b[0] for b in bars]) if bars else np.empty(0, dtype=np.int32)
        self.levels = sorted({c for b in bars for c in b[2]})
        self.code_no = {c: k for k, c in enumerate(self.levels)}
        self.day_levels = np.unique(days)
        self.first_day = int(self.day_levels[0]) if len(days) else 0
        self.day_no = np.full(int(self.day_levels[-1]) - self.first_day + 1 if len(days) else 0, -1, dtype=np.int64)
        self.day_no[self.day_levels - self.first_day] = np.arange(len(self.day_levels))
        width = len(self.levels)
        cells = [self._cells(days, codes, dictionary) for days, codes, dictionary, _ in bars]
        occupied = np.zeros(len(self.day_levels) * width, dtype=bool)
        for c in cells:
            occupied[c] = True
        self.cells = np.flatnonzero(occupied)  # sorted by (day, instrument): the rows' order
        self.rows = len(self.cells)
        self.grid = np.full(len(occupied), -1, dtype=np.int64)
        self.grid[self.cells] = np.arange(self.rows)
        del occupied
        if self.early is not None and len(self.early) == self.rows:
            self.block = self.early
        else:
            self.block = np.empty((self.rows, len(self.names)), dtype=np.float64)
        self.early = None
        self._start_table()
        bars_select = self.selects[0]
        for (_, _, _, values), c in zip(bars, cells):
            self._place(bars_select, self.grid[c], values, np.ones(len(c), dtype=bool))
        self._finish_table(bars_select)

    def _start_table(self) -> None:
        self.stamp = np.full(self.rows, -1, dtype=np.int64)
        self.stamped = 0

    def _place(self, select: SourceSelect, rows: np.ndarray, values: np.ndarray, keep: np.ndarray) -> None:
        """Write a batch's ``values`` (:func:`_value_block`) at ``rows`` (where ``keep``), noting keys seen
        twice in this table."""
        every = bool(keep.all())
        rows = rows if every else rows[keep]
        ids = np.arange(self.stamped, self.stamped + len(rows))
        self.stamped += len(rows)
        seen = self.stamp[rows] >= 0  # placed by an earlier batch of this table
        self.stamp[rows] = ids
        twice = seen | (self.stamp[rows] != ids)  # … or by a later row of this batch
        if twice.any():
            self.duplicates.append(rows[twice])
        if not every:
            values = values[keep]
        at = [self.at[name] for name in select.names]
        if select.divides:  # the bars put the numerator in these columns
            for i, j in enumerate(at):
                self.block[rows, j] = self.block[rows, j] / values[:, i]
        elif at == list(range(at[0], at[0] + len(at))):
            # whole rows in one assignment: each destination row's cache lines are touched once
            self.block[rows, at[0]:at[0] + len(at)] = values
        else:
            self.block[rows[:, None], np.asarray(at)] = values

    def _cells(self, days: np.ndarray, codes: np.ndarray, dictionary: list[str]) -> np.ndarray:
        """Per row, its cell of the day × instrument grid (day number × instruments + instrument number);
        −1 for a day or instrument the bars do not have (only a joined table's rows can have those)."""
        code_no = np.array([self.code_no.get(c, -1) for c in dictionary], dtype=np.int64)[codes]
        offset = days.astype(np.int64) - self.first_day
        inside = (offset >= 0) & (offset < len(self.day_no))
        day_no = np.where(inside, self.day_no[np.where(inside, offset, 0)], -1)
        return np.where((day_no >= 0) & (code_no >= 0), day_no * len(self.levels) + code_no, -1)

    def _add_joined(self, select: SourceSelect, batch: pa.RecordBatch) -> None:
        days, codes, dictionary, batch = _batch_keys(batch)
        values = _value_block(select, batch)
        if select.divides and self.fingerprints is not None:  # every raw row counts, with a bar or not
            self.fingerprints.add_raw(days, codes, dictionary, values[:, 0])
        cells = self._cells(days, codes, dictionary)
        rows = np.where(cells >= 0, self.grid[np.maximum(cells, 0)], -1)
        self._place(select, rows, values, rows >= 0)

    def _finish_joined(self, select: SourceSelect) -> None:
        missing = self.stamp < 0
        for name in select.names:
            self.block[missing, self.at[name]] = np.nan
        self._finish_table(select)

    def _finish_table(self, select: SourceSelect) -> None:
        """Note the table's duplicate keys (raised by :meth:`result`, once the stream is read to its end:
        the connection is then idle and the transaction ends cleanly) and reset the stamps."""
        if self.duplicates:
            rows = np.unique(np.concatenate(self.duplicates))[:5]
            self.duplicates = []
            examples = ", ".join(f"{d:%Y-%m-%d} {c}" for d, c in zip(self._row_days(rows), self._row_codes(rows)))
            self.errors.append(f"duplicate (ts_code, trade_date) rows in {select.label}: {examples}; deduplicate "
                               "the table (it should have a unique key on (ts_code, trade_date))")
        self._start_table()

    def _row_days(self, rows: np.ndarray) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.day_levels[self.cells[rows] // max(len(self.levels), 1)].astype("datetime64[D]"))

    def _row_codes(self, rows: np.ndarray) -> list[str]:
        return [self.levels[k] for k in self.cells[rows] % max(len(self.levels), 1)]

    def result(self) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
        if self.errors:
            raise DataGateError(self.errors[0])
        if not self.derived:
            _derive(self.block, self.at, self.resolved)
        return self.block, self._index(), self.names


def _assemble(date_codes: np.ndarray, date_levels: np.ndarray, inst_codes: np.ndarray, inst_levels: np.ndarray,
              column, resolved: ResolvedMapping) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
    """The logical frame's parts from per-row codes into sorted date and instrument levels and
    ``column(name)`` → float64 values: rows sorted by (datetime, instrument) through the integer codes, one
    row-major float64 block (a row's values contiguous: pandas' fixed-format HDF5 writer stores it without
    a transposed copy)."""
    width = max(len(inst_levels), 1)
    perm = sort_order(date_codes.astype(np.int64) * width + inst_codes, len(date_levels) * width)
    names = list(resolved.logical_columns)
    at = {name: j for j, name in enumerate(names)}
    block = np.empty((len(perm), len(names)), dtype=np.float64)
    for name in names:
        if name not in ("change", "vwap"):
            block[:, at[name]] = column(name)[perm]
    _derive(block, at, resolved)
    index = make_index(date_levels, np.asarray(date_codes)[perm], inst_levels, np.asarray(inst_codes)[perm])
    return block, index, names


def _derived_columns(resolved: ResolvedMapping) -> tuple[str, ...]:
    """The columns :func:`_derive` writes."""
    return ("change", "volume", "vwap") if resolved.mapping.has_factor else ("change",)


def _derive(block: np.ndarray, at: dict[str, int], resolved: ResolvedMapping) -> None:
    """The derived columns (:func:`_derived_columns`), in place, on a block whose ``volume`` still holds
    the SELECT's raw shares: the one definition for database and live rows alike."""
    block[:, at["change"]] = np.nan
    if resolved.mapping.has_factor:
        # Qlib convention: $volume × $factor = raw shares, $vwap is the adjusted average price.
        raw_shares = block[:, at["volume"]].copy()
        factor, amount = block[:, at["factor"]], block[:, at["amount"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            block[:, at["volume"]] = raw_shares / factor
            block[:, at["vwap"]] = amount / np.where(raw_shares > 0, raw_shares, np.nan) * factor


class DBReader:
    """Seed §5.3 interface over a SQLAlchemy engine (catalogue checks) and ADBC (bulk reads)."""

    def __init__(self, engine: Engine, mapping: ExportMapping | None = None, url: str | None = None):
        self.engine = engine
        self.mapping = mapping or ExportMapping()
        self._url = libpq_url(url or engine.url.render_as_string(hide_password=False))
        self._resolved: ResolvedMapping | None = None

    def select(self, factor_tables: list[str] | None) -> "DBReader":
        """A reader over the mapping restricted to the named factor tables (None = this reader): how a
        snapshot's ``factor_tables`` option chooses its columns, for the exporter and the live adapter."""
        if factor_tables is None:
            return self
        return DBReader(self.engine, self.mapping.select(list(factor_tables)), self._url)

    @property
    def resolved(self) -> ResolvedMapping:
        if self._resolved is None:
            self._resolved = resolve_mapping(self.engine, self.mapping)
        return self._resolved

    @contextmanager
    def session(self, conn: adbc.Connection | None = None, *, shared: bool = False,
                snapshot: str | None = None) -> Iterator[ReadSession]:
        """One REPEATABLE READ view. ``conn``: an open connection from :meth:`connect` to run it on — a
        long-lived caller (the live adapter) saves the ~40 ms connect per read; it is left open here.

        ``shared``: export the view (:attr:`ReadSession.snapshot`), so that work on a second connection —
        a session opened with ``snapshot=`` that id, while this one is open — reads the same database
        state; this is how the exporter's fingerprints run beside its bulk read. A server that refuses
        (``snapshot`` stays None) costs a fresh transaction before anything was read."""
        own = conn is None
        if own:
            conn = self.connect()
        try:
            exported = None
            with conn.cursor() as cur:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                if snapshot is not None:
                    if not _SNAPSHOT_ID.match(snapshot):
                        raise ReaderError(f"malformed snapshot id {snapshot!r}")
                    cur.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # a utility statement: no parameters
                elif shared:
                    try:
                        cur.execute("SELECT pg_export_snapshot()")
                        exported = cur.fetch_arrow_table().column(0)[0].as_py()
                    except adbc.Error as e:
                        log.info("this read's view is not shared (%s)", str(e).splitlines()[0])
                        cur.execute("ROLLBACK")
                        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield ReadSession(conn, self.resolved, snapshot=exported)
        finally:
            try:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK")
            finally:
                if own:
                    conn.close()

    def connect(self) -> adbc.Connection:
        """A connection with the session functions of :data:`_FOLDED_BOUNDS` (when it may create them)."""
        conn = adbc.connect(self._url, autocommit=True)
        try:
            with conn.cursor() as cur:
                for statement in BOUND_FUNCTIONS_DDL:
                    cur.execute(statement)
        except adbc.Error as e:  # read-only server or no TEMP privilege: the direct (slower) form is used
            log.info("bulk reads evaluate their date bounds per row (no session functions: %s)", str(e).splitlines()[0])
        return conn

    def get_all_ts_codes(self) -> list[str]:
        with self.session() as s:
            return s.all_ts_codes()

    def load_daily(self, ts_codes: list[str] | None, start: date | None, end: date | None) -> pd.DataFrame:
        with self.session() as s:
            block, index, columns = s.load_daily_block(ts_codes, start or date(1900, 1, 1), end or date(2999, 12, 31))
        return finish_in_place(block, index, columns, "float64")  # ``change``, as every snapshot computes it

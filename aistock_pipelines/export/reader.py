"""DBReader: bars + factor joins → logical frames, read in bulk through ADBC.

Why ADBC: the PostgreSQL ADBC driver streams ``COPY … (FORMAT binary)`` into Arrow record batches, several
times faster than ``pandas.read_sql``. Scaling and casts run in SQL, one SELECT per source table;
the join on ``(ts_code, trade_date)`` runs on arrays here (:class:`key_join.KeyJoin`), which halves the server's work
against a SQL join. Codes and dates are always bound parameters, never SQL text: the bulk SELECT of
:meth:`ReadSession.load_daily` reads them from settings of its transaction, set by a bound ``set_config``
(see :data:`READ_BOUNDS`), because the driver streams ``COPY`` only for a statement without parameters.
Identifiers come from the validated mapping and are quoted. One ``ReadSession`` is one REPEATABLE READ
transaction, so the rows an export reads and the checksums it records describe the same database state.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Callable, Iterator

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy.engine import Engine

from aistock_pipelines.conventions import TS_CODE
from aistock_pipelines.db import libpq_url
from aistock_pipelines.export.arrow_batches import prefetched, statement_batches
from aistock_pipelines.export.daily_features import SourceSelect, joined_select, source_selects
from aistock_pipelines.export.frames import finish_in_place
from aistock_pipelines.export.gates import DataNotReady
from aistock_pipelines.export.key_join import KeyJoin, OnReady
from aistock_pipelines.export.mapping import ExportMapping, ResolvedMapping, quote_table, resolve_mapping
from aistock_pipelines.export.row_fingerprints import RowFingerprints

log = logging.getLogger(__name__)
_SNAPSHOT_ID = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]+)+$")  # pg_export_snapshot(): e.g. 00000003-0000001B-1
#: The bulk read's bounds as settings of the read's transaction. The ADBC driver streams a statement's
#: rows through ``COPY (FORMAT binary)`` only when it has no parameters — with ``$n`` it buffers the whole
#: result in libpq before the first row is returned. So :meth:`ReadSession.bind_bounds`
#: binds the dates and codes as parameters of ``set_config(…, is_local => true)``, and the SELECT reads
#: them back (:func:`_bound_dates`).
READ_BOUNDS = {"start": "aistock.read_start", "end": "aistock.read_end", "codes": "aistock.read_codes"}
_CODES = f"string_to_array(current_setting('{READ_BOUNDS['codes']}'), ',')"

#: Session functions that read the date bounds and are declared IMMUTABLE so that the planner folds each
#: call into a constant: the statement is then planned *and executed* as if the dates were literals. Read
#: directly, ``current_setting(…)::date`` is estimated right (the planner folds stable calls when it
#: estimates) but evaluated for every row a scan filters, which makes scans several times slower.
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


def check_codes(ts_codes: list[str]) -> list[str]:
    bad = [c for c in ts_codes if not isinstance(c, str) or not TS_CODE.match(c)]
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

    def arrow(self, query: str, params: tuple) -> pa.Table:
        with self.conn.cursor() as cur:
            cur.execute(query, parameters=params)
            return cur.fetch_arrow_table()

    def universe_clause(self, ts_codes: list[str] | None, param_no: int, alias: str = "b") -> tuple[str, tuple]:
        if ts_codes is None:
            return "", ()
        return f" AND {alias}.ts_code = ANY(string_to_array(${param_no}, ','))", (",".join(check_codes(ts_codes)),)

    def count_bars(self, after: date, end: date, ts_codes: list[str] | None) -> int:
        """Bars in (after, end] — an index range count (the exporter sizes the stored block's spare rows)."""
        m = self.resolved.mapping
        universe, uparams = self.universe_clause(ts_codes, 3)
        t = self.arrow(f"SELECT count(*) FROM {quote_table(m.bars_table)} b "
                        f"WHERE b.trade_date > $1 AND b.trade_date <= $2{universe}", (after, end, *uparams))
        return int(t.column(0)[0].as_py())

    def last_bar(self, on_or_before: date | None) -> date | None:
        """The last day with any bar on or before ``on_or_before`` (None: any)."""
        t = self.arrow(f"SELECT max(trade_date) FROM {quote_table(self.resolved.mapping.bars_table)} "
                       "WHERE trade_date <= $1", (on_or_before or date(2999, 12, 31),))
        return t.column(0)[0].as_py()

    def read_range(self, start: date, end: date | None) -> tuple[date, list[date]]:
        """The range a read up to ``end`` (None: the last bar) covers: its last day and every trading day of
        it. Refuses a range whose trading days have no bars yet (:class:`DataNotReady`) or that has none."""
        last_bar = self.last_bar(end)
        if last_bar is None:
            raise DataNotReady(f"no bars on or before {end} in {self.resolved.mapping.bars_table}")
        days = self.trading_days(start, end or last_bar)
        if not days:
            raise ReaderError(f"no trading days between {start} and {end}")
        if days[-1] > last_bar:
            missing = [d for d in days if d > last_bar]
            raise DataNotReady(f"trading day(s) {missing[0]}…{missing[-1]} have no bars yet "
                               f"(latest bar: {last_bar}); load them, then export again")
        return days[-1], days

    def trading_days(self, start: date, end: date) -> list[date]:
        m = self.resolved.mapping
        t = self.arrow(f"SELECT cal_date FROM {quote_table(m.calendar_table)} "
                        "WHERE is_trading AND cal_date BETWEEN $1 AND $2 ORDER BY cal_date", (start, end))
        return t.column(0).to_pylist()

    def all_ts_codes(self, start: date | None = None, end: date | None = None) -> list[str]:
        """Every code with a bar in [start, end] — delisted ones included (no survivorship bias)."""
        m = self.resolved.mapping
        t = self.arrow(f"SELECT DISTINCT ts_code FROM {quote_table(m.bars_table)} "
                        "WHERE trade_date BETWEEN $1 AND $2 ORDER BY ts_code",
                        (start or date(1900, 1, 1), end or date(2999, 12, 31)))
        return t.column(0).to_pylist()

    def bar_date_range(self, not_before: date, on_or_before: date) -> tuple[date | None, date | None]:
        """First and last day with any bar in [not_before, on_or_before] (index lookups on trade_date)."""
        bars = quote_table(self.resolved.mapping.bars_table)
        t = self.arrow(f"SELECT (SELECT min(trade_date) FROM {bars} WHERE trade_date BETWEEN $1 AND $2), "
                        f"(SELECT max(trade_date) FROM {bars} WHERE trade_date BETWEEN $1 AND $2)",
                        (not_before, on_or_before))
        return t.column(0)[0].as_py(), t.column(1)[0].as_py()

    def trading_days_back(self, end: date, count: int, not_before: date) -> list[date]:
        """The last ``count`` trading days on or before ``end`` and not before ``not_before``, ascending
        (fewer when the calendar has fewer)."""
        m = self.resolved.mapping
        t = self.arrow(f"SELECT cal_date FROM {quote_table(m.calendar_table)} "
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
        return self.arrow(q, (",".join(check_codes(ts_codes)), not_before, before)).to_pandas()

    def codes_with_bars(self, ts_codes: list[str], not_before: date) -> list[str]:
        """The subset of ``ts_codes`` with any bar on or after ``not_before`` (one index probe per code)."""
        m = self.resolved.mapping
        q = (f"SELECT c.code FROM unnest(string_to_array($1, ',')) AS c(code) WHERE EXISTS (SELECT 1 FROM "
             f"{quote_table(m.bars_table)} b WHERE b.ts_code = c.code AND b.trade_date >= $2) ORDER BY 1")
        return self.arrow(q, (",".join(check_codes(ts_codes)), not_before)).column(0).to_pylist()



    def column_types(self, table: str) -> dict[str, str]:
        schema, name = table.split(".")
        t = self.arrow("SELECT column_name::text, data_type::text FROM information_schema.columns "
                        "WHERE table_schema = $1 AND table_name = $2", (schema, name))
        return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))

    def load_daily(self, ts_codes: list[str] | None, start: date, end: date) -> pd.DataFrame:
        """Logical frame for [start, end]: MultiIndex (datetime, instrument=ts_code), float64 columns in
        ``resolved.logical_columns`` order, ``change`` NaN (cross-row: :func:`frames.finish_in_place`)."""
        block, index, columns = self.load_daily_block(ts_codes, start, end)
        return pd.DataFrame(block, index=index, columns=columns, copy=False)

    def load_daily_block(self, ts_codes: list[str] | None, start: date, end: date, *,
                         expected_rows: int | Callable[[], int | None] | None = None,
                         on_ready: OnReady | None = None,
                         fingerprints: RowFingerprints | None = None) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
        """:meth:`load_daily` as its parts: a writable row-major float64 block owned by the caller (who may
        finish it in place — the exporter does), the sorted index and the column names.

        The SELECTs of :meth:`_plan` (over a date range: one per source table), run one after the other on
        this session's connection by a second thread (:func:`arrow_batches.prefetched`) while this one places the rows
        (:class:`key_join.KeyJoin`): the server only scans and converts, and the key join costs the client a few
        array operations per batch. ``expected_rows`` (the bars in the range, when the caller knows them —
        the exporter's fingerprints count them) lets the block be allocated and its memory faulted in
        while the bars arrive, instead of after them; a callable is asked at each of the bars' batches
        until it returns a number (the fingerprints, computed on a second connection beside this read).
        ``on_ready(frame, names)`` is called (in this thread) each time columns of the block become final,
        while the read goes on: ``frame`` is the block under the final index, ``names`` the columns that
        will not change again in this read — ``change`` never (it is computed from the rounded closes of a
        finished frame). A full export writes their Qlib bins meanwhile. ``fingerprints`` (from
        :func:`row_fingerprints.client_fingerprints`, a read of all codes only) is given every row as it arrives."""
        if fingerprints is not None and ts_codes is not None:
            raise ValueError("row fingerprints count a read of all codes, not of listed ones")
        folded = self.bind_bounds(start, end, ts_codes)
        plan = self._plan(ts_codes is not None, folded)
        join = KeyJoin(self.resolved, [select for select, _ in plan], expected_rows, on_ready, fingerprints)
        for i, batch in prefetched(statement_batches(self.conn, [sql for _, sql in plan]), depth=16):
            join.add(i, batch)
        self.rows_read += join.rows
        return join.result()

    def bind_bounds(self, start: date, end: date, ts_codes: list[str] | None) -> bool:
        """Set :data:`READ_BOUNDS` for the rest of this transaction, the values as bound parameters.
        Returns whether this connection has the folding functions (:data:`_FOLDED_BOUNDS`)."""
        codes = ",".join(check_codes(ts_codes)) if ts_codes is not None else ""
        t = self.arrow("SELECT set_config($1, $2::date::text, true), set_config($3, $4::date::text, true), "
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
            # order — the planner picks that shape inside a LATERAL (cheaper than per-table SELECTs here).
            # ``check_codes`` de-duplicates, so no row repeats.
            def per_code(alias: str) -> str:
                return f" AND {alias}.trade_date BETWEEN {first} AND {last} AND {alias}.ts_code = c.code"

            joined = joined_select(self.resolved)
            inner = joined.sql(f"WHERE b.ts_code = c.code AND b.trade_date BETWEEN {first} AND {last}", per_code)
            return [(joined, f"SELECT x.* FROM unnest({_CODES}) AS c(code) CROSS JOIN LATERAL ({inner}) x")]
        return [(s, s.packed_sql(f"WHERE {s.alias}.trade_date BETWEEN {first} AND {last}")) for s in source_selects(self.resolved)]




















def _end_quietly(conn: adbc.Connection, close: bool) -> None:
    """End the transaction and (``close``) the connection of a failed read; their own errors — a server
    that went away fails both — are logged, not raised."""
    try:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
    except Exception as e:  # noqa: BLE001 - secondary to the error being raised
        log.info("ending a failed read's transaction failed too: %s", str(e).splitlines()[0])
    if close:
        try:
            conn.close()
        except Exception as e:  # noqa: BLE001
            log.info("closing a failed read's connection failed too: %s", str(e).splitlines()[0])


class DBReader:
    """The reader of a mapping: a SQLAlchemy engine (catalogue checks) and ADBC connections (bulk reads)."""

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
        except BaseException:
            _end_quietly(conn, own)  # the error that ended the read is the one to report, not the ROLLBACK's
            raise
        else:
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

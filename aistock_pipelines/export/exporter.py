"""QlibDailyExporter (seed §5.6): full and incremental exports, restatement-safe, atomic.

Incremental export in one consistent database view:
1. the new trading days are read and appended to the stored block (read with a spare row per new bar);
   meanwhile per-instrument fingerprints of the already exported range are recomputed by the server and
   compared with ``market.qlib_export_meta``: a mismatch means the instrument's history was restated
   (ex-dividend in qfq data) or corrected. Every bin is extended from the current version's files while the
   server works, before the restated instruments are known;
2. the full histories of the restated instruments are read — so only the new days and those are read;
3. their rows are overwritten in the stored block and their ``change`` recomputed, when they have the
   days they had (a restatement changes values, not days: :func:`frames.patch_sorted`); otherwise
   everything is merged into a new block. Their bins are written anew;
4. the files are swapped in atomically, then the meta rows are replaced.
So after every run the snapshot equals a fresh full export of the same range (tests compare byte-equal
frames). A changed declaration (mapping, options, universe, start) rebuilds in full instead of mixing rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pandas as pd

from aistock_pipelines.export.mapping import quote_table
from aistock_pipelines.export.meta_repo import InstrumentState, MetaRepo
from aistock_pipelines.export import frames, qlib_format
from aistock_pipelines.export.reader import DataGateError, DBReader, ReadSession, check_codes
from aistock_pipelines.export.snapshot_lock import snapshot_write_lock
from aistock_pipelines.export.snapshot_writer import (NewVersion, SnapshotError, SnapshotOptions, SnapshotWriter,
                                                      by_field, check_snapshot_id, external_frame)

PRICE_COLUMNS = ["open", "high", "low", "close"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class DataNotReady(RuntimeError):
    """The requested trading day has no bars yet (load the day, then retry)."""


@dataclass
class ExportResult:
    snapshot_id: str
    mode: str  # full | incremental | rebuild | unchanged
    start: date
    end: date
    path: Path
    instruments: int = 0
    rows: int = 0
    per_instrument: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    restated: list[str] = field(default_factory=list)
    rows_added: int = 0
    rows_rewritten: int = 0
    rows_read: int = 0
    applied: str = ""  # incremental: "in place" (the stored block patched) or "merge" (a new block)
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sha256: str = ""
    export_id: str = ""

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_instrument"} | {"path": str(self.path)}


def declaration_hash(start: date, universe: list[str] | None, options: SnapshotOptions, mapping_fingerprint: str) -> str:
    doc = {"start": start.isoformat(), "universe": universe or "all", "options": options.to_json(),
           "mapping": mapping_fingerprint}
    doc["options"].pop("debug_years"), doc["options"].pop("debug_instruments")
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def check_gates(frame: pd.DataFrame, trading_days: set[date]) -> None:
    """Refuse data Qlib/RD-Agent would silently mis-use. Examples in messages are (date, code).
    Works on columns and index codes (no per-row objects): cheap enough for every read."""
    def examples(mask: np.ndarray | pd.Series) -> str:
        idx = frame.index[np.asarray(mask)][:5]
        return ", ".join(f"{d:%Y-%m-%d} {c}" for d, c in idx)

    if frame.empty:
        return
    # strictly sorted (every bulk read's index) means no key twice; only other frames are hashed
    dup = np.zeros(len(frame), dtype=bool) if frames.strictly_sorted(frame.index) else frame.index.duplicated(keep=False)
    if dup.any():
        raise DataGateError(f"duplicate (ts_code, trade_date) rows in the source: {examples(dup)}; "
                            "deduplicate the bars table (it should have a unique key on (ts_code, trade_date))")
    col = {c: frame[c].to_numpy(dtype=np.float64) for c in PRICE_COLUMNS}
    null = np.isnan(col["open"]) | np.isnan(col["high"]) | np.isnan(col["low"]) | np.isnan(col["close"])
    if null.any():
        raise DataGateError(f"NULL prices on trading rows: {examples(null)}")
    nonpos = col["close"] <= 0
    if nonpos.any():
        raise DataGateError(f"close <= 0 (subtractive qfq from the vendor?): {examples(nonpos)}")
    inverted = col["high"] < col["low"]
    if inverted.any():
        raise DataGateError(f"high < low: {examples(inverted)}")
    level = pd.DatetimeIndex(frame.index.levels[0])
    closed = ~level.normalize().isin(pd.DatetimeIndex(sorted(trading_days)))
    if closed.any():
        off = closed[frame.index.codes[0]]
        if off.any():
            raise DataGateError(f"bars on days the trade calendar marks closed: {examples(off)}")


def finalize(frame: pd.DataFrame, dtype: str) -> pd.DataFrame:
    """Round to the snapshot dtype first, then derive ``change`` from the rounded closes, so an incremental
    export (which starts from the stored, rounded values) produces exactly what a full export does.
    Returns a new sorted frame in one row-major float64 block (see :mod:`frames`)."""
    return frames.merge_sorted([(frame, None)], dtype=dtype, change=True)


class QlibDailyExporter:
    def __init__(self, reader: DBReader, writer: SnapshotWriter, meta: MetaRepo):
        self.reader = reader
        self.writer = writer
        self.meta = meta
        self._readers: dict[tuple[str, ...], DBReader] = {}

    # ------------------------------------------------------------------------------------ public

    def export_full(self, snapshot_id: str, start: date, end: date | None = None, ts_codes: list[str] | None = None,
                    *, options: SnapshotOptions = SnapshotOptions(), if_exists: str = "overwrite") -> ExportResult:
        """Write the whole snapshot for [start, end] (end None = the last day with bars)."""
        check_snapshot_id(snapshot_id)
        if if_exists not in ("overwrite", "refuse"):
            raise ValueError("if_exists must be 'overwrite' or 'refuse'")
        with snapshot_write_lock(self.reader.engine, snapshot_id), self.writer.lock(snapshot_id):
            if self.writer.exists(snapshot_id) and if_exists == "refuse":
                raise SnapshotError(f"snapshot {snapshot_id} exists; pass if_exists='overwrite' to replace it")
            return self._full(snapshot_id, start, end, ts_codes, options, mode="full")

    def export_incremental(self, snapshot_id: str, end: date | None = None, ts_codes: list[str] | None = None,
                           *, options: SnapshotOptions | None = None, start: date | None = None) -> ExportResult:
        """Bring the snapshot up to ``end``: new trading days appended, restated instruments rewritten.
        ``ts_codes``/``options``/``start`` default to the snapshot's declaration; differing values rebuild it."""
        check_snapshot_id(snapshot_id)
        with snapshot_write_lock(self.reader.engine, snapshot_id), self.writer.lock(snapshot_id):
            meta = self.writer.read_meta(snapshot_id)
            if meta is None:
                if start is None:
                    raise SnapshotError(f"snapshot {snapshot_id} does not exist yet: run a full export first")
                return self._full(snapshot_id, start, end, ts_codes, options or SnapshotOptions(), mode="full")
            options = options or SnapshotOptions.from_json(meta["options"])
            universe = ts_codes if ts_codes is not None else meta["universe"]
            snap_start = start or date.fromisoformat(meta["start"])
            mapping = self._reader_for(options).resolved
            decl = declaration_hash(snap_start, universe, options, mapping.fingerprint())
            if decl != meta.get("declaration_hash"):
                prev_end = date.fromisoformat(meta["end"])
                return self._full(snapshot_id, snap_start, max(end or prev_end, prev_end), universe, options, mode="rebuild")
            return self._incremental(snapshot_id, meta, snap_start, end, universe, options)

    # ---------------------------------------------------------------------------------- internals

    def _reader_for(self, options: SnapshotOptions) -> DBReader:
        if options.factor_tables is None:
            return self.reader
        key = options.factor_tables
        if key not in self._readers:
            self._readers[key] = self.reader.select(list(key))
        return self._readers[key]

    def _effective_end(self, s: ReadSession, start: date, end: date | None) -> tuple[date, list[date]]:
        last_bar = s._arrow(f"SELECT max(trade_date) FROM {quote_table(s.resolved.mapping.bars_table)} WHERE trade_date <= $1",
                            (end or date(2999, 12, 31),)).column(0)[0].as_py()
        if last_bar is None:
            raise DataNotReady(f"no bars on or before {end} in {s.resolved.mapping.bars_table}")
        days = s.trading_days(start, end or last_bar)
        if not days:
            raise SnapshotError(f"no trading days between {start} and {end}")
        if days[-1] > last_bar:
            missing = [d for d in days if d > last_bar]
            raise DataNotReady(f"trading day(s) {missing[0]}…{missing[-1]} have no bars yet "
                               f"(latest bar: {last_bar}); load them, then export again")
        return days[-1], days

    def _full(self, snapshot_id: str, start: date, end: date | None, ts_codes: list[str] | None,
              options: SnapshotOptions, mode: str) -> ExportResult:
        t0 = time.perf_counter()
        universe = check_codes(ts_codes) if ts_codes is not None else None
        reader = self._reader_for(options)
        resolved = reader.resolved
        begun, beside = self.writer.begin(snapshot_id), None
        try:
            with reader.session(shared=True) as s:
                end, days = self._effective_end(s, start, end)
                # Each group of columns the read makes final gets its bins written beside the rest of the read.
                beside = (qlib_format.BinsBeside(begun.path / "features", days, options.instruments)
                          if options.qlib_bins else None)
                block, index, columns, sums, timings = self._read_full(s, reader, start, end, universe, beside)
                rows_read = s.rows_read
            if not len(index):
                which = f"codes {universe[:10]}{'…' if len(universe) > 10 else ''}" if universe else "any instrument"
                raise SnapshotError(f"snapshot {snapshot_id}: no bars for {which} between {start} and {end} in "
                                    f"{resolved.mapping.bars_table}; check the codes (ts_code form, e.g. 000001.SZ) and the range")
            t = time.perf_counter()
            check_gates(pd.DataFrame(block, index=index, columns=columns, copy=False), set(days))
            # the block is ours alone (the bins beside only read columns finish_in_place leaves as they are,
            # up to the rounding to float32 they apply anyway): finish it in place — the values never exist twice
            frame = frames.finish_in_place(block, index, columns, options.dtype)
            del block
            ext = external_frame(frame, options)  # float64/ts_code/plain: the same block
            del frame
            timings["frame"] = time.perf_counter() - t
            result = self._commit(snapshot_id, mode, start, end, universe, options, resolved, ext, days, sums,
                                  restated=[], rows_added=len(ext), rows_rewritten=0, rows_read=rows_read,
                                  begun=begun, bins_beside=beside)
        except BaseException:
            if beside is not None:
                beside.close()
            self.writer.discard(snapshot_id, begun)
            raise
        result.timings = {**timings, **result.timings, "total": time.perf_counter() - t0}
        return result

    @staticmethod
    def _read_full(s: ReadSession, reader: DBReader, start: date, end: date, universe: list[str] | None,
                   beside: qlib_format.BinsBeside | None) -> tuple:
        """The bulk read and the fingerprints of [start, end]: (block, index, columns, sums, timings).

        The fingerprints are counted from the rows as they arrive (:meth:`ReadSession.row_fingerprints`):
        the server then only scans and converts — a full export is CPU-bound on two cores, and the server's
        own fingerprints cost it 2.6–2.8 s of CPU at 5.6 M bars. Where the client cannot count them, the server
        computes them beside the read; where the client finds a value it cannot count exactly, after it.
        Either way, the work beside the read (the fingerprints, or the bars' count that lets the block be
        allocated early) runs on a second connection in the read's view, or first, when the view is not
        shared."""
        fingerprints = s.row_fingerprints(universe)
        with ThreadPoolExecutor(1, thread_name_prefix="beside-read") as pool:
            if fingerprints is None:
                aside = _in_view(pool, reader, s, lambda v: v.checksums(start, None, end, universe))
            else:
                aside = _in_view(pool, reader, s, lambda v: v.count_bars(start - timedelta(days=1), end, None))
            t = time.perf_counter()
            block, index, columns = s.load_daily_block(universe, start, end, expected_rows=lambda: _rows(aside),
                                                       on_ready=beside.add if beside is not None else None,
                                                       fingerprints=fingerprints)
            read_s = time.perf_counter() - t
            if fingerprints is None:
                sums, check_s = aside.result()
            else:
                aside.result()  # its failure, if any
                sums, check_s = fingerprints.frame(), fingerprints.seconds
                if sums is None:
                    log.info("fingerprints computed by the server: the client cannot count them exactly (%s)",
                             fingerprints.failure)
                    sums, server_s = _timed(s.checksums, start, None, end, universe)
                    check_s += server_s
            return block, index, columns, sums, {"read_db": read_s, "checksums": check_s}

    def _incremental(self, snapshot_id: str, meta: dict, start: date, end: date | None, universe: list[str] | None,
                     options: SnapshotOptions) -> ExportResult:
        t0 = time.perf_counter()
        reader = self._reader_for(options)
        resolved = reader.resolved
        prev_end = date.fromisoformat(meta["end"])
        states = self.meta.load(snapshot_id)
        trust_states = bool(states) and all(st.export_id == meta["export_id"] for st in states.values())
        timings: dict[str, float] = {}

        def read_stored(spare: int) -> tuple[np.ndarray, pd.MultiIndex, list[str]] | None:
            t = time.perf_counter()
            try:
                return self.writer.read_block(snapshot_id, spare)
            finally:
                timings["read_snapshot"] = time.perf_counter() - t

        begun, ahead, current, source = None, None, None, None
        try:
            with reader.session() as s, ThreadPoolExecutor(2, thread_name_prefix="incremental") as pool:
                new_end, days = self._effective_end(s, start, max(end or prev_end, prev_end) if end else None)
                new_end = max(new_end, prev_end)
                days = [d for d in days if d <= new_end]
                # The stored block is read (with a spare row per new bar; too few only means a merge) by a
                # second thread while this one reads the new days; then the server computes the fingerprints
                # while this thread applies the new days to the stored block and has every bin written from
                # that — before it is known which instruments were restated (their bins are rewritten after).
                # Every thread waits on I/O or system calls with the GIL released (HDF5 is called without it:
                # export/h5_values.py).
                t = time.perf_counter()
                n_new = s.count_bars(prev_end, new_end, universe) if new_end > prev_end else 0
                stored = pool.submit(read_stored, n_new) if n_new else None
                new_rows = s.load_daily(universe, prev_end + timedelta(days=1), new_end) if n_new else None
                read_s = time.perf_counter() - t
                sums = pool.submit(_timed, s.checksums, start, prev_end, new_end, universe)
                wait_s = 0.0
                if stored is not None:
                    check_gates(new_rows, set(days))  # the stored rows passed them when they were exported
                    t = time.perf_counter()
                    stored = stored.result()
                    wait_s = time.perf_counter() - t
                    t = time.perf_counter()
                    current = self._with_new_days(stored, new_rows, prev_end, options)
                    if current is not None and options.qlib_bins:
                        begun, ahead, source = self._bins_ahead(snapshot_id, stored, current, days)
                    timings["frame"] = time.perf_counter() - t
                sums, check_s = sums.result()
                restated = sorted(_restated(sums, states) if trust_states else set(sums.index) | set(states))
                t = time.perf_counter()
                history = s.load_daily(restated, start, new_end) if restated else None
                read_s += time.perf_counter() - t
                rows_read = s.rows_read
            if not restated and new_rows is None:
                return ExportResult(snapshot_id, "unchanged", start, prev_end, self.writer.path(snapshot_id),
                                    instruments=meta["instrument_count"], rows=meta["row_count"],
                                    sha256=meta["daily_pv_sha256"], export_id=meta["export_id"], rows_read=rows_read,
                                    timings={"checksums": check_s, "read_db": read_s, "total": time.perf_counter() - t0})
            if history is not None:
                check_gates(history, set(days))
            if ahead is not None and source is None:
                t = time.perf_counter()
                ahead.wait()  # the bins are read from the block the restated histories are written into next
                timings["wait_bins_ahead"] = time.perf_counter() - t
            t = time.perf_counter()
            if not n_new:  # restatements only
                stored = read_stored(0)
                if stored is not None:
                    current = pd.DataFrame(stored[0], index=stored[1], columns=stored[2], copy=False)
            block = None if current is None else stored[0][:len(current)]
            ext, n_old, rewritten, applied = self._updated(snapshot_id, block, current, new_rows, history, restated,
                                                           new_end, options)
            del stored, block, current
            if not frames.strictly_sorted(ext.index):  # the parts are disjoint by construction; never write if not
                raise DataGateError("internal consistency: the merged snapshot has duplicate (date, instrument) "
                                    "rows; run a full export")
            if ahead is not None and restated:
                ahead.rewrite(by_field(ext), set(qlib_format.instrument_names(restated, options.instruments)))
            timings["frame"] = timings.get("frame", 0.0) + time.perf_counter() - t
            result = self._commit(snapshot_id, "incremental", start, new_end, universe, options, resolved, ext, days,
                                  sums, restated=restated, rows_added=len(ext) - n_old + rewritten,
                                  rows_rewritten=rewritten, rows_read=rows_read, applied=applied,
                                  begun=begun, bins_beside=ahead)
        except BaseException:
            if ahead is not None:
                ahead.close()  # the version stays a crash leftover, deleted by the next writing export
            raise
        result.timings = {"checksums": check_s, "read_db": read_s, **timings, "wait_snapshot": wait_s,
                          **result.timings, "total": time.perf_counter() - t0}
        return result

    def _bins_ahead(self, snapshot_id: str, stored: tuple[np.ndarray, pd.MultiIndex, list[str]],
                    current: pd.DataFrame, days: list[date]) -> tuple[NewVersion, qlib_format.BinsBeside,
                                                                   pd.DataFrame | None]:
        """Begin the new version and start writing all its bins from ``current`` (the stored rows, then the
        new days: :meth:`_with_new_days`) before the restated instruments are known. Returns (version, the
        bins' writer, their source or None).

        The source is ``current`` over a second mapping of the stored file: the restated histories can then
        be written into the stored block while the bins are still being written, which keep reading the
        stored values wherever they rewrite bytes the current version holds, as they must. None where the
        file cannot be mapped: the bins then read ``current`` itself, and the caller waits for them before
        the block changes."""
        begun = self.writer.begin(snapshot_id)
        block, n, total = stored[0], len(stored[1]), len(current)
        twin = self.writer.map_values(snapshot_id, total - n)
        source = None
        if twin is not None and twin.shape == (total, block.shape[1]) and twin.dtype == block.dtype:
            twin[n:] = block[n:total]  # the new days (the stored rows are the file's: _with_new_days only appends)
            source = pd.DataFrame(twin, index=current.index, columns=current.columns, copy=False)
        return begun, self.writer.bins_ahead(snapshot_id, begun, current if source is None else source, days), source

    @staticmethod
    def _with_new_days(stored: tuple[np.ndarray, pd.MultiIndex, list[str]] | None, new_rows: pd.DataFrame,
                       prev_end: date, options: SnapshotOptions) -> pd.DataFrame | None:
        """The stored block with every instrument's new days appended in its spare rows (rounded, sorted;
        ``change`` from the last stored close: :func:`frames.patch_sorted`), or None — the block untouched —
        when it cannot take them (then :meth:`_merged`)."""
        if stored is None:
            return None
        return frames.patch_sorted(*stored, _in_file_shape(new_rows, options), set(), np.datetime64(prev_end, "ns"))

    def _updated(self, snapshot_id: str, block: np.ndarray | None, current: pd.DataFrame | None,
                 new_rows: pd.DataFrame | None, history: pd.DataFrame | None, restated: list[str], new_end: date,
                 options: SnapshotOptions) -> tuple[pd.DataFrame, int, int, str]:
        """The snapshot's new frame in the file's shape. ``current``: the stored frame with the new days
        appended (:meth:`_with_new_days`; None: they could not be), its values the rows of ``block`` (ours to
        write). The restated histories (every row up to ``new_end``) overwrite their instruments' rows in
        place (:func:`frames.patch_sorted`), or — a restated history whose days changed — everything is
        merged into a new block (:meth:`_merged`). Returns (frame, stored rows, stored rows replaced,
        ``"in place"`` | ``"merge"``)."""
        n_new = 0 if new_rows is None else len(new_rows)
        ext = current
        if current is not None and history is not None:
            delta = _in_file_shape(history, options)
            replaced = set(qlib_format.instrument_names(restated, options.instruments))
            ext = frames.patch_sorted(block, current.index, list(current.columns), delta, replaced,
                                      np.datetime64(new_end, "ns"))
        if ext is None:
            return (*self._merged(snapshot_id, new_rows, history, restated, options), "merge")
        # the restated histories' rows after the previous end are new days, appended with the others
        restated_new = 0 if new_rows is None else int(frames.instrument_mask(new_rows.index, restated).sum())
        rewritten = 0 if history is None else len(history) - restated_new
        return ext, len(ext) - n_new, rewritten, "in place"

    def _merged(self, snapshot_id: str, new_rows: pd.DataFrame | None, history: pd.DataFrame | None,
                restated: list[str], options: SnapshotOptions) -> tuple[pd.DataFrame, int, int]:
        """The general incremental merge (a restated history whose days changed): the stored frame without
        the restated instruments, plus the rows read, in one new block. Returns (file's frame, stored rows,
        stored rows replaced)."""
        old = self.writer.read_frame(snapshot_id)
        kept = ~frames.instrument_mask(old.index, restated)
        parts = [(old, kept)]
        if new_rows is not None:
            parts.append((new_rows, ~frames.instrument_mask(new_rows.index, restated)))
        if history is not None:
            parts.append((history, None))
        n_old, rewritten = len(old), int(len(old) - kept.sum())
        # One pass: merge without concatenating, sort by codes, round, recompute ``change`` (see finalize).
        frame = frames.merge_sorted(parts, dtype=options.dtype, change=True)
        del old, parts
        return external_frame(frame, options), n_old, rewritten

    def _commit(self, snapshot_id, mode, start, end, universe, options, resolved, ext, days, sums, *, restated,
                rows_added, rows_rewritten, rows_read, applied="", begun=None, bins_beside=None) -> ExportResult:
        """Write ``ext`` (the file's frame) as the snapshot's new version, then its meta rows."""
        export_id = uuid.uuid4().hex
        ts_code = (lambda name: name) if options.instruments == "ts_code" else qlib_format.from_qlib_symbol
        counts = {ts_code(name): n for name, n in frames.instrument_row_counts(ext.index).items()}
        expected = sums["rows_all"]
        if counts != {c: int(n) for c, n in expected.items() if n > 0}:
            raise SnapshotError("internal consistency: rows per instrument differ from the database's counts; "
                                "the source changed in an unexpected way — run a full export")
        rows = sums.loc[list(counts), ["first_date", "last_date", "rows_all", "sum_all"]]
        states = [InstrumentState(c, first, last, int(n), str(checksum), export_id)
                  for c, first, last, n, checksum in zip(rows.index, rows["first_date"], rows["last_date"],
                                                         rows["rows_all"], rows["sum_all"])]
        per_inst = {st.ts_code: (str(st.first_datetime), str(st.last_datetime), st.rows) for st in states}
        column_info = resolved.describe()
        meta = {
            "start": start.isoformat(), "end": end.isoformat(),
            "as_of": datetime.now(timezone.utc).isoformat(timespec="seconds"), "export_id": export_id,
            "instrument_count": int(len(counts)), "row_count": int(len(ext)),
            "calendar_days": len(days),
            "columns": [{"name": c, **column_info.get(c.lstrip("$"), {})} for c in ext.columns],
            "mapping": {"fingerprint": resolved.fingerprint(), "bars_table": resolved.mapping.bars_table,
                        "raw_table": resolved.mapping.raw_table, "factor_tables": list(resolved.factor_columns)},
            "options": options.to_json(), "universe": universe,
            "declaration_hash": declaration_hash(start, universe, options, resolved.fingerprint()),
            "last_export": {"mode": mode, "restated": restated, "rows_added": rows_added,
                            "rows_rewritten": rows_rewritten, "rows_read": rows_read, "applied": applied},
        }
        path, meta, timings = self.writer.write(snapshot_id, ext, days, options, meta, column_info,
                                                rewrite=set(restated) if mode == "incremental" else None,
                                                begun=begun, bins_beside=bins_beside)
        t = time.perf_counter()
        self.meta.replace(snapshot_id, states)
        timings["write_meta_repo"] = time.perf_counter() - t
        return ExportResult(snapshot_id, mode, start, end, path, instruments=len(counts), rows=len(ext),
                            per_instrument=per_inst, restated=restated, rows_added=rows_added,
                            rows_rewritten=rows_rewritten, rows_read=rows_read, applied=applied, timings=timings,
                            sha256=meta["daily_pv_sha256"], export_id=export_id)


def _in_file_shape(rows: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """Rows read from the database as the file holds them — rounded to its dtype, sorted, renamed — for
    :func:`frames.patch_sorted` (``change`` is left to it: it needs the stored closes)."""
    return external_frame(frames.merge_sorted([(rows, None)], dtype=options.dtype), options)


def _in_view(pool: ThreadPoolExecutor, reader: DBReader, s: ReadSession, work: Callable[[ReadSession], T]) -> Future:
    """``(work(session), seconds)`` in ``s``'s view of the database: on a second connection in ``pool``
    when the view is shared (``s.snapshot``), else now, on ``s`` itself (a completed Future)."""
    if s.snapshot is None:
        done: Future = Future()
        done.set_result(_timed(work, s))
        return done

    def twin_work() -> tuple:
        with reader.session(snapshot=s.snapshot) as twin:
            return _timed(work, twin)

    return pool.submit(twin_work)


def _timed(fn, *args) -> tuple:
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def _rows(aside: Future) -> int | None:
    """The bars in the read's range, once the work beside the read has counted them (its result: a count,
    or fingerprints with their rows), else None — before, or if it failed: the read then allocates its
    block after the bars, and the failure is raised where the result is used."""
    if not aside.done() or aside.exception() is not None:
        return None
    counted = aside.result()[0]
    return counted if isinstance(counted, int) else int(counted["rows_all"].sum())


def _restated(sums: pd.DataFrame, stored: dict[str, InstrumentState]) -> set[str]:
    """Instruments whose rows up to the previous end differ from what was exported (or vanished)."""
    out = set()
    for code, row in sums.iterrows():
        st = stored.get(code)
        if st is None:
            if row["rows_old"] > 0:
                out.add(code)
        elif row["rows_old"] != st.rows or str(row["sum_old"]) != st.checksum:
            out.add(code)
    out |= set(stored) - set(sums.index)
    return out


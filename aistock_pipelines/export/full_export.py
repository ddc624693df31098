"""A full export's stages: plan → read (fingerprints counted beside it, bins written as columns become
final) → gate → finish in place → commit.

A full export is bound by one server backend's bulk read while the machine's second core has time to
spare, so it works beside its read: the fingerprints are counted from the rows as they arrive (the server
computes them instead where the client cannot: :func:`row_fingerprints.client_fingerprints`); a second
connection in the read's own view counts the bars so the block is allocated early; and the bins of each
group of columns are written by a :class:`BinsWriter` as soon as the read makes them final.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable, TypeVar

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames, row_fingerprints
from aistock_pipelines.export.bins_writer import BinsWriter
from aistock_pipelines.export.build import Built, ExportResult, RowStats, SnapshotBuild, commit
from aistock_pipelines.export.fingerprints import Fingerprints, server_fingerprints
from aistock_pipelines.export.gates import check_gates
from aistock_pipelines.export.reader import DBReader, ReadSession
from aistock_pipelines.export.snapshot_shape import SnapshotError, external_frame
from aistock_pipelines.export.snapshot_writer import PendingBins

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class FullRead:
    """The read stage's output: the block (owned by the build), its index and columns, the fingerprints of
    its rows and the rows read."""

    block: np.ndarray
    index: pd.MultiIndex
    columns: list[str]
    fingerprints: Fingerprints
    rows_read: int


def run_full(build: SnapshotBuild, end: date | None) -> ExportResult:
    """The whole snapshot for [build.start, end] (None: the last day with bars)."""
    version = build.begin()
    try:
        with build.reader.session(shared=True) as s:
            end, days = s.read_range(build.start, end)
            if build.options.qlib_bins:
                build.bins = BinsWriter(version.path / "features", days, build.options.instruments)
            read = _read(build, s, end)
        _refuse_empty(build, read, end)
        fingerprints, rows_read = read.fingerprints, read.rows_read
        with build.timer.phase("frame"):
            ext = _finish(build, read, days)
        del read  # the block lives on only where ext (or the bins writer) still uses it
        built = Built(ext, days, end, fingerprints, RowStats(rows_read=rows_read, rows_added=len(ext)))
        return commit(build, built, PendingBins(beside=build.bins))
    except BaseException:
        build.abandon()
        raise


def _finish(build: SnapshotBuild, read: FullRead, days: list[date]) -> pd.DataFrame:
    """Gate the rows, then finish the block in place and shape it as the file holds it. The block is the
    build's alone; the bins writer reads only columns the read made final, which finishing leaves as they
    are (up to the float32 rounding bins apply anyway)."""
    check_gates(pd.DataFrame(read.block, index=read.index, columns=read.columns, copy=False), set(days),
                build.resolved.mapping.required_raw_table)
    frame = frames.finish_in_place(read.block, read.index, read.columns, build.options.dtype)
    return external_frame(frame, build.options)  # float64/ts_code/plain: the same block


def _refuse_empty(build: SnapshotBuild, read: FullRead, end: date) -> None:
    if not len(read.index):
        universe = build.universe
        which = f"codes {universe[:10]}{'…' if len(universe) > 10 else ''}" if universe else "any instrument"
        raise SnapshotError(f"snapshot {build.snapshot_id}: no bars for {which} between {build.start} and {end} in "
                            f"{build.resolved.mapping.bars_table}; check the codes (ts_code form, e.g. 000001.SZ) "
                            "and the range")


def _read(build: SnapshotBuild, s: ReadSession, end: date) -> FullRead:
    """The bulk read of [start, end] and its fingerprints, with the work beside it (module docstring)."""
    start, universe, timer = build.start, build.universe, build.timer
    counted = row_fingerprints.client_fingerprints(s, universe)
    with ThreadPoolExecutor(1, thread_name_prefix="beside-read") as pool:
        if counted is None:
            aside = _in_view(pool, build.reader, s, lambda v: server_fingerprints(v, start, None, end, universe))
        else:
            aside = _in_view(pool, build.reader, s, lambda v: v.count_bars(start - timedelta(days=1), end, None))
        with timer.phase("read_db"):
            block, index, columns = s.load_daily_block(
                universe, start, end, expected_rows=lambda: _counted_rows(aside),
                on_ready=build.bins.add if build.bins is not None else None, fingerprints=counted)
        if counted is None:
            fingerprints = aside.result()
        else:
            aside.result()  # its failure, if any
            fingerprints = counted.result()
            if fingerprints is None:
                log.info("fingerprints computed by the server: the client cannot count them exactly (%s)",
                         counted.failure)
                server = server_fingerprints(s, start, None, end, universe)
                fingerprints = Fingerprints(server.table, counted.seconds + server.seconds)
        timer.add("checksums", fingerprints.seconds)
        return FullRead(block, index, columns, fingerprints, s.rows_read)


def _in_view(pool: ThreadPoolExecutor, reader: DBReader, s: ReadSession, work: Callable[[ReadSession], T]) -> Future:
    """``work(session)`` in ``s``'s view of the database: on a second connection in ``pool`` when the view is
    shared (``s.snapshot``), else now, on ``s`` itself (a completed Future)."""
    if s.snapshot is None:
        done: Future = Future()
        done.set_result(work(s))
        return done

    def twin_work() -> T:
        with reader.session(snapshot=s.snapshot) as twin:
            return work(twin)

    return pool.submit(twin_work)


def _counted_rows(aside: Future) -> int | None:
    """The bars in the read's range once the work beside the read has counted them (a count, or the
    server's fingerprints), else None — before, or if it failed: the read then allocates its block after the
    bars, and the failure is raised where the result is used."""
    if not aside.done() or aside.exception() is not None:
        return None
    counted = aside.result()
    return counted if isinstance(counted, int) else counted.rows()

"""An incremental export's stages, in one consistent database view:

1. read the new trading days, while a second thread reads the stored block with a spare row per new bar
   and the server computes every instrument's fingerprint over the exported range;
2. append the new days to the stored block and start every bin, extended from the current version's
   files, before the restated instruments are known (:meth:`SnapshotWriter.bins_ahead`);
3. compare the fingerprints with ``market.qlib_export_meta`` (:meth:`Fingerprints.restated`: a qfq
   restatement, a corrected or deleted row) and read those instruments' full histories;
4. overwrite their rows in the stored block when they have the days they had (:func:`frames.patch_sorted`),
   otherwise merge everything into a new block; rewrite their bins;
5. commit: the version swapped in, then the meta rows replaced.
So after every run the snapshot equals a fresh full export of the same range.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames, qlib_format
from aistock_pipelines.export.build import Built, ExportResult, RowStats, SnapshotBuild, commit
from aistock_pipelines.export.fingerprints import Fingerprints, server_fingerprints
from aistock_pipelines.export.gates import DataGateError, check_gates
from aistock_pipelines.export.snapshot_shape import by_field, external_frame, in_file_shape
from aistock_pipelines.export.snapshot_writer import PendingBins
from aistock_pipelines.export.stored_snapshot import StoredBlock, verify_h5


@dataclass(frozen=True)
class Reads:
    """What the read stages found: the range, the new days' rows, the restated instruments and their
    histories, the stored block with the new days appended (None: they could not be) and the fingerprints."""

    end: date
    days: list[date]
    new_rows: pd.DataFrame | None
    restated: list[str]
    history: pd.DataFrame | None
    stored: StoredBlock | None
    current: pd.DataFrame | None
    fingerprints: Fingerprints
    rows_read: int


@dataclass(frozen=True)
class Patched:
    """The patch stage's output: the new frame in the file's shape and how it was made."""

    frame: pd.DataFrame
    stored_rows: int
    rewritten: int
    applied: str  # "in place" | "merge"


def run_incremental(build: SnapshotBuild, meta: dict, end: date | None) -> ExportResult:
    """Bring the snapshot whose ``meta.json`` is ``meta`` up to ``end`` (None: the last day with bars)."""
    prev_end = date.fromisoformat(meta["end"])
    states = build.meta.load(build.snapshot_id)
    trusted = bool(states) and all(st.export_id == meta["export_id"] for st in states.values())
    try:
        reads = _read(build, meta, end, states, trusted)
        if not reads.restated and reads.new_rows is None:
            return ExportResult(build.snapshot_id, "unchanged", build.start, prev_end, build.writer.path(build.snapshot_id),
                                instruments=meta["instrument_count"], rows=meta["row_count"],
                                sha256=meta["daily_pv_sha256"], export_id=meta["export_id"], rows_read=reads.rows_read,
                                timings=build.timer.total())
        if reads.history is not None:
            check_gates(reads.history, set(reads.days), build.resolved.mapping.required_raw_table)
        with build.timer.phase("frame"):
            patched = _patch(build, reads)
            if build.bins is not None and reads.restated:
                build.bins.rewrite(by_field(patched.frame),
                                   set(qlib_format.instrument_names(reads.restated, build.options.instruments)))
        return commit(build, _built(reads, patched), _pending_bins(build, reads))
    except BaseException:
        build.abandon()
        raise


def _read(build: SnapshotBuild, meta: dict, end: date | None, states: dict, trusted: bool) -> Reads:
    """Stages 1–3 (module docstring) in one REPEATABLE READ view."""
    timer, universe = build.timer, build.universe
    prev_end, sha256 = date.fromisoformat(meta["end"]), meta["daily_pv_sha256"]
    with build.reader.session() as s, ThreadPoolExecutor(2, thread_name_prefix="incremental") as pool:
        new_end, days = s.read_range(build.start, max(end or prev_end, prev_end) if end else None)
        new_end = max(new_end, prev_end)
        days = [d for d in days if d <= new_end]
        with timer.phase("read_db"):
            n_new = s.count_bars(prev_end, new_end, universe) if new_end > prev_end else 0
            stored_job = pool.submit(_read_stored, build, n_new, sha256) if n_new else None
            new_rows = s.load_daily(universe, prev_end + timedelta(days=1), new_end) if n_new else None
        fingerprints_job = pool.submit(server_fingerprints, s, build.start, prev_end, new_end, universe)
        stored, current = _append_new_days(build, stored_job, new_rows, days, prev_end) if n_new else (None, None)
        fingerprints = fingerprints_job.result()
        timer.add("checksums", fingerprints.seconds)
        restated = sorted(fingerprints.restated(states) if trusted else set(fingerprints.table.index) | set(states))
        with timer.phase("read_db"):
            history = s.load_daily(restated, build.start, new_end) if restated else None
        if not n_new and restated:  # restatements only: the stored block as it is
            stored = _read_stored(build, 0, sha256)
            current = stored.frame() if stored is not None else None
        return Reads(new_end, days, new_rows, restated, history, stored, current, fingerprints, s.rows_read)


def _read_stored(build: SnapshotBuild, spare: int, sha256: str) -> StoredBlock | None:
    """The stored block (:meth:`SnapshotWriter.read_block`), once its file is verified against ``sha256``."""
    with build.timer.phase("read_snapshot"):
        verify_h5(build.writer.path(build.snapshot_id) / "daily_pv.h5", sha256)
        return build.writer.read_block(build.snapshot_id, spare)


def _append_new_days(build: SnapshotBuild, stored_job: Future, new_rows: pd.DataFrame, days: list[date],
                     prev_end: date) -> tuple[StoredBlock | None, pd.DataFrame | None]:
    """Stage 2: the stored block with every instrument's new days in its spare rows (rounded, sorted;
    ``change`` from the last stored close), or None — the block untouched — when it cannot take them (then
    a merge); and every bin started from it."""
    check_gates(new_rows, set(days), build.resolved.mapping.required_raw_table)  # the stored rows passed them
    with build.timer.phase("wait_snapshot"):
        stored = stored_job.result()
    with build.timer.phase("frame"):
        if stored is None:
            return None, None
        current = frames.patch_sorted(*stored, in_file_shape(new_rows, build.options), set(),
                                      np.datetime64(prev_end, "ns"))
        if current is not None and build.options.qlib_bins:
            _start_bins_ahead(build, stored, current, days)
    return stored, current


def _start_bins_ahead(build: SnapshotBuild, stored: StoredBlock, current: pd.DataFrame, days: list[date]) -> None:
    """Begin the new version and have every bin of ``current`` written into it. The bins read a second,
    read-only mapping of the stored file with the new days after it — the restated histories can then be
    written into the stored block meanwhile — or, where the file cannot be mapped, a copy of ``current``."""
    n, total = len(stored.index), len(current)
    source = build.writer.map_values(build.snapshot_id, stored.values[n:total])
    if source is None or source.shape != (total, stored.values.shape[1]):
        source = current.to_numpy().copy()
    frame = pd.DataFrame(source, index=current.index, columns=current.columns, copy=False)
    build.bins = build.writer.bins_ahead(build.snapshot_id, build.begin(), frame, days)


def _patch(build: SnapshotBuild, reads: Reads) -> Patched:
    """Stage 4: the restated histories (every row up to the end) overwrite their instruments' rows in the
    stored block (:func:`frames.patch_sorted`), or — a history whose days changed — everything is merged
    into a new block."""
    options, current, history = build.options, reads.current, reads.history
    ext = current
    if current is not None and history is not None:
        replaced = set(qlib_format.instrument_names(reads.restated, options.instruments))
        ext = frames.patch_sorted(reads.stored.values[:len(current)], current.index, list(current.columns),
                                  in_file_shape(history, options), replaced, np.datetime64(reads.end, "ns"))
    if ext is None:
        patched = _merged(build, reads)
    else:
        n_new = 0 if reads.new_rows is None else len(reads.new_rows)
        # the restated histories' rows after the previous end are new days, appended with the others
        restated_new = 0 if reads.new_rows is None else int(frames.instrument_mask(reads.new_rows.index, reads.restated).sum())
        rewritten = 0 if history is None else len(history) - restated_new
        patched = Patched(ext, len(ext) - n_new, rewritten, "in place")
    if not frames.strictly_sorted(patched.frame.index):  # the parts are disjoint by construction
        raise DataGateError("internal consistency: the merged snapshot has duplicate (date, instrument) "
                            "rows; run a full export")
    return patched


def _merged(build: SnapshotBuild, reads: Reads) -> Patched:
    """The general merge: the stored frame without the restated instruments, plus the rows read, sorted,
    rounded and ``change`` recomputed in one pass, into a new block."""
    old = build.writer.read_frame(build.snapshot_id)
    kept = ~frames.instrument_mask(old.index, reads.restated)
    parts = [(old, kept)]
    if reads.new_rows is not None:
        parts.append((reads.new_rows, ~frames.instrument_mask(reads.new_rows.index, reads.restated)))
    if reads.history is not None:
        parts.append((reads.history, None))
    n_old, rewritten = len(old), int(len(old) - kept.sum())
    frame = frames.merge_sorted(parts, dtype=build.options.dtype, change=True)
    del old, parts
    return Patched(external_frame(frame, build.options), n_old, rewritten, "merge")


def _built(reads: Reads, patched: Patched) -> Built:
    stats = RowStats(rows_read=reads.rows_read, rows_added=len(patched.frame) - patched.stored_rows + patched.rewritten,
                     rows_rewritten=patched.rewritten, restated=reads.restated, applied=patched.applied)
    return Built(patched.frame, reads.days, reads.end, reads.fingerprints, stats)


def _pending_bins(build: SnapshotBuild, reads: Reads) -> PendingBins:
    """The bins ahead, or — none started — every bin, extending an older version's files where they can be
    (:meth:`SnapshotVersions.bin_reuse`) but the restated instruments'."""
    if build.bins is not None or not build.options.qlib_bins:
        return PendingBins(beside=build.bins)
    rewrite = set(qlib_format.instrument_names(sorted(reads.restated), build.options.instruments))
    return PendingBins(reuse=build.writer.bin_reuse(build.snapshot_id, reads.days, rewrite, build.begin()))

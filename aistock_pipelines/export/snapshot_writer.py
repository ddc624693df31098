"""SnapshotWriter: a version's files written and swapped in.

A version holds::

    daily_pv.h5  meta.json  calendars/day.txt  instruments/all.txt  features/<sym>/<field>.day.bin
    rdagent/{daily_pv.h5, README.md}          (hard link to the top-level h5: no second copy)
    rdagent_debug/{daily_pv.h5, README.md}    (last 2 years × 100 instruments by default)

The bins (tens of thousands of small files: system calls, the GIL free) are written by a second thread
while this one writes the HDF5 files and hashes ``daily_pv.h5`` (the GIL free too: :mod:`stored_snapshot`);
the versions this one supersedes are deleted by a third (module :mod:`versions`).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.bins_writer import BinsWriter
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.market_files import MarketFiles, write_benchmarks, write_universes
from aistock_pipelines.export.qlib_bins import BinReuse
from aistock_pipelines.export.snapshot_shape import (SnapshotError, SnapshotOptions, by_field, debug_subset,
                                                     internal_frame, rdagent_readme)
from aistock_pipelines.export.stored_snapshot import (StoredBlock, map_h5_values, read_h5, read_h5_block,
                                                      sha256_file, write_h5)
from aistock_pipelines.export.suspension import without_suspension_frame, without_suspension_rows
from aistock_pipelines.export.timing import PhaseTimer
from aistock_pipelines.export.versions import NewVersion, SnapshotVersions, remove_tree


@dataclass(frozen=True)
class VersionContent:
    """What a new version holds: its bars in the file's shape (column style, names and dtype of
    ``options``; sorted, row-major), ``daily_pv.h5``'s frame (the bars, or with the suspension rows
    ``options`` asks for), its calendar, the meta document, the columns' descriptions, ``all.txt``'s lines
    and the universe files and benchmark bins (:mod:`market_files`)."""

    frame: pd.DataFrame
    h5_frame: pd.DataFrame
    calendar: list[date]
    options: SnapshotOptions
    meta: dict
    column_info: dict[str, dict]
    spans: list[tuple[str, date, date]]  # instruments/all.txt
    market_files: MarketFiles = MarketFiles()


@dataclass(frozen=True)
class PendingBins:
    """The bins a version still needs: the fields a :class:`BinsWriter` is writing already (``beside``), and
    how :meth:`SnapshotWriter.write` writes the others — anew, or extending an older version's files
    (``reuse``: :meth:`SnapshotVersions.bin_reuse`)."""

    beside: BinsWriter | None = None
    reuse: BinReuse | None = None


def _check_space(path: Path, content: VersionContent, bins: PendingBins) -> None:
    """Refuse a version the file system cannot hold before writing it: its HDF5 files and (an upper bound)
    its bins — a full disk mid-write would only leave a half-built version behind."""
    frame = content.frame
    needed = content.h5_frame.to_numpy().nbytes * 1.1 + 2**20
    if content.options.qlib_bins and bins.beside is None:
        needed += len(frame) * len(frame.columns) * 4 + len(frame.index.levels[1]) * len(frame.columns) * 4096
    free = shutil.disk_usage(path).free
    if free < needed:
        raise SnapshotError(f"not enough free space for snapshot version {path.name}: it needs about "
                            f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free under {path.parent.parent}; "
                            "free space there (old releases, other snapshots) or point AISTOCK_SNAPSHOT_ROOT "
                            "at a larger file system")


class SnapshotWriter(SnapshotVersions):
    def __init__(self, snapshot_root: Path, market: str = "aistock"):
        super().__init__(snapshot_root)
        self.market = market

    def read_frame(self, snapshot_id: str) -> pd.DataFrame:
        """The current ``daily_pv.h5``'s bars, in the exporter's internal shape."""
        return internal_frame(without_suspension_frame(read_h5(self.path(snapshot_id) / "daily_pv.h5")))

    def read_block(self, snapshot_id: str, spare_rows: int) -> StoredBlock | None:
        """The current ``daily_pv.h5``'s bars as they are stored (:func:`read_h5_block`), suspension rows
        dropped: an export works on bars, and the writer adds those rows again."""
        stored = read_h5_block(self.path(snapshot_id) / "daily_pv.h5", spare_rows)
        return None if stored is None else without_suspension_rows(stored)

    def map_values(self, snapshot_id: str, appended: np.ndarray) -> np.ndarray | None:
        """The current ``daily_pv.h5``'s values mapped once more, read-only, ``appended`` after them."""
        return map_h5_values(self.path(snapshot_id) / "daily_pv.h5", appended)

    def bins_ahead(self, snapshot_id: str, version: NewVersion, source: pd.DataFrame, calendar: list[date]) -> BinsWriter:
        """Start writing every bin of ``source`` (the file's frame, read-only) into ``version``, extending the
        files of the version the current one replaced where they can be (:meth:`bin_reuse`), before the
        caller knows which instruments were restated; it then has those rewritten (:meth:`BinsWriter.rewrite`).
        Caller holds :meth:`lock`."""
        reuse = self.bin_reuse(snapshot_id, calendar, set(), version)
        named = by_field(source)
        ahead = BinsWriter(version.path / "features", calendar, "ts_code", reuse=reuse)
        ahead.add(named, list(named.columns))
        return ahead

    def write(self, snapshot_id: str, version: NewVersion, content: VersionContent, bins: PendingBins,
              timer: PhaseTimer) -> tuple[Path, dict]:
        """Complete ``version`` with ``content`` and swap it in; returns (path, final meta). Caller holds
        :meth:`lock`."""
        path = version.path
        _check_space(path, content, bins)
        qlib_format.write_calendar(path / "calendars" / "day.txt", content.calendar)
        named = by_field(content.frame)
        spans = content.spans
        qlib_format.write_instruments(path / "instruments" / "all.txt", spans)
        write_universes(path / "instruments", content.market_files)
        written = bins.beside.fields if bins.beside is not None else []
        remaining = [c for c in named.columns if c not in written] if content.options.qlib_bins else []
        with ThreadPoolExecutor(2, thread_name_prefix="bins") as pool:
            bins_job = (pool.submit(self._bins, path, named, content, remaining, bins, timer)
                        if content.options.qlib_bins else None)
            cleared = pool.submit(self._clear, version.stale, timer)
            digest = self._write_h5_files(snapshot_id, path, content, timer)
            with timer.phase("wait_bins"):
                if bins_job is not None:
                    bins_job.result()  # a failure in the bins raises here
            cleared.result()
        n_bins = len(spans) * len(named.columns) if content.options.qlib_bins else 0  # a file per instrument and field
        with timer.phase("write_meta"):
            meta = {**content.meta, "snapshot_id": snapshot_id, "market": self.market, "freq": "day",
                    "daily_pv_sha256": digest, "replaces": self.current_name(snapshot_id),
                    "files": {"daily_pv.h5": (path / "daily_pv.h5").stat().st_size,
                              "rdagent_debug/daily_pv.h5": (path / "rdagent_debug" / "daily_pv.h5").stat().st_size,
                              "bins": n_bins}}
            (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        with timer.phase("swap"):
            self.swap(snapshot_id, path)  # the replaced version stays until the next export (versions)
        return self.path(snapshot_id), meta

    @staticmethod
    def _bins(path: Path, named: pd.DataFrame, content: VersionContent, remaining: list[str], bins: PendingBins,
              timer: PhaseTimer) -> None:
        if remaining:
            with timer.phase("write_bins"):
                qlib_bins.write_bins(path / "features", named, content.calendar, remaining, reuse=bins.reuse)
        if bins.beside is not None:
            with timer.phase("wait_bins_beside"):
                bins.beside.result()
        write_benchmarks(path / "features", content.market_files, content.calendar, content.options)

    @staticmethod
    def _clear(stale: list[Path], timer: PhaseTimer) -> None:
        """Delete the superseded versions (a recycled one's ``features`` folder was moved out before)."""
        with timer.phase("clear_versions"):
            for p in stale:
                remove_tree(p, workers=1)

    def _write_h5_files(self, snapshot_id: str, path: Path, content: VersionContent, timer: PhaseTimer) -> str:
        """``daily_pv.h5``, the RD-Agent folders; returns the h5's sha256."""
        ext, options = content.h5_frame, content.options
        with timer.phase("write_h5"):
            write_h5(path / "daily_pv.h5", ext)
        with timer.phase("write_rdagent"):
            readme = rdagent_readme(snapshot_id, ext, content.column_info, options)
            (path / "rdagent").mkdir()
            os.link(path / "daily_pv.h5", path / "rdagent" / "daily_pv.h5")
            (path / "rdagent" / "README.md").write_text(readme)
            debug = debug_subset(ext, options)
            (path / "rdagent_debug").mkdir()
            write_h5(path / "rdagent_debug" / "daily_pv.h5", debug)
            (path / "rdagent_debug" / "README.md").write_text(
                readme + f"\nDebug subset: last {options.debug_years} years × {options.debug_instruments} instruments "
                         f"({len(debug)} rows).\n")
        with timer.phase("hash_h5"):
            return sha256_file(path / "daily_pv.h5")

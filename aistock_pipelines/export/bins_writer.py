"""The bins writer: Qlib bins written by a background thread while the export goes on.

It only ever holds read-only views (:meth:`BinsWriter.add` makes them): it cannot change what it is given,
and what it is given is either final (a full export's columns once its read has made them so — the reader
refuses to write a column it has reported final) or a read-only mapping of the stored file (an incremental
export); where neither is possible the exporter hands over a copy.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date
from pathlib import Path

import pandas as pd

from aistock_pipelines.export.frames import instrument_mask, instrument_row_counts
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.qlib_bins import BinPlan, BinReuse, bin_plan
from aistock_pipelines.export.qlib_format import instrument_names


def read_only(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` over a read-only view of its values (no copy)."""
    values = frame.to_numpy().view()
    values.flags.writeable = False
    return pd.DataFrame(values, index=frame.index, columns=frame.columns, copy=False)


class BinsWriter:
    """:func:`write_bins` for groups of fields, one group after another in a background thread. A full
    export hands over each group of columns as its read makes them final (``on_ready``), so most files are
    written while the server still sends the factor tables; an incremental export hands over all fields at
    once, extended from the current version (``reuse``) before the restated instruments are known, and then
    has those rewritten (:meth:`rewrite`). The snapshot writer writes any remaining fields and waits here
    (:meth:`result`) before anything is swapped in.

    ``style``: the naming :meth:`add` gives the frames' ts_code instruments (``"ts_code"``: none — also for
    frames already in the file's naming)."""

    def __init__(self, features_dir: Path, calendar: list[date], style: str, reuse: BinReuse | None = None) -> None:
        self.features_dir, self.calendar, self.style, self.reuse = features_dir, calendar, style, reuse
        self.fields: list[str] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bins-writer")
        self._jobs: list[Future] = []
        self._plan: BinPlan | None = None

    def add(self, frame: pd.DataFrame, fields: list[str]) -> None:
        """Write ``fields`` of ``frame`` (plain logical names; bins are float32, so a float64 value gives the
        same bytes as its float32 rounding)."""
        frame = read_only(frame)
        if self.style != "ts_code":
            index = frame.index
            renamed = instrument_names(pd.Index(index.levels[1]), self.style)
            frame = pd.DataFrame(frame.to_numpy(), index=index.set_levels(renamed, level=1, verify_integrity=False),
                                 columns=frame.columns, copy=False)
        self.fields += fields
        self._jobs.append(self._pool.submit(self._write, frame, fields))

    def _write(self, frame: pd.DataFrame, fields: list[str]) -> None:
        # one plan for every group: the groups are columns of one block under one index
        self._plan = self._plan if self._plan is not None else bin_plan(frame.index, self.calendar, self.reuse)
        qlib_bins.write_bins(self.features_dir, frame, self.calendar, fields, reuse=self.reuse, workers=2, plan=self._plan)

    def rewrite(self, frame: pd.DataFrame, names: set[str]) -> None:
        """After the work handed over so far (queued behind it), write the bins of instruments ``names`` anew
        from ``frame`` (named as the folders are; plain field names), whose rows changed since they were
        handed over — an incremental export's restated instruments — and delete the folders of those
        ``frame`` has no rows for. Their files may be links to the current version's inodes: they are
        unlinked, never written."""
        self._jobs.append(self._pool.submit(self._rewrite, read_only(frame), set(names)))

    def _rewrite(self, frame: pd.DataFrame, names: set[str]) -> None:
        part = frame[instrument_mask(frame.index, names)]
        present = set(instrument_row_counts(part.index))
        if present:
            qlib_bins.write_bins(self.features_dir, part, self.calendar, self.fields)
        for gone in names - present:
            shutil.rmtree(self.features_dir / qlib_bins.folder_name(gone), ignore_errors=True)

    def wait(self) -> None:
        """Wait for the work handed over so far (a failure in it raises here); more may follow."""
        for job in list(self._jobs):
            job.result()

    def result(self) -> None:
        """Wait for everything handed over (a failure raises here), then stop the thread."""
        try:
            self.wait()
        finally:
            self.close()

    def close(self) -> None:
        """Drop the work not started and wait for the one under way (the caller is failing)."""
        for job in self._jobs:
            job.cancel()
        self._pool.shutdown(wait=True)

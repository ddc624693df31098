"""The bulk read's left join on ``(ts_code, trade_date)``, done on arrays as the batches arrive.

Statement 0 is the bars (alone, or already joined in SQL with the other tables); then the tables still to
join. The bars' batches are kept until their statement ends; then every bar gets its row in the sorted
(datetime, instrument) order, read off a dense grid of days × instruments (:class:`_KeyGrid`), and the
bars' columns are written into one row-major block of exactly that many rows. A joined table's batch then
costs a grid lookup per row and a scatter per column straight into the block — no sort, no second copy.
Rows of a joined table without a bar are dropped; bars without a row there get NaN. Two rows with one key
in any table (which SQL's join would turn into duplicate bars) are refused with examples
(:class:`_Duplicates`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from aistock_pipelines.conventions import TS_CODE
from aistock_pipelines.export.arrow_batches import batch_keys, value_block
from aistock_pipelines.export.daily_features import SourceSelect
from aistock_pipelines.export.derived import derive, written_columns
from aistock_pipelines.export.frames import make_index
from aistock_pipelines.export.gates import DataGateError
from aistock_pipelines.export.mapping import ResolvedMapping
from aistock_pipelines.export.row_fingerprints import RowFingerprints

OnReady = Callable[[pd.DataFrame, list[str]], None]
Batch = tuple[np.ndarray, np.ndarray, list[str], np.ndarray]  # days, codes, dictionary, values


class _KeyGrid:
    """Every bar's row in the sorted (datetime, instrument) order: a dense grid of days × instruments
    holding a row number per cell (−1 where an instrument has no bar that day)."""

    def __init__(self, bars: list[Batch]) -> None:
        days = np.concatenate([b[0] for b in bars]) if bars else np.empty(0, dtype=np.int32)
        self.levels = sorted({c for b in bars for c in b[2]})
        self.code_no = {c: k for k, c in enumerate(self.levels)}
        self.day_levels = np.unique(days)
        self.first_day = int(self.day_levels[0]) if len(days) else 0
        self.day_no = np.full(int(self.day_levels[-1]) - self.first_day + 1 if len(days) else 0, -1, dtype=np.int64)
        self.day_no[self.day_levels - self.first_day] = np.arange(len(self.day_levels))
        self.width = max(len(self.levels), 1)
        self.bar_cells = [self.cells(d, c, dictionary) for d, c, dictionary, _ in bars]
        occupied = np.zeros(len(self.day_levels) * len(self.levels), dtype=bool)
        for c in self.bar_cells:
            occupied[c] = True
        self.occupied = np.flatnonzero(occupied)  # sorted by (day, instrument): the rows' order
        self.rows = len(self.occupied)
        self.grid = np.full(len(occupied), -1, dtype=np.int64)
        self.grid[self.occupied] = np.arange(self.rows)
        self._index: pd.MultiIndex | None = None

    def cells(self, days: np.ndarray, codes: np.ndarray, dictionary: list[str]) -> np.ndarray:
        """Per row, its cell (day number × instruments + instrument number); −1 for a day or instrument the
        bars do not have (only a joined table's rows can have those)."""
        code_no = np.array([self.code_no.get(c, -1) for c in dictionary], dtype=np.int64)[codes]
        offset = days.astype(np.int64) - self.first_day
        inside = (offset >= 0) & (offset < len(self.day_no))
        day_no = np.where(inside, self.day_no[np.where(inside, offset, 0)], -1)
        return np.where((day_no >= 0) & (code_no >= 0), day_no * len(self.levels) + code_no, -1)

    def rows_of(self, days: np.ndarray, codes: np.ndarray, dictionary: list[str]) -> np.ndarray:
        """Per row of a joined table, the block row of its bar (−1: none)."""
        cells = self.cells(days, codes, dictionary)
        return np.where(cells >= 0, self.grid[np.maximum(cells, 0)], -1)

    def index(self) -> pd.MultiIndex:
        if self._index is None:
            self._index = make_index(self.day_levels.astype("datetime64[D]").astype("datetime64[ns]"),
                                     self.occupied // self.width, np.asarray(self.levels, dtype=object),
                                     self.occupied % self.width)
        return self._index

    def examples(self, rows: np.ndarray) -> str:
        days = pd.DatetimeIndex(self.day_levels[self.occupied[rows] // self.width].astype("datetime64[D]"))
        codes = [self.levels[k] for k in self.occupied[rows] % self.width]
        return ", ".join(f"{d:%Y-%m-%d} {c}" for d, c in zip(days, codes))


class _Duplicates:
    """Keys seen twice in one table: per block row, the last table row placed there."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.found: list[np.ndarray] = []
        self.start()

    def start(self) -> None:
        self.stamp = np.full(self.rows, -1, dtype=np.int64)
        self.stamped = 0

    def note(self, rows: np.ndarray) -> None:
        ids = np.arange(self.stamped, self.stamped + len(rows))
        self.stamped += len(rows)
        seen = self.stamp[rows] >= 0  # placed by an earlier batch of this table
        self.stamp[rows] = ids
        twice = seen | (self.stamp[rows] != ids)  # … or by a later row of this batch
        if twice.any():
            self.found.append(rows[twice])

    def missing(self) -> np.ndarray:
        """Block rows no row of this table reached."""
        return self.stamp < 0

    def finish(self, grid: _KeyGrid, label: str) -> str | None:
        """The table's duplicate keys as an error message (None: none); then ready for the next table."""
        message = None
        if self.found:
            rows = np.unique(np.concatenate(self.found))[:5]
            self.found = []
            message = (f"duplicate (ts_code, trade_date) rows in {label}: {grid.examples(rows)}; deduplicate "
                       "the table (it should have a unique key on (ts_code, trade_date))")
        self.start()
        return message


class _EarlyBlock:
    """The block, allocated as soon as its size is known and faulted in as the bars arrive: a first write
    to fresh memory costs a page fault per page, which then overlaps the server and the decoding thread."""

    def __init__(self, expected_rows: int | Callable[[], int | None] | None, width: int) -> None:
        self.expected_rows = expected_rows if callable(expected_rows) else lambda: expected_rows
        self.width = width
        self.early: np.ndarray | None = None
        self.faulted = 0

    def arrived(self, rows: int) -> None:
        """``rows`` bars have arrived so far."""
        if self.expected_rows is not None:
            expected = self.expected_rows()
            if expected is not None:
                self.expected_rows = None
                self.early = np.empty((expected, self.width)) if expected else None
        if self.early is not None and self.faulted < len(self.early):
            upto = min(rows, len(self.early))
            self.early[self.faulted:upto] = 0.0
            self.faulted = upto

    def take(self, rows: int) -> np.ndarray:
        """The block of ``rows`` rows: the early one if it has that size."""
        block = self.early if self.early is not None and len(self.early) == rows else None
        self.early = None
        return block if block is not None else np.empty((rows, self.width), dtype=np.float64)


class KeyJoin:
    """The join of ``selects`` into one row-major float64 block (module docstring). ``on_ready(frame,
    names)`` is told each group of columns the read has made final; the join then never writes them again
    (enforced: :meth:`_writable`). ``fingerprints`` is given every bars row and every raw row as it arrives."""

    def __init__(self, resolved: ResolvedMapping, selects: list[SourceSelect],
                 expected_rows: int | Callable[[], int | None] | None = None, on_ready: OnReady | None = None,
                 fingerprints: RowFingerprints | None = None) -> None:
        self.resolved, self.selects = resolved, selects
        self.on_ready, self.fingerprints = on_ready, fingerprints
        self.names = list(resolved.logical_columns)
        self.at = {name: j for j, name in enumerate(self.names)}
        self.reported: set[str] = {"change"}  # columns final so far (change: never, in a read)
        self.derived = False  # derive() ran (once the ratio's denominator is in)
        self.bars: list[Batch] = []
        self.early = _EarlyBlock(expected_rows, len(self.names))
        self.arrived = 0
        self.rows = 0
        self.grid: _KeyGrid | None = None
        self.block: np.ndarray | None = None
        self.duplicates: _Duplicates | None = None
        self.errors: list[str] = []

    def add(self, i: int, batch: pa.RecordBatch | None) -> None:
        if i == 0 and batch is None:
            self._place_bars()
            self._statement_done(0)
        elif i == 0 and batch.num_rows:
            days, codes, dictionary, batch = batch_keys(batch)
            values = value_block(self.selects[0], batch)
            if self.fingerprints is not None:
                self.fingerprints.add_bars(days, codes, dictionary, values)
            self.bars.append((days, codes, dictionary, values))
            self.arrived += batch.num_rows
            self.early.arrived(self.arrived)
        elif i and batch is None:
            self._finish_joined(self.selects[i])
            self._statement_done(i)
        elif i and batch.num_rows and self.rows:
            self._add_joined(self.selects[i], batch)

    def _statement_done(self, i: int) -> None:
        """Derive once the ratio's denominator (the raw bars) is in; tell ``on_ready`` what became final."""
        if not self.derived and (self.selects[i].divides or not any(s.divides for s in self.selects)):
            self._derive()
        if self.on_ready is None or self.errors or not self.rows:
            return
        done = {name for s in self.selects[:i + 1] for name in s.names}
        if self.derived:
            done |= set(self.resolved.derived_fields)
        else:  # the ratio is a numerator still, and what derive() writes is not written yet
            done -= {SourceSelect.RATIO, *written_columns(self.resolved)}
        ready = [name for name in self.names if name in done and name not in self.reported]
        if ready:
            self.reported.update(ready)
            self.on_ready(pd.DataFrame(self.block, index=self.grid.index(), columns=self.names, copy=False), ready)

    def _writable(self, names) -> None:
        """Refuse to write a column already reported final: a bins writer may be reading it."""
        clash = set(names) & (self.reported - {"change"})
        if clash:
            raise RuntimeError(f"internal: columns {sorted(clash)} were reported final and would be written again")

    def _derive(self) -> None:
        self._writable(written_columns(self.resolved))
        derive(self.block, self.at, self.resolved)
        self.derived = True

    def _place_bars(self) -> None:
        bars, self.bars = self.bars, []
        self.grid = _KeyGrid(bars)
        malformed = [c for c in self.grid.levels if not TS_CODE.match(c)]
        if malformed:  # codes become folder names: refused before anything is reported, let alone written
            self.errors.append(f"malformed ts_code(s) {malformed[:5]} in {self.selects[0].label}: expected e.g. "
                               "000001.SZ, 600000.SH, 430047.BJ; correct or delete those rows")
        self.rows = self.grid.rows
        self.block = self.early.take(self.rows)
        self.duplicates = _Duplicates(self.rows)
        bars_select = self.selects[0]
        for (_, _, _, values), cells in zip(bars, self.grid.bar_cells):
            self._place(bars_select, self.grid.grid[cells], values, np.ones(len(cells), dtype=bool))
        self.grid.bar_cells = []
        self._finish_table(bars_select)

    def _place(self, select: SourceSelect, rows: np.ndarray, values: np.ndarray, keep: np.ndarray) -> None:
        """Write a batch's ``values`` at ``rows`` (where ``keep``), noting keys seen twice in this table."""
        self._writable(select.names)
        every = bool(keep.all())
        rows = rows if every else rows[keep]
        self.duplicates.note(rows)
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

    def _add_joined(self, select: SourceSelect, batch: pa.RecordBatch) -> None:
        days, codes, dictionary, batch = batch_keys(batch)
        values = value_block(select, batch)
        if select.divides and self.fingerprints is not None:  # every raw row counts, with a bar or not
            self.fingerprints.add_raw(days, codes, dictionary, values[:, 0])
        rows = self.grid.rows_of(days, codes, dictionary)
        self._place(select, rows, values, rows >= 0)

    def _finish_joined(self, select: SourceSelect) -> None:
        if self.duplicates is not None:
            missing = self.duplicates.missing()
            for name in select.names:
                self.block[missing, self.at[name]] = np.nan
        self._finish_table(select)

    def _finish_table(self, select: SourceSelect) -> None:
        """Note the table's duplicate keys (raised by :meth:`result`, once the stream is read to its end:
        the connection is then idle and the transaction ends cleanly)."""
        message = self.duplicates.finish(self.grid, select.label) if self.duplicates is not None else None
        if message:
            self.errors.append(message)

    def result(self) -> tuple[np.ndarray, pd.MultiIndex, list[str]]:
        if self.errors:
            raise DataGateError(self.errors[0])
        if not self.derived:
            self._derive()
        return self.block, self.grid.index(), self.names

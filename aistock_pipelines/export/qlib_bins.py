"""Qlib's ``features/<sym>/<field>.day.bin`` files, written anew or extended from an older version's.

Format (what ``qlib.init(provider_uri=…)`` reads): little-endian float32; element 0 is the instrument's
start position in ``calendars/day.txt`` (as a float32), then one value per calendar day from that position
on, NaN where the instrument has no row. Values are placed by calendar position — never appended blindly,
which is how Qlib's own ``dump_bin`` update mode shifts data after a missing bar.

An extension writes whole file-system blocks from the block holding the current end (whose bytes are
rewritten unchanged, then the file is truncated to its length): a write into part of a block whose page is
not cached makes the kernel read that block first, one random read per file.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

_BLOCK = 4096  # the file system block (and page) size bins are extended by
_FOLDER = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


@dataclass(frozen=True)
class BinReuse:
    """Bins of an older version whose inodes the new version may extend: the ``features`` folder of the
    version the current one replaced, moved into the new version in one rename (``recycled``: its
    instrument folders). ``spans``: file name (as in ``all.txt``) → (first, last) calendar position of
    those bins, whose calendar is a prefix of the new one. ``rewrite``: names whose history changed since
    (written anew). A file is extended only if it has one link (no other version or release holds it), is
    at least as long as its span and was not modified after ``trusted_before`` (when that version was
    completed): anything else is replaced by a new file."""

    spans: dict[str, tuple[int, int]]
    recycled: frozenset[str]
    trusted_before: float
    rewrite: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Extension:
    """An extension of a bin whose values cover calendar positions ``first``…``old_last``: the bytes known to
    be right (``valid``), the block-aligned offset the write starts at, and the first calendar position whose
    value that write covers — what the plan sorts rows from and what the extension writes."""

    first: int
    old_last: int

    @property
    def valid(self) -> int:
        return 4 * (self.old_last - self.first + 2)

    @property
    def offset(self) -> int:
        return self.valid - self.valid % _BLOCK

    @property
    def first_position(self) -> int:
        return self.first + max(self.offset // 4, 1) - 1


@dataclass(frozen=True)
class BinPlan:
    """Where each instrument's rows are for :func:`write_bins`: calendar positions (``pos``) and instruments
    (``inst``) per frame row, the rows to write grouped by instrument in position order (``order[a:b]`` for
    each ``(code, a, b)`` of ``groups``), and per instrument the current version's last position when its
    files are extended (``old_last``, -1: written anew). Depends only on the index, the calendar and
    ``reuse``: a bins writer makes it once for all its groups of fields."""

    pos: np.ndarray
    inst: np.ndarray
    names: np.ndarray
    first: np.ndarray
    old_last: np.ndarray
    order: np.ndarray
    pos_sorted: np.ndarray
    groups: list[tuple[int, int, int]]

    def rows_of(self, code: int) -> np.ndarray:
        """Every row of ``code`` in position order (an extension that fell back: only its tail was sorted)."""
        selected = np.flatnonzero(self.inst == code)
        return selected[np.argsort(self.pos[selected], kind="stable")]

    def extension(self, code: int) -> Extension:
        return Extension(int(self.first[code]), int(self.old_last[code]))


def _positions(index: pd.MultiIndex, calendar: list[date]) -> tuple[np.ndarray, int]:
    """Per row, its calendar position; and the calendar's length."""
    cal = np.asarray(pd.DatetimeIndex(pd.to_datetime(calendar)).as_unit("ns"), dtype="datetime64[ns]")
    level_dates = np.asarray(index.levels[0], dtype="datetime64[ns]")
    level_pos = np.searchsorted(cal, level_dates)
    found = level_pos < len(cal)
    found[found] = cal[level_pos[found]] == level_dates[found]
    used = np.zeros(len(level_dates), dtype=bool)
    used[index.codes[0]] = True
    if (used & ~found).any():
        raise ValueError(f"rows on days missing from the calendar: {list(level_dates[used & ~found][:3])}")
    return level_pos[index.codes[0]].astype(np.int64), len(cal)


def bin_plan(index: pd.MultiIndex, calendar: list[date], reuse: BinReuse | None = None) -> BinPlan:
    """The :class:`BinPlan` of a frame index (datetime, instrument) on ``calendar``."""
    pos, n_cal = _positions(index, calendar)
    inst = np.asarray(index.codes[1], dtype=np.intp)
    names = np.asarray(index.levels[1], dtype=object)
    first = np.full(len(names), n_cal, dtype=np.int64)
    last = np.full(len(names), -1, dtype=np.int64)
    if reuse is not None:  # only extensions need each instrument's span up front
        np.minimum.at(first, inst, pos)
        np.maximum.at(last, inst, pos)
    old_last, cut = _extensions(names, first, last, reuse)
    rows = np.flatnonzero(pos >= cut[inst]) if cut.any() else None  # None: all rows
    order = _grouped_order(inst, pos, rows, len(names), n_cal)
    inst_sorted = inst[order]
    boundaries = np.flatnonzero(inst_sorted[1:] != inst_sorted[:-1]) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64).tolist()
    ends = np.concatenate([boundaries, [len(inst_sorted)]]).astype(np.int64).tolist()
    groups = [(int(inst_sorted[a]), a, b) for a, b in zip(starts, ends)]
    return BinPlan(pos, inst, names, first, old_last, order, pos[order], groups)


def _extensions(names: np.ndarray, first: np.ndarray, last: np.ndarray,
                reuse: BinReuse | None) -> tuple[np.ndarray, np.ndarray]:
    """Per instrument: the current version's last position where its files are extended (-1: written anew),
    and the first position an extension needs (rows before it are never sorted)."""
    old_last = np.full(len(names), -1, dtype=np.int64)
    cut = np.zeros(len(names), dtype=np.int64)
    for code in np.flatnonzero(last >= 0).tolist() if reuse is not None else []:
        name = str(names[code])
        span = None if name in reuse.rewrite else reuse.spans.get(name)
        if span is not None and span[0] == first[code] and span[1] <= last[code]:
            old_last[code] = span[1]
            cut[code] = Extension(span[0], span[1]).first_position
    return old_last, cut


def _grouped_order(inst: np.ndarray, pos: np.ndarray, rows: np.ndarray | None, n_names: int,
                   n_cal: int) -> np.ndarray:
    """``rows`` (None: all) ordered by instrument, then calendar position. Rows in date order (every
    snapshot frame) need only a stable sort by instrument: a radix sort of 16-bit codes."""
    sub_inst, sub_pos = (inst, pos) if rows is None else (inst[rows], pos[rows])
    if len(sub_pos) and bool(np.all(sub_pos[1:] >= sub_pos[:-1])) and n_names < 2**15:
        order = np.argsort(sub_inst.astype(np.int16), kind="stable")
    else:
        order = np.argsort(sub_inst * (n_cal + 1) + sub_pos, kind="stable")
    return order if rows is None else rows[order]


def write_bins(features_dir: Path, frame: pd.DataFrame, calendar: list[date], fields: list[str], *,
               reuse: BinReuse | None = None, workers: int = 4, plan: BinPlan | None = None) -> int:
    """Write every instrument's bins; returns the number of files. ``frame`` is indexed (datetime,
    instrument) with plain logical column names.

    With ``reuse``, an instrument whose history did not change and whose first day is the same has its
    recycled files extended by the days they lack: one ``pwrite`` of whole blocks from the block holding
    their last day, then ``ftruncate`` to the exact length. No file another version or a release holds is
    ever written (:func:`_extend`). New files are written by ``workers`` threads (the system calls release
    the GIL), extensions by two; an extension that falls back is written anew."""
    plan = plan if plan is not None else bin_plan(frame.index, calendar, reuse)
    files = _BinFiles(features_dir, frame, fields, plan, reuse)
    fresh = [(code, a, b) for code, a, b in plan.groups if plan.old_last[code] < 0]
    linked = [(code, a, b) for code, a, b in plan.groups if plan.old_last[code] >= 0]
    with ThreadPoolExecutor(max(2, workers)) as pool:
        pending = [pool.submit(files.write_fresh, code, plan.order[a:b]) for code, a, b in fresh]
        other_half = pool.submit(files.extend_all, linked[1::2])
        fallbacks = files.extend_all(linked[0::2]) + other_half.result()
        pending += [pool.submit(files.write_fresh, code, plan.rows_of(code)) for code in fallbacks]
        for f in pending:
            f.result()
    for gone in files.recycled - {str(n).lower() for n in plan.names}:  # an instrument the new version lacks
        shutil.rmtree(os.path.join(files.features, gone))
    return (len(fresh) + len(linked)) * len(fields)


class _BinFiles:
    """The files of one :func:`write_bins` call: ``fields`` of ``frame`` into ``features_dir``."""

    def __init__(self, features_dir: Path, frame: pd.DataFrame, fields: list[str], plan: BinPlan,
                 reuse: BinReuse | None) -> None:
        # The frame's own row-major block: no copy. Anything else (a column-major or unaligned block) is
        # copied once here — numpy's ``take`` would copy all of it per instrument.
        self.block = np.require(frame.to_numpy(), requirements=["C_CONTIGUOUS", "ALIGNED"])
        self.take = [frame.columns.get_loc(f) for f in fields]
        self.files = [f"{f.lower()}.day.bin" for f in fields]
        self.plan, self.reuse = plan, reuse
        self.features = str(features_dir)
        self.recycled = reuse.recycled if reuse is not None else frozenset()
        features_dir.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> str:
        target = os.path.join(self.features, folder_name(name))
        try:
            os.mkdir(target)
        except FileExistsError:
            pass
        return target

    def values(self, rows: np.ndarray) -> np.ndarray:
        """The fields of ``rows`` as (field, row) — float64 → float32 happens on assignment by the caller."""
        return np.take(self.block, rows, axis=0)[:, self.take].T

    def write_fresh(self, code: int, selected: np.ndarray) -> None:
        """All bins of instrument ``code`` anew from its rows ``selected`` (frame rows, in position order)."""
        target = self.folder(str(self.plan.names[code]))
        p = self.plan.pos[selected]
        first, last = int(p[0]), int(p[-1])
        buf = np.full((len(self.files), last - first + 2), np.nan, dtype="<f4")
        buf[:, 0] = np.float32(first)
        buf[:, 1 + (p - first)] = self.values(selected)
        folder_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # one path walk per instrument, not per file
        try:
            for i, file in enumerate(self.files):
                _write_bytes(folder_fd, file, buf[i])
        finally:
            os.close(folder_fd)

    def extend_all(self, part: list[tuple[int, int, int]]) -> list[int]:
        """Extend each instrument of ``part``; returns those that must be written anew instead."""
        return [code for code, a, b in part if not self.extend(code, a, b)]

    def extend(self, code: int, a: int, b: int) -> bool:
        """Append this instrument's new days to its recycled files; False if any file cannot be extended
        (then the instrument is written anew, its recycled files unlinked — never written)."""
        name = folder_name(str(self.plan.names[code]))
        if name not in self.recycled:
            return False
        ext = self.plan.extension(code)
        p = self.plan.pos_sorted[a:b]  # the rows from the block holding the old end on
        length = 4 * (int(p[-1]) - ext.first + 2)
        e0 = ext.offset // 4  # element e ≥ 1 of the file is position first + e − 1
        span = np.full((len(self.files), (-(-length // _BLOCK) * _BLOCK - ext.offset) // 4), np.nan, dtype="<f4")
        if e0 == 0:
            span[:, 0] = np.float32(ext.first)
        k = int(np.searchsorted(p, ext.first_position))  # rows from the first rewritten position on
        if k < len(p):
            span[:, p[k:] - ext.first + 1 - e0] = self.values(self.plan.order[a + k:b])
        folder = os.open(os.path.join(self.features, name), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, file in enumerate(self.files):
                if not _extend(folder, file, span[i].tobytes(), ext.offset, ext.valid, length,
                               self.reuse.trusted_before):
                    for entry in os.listdir(folder):  # none of its files may stay
                        os.unlink(entry, dir_fd=folder)
                    return False
            return True
        finally:
            os.close(folder)


def recycle(features: Path, features_dir: Path) -> frozenset[str]:
    """Move an older version's ``features`` folder to be the new version's, in one rename; returns the
    instrument folders it brought (none when there is no folder to move or the new version has one already).
    A folder the new version has no instrument for is deleted by :func:`write_bins`."""
    if features_dir.exists():
        return frozenset()
    try:
        os.rename(features, features_dir)
    except OSError:  # gone, or on another file system: the bins are written anew
        return frozenset()
    return frozenset(os.listdir(features_dir))


def _extend(folder: int, name: str, data: bytes, offset: int, valid: int, length: int, trusted_before: float) -> bool:
    """Extend ``name`` in an open folder to ``length`` bytes: ``data`` (whole blocks from ``offset`` ≤
    ``valid``: the bytes there now, then the new ones) written in place, then truncated to ``length``. Only
    a file with one link, at least ``valid`` bytes long and not modified after ``trusted_before``; False
    (and the name unlinked) otherwise."""
    try:
        fd = os.open(name, os.O_WRONLY, dir_fd=folder)
    except FileNotFoundError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1 or st.st_size < valid or st.st_mtime > trusted_before:
            os.unlink(name, dir_fd=folder)
            return False
        os.pwrite(fd, data, offset)
        os.ftruncate(fd, length)  # the block's padding
    finally:
        os.close(fd)
    return True


def folder_name(name: str) -> str:
    """An instrument's folder name (lower case), refusing any name that is not one plain path component."""
    folder = name.lower()
    if not _FOLDER.match(folder):
        raise ValueError(f"instrument name {name!r} cannot be a folder name inside the snapshot")
    return folder


def _write_bytes(folder_fd: int, name: str, data: np.ndarray) -> None:
    """A new file ``name`` in an open folder holding ``data`` (a contiguous array, written without a copy),
    never a write into an existing file: a name left there may be a hard link whose inode another version
    or a release holds."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(name, flags, 0o644, dir_fd=folder_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=folder_fd)
        fd = os.open(name, flags, 0o644, dir_fd=folder_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_bin(path: Path) -> tuple[int, np.ndarray]:
    """Decode a bin (start position, values) straight from the format description above."""
    raw = np.fromfile(path, dtype="<f4")
    return int(raw[0]), raw[1:]

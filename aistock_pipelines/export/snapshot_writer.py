"""SnapshotWriter (seed §5.5): one snapshot directory per id, written atomically.

Layout under ``AISTOCK_SNAPSHOT_ROOT``::

    <id>            -> symlink to .versions/<id>@<stamp>   (what Qlib / RD-Agent are pointed at)
    .versions/<id>@<stamp>/
        daily_pv.h5  meta.json  calendars/day.txt  instruments/all.txt  features/<sym>/<field>.day.bin
        rdagent/{daily_pv.h5, README.md}          (hard link to the top-level h5: no second copy)
        rdagent_debug/{daily_pv.h5, README.md}    (last 2 years × 100 instruments by default)
    .locks/<id>.lock

A new version is built completely beside the current one, then the symlink is replaced with
``os.replace`` (atomic on POSIX): a crash at any point leaves the previous version in place and readable.
The version a swap replaces stays until the next export of the snapshot writes, which deletes it (and any
crash leftovers) in a background thread beside its own writing (:meth:`SnapshotWriter.write`): a reader
that resolved the old path — a backtest running through the daily export — keeps reading complete files,
and unlinking is off the export's critical path. An incremental export even recycles that version's
``features`` folder for its bins (:class:`qlib_format.BinReuse`). An exclusive ``flock`` keeps two writers
off one snapshot.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames, qlib_format
from aistock_pipelines.export.h5_values import HDF5 as _HDF5, map_values

SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9_-]+$")
H5_KEY = "data"


class SnapshotError(RuntimeError):
    pass


class SnapshotLocked(SnapshotError):
    pass


@dataclass(frozen=True)
class SnapshotOptions:
    """Per-snapshot layout options (part of the snapshot's declaration)."""

    columns: Literal["plain", "dollar"] = "plain"
    instruments: Literal["ts_code", "qlib"] = "ts_code"
    dtype: Literal["float32", "float64"] = "float64"
    factor_tables: tuple[str, ...] | None = None
    qlib_bins: bool = True
    debug_years: int = 2
    debug_instruments: int = 100

    def __post_init__(self) -> None:
        if self.columns not in ("plain", "dollar"):
            raise ValueError(f"columns must be 'plain' or 'dollar', got {self.columns!r}")
        if self.instruments not in ("ts_code", "qlib"):
            raise ValueError(f"instruments must be 'ts_code' or 'qlib', got {self.instruments!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["factor_tables"] = list(self.factor_tables) if self.factor_tables is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SnapshotOptions":
        d = dict(d)
        if d.get("factor_tables") is not None:
            d["factor_tables"] = tuple(d["factor_tables"])
        return cls(**d)


def check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID.match(snapshot_id or ""):
        raise SnapshotError(f"snapshot id {snapshot_id!r} may only contain letters, digits, '_' and '-'")
    return snapshot_id


def external_frame(frame: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """Internal frame (plain names, ts_code, float64) → the file's shape (column style, naming, dtype).
    Index levels are plain datetime64[ns] / object: pandas' string dtype breaks ``to_hdf``. Renames the
    instrument level (not each row); the values stay in one row-major block — shared with ``frame`` when
    nothing changes (float64, ts_code), so writing the HDF5 file copies nothing."""
    prefix = "$" if options.columns == "dollar" else ""
    return frames.relabel(frame, lambda names: qlib_format.instrument_names(names, options.instruments),
                          [f"{prefix}{c}" for c in frame.columns], options.dtype, layout="C")


def by_field(ext: pd.DataFrame) -> pd.DataFrame:
    """The file's frame with plain field names (``$close`` → ``close``): bins are named by field."""
    return ext.set_axis([str(c).lstrip("$") for c in ext.columns], axis=1)


def read_view(frame: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """The snapshot frame exactly as a consumer gets it from ``pd.read_hdf(daily_pv.h5)``:
    :func:`external_frame`, with the instrument level re-inferred the way HDF read-back infers it (pandas ≥ 3:
    ``str``; ``object`` before). Frames built in memory from the same rows (the live adapter's) then compare
    equal to the file's with ``assert_frame_equal``, index dtypes included."""
    ext = external_frame(frame, options)
    levels = ext.index.levels[1]
    ext.index = ext.index.set_levels(pd.Index(levels.to_numpy(dtype=object)), level=1, verify_integrity=False)
    return ext


def internal_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Inverse of :func:`external_frame` (float64, plain names, ts_code instruments)."""
    return frames.relabel(frame, lambda names: np.array([qlib_format.from_qlib_symbol(s) for s in names], dtype=object),
                          [c.lstrip("$") for c in frame.columns], "float64", layout="K")


def write_h5(path: Path, frame: pd.DataFrame) -> None:
    """pandas HDF5, fixed format, key ``data``, exactly one dataset (RD-Agent reads without a key).

    A frame held in one row-major block (every snapshot frame) is written in two steps, so the 0.94 GB of
    values (5.6 M × 21 float64) are written without holding the GIL — PyTables holds it for its whole
    write (2.4 s), and the bins thread, which needs it between its system calls, stood still meanwhile:
    pandas writes the file from a zero-strided stand-in of the block (index, attributes and an unwritten
    values dataset of the right shape: PyTables writes no data for a zero-strided array), then HDF5's own
    ``H5Dwrite`` — called through ctypes, which releases the GIL — writes the block into that dataset, its
    storage placed at a page boundary (:meth:`h5_values.Hdf5Values.write_aligned`).
    The file reads back equal to ``to_hdf``'s (tested); any other frame goes through ``to_hdf``."""
    one_dtype = len(frame) > 0 and len(set(frame.dtypes)) == 1 and frame.dtypes.iloc[0] in (np.float32, np.float64)
    block = np.ascontiguousarray(frame.to_numpy()) if one_dtype else None  # the frame's block: no copy
    if block is None or _HDF5 is None:
        frame.to_hdf(path, key=H5_KEY, mode="w", format="fixed")
        return
    import tables

    stand_in = np.ndarray(block.shape, dtype=block.dtype, buffer=np.zeros((), dtype=block.dtype), strides=(0, 0))
    pd.DataFrame(stand_in, index=frame.index, columns=frame.columns, copy=False).to_hdf(
        path, key=H5_KEY, mode="w", format="fixed")
    with tables.open_file(path, mode="r") as f:
        node = f.get_node(f"/{H5_KEY}/block0_values")
        if tuple(node.shape) != block.shape or node.dtype != block.dtype or not node.attrs.transposed:
            raise SnapshotError(f"{path}: pandas laid out the values unlike a row-major block "
                                f"({node.shape}, {node.dtype}); please report this pandas/PyTables version")
    _HDF5.write_aligned(path, f"/{H5_KEY}/block0_values", block)  # page-aligned: read_h5_block maps it


def read_h5(path: Path) -> pd.DataFrame:
    """``pd.read_hdf(path, "data")`` with the stored row-major block as it is (:func:`read_h5_block`):
    pandas ≥ 3 copies a fixed-format block into column-major order on read (2 s and a second 1 GB at
    5.6 M × 21). Same frame; any layout other than the one :func:`write_h5` produces goes through
    ``pd.read_hdf``."""
    try:
        parts = read_h5_block(path, 0)
    except (AttributeError, TypeError, ValueError):
        parts = None
    if parts is None:
        return pd.read_hdf(path, key=H5_KEY)
    block, index, columns = parts
    return pd.DataFrame(block, index=index, columns=columns, copy=False)


def _values_node(store: pd.HDFStore):
    """The values dataset of the frame :func:`write_h5` stores — one block, a row-major 2-D float32/float64
    array — or None for any other layout."""
    import tables

    storer = store.get_storer(H5_KEY)
    if type(storer).__name__ != "FrameFixed" or int(storer.nblocks) != 1:
        return None
    node = storer.group.block0_values
    if (not isinstance(node, tables.Array) or not getattr(node.attrs, "transposed", False) or len(node.shape) != 2
            or node.dtype not in (np.float32, np.float64)):
        return None
    return node


def read_h5_block(path: Path, spare_rows: int) -> tuple[np.ndarray, pd.MultiIndex, list[str]] | None:
    """The stored frame's parts as :func:`write_h5` lays them out — a row-major block in the file's dtype
    with ``spare_rows`` more rows after the stored ones, the index, the column names — read straight into
    that block (no second copy), for :func:`frames.patch_sorted`. None for any other layout.

    Where it can (Linux, a contiguous dataset in native byte order), the block is not read at all but
    mapped copy-on-write from the file (:func:`h5_values.map_values`): the stored rows are the file's page
    cache, and only pages the caller writes (restated rows, ``change``) and the spare rows take memory of
    their own. Writing to the block never changes the file."""
    with pd.HDFStore(path, mode="r") as store:
        node = _values_node(store)
        if node is None:
            return None
        storer = store.get_storer(H5_KEY)
        items, index = storer.read_index("axis0"), storer.read_index("axis1")
        if (not storer.read_index("block0_items").equals(items) or not isinstance(index, pd.MultiIndex)
                or tuple(node.shape) != (len(index), len(items))):
            return None
        shape = (len(index) + spare_rows, len(items))
        native = node.byteorder == sys.byteorder and _HDF5 is not None and len(index) > 0
        block = map_values(path, _HDF5.offset(node._v_objectid), node.dtype, len(index), shape) if native else None
        if block is None:
            block = np.empty(shape, dtype=node.dtype)
            if native:
                _HDF5.read(node._v_objectid, block[:len(index)])  # without the GIL (write_h5)
            else:
                node.read(out=block[:len(index)])
    return block, index, [str(c) for c in items]


def map_h5_values(path: Path, spare_rows: int) -> np.ndarray | None:
    """Only the values of the stored frame, as :func:`read_h5_block` maps them (copy-on-write, ``spare_rows``
    more rows of fresh memory), its pages mapped as they are touched; None where they cannot be mapped.
    A second mapping of the file is a second view of its page cache: what is written into the first never
    shows here."""
    if _HDF5 is None:
        return None
    with pd.HDFStore(path, mode="r") as store:
        node = _values_node(store)
        if node is None or node.byteorder != sys.byteorder or not node.shape[0]:
            return None
        rows, width = node.shape
        return map_values(path, _HDF5.offset(node._v_objectid), node.dtype, rows, (rows + spare_rows, width),
                          populate=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class NewVersion:
    """A version folder being built and the versions it supersedes (listed before it existed)."""

    path: Path
    stale: list[Path]


class SnapshotWriter:
    def __init__(self, snapshot_root: Path, market: str = "aistock"):
        self.root = Path(snapshot_root)
        self.market = market

    # ------------------------------------------------------------------------------ locations

    def path(self, snapshot_id: str) -> Path:
        return self.root / check_snapshot_id(snapshot_id)

    def exists(self, snapshot_id: str) -> bool:
        return (self.path(snapshot_id) / "meta.json").exists()

    def read_meta(self, snapshot_id: str) -> dict | None:
        meta = self.path(snapshot_id) / "meta.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def read_frame(self, snapshot_id: str) -> pd.DataFrame:
        return internal_frame(read_h5(self.path(snapshot_id) / "daily_pv.h5"))

    def read_block(self, snapshot_id: str, spare_rows: int) -> tuple[np.ndarray, pd.MultiIndex, list[str]] | None:
        """The current ``daily_pv.h5`` as it is stored (:func:`read_h5_block`)."""
        return read_h5_block(self.path(snapshot_id) / "daily_pv.h5", spare_rows)

    def map_values(self, snapshot_id: str, spare_rows: int) -> np.ndarray | None:
        """The current ``daily_pv.h5``'s values, mapped once more (:func:`map_h5_values`)."""
        return map_h5_values(self.path(snapshot_id) / "daily_pv.h5", spare_rows)

    def list_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if SNAPSHOT_ID.match(p.name) and (p / "meta.json").exists())

    # ---------------------------------------------------------------------------------- locking

    @contextmanager
    def lock(self, snapshot_id: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{check_snapshot_id(snapshot_id)}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SnapshotLocked(f"snapshot {snapshot_id} is being written by another process; retry later") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def stale_versions(self, snapshot_id: str) -> list[Path]:
        """Versions of ``snapshot_id`` the current symlink does not point to: the one the last swap replaced
        and a crashed run's leftovers."""
        versions = self.root / ".versions"
        if not versions.exists():
            return []
        link = self.path(snapshot_id)
        current = link.resolve() if link.is_symlink() else None
        return sorted(p for p in versions.glob(f"{snapshot_id}@*") if p.resolve() != current)

    # ---------------------------------------------------------------------------------- writing

    def begin(self, snapshot_id: str) -> NewVersion:
        """The folder of a new version, made now — before :meth:`write` — for files written while the
        export still reads (:class:`qlib_format.BinsBeside`). Caller holds :meth:`lock`; a version that
        is never written is a crash leftover, deleted by the next writing export."""
        stale = self.stale_versions(snapshot_id)  # listed before the new version exists
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        version = self.root / ".versions" / f"{snapshot_id}@{stamp}"
        version.mkdir(parents=True)
        return NewVersion(version, stale)

    def discard(self, snapshot_id: str, begun: NewVersion) -> None:
        """Delete a version from :meth:`begin` whose export failed (never the current one)."""
        if self.path(snapshot_id).resolve() != begun.path.resolve():
            _remove_tree(begun.path, workers=1)

    def write(self, snapshot_id: str, ext: pd.DataFrame, calendar: list[date], options: SnapshotOptions,
              meta: dict, column_info: dict[str, dict], *, rewrite: set[str] | None = None,
              begun: NewVersion | None = None, bins_beside: "qlib_format.BinsBeside | None" = None
              ) -> tuple[Path, dict, dict[str, float]]:
        """Build a complete new version and swap it in. ``ext`` is the file's frame (:func:`external_frame`:
        column style, instrument names and dtype of ``options``; sorted, row-major). Returns (path, final
        meta, per-phase seconds). Caller holds :meth:`lock`.

        ``rewrite`` (incremental exports): the ts_codes whose history changed. Every other instrument's bins
        are hard links to the current version's files, extended in place by the new days
        (:func:`qlib_format.write_bins`); None writes every bin anew. ``begun``: the version's folder from
        :meth:`begin`, with ``bins_beside`` writing some fields' bins there already (:meth:`bins_ahead`: all
        of them; the rest are written here; both are waited for before the swap)."""
        timings: dict[str, float] = {}
        begun = begun or self.begin(snapshot_id)
        version, stale = begun.path, begun.stale
        qlib_format.write_calendar(version / "calendars" / "day.txt", calendar)
        named = by_field(ext)
        spans = qlib_format.instrument_spans(named, calendar)
        qlib_format.write_instruments(version / "instruments" / "all.txt", spans)

        written = bins_beside.fields if bins_beside is not None else []
        remaining = [c for c in named.columns if c not in written] if options.qlib_bins else []
        # An incremental export recycles the newest stale version's features folder (BinReuse.recycle);
        # that version is deleted only once the bins are written, the others right away.
        recycle = _recyclable(stale) if rewrite is not None and remaining else None

        def bins() -> None:
            t = time.perf_counter()
            if remaining:
                reuse = None
                if rewrite is not None:
                    reuse = self._bin_reuse(snapshot_id, calendar,
                                            set(qlib_format.instrument_names(sorted(rewrite), options.instruments)),
                                            recycle)
                qlib_format.write_bins(version / "features", named, calendar, remaining, reuse=reuse)
                timings["write_bins"] = time.perf_counter() - t
            if bins_beside is not None:
                t = time.perf_counter()
                bins_beside.result()
                timings["wait_bins_beside"] = time.perf_counter() - t

        # The bins (tens of thousands of small files: system calls, the GIL free) are written by a second
        # thread while this one writes the HDF5 files and hashes daily_pv.h5 (large writes and reads, the
        # GIL free too): in a full export at 5.6 M × 21 the 3.3 s of HDF5 writing and hashing then run
        # beside the bins' 6.1 s instead of after them.
        #
        # The versions this one supersedes are deleted by a third thread meanwhile (module docstring):
        # unlinking is kernel work, the GIL free.
        def clear(after: Future | None) -> None:
            t = time.perf_counter()
            for p in stale:
                if p != recycle:
                    _remove_tree(p, workers=1)
            if recycle is not None:
                wait([after] if after is not None else [])  # its folders are being moved meanwhile
                _remove_tree(recycle, workers=1)
            timings["clear_versions"] = time.perf_counter() - t

        with ThreadPoolExecutor(2, thread_name_prefix="bins") as pool:
            bins_job = pool.submit(bins) if options.qlib_bins else None
            cleared = pool.submit(clear, bins_job)
            t = time.perf_counter()
            write_h5(version / "daily_pv.h5", ext)
            timings["write_h5"] = time.perf_counter() - t

            t = time.perf_counter()
            readme = rdagent_readme(snapshot_id, ext, column_info, options)
            (version / "rdagent").mkdir()
            os.link(version / "daily_pv.h5", version / "rdagent" / "daily_pv.h5")
            (version / "rdagent" / "README.md").write_text(readme)
            debug = debug_subset(ext, options)
            (version / "rdagent_debug").mkdir()
            write_h5(version / "rdagent_debug" / "daily_pv.h5", debug)
            (version / "rdagent_debug" / "README.md").write_text(
                readme + f"\nDebug subset: last {options.debug_years} years × {options.debug_instruments} instruments "
                         f"({len(debug)} rows).\n")
            timings["write_rdagent"] = time.perf_counter() - t

            t = time.perf_counter()
            digest = sha256_file(version / "daily_pv.h5")
            timings["hash_h5"] = time.perf_counter() - t
            t = time.perf_counter()
            if bins_job is not None:
                bins_job.result()  # a failure in the bins raises here
            n_bins = len(spans) * len(named.columns) if options.qlib_bins else 0  # a file per instrument and field
            timings["wait_bins"] = time.perf_counter() - t
            cleared.result()

        t = time.perf_counter()
        meta = {**meta, "snapshot_id": snapshot_id, "market": self.market, "freq": "day",
                "daily_pv_sha256": digest,
                "files": {"daily_pv.h5": (version / "daily_pv.h5").stat().st_size,
                          "rdagent_debug/daily_pv.h5": (version / "rdagent_debug" / "daily_pv.h5").stat().st_size,
                          "bins": n_bins}}
        (version / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        timings["write_meta"] = time.perf_counter() - t

        t = time.perf_counter()
        self._swap(snapshot_id, version)  # the replaced version stays until the next export (module docstring)
        timings["swap"] = time.perf_counter() - t
        return self.path(snapshot_id), meta, timings

    def bins_ahead(self, snapshot_id: str, begun: NewVersion, ext: pd.DataFrame,
                   calendar: list[date]) -> "qlib_format.BinsBeside":
        """Start writing every bin of ``ext`` (the file's frame) into ``begun``, in a background thread: each
        instrument's files extended from the current version's (recycling the newest stale version's
        ``features`` folder), as :meth:`write` does for an incremental export — but before the caller knows
        which instruments were restated. It then has those rewritten (:meth:`qlib_format.BinsBeside.rewrite`)
        and passes the result to :meth:`write` as ``bins_beside``. ``ext`` must not change before the bins
        are written (``BinsBeside.wait``, or the exporter's second mapping of the stored file, which never
        changes). Caller holds :meth:`lock`."""
        reuse = self._bin_reuse(snapshot_id, calendar, set(), _recyclable(begun.stale))
        named = by_field(ext)
        ahead = qlib_format.BinsBeside(begun.path / "features", calendar, "ts_code", reuse=reuse)
        ahead.add(named, list(named.columns))
        return ahead

    def _bin_reuse(self, snapshot_id: str, calendar: list[date], rewrite: set[str],
                   recycle: Path | None) -> "qlib_format.BinReuse | None":
        """What the current version offers the next one: its bins and each instrument's calendar span, if
        its calendar is a prefix of the new one (positions then mean the same days); and the folders of
        ``recycle``, a stale version."""
        current = self.path(snapshot_id)
        if not (current.is_symlink() and (current / "features").is_dir()):
            return None
        current = current.resolve()
        try:
            old_calendar = qlib_format.read_calendar(current / "calendars" / "day.txt")
            lines = (current / "instruments" / "all.txt").read_text().splitlines()
        except OSError:
            return None
        if calendar[:len(old_calendar)] != old_calendar:
            return None
        position = {d: i for i, d in enumerate(old_calendar)}
        spans = {}
        for line in lines:
            name, first, last = line.split("\t")
            a, b = position.get(date.fromisoformat(first)), position.get(date.fromisoformat(last))
            if a is not None and b is not None:
                spans[name] = (a, b)
        return qlib_format.BinReuse(current / "features", spans, rewrite,
                                    recycle / "features" if recycle is not None else None)

    def _swap(self, snapshot_id: str, version: Path) -> None:
        link = self.path(snapshot_id)
        if link.exists() and not link.is_symlink():  # a plain directory from elsewhere: keep it aside
            link.rename(self.root / ".versions" / f"{snapshot_id}@legacy-{version.name.split('@')[1]}")
        tmp = self.root / f".{snapshot_id}.link-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(version.relative_to(self.root))
        os.replace(tmp, link)


def _recyclable(stale: list[Path]) -> Path | None:
    """The stale version whose ``features`` folder the next version recycles: the newest that has one."""
    return max((p for p in stale if (p / "features").is_dir()), default=None)


def debug_subset(ext: pd.DataFrame, options: SnapshotOptions) -> pd.DataFrame:
    """RD-Agent's debug file: the most recent ``debug_years`` years × the ``debug_instruments`` instruments
    with the most rows there (ties by name) — deterministic. Selected on the index codes, copied once."""
    if ext.empty:
        return ext
    dates = pd.DatetimeIndex(ext.index.levels[0])
    used = np.zeros(len(dates), dtype=bool)
    used[ext.index.codes[0]] = True
    cutoff = dates[used].max() - pd.DateOffset(years=options.debug_years)
    recent = np.asarray(dates >= cutoff)[ext.index.codes[0]]
    names = np.asarray(ext.index.levels[1], dtype=object)
    counts = np.bincount(np.asarray(ext.index.codes[1])[recent], minlength=len(names))
    present = np.flatnonzero(counts)
    ranked = sorted(present, key=lambda i: (-counts[i], names[i]))[:options.debug_instruments]
    keep = np.zeros(len(names), dtype=bool)
    keep[ranked] = True
    return ext[recent & keep[ext.index.codes[1]]]


def _remove_tree(path: Path, workers: int = 4) -> None:
    """``rm -r`` of a version: the per-instrument folders of ``features/`` in a few threads (unlinking is a
    system call per file, 84,000 at 4,000 instruments × 21 fields; the GIL is released meanwhile)."""
    features = path / "features"
    if features.is_dir() and not features.is_symlink():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda d: shutil.rmtree(d, ignore_errors=True), list(os.scandir(features))))
    shutil.rmtree(path, ignore_errors=True)


def rdagent_readme(snapshot_id: str, ext: pd.DataFrame, column_info: dict[str, dict], options: SnapshotOptions) -> str:
    lines = [
        f"# {snapshot_id}: A-share daily data (forward-adjusted, qfq)",
        "",
        "`daily_pv.h5`: pandas HDF5 (fixed format, key `data`). Index: MultiIndex `(datetime, instrument)`, "
        f"sorted and unique; instruments named like `{'SZ000001' if options.instruments == 'qlib' else '000001.SZ'}`. "
        f"Values are {options.dtype}. Rows exist for trading days on which the instrument traded; "
        "suspended days have no row.",
        "",
        "| column | unit | source |",
        "|---|---|---|",
    ]
    for col in ext.columns:
        info = column_info.get(col.lstrip("$"), {})
        lines.append(f"| `{col}` | {info.get('unit', '')} | {info.get('source', '')} |")
    lines += ["", "Prices are forward-adjusted to the latest ex-rights event; `factor` = adjusted / raw price, "
              "so raw price = price / factor and raw shares = volume × factor."]
    return "\n".join(lines) + "\n"

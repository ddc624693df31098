"""What changed between two versions of a snapshot — the live one, a release, a version folder: rows and
instruments added or removed, instruments whose history changed (restated) with the largest relative
price change of each, columns added or removed. A researcher sees at a glance why a backtest moved.

Both ``daily_pv.h5`` blocks are mapped, not read (:func:`stored_snapshot.read_h5_block`). Rows are matched
on (datetime, instrument); when the older version's rows are the newer one's first rows — an incremental
export that appended days and patched restated rows in place — they are compared slice by slice without a
join. A value counts as changed when its bytes differ (between blocks of different float types: when the
numbers differ, NaN equal to NaN).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from aistock_pipelines.export.releases import LIVE, ReleaseError, ReleaseStore
from aistock_pipelines.export.stored_snapshot import StoredBlock, read_h5, read_h5_block
from aistock_pipelines.export.suspension import without_suspension_frame, without_suspension_rows

PRICE_FIELDS = ("open", "high", "low", "close")
_CHUNK = 1 << 16  # rows compared at a time


@dataclass(frozen=True)
class Restated:
    """An instrument whose stored history changed: its rows with a changed value and the largest relative
    change of a price (``|new / old - 1|`` over open, high, low, close)."""

    instrument: str
    rows: int
    max_price_change: float


@dataclass
class SnapshotDiff:
    a: str
    b: str
    range_a: tuple[str, str]
    range_b: tuple[str, str]
    rows_a: int
    rows_b: int
    rows_added: int
    rows_removed: int
    instruments_added: list[str] = field(default_factory=list)
    instruments_removed: list[str] = field(default_factory=list)
    restated: list[Restated] = field(default_factory=list)
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)

    def to_json(self, top: int | None = None) -> dict:
        doc = {k: v for k, v in self.__dict__.items() if k != "restated"}
        doc["restated_count"] = len(self.restated)
        doc["restated"] = [r.__dict__ for r in self.restated[:top]]
        return doc

    def lines(self, top: int = 20) -> list[str]:
        """The diff as text, one fact a line."""
        out = [f"{self.a} → {self.b}",
               f"range        {'..'.join(self.range_a)} → {'..'.join(self.range_b)}",
               f"rows         {self.rows_a:,} → {self.rows_b:,} (+{self.rows_added:,} added, "
               f"−{self.rows_removed:,} removed)",
               f"instruments  +{len(self.instruments_added)} {_sample(self.instruments_added)}  "
               f"−{len(self.instruments_removed)} {_sample(self.instruments_removed)}",
               f"columns      +{self.columns_added}  −{self.columns_removed}",
               f"restated     {len(self.restated)} instruments whose stored history changed"
               + (" (largest relative price change first):" if self.restated else "")]
        out += [f"  {r.instrument:<12} {r.max_price_change:9.4%}  {r.rows:,} rows" for r in self.restated[:top]]
        if len(self.restated) > top:
            out.append(f"  … and {len(self.restated) - top} more")
        return out

    def markdown(self, top: int = 20) -> str:
        """The restated instruments as a markdown table (Dagster metadata)."""
        rows = "\n".join(f"| {r.instrument} | {r.max_price_change:.4%} | {r.rows} |" for r in self.restated[:top])
        return ("| restated instrument | largest relative price change | rows changed |\n|---|---|---|\n" + rows
                if rows else "no instrument's stored history changed")


def _sample(names: list[str], n: int = 10) -> str:
    return ("[" + ", ".join(names[:n]) + (", …" if len(names) > n else "") + "]") if names else ""


def resolve(store: ReleaseStore, snapshot_id: str, ref: str) -> Path:
    """The folder ``ref`` names: ``live``, a release, or a version folder (``<id>@<stamp>``)."""
    if ref == LIVE:
        path = store.versions.path(snapshot_id)
        if not (path / "meta.json").is_file():
            raise ReleaseError(f"snapshot {snapshot_id} has no live version under {store.versions.root}")
        return path.resolve()
    if ref.startswith(f"{snapshot_id}@"):
        path = store.versions.version(ref)
        if not (path / "meta.json").is_file():
            raise ReleaseError(f"no complete version folder {ref} under {path.parent}; "
                               f"`aistock-pipelines snapshots history {snapshot_id}` lists them")
        return path
    return store.get(snapshot_id, ref).path


def diff_snapshot(store: ReleaseStore, snapshot_id: str, a: str, b: str) -> SnapshotDiff:
    """The diff from ``a`` to ``b`` (each ``live``, a release name or a version folder name)."""
    return diff_folders(resolve(store, snapshot_id, a), resolve(store, snapshot_id, b), a, b)


def diff_folders(path_a: Path, path_b: Path, label_a: str, label_b: str) -> SnapshotDiff:
    """The diff between two snapshot folders (each holding ``daily_pv.h5`` and ``meta.json``)."""
    a, b = _block(path_a), _block(path_b)
    days = np.union1d(np.asarray(a.index.levels[0]), np.asarray(b.index.levels[0]))
    names = np.union1d(np.asarray(a.index.levels[1], dtype=object), np.asarray(b.index.levels[1], dtype=object))
    key_a, key_b = _keys(a.index, days, names), _keys(b.index, days, names)
    n_a, n_b = len(key_a), len(key_b)
    if n_a <= n_b and np.array_equal(key_a, key_b[:n_a]):
        rows_a = rows_b = None  # the older rows are the newer block's first rows
        n_common = n_a
    else:
        _, rows_a, rows_b = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
        n_common = len(rows_a)
    common = [c for c in a.columns if c in b.columns]
    changed, change = _compare(a, b, common, rows_a, rows_b, n_common)
    key_changed = key_a[changed] if rows_a is None else key_a[rows_a[changed]]
    used_a, used_b = _used_names(a.index), _used_names(b.index)
    meta_a, meta_b = _meta(path_a), _meta(path_b)
    return SnapshotDiff(
        label_a, label_b, (meta_a.get("start", "?"), meta_a.get("end", "?")),
        (meta_b.get("start", "?"), meta_b.get("end", "?")), n_a, n_b, n_b - n_common, n_a - n_common,
        sorted(used_b - used_a), sorted(used_a - used_b), _restated(names[key_changed % len(names)], change),
        [c for c in b.columns if c not in a.columns], [c for c in a.columns if c not in b.columns])


def _block(path: Path) -> StoredBlock:
    """A folder's ``daily_pv.h5`` bars as a block (mapped where it can be, else read): suspension rows are
    a layout, not data, so a resumption that adds them in the past changes nothing here."""
    stored = read_h5_block(path / "daily_pv.h5", 0)
    if stored is not None:
        return without_suspension_rows(stored)
    frame = without_suspension_frame(read_h5(path / "daily_pv.h5"))
    return StoredBlock(np.ascontiguousarray(frame.to_numpy()), frame.index, [str(c) for c in frame.columns])


def _meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _keys(index: pd.MultiIndex, days: np.ndarray, names: np.ndarray) -> np.ndarray:
    """Per row, one integer for (datetime, instrument) over the union of both blocks' days and names."""
    day = np.searchsorted(days, np.asarray(index.levels[0]))[index.codes[0]].astype(np.int64)
    name = np.searchsorted(names, np.asarray(index.levels[1], dtype=object))[index.codes[1]].astype(np.int64)
    return day * len(names) + name


def _used_names(index: pd.MultiIndex) -> set[str]:
    """The instruments with rows (a level may hold names no row uses)."""
    levels = np.asarray(index.levels[1], dtype=object)
    used = np.bincount(index.codes[1], minlength=len(levels)) > 0
    return {str(n) for n in levels[used]}


def _compare(a: StoredBlock, b: StoredBlock, common: list[str], rows_a: np.ndarray | None,
             rows_b: np.ndarray | None, n_common: int) -> tuple[np.ndarray, np.ndarray]:
    """The common rows (as positions in ``rows_a``, or in ``a`` when aligned) with a changed value, and per
    such row the largest relative price change (0 where no price changed)."""
    ja = _columns(a, common)
    jb = _columns(b, common)
    prices = [i for i, c in enumerate(common) if c.lstrip("$") in PRICE_FIELDS]
    changed, change = [], []
    for s in range(0, n_common, _CHUNK):
        e = min(s + _CHUNK, n_common)
        va = a.values[s:e] if rows_a is None else a.values[rows_a[s:e]]
        vb = b.values[s:e] if rows_b is None else b.values[rows_b[s:e]]
        va = va if ja is None else va[:, ja]
        vb = vb if jb is None else vb[:, jb]
        rows = np.flatnonzero(_differs(va, vb))
        if rows.size:
            changed.append(rows + s)
            change.append(_price_change(va[rows][:, prices], vb[rows][:, prices]))
    if not changed:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(changed), np.concatenate(change)


def _columns(block: StoredBlock, common: list[str]) -> list[int] | None:
    """Where the common columns are in ``block`` (None: all of them, in order — no copy needed)."""
    where = [block.columns.index(c) for c in common]
    return None if where == list(range(len(block.columns))) else where


def _differs(va: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """Per row, whether any value's bytes differ (one pass over integer views); values of different float
    types are compared as numbers (NaN equal to NaN)."""
    if va.dtype == vb.dtype:
        bits = np.dtype(f"u{va.dtype.itemsize}")
        return (np.ascontiguousarray(va).view(bits) != np.ascontiguousarray(vb).view(bits)).any(axis=1)
    va, vb = va.astype(np.float64), vb.astype(np.float64)
    return ((va != vb) & ~(np.isnan(va) & np.isnan(vb))).any(axis=1)


def _price_change(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per row, the largest ``|new / old - 1|`` over the price columns (a NaN counts 0)."""
    if old.shape[1] == 0:
        return np.zeros(len(old))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(new.astype(np.float64) / old.astype(np.float64) - 1.0)
    rel[np.isnan(rel)] = 0.0  # a NaN on either side, or 0 → 0 (prices are positive: the gates)
    return rel.max(axis=1)


def _restated(instruments: np.ndarray, change: np.ndarray) -> list[Restated]:
    """Per instrument with changed rows: their count and the largest price change, largest first."""
    if not len(instruments):
        return []
    grouped = pd.DataFrame({"inst": instruments.astype(str), "change": change}).groupby("inst")["change"].agg(["size", "max"])
    out = [Restated(str(name), int(n), float(m)) for name, n, m in grouped.itertuples()]
    return sorted(out, key=lambda r: (-r.max_price_change, r.instrument))

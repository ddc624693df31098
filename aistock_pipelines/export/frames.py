"""(datetime, instrument) frames reshaped through their integer index codes.

The snapshot frame has millions of rows but only thousands of dates and instruments.
Sorting, merging, renaming instruments and per-instrument arithmetic therefore work on the MultiIndex codes
and on the few level values — never on per-row Python objects (``get_level_values``, ``sort_index`` and
``groupby`` on an object level build or hash millions of them: seconds per call at this size).

Frames built here hold their values in one float64 (or the snapshot dtype) block. ``layout="C"`` puts a row's
values next to each other: pandas' fixed-format HDF5 writer stores such a block as it is, where a
column-major block is first transposed into a full copy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

INDEX_NAMES = ["datetime", "instrument"]


def _levels(index: pd.MultiIndex) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(index.levels[0], dtype="datetime64[ns]"), np.asarray(index.levels[1], dtype=object))


def make_index(dates: np.ndarray, date_codes: np.ndarray, names: np.ndarray, name_codes: np.ndarray) -> pd.MultiIndex:
    """The project's index: datetime64[ns] dates, object instrument names (pandas' string dtype breaks
    ``to_hdf``), levels as given (unique), codes as given."""
    return pd.MultiIndex(levels=[pd.DatetimeIndex(dates).as_unit("ns"), pd.Index(names, dtype=object)],
                         codes=[date_codes, name_codes], names=INDEX_NAMES, verify_integrity=False)


def sort_order(key: np.ndarray, bound: int) -> np.ndarray:
    """``argsort(key, kind="stable")`` for int keys in [0, bound): a counting placement, O(n + bound), when the
    keys are unique and the key space is not much larger than the rows (dates × instruments of a panel);
    otherwise (or with duplicate keys, which keep every row) a sort."""
    n = len(key)
    if n and bound <= 4 * n:
        slot = np.full(bound, -1, dtype=np.int64)
        slot[key] = np.arange(n)
        perm = slot[slot >= 0]
        if len(perm) == n:
            return perm
    return np.argsort(key, kind="stable")


def _drop_unused(levels: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used = np.zeros(len(levels), dtype=bool)
    used[codes] = True
    if used.all():
        return levels, codes
    remap = np.cumsum(used) - 1
    return levels[used], remap[codes]


def merge_sorted(parts: Sequence[tuple[pd.DataFrame, np.ndarray | None]], *, dtype: str = "float64",
                 change: bool = False) -> pd.DataFrame:
    """The rows of ``parts`` (frame, boolean row mask or None) as one frame sorted by (datetime, instrument),
    values rounded through ``dtype`` and back to float64, in one row-major float64 block; level values no
    row uses are dropped. ``change=True`` recomputes ``change`` = close / previous close − 1 per instrument
    (as ``groupby(level="instrument").shift(1)`` on the sorted frame) from the rounded closes.
    Columns: those of the first part (``change`` appended when missing); a part lacking one gives NaN."""
    columns = list(parts[0][0].columns)
    if change and "change" not in columns:
        columns.append("change")
    live = [(f, m) for f, m in parts if len(f) and (m is None or bool(np.any(m)))]
    if not live:
        empty = make_index(np.array([], dtype="datetime64[ns]"), np.array([], dtype=np.int8),
                           np.array([], dtype=object), np.array([], dtype=np.int8))
        return pd.DataFrame(np.empty((0, len(columns))), index=empty, columns=columns)
    lv0 = np.unique(np.concatenate([_levels(f.index)[0] for f, _ in live]))
    lv1 = np.unique(np.concatenate([_levels(f.index)[1] for f, _ in live]))
    width = max(len(lv1), 1)
    keys = []
    for f, m in live:
        a, b = _levels(f.index)
        c0 = np.searchsorted(lv0, a)[f.index.codes[0]]
        c1 = np.searchsorted(lv1, b)[f.index.codes[1]]
        key = c0.astype(np.int64) * width + c1
        keys.append(key if m is None else key[np.asarray(m, dtype=bool)])
    key = np.concatenate(keys) if len(keys) > 1 else keys[0]
    n = len(key)
    perm = None if n < 2 or bool(np.all(key[1:] > key[:-1])) else sort_order(key, len(lv0) * width)
    inv = None
    if perm is not None:
        inv = np.empty(n, dtype=np.int64)
        inv[perm] = np.arange(n)
        key = key[perm]
    out = np.empty((n, len(columns)), dtype=np.float64)
    offset = 0
    for (f, m), k in zip(live, keys):
        rows = slice(offset, offset + len(k)) if inv is None else inv[offset:offset + len(k)]
        if list(f.columns) == columns and _copy_rows(f, m, rows, out, dtype):
            offset += len(k)
            continue
        present = set(f.columns)
        for j, c in enumerate(columns):
            if c not in present:
                out[rows, j] = np.nan
                continue
            v = f[c].to_numpy(dtype=np.float64)
            if m is not None:
                v = v[np.asarray(m, dtype=bool)]
            if dtype != "float64":
                v = v.astype(dtype).astype(np.float64)
            out[rows, j] = v
        offset += len(k)
    d_levels, d_codes = _drop_unused(lv0, key // width)
    i_levels, i_codes = _drop_unused(lv1, key % width)
    if change:
        _change_into(out, columns.index("close"), columns.index("change"), i_codes)
    return pd.DataFrame(out, index=make_index(d_levels, d_codes, i_levels, i_codes), columns=columns, copy=False)


def _copy_rows(f: pd.DataFrame, m: np.ndarray | None, rows: slice | np.ndarray, out: np.ndarray, dtype: str) -> bool:
    """Row-wise copy for a row-major float64 part (a snapshot read back, a finished frame): whole rows in
    chunks, no column-by-column scatter and no full-size temporary. False when the part is not such."""
    if not (len(f.columns) and all(t == np.float64 for t in f.dtypes)):
        return False
    values = f.to_numpy()
    if not values.flags.c_contiguous:
        return False
    src = np.flatnonzero(m) if m is not None else None
    count = len(values) if src is None else len(src)
    step = 1 << 18
    for r0 in range(0, count, step):
        r1 = min(r0 + step, count)
        # np.take along axis 0 copies whole rows; values[idx] on a 2-D array is ~25× slower
        chunk = values[r0:r1] if src is None else np.take(values, src[r0:r1], axis=0)
        if dtype != "float64":
            chunk = chunk.astype(dtype).astype(np.float64)
        if isinstance(rows, slice):
            out[rows.start + r0:rows.start + r1] = chunk
        else:
            out[rows[r0:r1]] = chunk
    return True


def finish_in_place(block: np.ndarray, index: pd.MultiIndex, columns: list[str], dtype: str) -> pd.DataFrame:
    """:func:`merge_sorted` of one part (round through ``dtype``, recompute ``change``) done in place, for a
    block its caller owns and nobody else sees — what ``ReadSession.load_daily_block`` returns: row-major,
    rows strictly sorted, every level value used. Anything else goes through :func:`merge_sorted` (a copy)."""
    c0, c1 = np.asarray(index.codes[0]), np.asarray(index.codes[1])
    ok = (block.dtype == np.float64 and block.flags.c_contiguous and block.flags.writeable
          and "close" in columns and "change" in columns
          and bool(np.bincount(c0, minlength=len(index.levels[0])).all())
          and bool(np.bincount(c1, minlength=len(index.levels[1])).all())
          and strictly_sorted(index))
    if not ok:
        return merge_sorted([(pd.DataFrame(block, index=index, columns=columns, copy=False), None)],
                            dtype=dtype, change=True)
    if dtype != "float64":
        step = 1 << 18
        for r in range(0, len(block), step):
            block[r:r + step] = block[r:r + step].astype(dtype)
    _change_into(block, columns.index("close"), columns.index("change"), c1)
    return pd.DataFrame(block, index=make_index(np.asarray(index.levels[0], dtype="datetime64[ns]"), c0,
                                                np.asarray(index.levels[1], dtype=object), c1),
                        columns=columns, copy=False)


def patch_sorted(block: np.ndarray, index: pd.MultiIndex, columns: list[str], delta: pd.DataFrame,
                 replaced: set[str], split: np.datetime64) -> pd.DataFrame | None:
    """A stored frame brought up to date in its own block, where :func:`merge_sorted` would copy it.

    ``block[:len(index)]`` holds the stored rows (sorted by (datetime, instrument), every date on or before
    ``split``); the rows after that are spare. ``delta`` (same columns and dtype, sorted) holds the replaced
    instruments' whole histories and every other instrument's rows after ``split``. The replaced
    instruments' stored rows are overwritten where ``delta`` has exactly the same (datetime, instrument)
    keys — what a qfq restatement changes is values, not days — and delta's rows after ``split`` are
    appended (they sort after every stored row). ``change`` is then recomputed where it can differ — the
    replaced instruments' rows and the appended ones (:func:`_change_into`, from the block's own rounded
    closes, as a full export computes it); every other stored row keeps the value it was exported with.

    Returns the frame (a view of ``block``), or None — ``block`` untouched — when the keys differ (a day
    added to or removed from a replaced history, a replaced instrument gone) or the spare rows do not
    suffice: then merge."""
    n = len(index)
    dates, names = _levels(index)
    c0, c1 = np.asarray(index.codes[0]), np.asarray(index.codes[1])
    d_dates, d_names = _levels(delta.index)
    row_dates = d_dates[np.asarray(delta.index.codes[0])]
    d_c1 = np.asarray(delta.index.codes[1])
    after = row_dates > split
    k = int(after.sum())
    if (list(delta.columns) != list(columns) or delta.to_numpy().dtype != block.dtype or block.shape[0] < n + k
            or (len(dates) and dates.max() > split) or not bool(np.all(after[1:] >= after[:-1]))
            or not (pd.Index(dates).is_monotonic_increasing and pd.Index(names).is_monotonic_increasing)):
        return None
    all_names = np.unique(np.concatenate([names, d_names]))
    old_no, delta_no = np.searchsorted(all_names, names), np.searchsorted(all_names, d_names)
    is_replaced = np.isin(names, np.asarray(list(replaced), dtype=object))
    stored = np.flatnonzero(is_replaced[c1])  # replaced rows
    before = len(delta) - k
    if len(stored) != before or not (np.array_equal(dates[c0[stored]], row_dates[:before])
                                     and np.array_equal(old_no[c1[stored]], delta_no[d_c1[:before]])):
        return None
    values = delta.to_numpy()
    block[stored] = values[:before]
    block[n:n + k] = values[before:]
    new_dates = np.unique(row_dates[before:])
    all_dates = np.concatenate([dates, new_dates])
    # The new codes in the smallest type pandas keeps them in (it would copy wider ones down into fresh
    # pages). The stored instruments' codes are kept as they are unless a new instrument sorts among them.
    t0, t1 = _code_type(len(all_dates)), _code_type(len(all_names))
    codes0 = np.concatenate([c0.astype(t0, copy=False),
                             (len(dates) + np.searchsorted(new_dates, row_dates[before:])).astype(t0)])
    kept = c1.astype(t1, copy=False) if len(all_names) == len(names) else old_no.astype(t1)[c1]
    codes1 = np.concatenate([kept, delta_no.astype(t1)[d_c1[before:]]])
    out = block[:n + k]
    # ``change`` differs from the stored one only in the replaced instruments' rows and the appended ones;
    # an appended row of any other instrument divides by that instrument's last stored close.
    last_row = np.full(len(all_names), -1, dtype=np.int64)
    np.maximum.at(last_row, codes1[:n], np.arange(n, dtype=np.int64))
    last_row[old_no[is_replaced]] = -1
    rows = np.concatenate([stored, np.arange(n, n + k)])
    at = {c: j for j, c in enumerate(columns)}
    _change_into(out, at[close_column(columns)], at[close_column(columns, "change")], codes1[rows], rows, last_row)
    return pd.DataFrame(out, index=make_index(all_dates, codes0, all_names, codes1), columns=columns, copy=False)


def _code_type(levels: int) -> type:
    """The integer type pandas stores the codes of a level of ``levels`` values in."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if levels <= np.iinfo(t).max)


def close_column(columns: list[str], name: str = "close") -> str:
    """``name`` or ``$name``, whichever the columns use (the stored file's column style)."""
    return name if name in columns else f"${name}"


def _change_into(block: np.ndarray, j_close: int, j_change: int, inst_codes: np.ndarray,
                 rows: np.ndarray | None = None, before: np.ndarray | None = None) -> None:
    """``change`` of a frame sorted by (datetime, instrument), computed in place: rows grouped by instrument
    with a stable sort keep their date order, so the previous row of a group is the previous close. The
    arithmetic is float64 whatever the block's dtype (a float32 block's closes are the rounded values a
    full export divides).

    ``rows`` (ascending; default all) limits it to those rows, ``inst_codes`` being theirs: an incremental
    export recomputes only the restated instruments' rows and the appended ones. Then ``before[code]`` is
    the row holding the close before an instrument's first row in ``rows`` (-1: none, NaN)."""
    n = len(inst_codes)
    if n == 0:
        return
    small = inst_codes.astype(np.int16) if inst_codes.max(initial=0) < 2**15 else inst_codes
    order = np.argsort(small, kind="stable")  # radix sort for int16 codes
    # Gathers and scatters run on a contiguous copy of the closes in row order, never across the block's
    # rows (a cache line each): ``prev_at[i]`` is the position (in ``rows``) of row i's previous close.
    close = (block[:, j_close] if rows is None else block[rows, j_close]).astype(np.float64)
    codes = inst_codes[order]
    first = np.ones(n, dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    starts = order[first]  # each instrument's first row
    prev_at = np.empty(n, dtype=np.intp)
    prev_at[order[1:]] = order[:-1]
    prev_at[starts] = 0
    prev = close[prev_at]
    prev[starts] = np.nan
    if before is not None:
        earlier = before[codes[first]]
        prev[starts] = np.where(earlier >= 0, block[np.maximum(earlier, 0), j_close].astype(np.float64), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        change = close / prev - 1.0
    if rows is None:
        block[:, j_change] = change
    else:
        block[rows, j_change] = change


def relabel(frame: pd.DataFrame, rename: Callable[[np.ndarray], np.ndarray], columns: list[str], dtype: str,
            layout: str) -> pd.DataFrame:
    """``frame`` with its instrument level renamed (a bijection on names), rows re-sorted by (datetime, new
    name) when the renaming changes the order, values in ``dtype``; ``layout`` "C" = row-major block (what
    the HDF5 writer wants), "K" = keep (no copy when nothing changes)."""
    dates, names = _levels(frame.index)
    c0 = np.asarray(frame.index.codes[0], dtype=np.int64)
    new = np.asarray(rename(names), dtype=object)
    d_order = np.argsort(dates, kind="stable")
    d_rank = np.empty(len(dates), dtype=np.int64)
    d_rank[d_order] = np.arange(len(dates))
    n_order = np.argsort(new, kind="stable")
    n_rank = np.empty(len(new), dtype=np.int64)
    n_rank[n_order] = np.arange(len(new))
    k0, k1 = d_rank[c0], n_rank[frame.index.codes[1]]
    key = k0 * max(len(new), 1) + k1
    perm = None if len(key) < 2 or bool(np.all(key[1:] >= key[:-1])) else np.argsort(key, kind="stable")
    values = frame.to_numpy(dtype=dtype)
    if perm is not None:
        values = np.take(values, perm, axis=0)
        k0, k1 = k0[perm], k1[perm]
    if layout == "C":
        values = np.ascontiguousarray(values)
    index = make_index(dates[d_order], k0, new[n_order], k1)
    return pd.DataFrame(values, index=index, columns=columns, copy=False)


def strictly_sorted(index: pd.MultiIndex) -> bool:
    """Rows strictly increasing by (datetime, instrument) over sorted levels: sorted and no key twice."""
    if len(index) < 2:
        return True
    if not (index.levels[0].is_monotonic_increasing and index.levels[1].is_monotonic_increasing):
        return False
    key = np.asarray(index.codes[0], dtype=np.int64) * max(len(index.levels[1]), 1) + index.codes[1]
    return bool(np.all(key[1:] > key[:-1]))


def instrument_row_counts(index: pd.MultiIndex) -> dict[str, int]:
    """Rows per instrument name (instruments without rows omitted)."""
    counts = np.bincount(index.codes[1], minlength=len(index.levels[1]))
    names = _levels(index)[1]
    return {str(names[i]): int(counts[i]) for i in np.flatnonzero(counts)}


def instrument_mask(index: pd.MultiIndex, names) -> np.ndarray:
    """Boolean row mask: the row's instrument is in ``names``."""
    hit = np.isin(_levels(index)[1], np.asarray(list(names), dtype=object))
    return hit[index.codes[1]]


def first_last_dates(index: pd.MultiIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per instrument with rows: (names, first datetime64, last datetime64)."""
    dates, names = _levels(index)
    d = dates.view(np.int64)[index.codes[0]]
    c1 = np.asarray(index.codes[1], dtype=np.intp)
    lo = np.full(len(names), np.iinfo(np.int64).max)
    hi = np.full(len(names), np.iinfo(np.int64).min)
    np.minimum.at(lo, c1, d)
    np.maximum.at(hi, c1, d)
    used = lo != np.iinfo(np.int64).max
    return names[used], lo[used].view("datetime64[ns]"), hi[used].view("datetime64[ns]")

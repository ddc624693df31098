"""Qlib bins extended in place through hard links equal bins written anew (no database needed)."""

from __future__ import annotations

import os
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.export import frames, qlib_bins, qlib_format


def panel(calendar: list[date], names: list[str], skip: set[tuple[int, str]]) -> pd.DataFrame:
    """Rows for every (day, name) except ``skip`` (suspensions), values that differ per cell."""
    keys = [(d, n) for d, day in enumerate(calendar) for n in names if (d, n) not in skip]
    dates = np.array(calendar, dtype="datetime64[D]").astype("datetime64[ns]")
    c0 = np.array([d for d, _ in keys])
    c1 = np.array([names.index(n) for _, n in keys])
    values = np.column_stack([c0 * 1.5 + c1, -(c0 + 0.25) * (c1 + 1)]).astype(np.float64)
    return pd.DataFrame(values, index=frames.make_index(dates, c0, np.array(names, dtype=object), c1),
                        columns=["close", "volume"])


@pytest.mark.parametrize("old_days", [1022, 1023, 1024, 1030, 40])
def test_bins_extended_through_links_equal_fresh_bins(tmp_path, old_days):
    """Old files ending just before, at and after a 4 KiB block boundary (1023 values + the start
    element = 4096 bytes), a suspension inside the rewritten block, junk a crashed run appended; the
    current version's files keep their bytes up to their own length."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(1100)]
    names = ["sh600000", "sz000001"]
    skip = {(old_days - 2, "sz000001"), (old_days + 3, "sh600000")}
    whole = panel(calendar, names, skip)
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[old_days])]
    current, fresh, extended = tmp_path / "current", tmp_path / "fresh", tmp_path / "extended"
    qlib_bins.write_bins(current, old, calendar[:old_days], ["close", "volume"])
    before = {p.relative_to(current): p.read_bytes() for p in current.rglob("*.bin")}
    with open(current / "sh600000" / "close.day.bin", "ab") as f:
        f.write(b"junk from a crashed run")
    spans = {n: (0, old_days - 1) for n in names}
    reuse = qlib_bins.BinReuse(current, spans, rewrite=set())
    assert qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse) == 4
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    for rel in before:
        assert (extended / rel).read_bytes() == (fresh / rel).read_bytes(), rel
        assert os.stat(extended / rel).st_ino == os.stat(current / rel).st_ino, "extended through a hard link"
        start, values = qlib_bins.read_bin(extended / rel)
        assert start == 0 and len(values) == 1100
        # what the current version reads (up to its own calendar's end) is unchanged
        assert (current / rel).read_bytes()[:len(before[rel])] == before[rel]
    _, values = qlib_bins.read_bin(fresh / "sz000001" / "close.day.bin")
    assert np.isnan(values[old_days - 2]) and values[old_days - 1] == (old_days - 1) * 1.5 + 1


def test_stored_block_is_read_with_spare_rows_or_not_at_all(tmp_path):
    """``read_h5_block`` hands back the file's row-major block (in its dtype) with spare rows after the stored
    ones; a file in any other layout (here: two dtypes, so two blocks) gives None and the exporter merges."""
    from aistock_pipelines.export.stored_snapshot import read_h5, read_h5_block, write_h5

    calendar = [date(2024, 1, 1) + timedelta(days=i) for i in range(30)]
    frame = panel(calendar, ["sh600000", "sz000001"], set())
    ext = frame.astype(np.float32)
    write_h5(tmp_path / "a.h5", ext)
    block, index, columns = read_h5_block(tmp_path / "a.h5", 7)
    assert block.dtype == np.float32 and block.shape == (len(frame) + 7, 2) and block.flags.c_contiguous
    assert columns == ["close", "volume"] and index.equals(frame.index)
    np.testing.assert_array_equal(block[:len(frame)], ext.to_numpy())
    mixed = frame.assign(volume=frame["volume"].astype(np.float32))
    write_h5(tmp_path / "b.h5", mixed)
    assert read_h5_block(tmp_path / "b.h5", 7) is None
    # read_h5: the same frame as pandas reads, by either path
    pd.testing.assert_frame_equal(read_h5(tmp_path / "a.h5"), pd.read_hdf(tmp_path / "a.h5", "data"),
                                  check_exact=True, check_index_type=False)
    pd.testing.assert_frame_equal(read_h5(tmp_path / "b.h5"), mixed, check_exact=True, check_index_type=False)


def test_an_instrument_missing_a_current_bin_is_written_anew(tmp_path):
    """A current version lacking one of an instrument's files (deleted by hand, say): none of that
    instrument's files is linked — all are written anew — and the result still equals fresh bins."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(60)]
    names = ["sh600000", "sz000001"]
    whole = panel(calendar, names, set())
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[50])]
    current, fresh, extended = tmp_path / "current", tmp_path / "fresh", tmp_path / "extended"
    qlib_bins.write_bins(current, old, calendar[:50], ["close", "volume"])
    (current / "sz000001" / "volume.day.bin").unlink()
    before = (current / "sz000001" / "close.day.bin").read_bytes()
    reuse = qlib_bins.BinReuse(current, {n: (0, 49) for n in names}, rewrite=set())
    qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse)
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    for rel in ("sh600000/close.day.bin", "sh600000/volume.day.bin", "sz000001/close.day.bin", "sz000001/volume.day.bin"):
        assert (extended / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    assert os.stat(extended / "sh600000/close.day.bin").st_ino == os.stat(current / "sh600000/close.day.bin").st_ino
    assert os.stat(extended / "sz000001/close.day.bin").st_ino != os.stat(current / "sz000001/close.day.bin").st_ino
    # its close file may have been extended through the link before the missing volume file was found:
    # what the current version reads (its first 51 values) is unchanged either way
    assert (current / "sz000001" / "close.day.bin").read_bytes()[:len(before)] == before


def test_recycled_folders_are_extended_where_they_are_and_never_write_into_other_inodes(tmp_path):
    """A stale version's ``features`` folder becomes the new version's (one rename). A file there that is the
    current version's inode is extended in place (no new link); a file that is not (the stale version had
    other bytes, e.g. before a restatement) is replaced by a link, its inode untouched; a missing file is
    linked; an instrument without a stale folder gets a new one, and a stale folder of an instrument the
    new version does not have is deleted. The result equals fresh bins, and what the current version
    reads is unchanged."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(60)]
    names = ["sh600000", "sz000001", "sz000002"]
    whole = panel(calendar, names, {(55, "sz000002")})
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[50])]
    current, stale, fresh, extended = (tmp_path / d for d in ("current", "stale", "fresh", "extended"))
    qlib_bins.write_bins(current, old, calendar[:50], ["close", "volume"])
    before = {p.relative_to(current): p.read_bytes() for p in current.rglob("*.bin")}
    for name in ("sh600000", "sz000001"):  # the stale version shared the current inodes ...
        (stale / name).mkdir(parents=True)
        for file in ("close.day.bin", "volume.day.bin"):
            os.link(current / name / file, stale / name / file)
    other = stale / "sz000001" / "volume.day.bin"  # ... except one file with bytes of its own, one missing
    other.unlink()
    other.write_bytes(b"\x00" * 40)
    (stale / "sh600000" / "close.day.bin").unlink()
    kept = tmp_path / "kept"  # a second name for that inode: the folder holding ``other`` is moved
    os.link(other, kept)
    (stale / "sz999999").mkdir()
    (stale / "sz999999" / "close.day.bin").write_bytes(b"\x00" * 8)
    reuse = qlib_bins.BinReuse(current, {n: (0, 49) for n in names}, rewrite=set(), recycle=stale)
    assert qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse) == 6
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    assert not stale.exists(), "the folder moved, not copied"
    assert sorted(p.name for p in extended.iterdir()) == names
    for rel in before:
        assert (extended / rel).read_bytes() == (fresh / rel).read_bytes(), rel
        assert os.stat(extended / rel).st_ino == os.stat(current / rel).st_ino, rel
        assert (current / rel).read_bytes()[:len(before[rel])] == before[rel]
    assert kept.read_bytes() == b"\x00" * 40 and os.stat(kept).st_nlink == 1, "never written into; unlinked"
    assert sorted(p.name for p in (extended / "sz000001").iterdir()) == ["close.day.bin", "volume.day.bin"]


@pytest.mark.parametrize("direct", [True, False], ids=["ctypes", "pytables"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_write_h5_equals_pandas_to_hdf(tmp_path, monkeypatch, dtype, direct):
    """``write_h5`` writes the values through HDF5 directly (the GIL released); the file must read back
    exactly as ``to_hdf``'s, with the same nodes and pandas attributes — a pandas or PyTables upgrade that
    changes the layout fails here. Mixed dtypes and empty frames go through ``to_hdf`` itself."""
    import tables

    from aistock_pipelines.export import stored_snapshot
    from aistock_pipelines.export.stored_snapshot import write_h5

    assert stored_snapshot.HDF5 is not None, "the HDF5 library behind PyTables was not found"
    if not direct:  # the fallback when it is not: PyTables/pandas alone
        monkeypatch.setattr(stored_snapshot, "HDF5", None)
    calendar = [date(2024, 1, 1) + timedelta(days=i) for i in range(40)]
    frame = panel(calendar, ["sh600000", "sz000001", "sz000002"], {(3, "sz000001")}).astype(dtype)
    frame.iloc[5, 1] = np.nan
    write_h5(tmp_path / "direct.h5", frame)
    frame.to_hdf(tmp_path / "pandas.h5", key="data", mode="w", format="fixed")
    got = pd.read_hdf(tmp_path / "direct.h5", "data")
    pd.testing.assert_frame_equal(got, frame, check_exact=True, check_index_type=False)
    pd.testing.assert_frame_equal(got, pd.read_hdf(tmp_path / "pandas.h5", "data"), check_exact=True)

    def layout(path):
        with tables.open_file(path) as f:
            return {n._v_pathname: (type(n).__name__, getattr(n, "shape", None), str(getattr(n, "dtype", "")),
                                    {k: str(n._v_attrs[k]) for k in n._v_attrs._v_attrnamesuser})
                    for n in f.walk_nodes("/")}
    assert layout(tmp_path / "direct.h5") == layout(tmp_path / "pandas.h5")
    block, index, _ = stored_snapshot.read_h5_block(tmp_path / "direct.h5", 3)
    np.testing.assert_array_equal(block[:len(frame)], frame.to_numpy())
    assert block.shape == (len(frame) + 3, 2) and index.equals(frame.index)
    mixed = frame.assign(volume=frame["volume"].astype(np.float64 if dtype == np.float32 else np.float32))
    write_h5(tmp_path / "mixed.h5", mixed)
    pd.testing.assert_frame_equal(pd.read_hdf(tmp_path / "mixed.h5", "data"), mixed, check_exact=True,
                                  check_index_type=False)
    write_h5(tmp_path / "empty.h5", frame.iloc[:0])
    assert len(pd.read_hdf(tmp_path / "empty.h5", "data")) == 0


def test_stored_block_mapped_copy_on_write_never_changes_the_file(tmp_path):
    """``read_h5_block`` maps the stored values copy-on-write (Linux): the block equals the file's values,
    its spare rows are writable, and writing anywhere in it leaves the file byte for byte as it was."""
    from aistock_pipelines.export import stored_snapshot as h5_values
    from aistock_pipelines.export.stored_snapshot import map_h5_values, read_h5_block, write_h5

    calendar = [date(2024, 1, 1) + timedelta(days=i) for i in range(701)]  # > 1 page of rows, an odd row count
    frame = panel(calendar, ["sh600000", "sz000001", "sz000002"], {(9, "sz000002")})
    write_h5(tmp_path / "a.h5", frame)
    before = (tmp_path / "a.h5").read_bytes()
    import tables
    with tables.open_file(tmp_path / "a.h5") as f:
        offset = h5_values.HDF5.offset(f.root.data.block0_values._v_objectid)
    mapped = h5_values._map_values(tmp_path / "a.h5", offset, np.float64, len(frame), (len(frame) + 5, 2))
    assert mapped is not None and offset % 4096 == 0, "write_h5 places the values at a page boundary"
    block, index, _ = read_h5_block(tmp_path / "a.h5", 5)
    for got in (mapped, block):
        np.testing.assert_array_equal(got[:len(frame)], frame.to_numpy())
        got[:] = -7.0  # stored rows and spare rows alike
        assert (got == -7.0).all()
    assert (tmp_path / "a.h5").read_bytes() == before
    pd.testing.assert_frame_equal(pd.read_hdf(tmp_path / "a.h5", "data"), frame, check_exact=True, check_index_type=False)
    assert h5_values._map_values(tmp_path / "a.h5", offset, np.float64, len(frame) + 1, (len(frame) + 5, 2)) is None
    assert h5_values._map_values(tmp_path / "a.h5", offset + 4, np.float64, len(frame) - 1, (len(frame), 2)) is None, \
        "never an unaligned block (numpy would copy all of it in take)"
    # the second mapping a bins writer reads: the file's values, then the appended rows — and read-only
    extra = np.arange(6.0).reshape(3, 2)
    twin = map_h5_values(tmp_path / "a.h5", extra)
    np.testing.assert_array_equal(twin, np.vstack([frame.to_numpy(), extra]))
    assert not twin.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        twin[0, 0] = 1.0
    assert map_h5_values(tmp_path / "a.h5", extra.astype(np.float32)) is None, "another dtype is never mapped"
    # a file pandas wrote (values wherever they fall) is read, equal
    frame.to_hdf(tmp_path / "b.h5", key="data", mode="w", format="fixed")
    block, _, _ = read_h5_block(tmp_path / "b.h5", 0)
    np.testing.assert_array_equal(block, frame.to_numpy())

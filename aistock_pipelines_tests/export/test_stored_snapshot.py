"""daily_pv.h5 written, read and mapped: equal to pandas, copy-on-write, the second mapping read-only."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines_tests.export.helpers import panel


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

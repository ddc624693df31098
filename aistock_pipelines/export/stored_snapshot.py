"""The snapshot's HDF5 file, ``daily_pv.h5``: write, read, map — its values moved without the GIL and,
when read back for an incremental export, mapped instead of copied.

PyTables holds the GIL for the whole of a dataset's read or write, so nothing else in the process runs
meanwhile (the bins writer stands still). :class:`Hdf5Values` calls HDF5's own ``H5Dread``/``H5Dwrite``
through ctypes, which releases the GIL for the call; the values are stored page-aligned so that a later
export can map them copy-on-write (:func:`_map_values`) and start from the file's page cache rather than
fresh memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from aistock_pipelines.export.snapshot_shape import SnapshotError

H5_KEY = "data"
_VALUES = f"/{H5_KEY}/block0_values"
_MAP_FIXED = 0x10  # Linux (mmap(2)); Python's mmap module does not export it
_MADV_POPULATE_READ = 22  # Linux ≥ 5.14 (madvise(2))
_HADDR_UNDEF = 2**64 - 1


class StoredBlock(NamedTuple):
    """A stored frame's parts: its row-major values (with spare rows after the stored ones), index, columns."""

    values: np.ndarray
    index: pd.MultiIndex
    columns: list[str]

    def frame(self) -> pd.DataFrame:
        """The stored rows as a frame over the block (no copy)."""
        return pd.DataFrame(self.values[:len(self.index)], index=self.index, columns=self.columns, copy=False)


class Hdf5Values:
    """``H5Dwrite``/``H5Dread``/``H5Dget_offset`` of the HDF5 library PyTables is linked with (resolved
    through PyTables' own extension module: the same library, the same open identifiers). The memory type
    is the dataset's own type, so a C-contiguous block of the dataset's native dtype is transferred byte for
    byte. One thread at a time uses HDF5 here (an export's threads never touch one file together)."""

    def __init__(self) -> None:
        import tables.hdf5extension

        lib = ctypes.CDLL(tables.hdf5extension.__file__, use_errno=True)
        hid, u64, c_int = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
        self._write = _fn(lib.H5Dwrite, c_int, [hid, hid, hid, hid, hid, ctypes.c_void_p])
        self._read = _fn(lib.H5Dread, c_int, [hid, hid, hid, hid, hid, ctypes.c_void_p])
        self._get_type, self._close_type = _fn(lib.H5Dget_type, hid, [hid]), _fn(lib.H5Tclose, c_int, [hid])
        self._offset = _fn(lib.H5Dget_offset, u64, [hid])
        self._pcreate, self._pclose = _fn(lib.H5Pcreate, hid, [hid]), _fn(lib.H5Pclose, c_int, [hid])
        self._set_alignment = _fn(lib.H5Pset_alignment, c_int, [hid, u64, u64])
        self._fopen = _fn(lib.H5Fopen, hid, [ctypes.c_char_p, ctypes.c_uint, hid])
        self._fclose = _fn(lib.H5Fclose, c_int, [hid])
        self._dopen, self._dclose = _fn(lib.H5Dopen2, hid, [hid, ctypes.c_char_p, hid]), _fn(lib.H5Dclose, c_int, [hid])
        self._file_access = ctypes.c_int64.in_dll(lib, "H5P_CLS_FILE_ACCESS_ID_g")

    def write_aligned(self, path: Path, name: str, block: np.ndarray, alignment: int = mmap.PAGESIZE) -> None:
        """Write the whole of dataset ``name`` of a closed file whose storage is not allocated yet, placing
        that storage at a multiple of ``alignment`` (``H5Pset_alignment``, a property of how the file is
        opened — PyTables offers no way to set it): a block mapped from the file later is aligned for numpy."""
        fapl = self._pcreate(self._file_access.value)
        if fapl < 0:
            raise OSError("HDF5: cannot create a file access property list")
        try:
            if self._set_alignment(fapl, 1, alignment) < 0:
                raise OSError("HDF5: H5Pset_alignment failed")
            f = self._fopen(str(path).encode(), 0x0001, fapl)  # H5F_ACC_RDWR
            if f < 0:
                raise OSError(f"HDF5: cannot open {path} for writing")
            try:
                d = self._dopen(f, name.encode(), 0)
                if d < 0:
                    raise OSError(f"HDF5: no dataset {name} in {path}")
                try:
                    self._call(self._write, "H5Dwrite", d, block)
                finally:
                    self._dclose(d)
            finally:
                if self._fclose(f) < 0:
                    raise OSError(f"HDF5: closing {path} failed")
        finally:
            self._pclose(fapl)

    def read(self, dataset: int, block: np.ndarray) -> None:
        if not (block.flags.c_contiguous and block.flags.writeable):
            raise ValueError("HDF5 reads into a writable C-contiguous block")
        self._call(self._read, "H5Dread", dataset, block)

    def offset(self, dataset: int) -> int | None:
        """Where a contiguous dataset's bytes start in the file; None for chunked or unwritten storage."""
        at = self._offset(dataset)
        return None if at == _HADDR_UNDEF else int(at)

    def _call(self, fn, name: str, dataset: int, block: np.ndarray) -> None:
        file_type = self._get_type(dataset)
        if file_type < 0:
            raise OSError("HDF5: cannot read the values dataset's type")
        try:
            all_, default = 0, 0  # H5S_ALL, H5P_DEFAULT
            ctypes.set_errno(0)
            if fn(dataset, file_type, all_, all_, default, block.ctypes.data) < 0:
                err = ctypes.get_errno()  # the OS error behind HDF5's (ENOSPC, EIO, …), when there was one
                cause = f": {os.strerror(err)}" if err else ""
                raise OSError(err or None, f"HDF5: {name} of the values dataset failed{cause}")
        finally:
            self._close_type(file_type)


def _fn(f, restype, argtypes):
    f.restype, f.argtypes = restype, argtypes
    return f


def _hdf5_values() -> Hdf5Values | None:
    """None if PyTables' HDF5 library cannot be reached (then PyTables does the transfers, GIL held)."""
    try:
        return Hdf5Values()
    except (ImportError, OSError, AttributeError):
        return None


HDF5 = _hdf5_values()


def write_h5(path: Path, frame: pd.DataFrame) -> None:
    """pandas HDF5, fixed format, key ``data``, exactly one dataset (RD-Agent reads without a key).

    A frame held in one row-major float block (every snapshot frame) is written in two steps so that its
    values are written without holding the GIL: pandas writes the file from a zero-strided stand-in of the
    block (index, attributes and an unwritten values dataset of the right shape: PyTables writes no data for
    a zero-strided array), then ``H5Dwrite`` writes the block into that dataset, page-aligned
    (:meth:`Hdf5Values.write_aligned`). The file reads back equal to ``to_hdf``'s (tested); any other frame
    goes through ``to_hdf``."""
    one_dtype = len(frame) > 0 and len(set(frame.dtypes)) == 1 and frame.dtypes.iloc[0] in (np.float32, np.float64)
    block = np.ascontiguousarray(frame.to_numpy()) if one_dtype else None  # the frame's block: no copy
    if block is None or HDF5 is None:
        frame.to_hdf(path, key=H5_KEY, mode="w", format="fixed")
        return
    import tables

    stand_in = np.ndarray(block.shape, dtype=block.dtype, buffer=np.zeros((), dtype=block.dtype), strides=(0, 0))
    pd.DataFrame(stand_in, index=frame.index, columns=frame.columns, copy=False).to_hdf(
        path, key=H5_KEY, mode="w", format="fixed")
    with tables.open_file(path, mode="r") as f:
        node = f.get_node(_VALUES)
        if tuple(node.shape) != block.shape or node.dtype != block.dtype or not node.attrs.transposed:
            raise SnapshotError(f"{path}: pandas laid out the values unlike a row-major block "
                                f"({node.shape}, {node.dtype}); please report this pandas/PyTables version")
    HDF5.write_aligned(path, _VALUES, block)


def read_h5(path: Path) -> pd.DataFrame:
    """``pd.read_hdf(path, "data")`` with the stored row-major block as it is (:func:`read_h5_block`; pandas
    ≥ 3 copies a fixed-format block into column-major order on read). Same frame; any layout other than the
    one :func:`write_h5` produces goes through ``pd.read_hdf``."""
    try:
        stored = read_h5_block(path, 0)
    except (AttributeError, TypeError, ValueError):
        stored = None
    return pd.read_hdf(path, key=H5_KEY) if stored is None else stored.frame()


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


def read_h5_block(path: Path, spare_rows: int) -> StoredBlock | None:
    """The stored frame as :func:`write_h5` lays it out, with ``spare_rows`` more rows after the stored ones,
    read straight into that block (no second copy), for :func:`frames.patch_sorted`; None for any other layout.

    Where it can (Linux, a contiguous dataset in native byte order), the block is not read but mapped
    copy-on-write from the file: the stored rows are the file's page cache, and only pages the caller writes
    and the spare rows take memory of their own. Writing to the block never changes the file."""
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
        native = node.byteorder == sys.byteorder and HDF5 is not None and len(index) > 0
        block = _map_values(path, HDF5.offset(node._v_objectid), node.dtype, len(index), shape) if native else None
        if block is None:
            block = np.empty(shape, dtype=node.dtype)
            if native:
                HDF5.read(node._v_objectid, block[:len(index)])  # without the GIL
            else:
                node.read(out=block[:len(index)])
    return StoredBlock(block, index, [str(c) for c in items])


def map_h5_values(path: Path, appended: np.ndarray) -> np.ndarray | None:
    """The stored values mapped once more, copy-on-write, with ``appended`` (rows of the same width and
    dtype) copied in after them — returned read-only, so nothing can change it while a bins writer reads it.
    A second mapping of the file is a second view of its page cache: what is written into the block of
    :func:`read_h5_block` never shows here. None where the values cannot be mapped."""
    if HDF5 is None:
        return None
    with pd.HDFStore(path, mode="r") as store:
        node = _values_node(store)
        if (node is None or node.byteorder != sys.byteorder or not node.shape[0] or node.dtype != appended.dtype
                or node.shape[1] != appended.shape[1]):
            return None
        rows, width = node.shape
        twin = _map_values(path, HDF5.offset(node._v_objectid), node.dtype, rows, (rows + len(appended), width),
                           populate=False)
    if twin is None:
        return None
    twin[rows:] = appended
    twin.flags.writeable = False
    return twin


class StoredSnapshotMismatch(SnapshotError):
    """A stored file is not what its version recorded (changed by hand, or damaged): it is not reused."""


def verify_h5(path: Path, expected_sha256: str) -> None:
    """Refuse a stored ``daily_pv.h5`` whose bytes differ from the sha256 its version recorded."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise StoredSnapshotMismatch(f"{path} does not match the sha256 its version recorded in meta.json "
                                     f"({actual[:12]}… instead of {expected_sha256[:12]}…): it was changed after "
                                     "the export; the snapshot is rebuilt by a full export")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _map_values(path: Path, offset: int | None, dtype: np.dtype, stored: int, shape: tuple[int, int], *,
                populate: bool = True) -> np.ndarray | None:
    """A writable ``shape`` block whose first ``stored`` rows are the dataset's bytes at ``offset`` in
    ``path``, mapped private (copy-on-write: the file never changes), the remaining rows fresh anonymous
    memory — one contiguous array: an anonymous private mapping of the whole size with the file's pages
    mapped over its start (``MAP_FIXED``). None where this cannot be done (not Linux, no offset, a file too
    short): the caller reads instead. ``populate``: map the file's pages now rather than one fault at a time.

    The file must not shrink while the block lives: a version's ``daily_pv.h5`` is never modified, only
    replaced by a new version."""
    dtype = np.dtype(dtype)
    if offset is None or offset % dtype.alignment or not sys.platform.startswith("linux"):
        return None  # an unaligned block would make numpy copy all of it in operations such as take
    row = dtype.itemsize * shape[1]
    with open(path, "rb") as f:
        if not 0 < stored <= shape[0] or offset + stored * row > f.seek(0, 2):
            return None
        page = mmap.PAGESIZE
        start = offset - offset % page
        lead = offset - start
        total = -(-(lead + shape[0] * row) // page) * page
        region = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(region)
        address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would pin ``region``; numpy holds it below
        file_bytes = -(-(lead + stored * row) // page) * page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        got = libc.mmap(address, file_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED,
                        f.fileno(), start)
        if got != address:
            region.close()
            return None
        if populate:  # read faults now, in the calling thread, instead of inside the HDF5 write later
            libc.madvise.restype, libc.madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise(address, file_bytes, _MADV_POPULATE_READ)  # best effort: Linux ≥ 5.14
    return np.frombuffer(region, dtype=dtype, count=shape[0] * shape[1], offset=lead).reshape(shape)

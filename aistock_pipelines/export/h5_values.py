"""The values of a snapshot's ``daily_pv.h5`` moved without the GIL and, when reading, without a copy.

PyTables holds the GIL for the whole of a dataset's read or write (2.4 s for 0.94 GB at 5.6 M × 21), so
nothing else in the process ran meanwhile — the exporter's bins thread stood still. :class:`Hdf5Values`
calls HDF5's own ``H5Dread``/``H5Dwrite`` through ctypes, which releases the GIL for the call.
:func:`map_values` maps a contiguous dataset's bytes copy-on-write instead of reading them: an incremental
export then starts from the file's page cache rather than 0.94 GB of fresh memory (which on this project's
VMs costs 2.3–3.2 s/GB to touch the first time, docs/performance.md).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import numpy as np

_MAP_FIXED = 0x10  # Linux (mmap(2)); Python's mmap module does not export it
_MADV_POPULATE_READ = 22  # Linux ≥ 5.14 (madvise(2))
_HADDR_UNDEF = 2**64 - 1


class Hdf5Values:
    """``H5Dwrite``/``H5Dread``/``H5Dget_offset`` of the HDF5 library PyTables is linked with (resolved
    through PyTables' own extension module: the same library, the same open identifiers). The memory type
    is the dataset's own type, so a C-contiguous block of the dataset's native dtype is transferred byte for
    byte. HDF5 is used by one thread at a time here (the exporter's threads never touch a file together)."""

    def __init__(self) -> None:
        import tables.hdf5extension

        lib = ctypes.CDLL(tables.hdf5extension.__file__)
        hid = ctypes.c_int64
        self._write, self._read = lib.H5Dwrite, lib.H5Dread
        for f in (self._write, self._read):
            f.restype, f.argtypes = ctypes.c_int, [hid, hid, hid, hid, hid, ctypes.c_void_p]
        self._get_type, self._close_type, self._offset = lib.H5Dget_type, lib.H5Tclose, lib.H5Dget_offset
        self._get_type.restype, self._get_type.argtypes = hid, [hid]
        self._close_type.restype, self._close_type.argtypes = ctypes.c_int, [hid]
        self._offset.restype, self._offset.argtypes = ctypes.c_uint64, [hid]

        self._pcreate, self._set_alignment, self._pclose = lib.H5Pcreate, lib.H5Pset_alignment, lib.H5Pclose
        self._pcreate.restype, self._pcreate.argtypes = hid, [hid]
        self._set_alignment.restype = ctypes.c_int
        self._set_alignment.argtypes = [hid, ctypes.c_uint64, ctypes.c_uint64]
        self._pclose.restype, self._pclose.argtypes = ctypes.c_int, [hid]
        self._fopen, self._fclose = lib.H5Fopen, lib.H5Fclose
        self._fopen.restype, self._fopen.argtypes = hid, [ctypes.c_char_p, ctypes.c_uint, hid]
        self._fclose.restype, self._fclose.argtypes = ctypes.c_int, [hid]
        self._dopen, self._dclose = lib.H5Dopen2, lib.H5Dclose
        self._dopen.restype, self._dopen.argtypes = hid, [hid, ctypes.c_char_p, hid]
        self._dclose.restype, self._dclose.argtypes = ctypes.c_int, [hid]
        self._file_access = ctypes.c_int64.in_dll(lib, "H5P_CLS_FILE_ACCESS_ID_g")

    def write(self, dataset: int, block: np.ndarray) -> None:
        self._call(self._write, "H5Dwrite", dataset, block)

    def write_aligned(self, path: Path, name: str, block: np.ndarray, alignment: int = mmap.PAGESIZE) -> None:
        """Write the whole of dataset ``name`` of a closed file whose storage is not allocated yet, placing
        that storage at a multiple of ``alignment`` (HDF5's ``H5Pset_alignment``, a property of how the file
        is opened — PyTables offers no way to set it): a block mapped from the file later is then aligned
        for numpy."""
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
                    self.write(d, block)
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
            if fn(dataset, file_type, all_, all_, default, block.ctypes.data) < 0:
                raise OSError(f"HDF5: {name} of the values dataset failed")
        finally:
            self._close_type(file_type)


def _hdf5_values() -> Hdf5Values | None:
    """None if PyTables' HDF5 library cannot be reached (then PyTables does the transfers, GIL held)."""
    try:
        return Hdf5Values()
    except (ImportError, OSError, AttributeError):
        return None


HDF5 = _hdf5_values()


def map_values(path: Path, offset: int | None, dtype: np.dtype, stored: int, shape: tuple[int, int], *,
               populate: bool = True) -> np.ndarray | None:
    """A writable ``shape`` block whose first ``stored`` rows are the dataset's bytes at ``offset`` in ``path``, mapped
    private (copy-on-write: the file never changes) and whose remaining rows are fresh anonymous memory —
    one contiguous array: an anonymous private mapping of the whole size with the file's pages mapped over
    its start (``MAP_FIXED``). None where this cannot be done (not Linux, no offset, a file too short for
    ``stored`` rows): the caller reads instead. ``populate``: map the file's pages now (below) rather than
    one fault at a time on first access.

    The file must not shrink while the block lives (access past its end would fault): a snapshot version's
    ``daily_pv.h5`` is never modified, only replaced by a new version."""
    dtype = np.dtype(dtype)
    if offset is None or offset % dtype.alignment or not sys.platform.startswith("linux"):
        return None  # (an unaligned block would make numpy copy all of it in operations such as take)
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
        del anchor  # (an exported buffer would pin ``region``; numpy holds it below)
        file_bytes = -(-(lead + stored * row) // page) * page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        got = libc.mmap(address, file_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED,
                        f.fileno(), start)
        if got != address:
            region.close()
            return None
        # Map the file's pages now (read faults: shared page cache, nothing copied), in this thread — the
        # exporter's reading thread, beside the fingerprints — rather than one fault at a time inside the
        # HDF5 write later. Best effort: MADV_POPULATE_READ needs Linux 5.14.
        if populate:
            libc.madvise.restype, libc.madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise(address, file_bytes, _MADV_POPULATE_READ)
    return np.frombuffer(region, dtype=dtype, count=shape[0] * shape[1], offset=lead).reshape(shape)

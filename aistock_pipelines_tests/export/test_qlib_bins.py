"""Qlib bins written anew and extended from the current version: byte-equal to fresh bins, never writing into another inode."""

from __future__ import annotations

import os
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.export import qlib_bins
from aistock_pipelines_tests.export.helpers import panel


def reuse_of(older: Path, new_features: Path, spans: dict, *, rewrite: frozenset = frozenset(),
             trusted_before: float | None = None) -> qlib_bins.BinReuse:
    """``older``'s bins recycled into ``new_features`` (one rename), as an incremental export reuses them."""
    recycled = qlib_bins.recycle(older, new_features)
    return qlib_bins.BinReuse(spans, recycled, time.time() + 60 if trusted_before is None else trusted_before, rewrite)


@pytest.mark.parametrize("old_days", [1022, 1023, 1024, 1030, 40])
def test_recycled_bins_extended_in_place_equal_fresh_bins(tmp_path, old_days):
    """Old files ending just before, at and after a 4 KiB block boundary (1023 values + the start
    element = 4096 bytes), a suspension inside the rewritten block, junk a crashed run appended: the older
    version's files are extended where they are (same inodes) and equal bins written anew."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(1100)]
    names = ["sh600000", "sz000001"]
    skip = {(old_days - 2, "sz000001"), (old_days + 3, "sh600000")}
    whole = panel(calendar, names, skip)
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[old_days])]
    older, fresh, extended = tmp_path / "older", tmp_path / "fresh", tmp_path / "extended"
    qlib_bins.write_bins(older, old, calendar[:old_days], ["close", "volume"])
    inodes = {p.relative_to(older): os.stat(p).st_ino for p in older.rglob("*.bin")}
    with open(older / "sh600000" / "close.day.bin", "ab") as f:
        f.write(b"junk from a crashed run")
    reuse = reuse_of(older, extended, {n: (0, old_days - 1) for n in names})
    assert qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse) == 4
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    for rel, inode in inodes.items():
        assert (extended / rel).read_bytes() == (fresh / rel).read_bytes(), rel
        assert os.stat(extended / rel).st_ino == inode, "extended where it is"
        start, values = qlib_bins.read_bin(extended / rel)
        assert start == 0 and len(values) == 1100
    _, values = qlib_bins.read_bin(fresh / "sz000001" / "close.day.bin")
    assert np.isnan(values[old_days - 2]) and values[old_days - 1] == (old_days - 1) * 1.5 + 1


def test_an_instrument_missing_a_recycled_bin_is_written_anew(tmp_path):
    """An older version lacking one of an instrument's files (deleted by hand, say): that instrument's
    files are all written anew (new inodes) and the result still equals fresh bins."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(60)]
    names = ["sh600000", "sz000001"]
    whole = panel(calendar, names, set())
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[50])]
    older, fresh, extended = tmp_path / "older", tmp_path / "fresh", tmp_path / "extended"
    qlib_bins.write_bins(older, old, calendar[:50], ["close", "volume"])
    (older / "sz000001" / "volume.day.bin").unlink()
    kept_inode = os.stat(older / "sh600000" / "close.day.bin").st_ino
    reuse = reuse_of(older, extended, {n: (0, 49) for n in names})
    qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse)
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    for rel in ("sh600000/close.day.bin", "sh600000/volume.day.bin", "sz000001/close.day.bin", "sz000001/volume.day.bin"):
        assert (extended / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    assert os.stat(extended / "sh600000/close.day.bin").st_ino == kept_inode


def test_a_recycled_file_another_name_holds_or_changed_since_is_never_written(tmp_path):
    """The recycled folder becomes the new version's (one rename). A file there with a second link (a
    release, another version) or modified after its version was completed is never written: it is
    unlinked and written anew, the other name keeping its bytes. A restated instrument is written anew; an
    instrument without a recycled folder gets a new one; a recycled folder of an instrument the new
    version does not have is deleted. The result equals fresh bins."""
    calendar = [date(2020, 1, 1) + timedelta(days=i) for i in range(60)]
    names = ["sh600000", "sz000001", "sz000002", "sz000003"]
    whole = panel(calendar, names, {(55, "sz000002")})
    old = whole[whole.index.get_level_values(0) < pd.Timestamp(calendar[50])]
    older, fresh, extended = (tmp_path / d for d in ("older", "fresh", "extended"))
    qlib_bins.write_bins(older, old[old.index.get_level_values(1) != "sz000002"], calendar[:50], ["close", "volume"])
    (older / "sz999999").mkdir()
    (older / "sz999999" / "close.day.bin").write_bytes(b"\x00" * 8)
    release = tmp_path / "release.bin"
    os.link(older / "sh600000" / "close.day.bin", release)
    held = release.read_bytes()
    completed = time.time()
    os.utime(older / "sz000001" / "volume.day.bin", (completed + 5, completed + 5))  # changed since
    # open descriptors keep the old inodes from being freed (and their numbers reused) during the write
    untouched = os.open(older / "sz000001" / "close.day.bin", os.O_RDONLY)
    restated = os.open(older / "sz000003" / "close.day.bin", os.O_RDONLY)
    reuse = reuse_of(older, extended, {n: (0, 49) for n in names}, rewrite=frozenset({"sz000003"}),
                     trusted_before=completed)
    assert qlib_bins.write_bins(extended, whole, calendar, ["close", "volume"], reuse=reuse) == 8
    qlib_bins.write_bins(fresh, whole, calendar, ["close", "volume"])
    assert not older.exists(), "the folder moved, not copied"
    assert sorted(p.name for p in extended.iterdir()) == names
    assert read_bins_under(extended) == read_bins_under(fresh)
    assert release.read_bytes() == held and os.stat(release).st_nlink == 1, "never written into; unlinked"
    assert os.stat(extended / "sz000001" / "close.day.bin").st_ino != os.fstat(untouched).st_ino, \
        "its folder was written anew"
    assert os.stat(extended / "sz000003" / "close.day.bin").st_ino != os.fstat(restated).st_ino
    os.close(untouched)
    os.close(restated)


def read_bins_under(features: Path) -> dict:
    return {p.relative_to(features): p.read_bytes() for p in features.rglob("*.bin")}

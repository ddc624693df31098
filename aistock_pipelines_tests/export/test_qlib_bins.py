"""Qlib bins written anew and extended from the current version: byte-equal to fresh bins, never writing into another inode."""

from __future__ import annotations

import os
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.export import qlib_bins
from aistock_pipelines_tests.export.helpers import panel


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

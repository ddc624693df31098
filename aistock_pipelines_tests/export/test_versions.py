"""Version folders: a crash or a full disk mid-write keeps the previous version and leaves nothing behind; a
second writer is locked out."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.snapshot_shape import SnapshotError
from aistock_pipelines.export.versions import SnapshotLocked
from aistock_pipelines_tests.export.helpers import START, make_exporter, read_h5

pytestmark = pytest.mark.db


def test_crash_mid_write_leaves_previous_snapshot_and_next_run_recovers(exported, market_db, monkeypatch):
    ex, result, path = exported
    before = read_h5(path)
    advance_market(create_db_engine(market_db), events=2)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(qlib_bins, "write_bins", crash)
    with pytest.raises(OSError, match="simulated"):
        ex.export_incremental("demo")
    pd.testing.assert_frame_equal(read_h5(path), before, check_exact=True)
    assert json.loads((path / "meta.json").read_text())["export_id"] == result.export_id
    previous = path.resolve()
    assert [p.name for p in (path.parent / ".versions").iterdir()] == [previous.name], \
        "the failed run removed its half-written version"
    killed = path.parent / ".versions" / "demo@19990101T000000000000"  # a run killed mid-write leaves this
    (killed / "features" / "sz000001").mkdir(parents=True)
    (killed / "features" / "sz000001" / "close.day.bin").write_bytes(b"\x00" * 12)
    monkeypatch.undo()
    after = ex.export_incremental("demo")
    assert after.mode == "incremental" and after.rows > result.rows
    # the killed run's leftover is gone; the version this export replaced stays (complete) until the next export
    assert sorted(p.name for p in (path.parent / ".versions").iterdir()) == sorted([path.resolve().name, previous.name])
    pd.testing.assert_frame_equal(read_h5(previous), before, check_exact=True)
    replaced = path.resolve()
    advance_market(create_db_engine(market_db), events=0)
    ex.export_incremental("demo")  # the next writing export deletes the version the last one replaced
    assert sorted(p.name for p in (path.parent / ".versions").iterdir()) == sorted([path.resolve().name, replaced.name])


def test_a_second_writer_is_locked_out(exported):
    ex, result, path = exported
    with ex.writer.lock("demo"):
        with pytest.raises(SnapshotLocked, match="another process"):
            ex.export_full("demo", START)


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MiB file system (tmpfs) for the snapshot root: room for one demo version, not two."""
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(root)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_full_disk_is_refused_before_writing_and_named_when_it_happens(market_db, small_disk, monkeypatch):
    """The second version does not fit: the export refuses before writing (free and needed space named);
    where the space runs out mid-write anyway (the check bypassed), the error names the OS error and the
    failed run removes its half-built version. Either way the current version is intact and nothing is
    left behind, however often it is retried."""
    from aistock_pipelines.export import snapshot_writer

    ex = make_exporter(market_db, small_disk)
    ex.export_full("demo", START)
    current = (small_disk / "demo").resolve()
    before = read_h5(current)
    advance_market(create_db_engine(market_db), events=2)
    with pytest.raises(SnapshotError, match="not enough free space .* GiB are free"):
        ex.export_incremental("demo")
    monkeypatch.setattr(snapshot_writer, "_check_space", lambda *args: None)
    for _ in range(2):
        with pytest.raises(OSError, match="No space left on device"):
            ex.export_incremental("demo")
        assert [p.name for p in (small_disk / ".versions").iterdir()] == [current.name]
    pd.testing.assert_frame_equal(read_h5(small_disk / "demo"), before, check_exact=True)

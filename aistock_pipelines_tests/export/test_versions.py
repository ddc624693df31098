"""Version folders: a crash mid-write keeps the previous version, a second writer is locked out."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.versions import SnapshotLocked
from aistock_pipelines_tests.export.helpers import START, read_h5

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
    leftovers = list((path.parent / ".versions").iterdir())
    assert len(leftovers) == 2, "the half-written version is still there until the next run"
    monkeypatch.undo()
    after = ex.export_incremental("demo")
    assert after.mode == "incremental" and after.rows > result.rows
    # the crash leftover is gone; the version this export replaced stays (complete) until the next export
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

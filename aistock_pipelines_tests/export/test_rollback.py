"""Rollback to a release on the demo market: later exports continue from it and equal a fresh full export,
never writing into a file the release holds (the recycling of the replaced version's bins included); a
rollback killed at any point leaves the live snapshot and every release intact."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export.releases import ReleaseError, ReleaseStore
from aistock_pipelines.export.rollback import rollback
from aistock_pipelines.export.snapshot_history import history
from aistock_pipelines.export.snapshot_lock import SnapshotWriteLockTimeout, snapshot_write_lock
from aistock_pipelines_tests.export.helpers import START, read_bins, read_h5
from aistock_pipelines_tests.export.release_helpers import (UNIVERSE_FILES, files, inodes, killed,
                                                            market_files_exporter, without_meta)

pytestmark = pytest.mark.db


def _same_files(live, fresh) -> None:
    """The live snapshot equals a fresh full export: the frame, every bin (benchmarks included), the
    calendar and every instruments file (universes included)."""
    pd.testing.assert_frame_equal(read_h5(live), read_h5(fresh), check_exact=True)
    assert read_bins(live) == read_bins(fresh)
    listed = sorted(p.name for p in (live / "instruments").iterdir())
    assert listed == sorted(p.name for p in (fresh / "instruments").iterdir()) and len(listed) == 3
    for f in ["calendars/day.txt", *(f"instruments/{name}" for name in listed)]:
        assert (live / f).read_bytes() == (fresh / f).read_bytes(), f


def test_rollback_then_two_incrementals_equal_a_fresh_full_export_and_never_touch_the_release(market_db, tmp_path):
    """Release, two exports, rollback; then an incremental export with restatements (its bins written anew)
    and a second one, which recycles the rolled-back version's bin folder — whose files the release also
    holds, so every one of them is written anew, none extended. The release still verifies and the live
    snapshot equals a fresh full export at the later date."""
    ex = market_files_exporter(market_db, tmp_path)
    ex.export_full("demo", START)
    path, engine = tmp_path / "demo", create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    release = store.create("demo", label="paper-v1").release
    restated = set()
    for _ in range(2):
        restated |= set(advance_market(engine, events=4).restated)
        ex.export_incremental("demo")
    old = path.resolve()
    old_h5 = read_h5(old)
    done = rollback(store, "demo", "paper-v1")
    assert done.replaced == old.name and done.meta_rows == release.doc["database"]["instruments"]
    assert path.resolve() == done.version and read_h5(old).equals(old_h5), "a reader of the old path keeps its files"
    live_meta = json.loads((path / "meta.json").read_text())
    assert live_meta["export_id"] == release.export_id and live_meta["replaces"] == old.name
    assert live_meta["last_export"]["mode"] == "rollback" and live_meta["last_export"]["release"] == "paper-v1"
    assert without_meta(files(path)) == without_meta(release.manifest()) and UNIVERSE_FILES <= set(files(path))
    assert {s.ts_code: s for s in ex.meta.load("demo").values()} == {s.ts_code: s for s in release.meta_states()}
    held = inodes(release.path)
    rolled_back_features = os.stat(done.version / "features").st_ino

    restated |= set(advance_market(engine, events=4).restated)
    after = ex.export_incremental("demo")
    assert after.mode == "incremental" and restated <= set(after.restated), "restatements since the release re-read"
    assert not inodes(path) & held, "nothing recycled from the rolled-back version: every file written anew"
    adv = advance_market(engine, events=3)
    second = ex.export_incremental("demo")
    assert second.mode == "incremental" and set(adv.restated) <= set(second.restated)
    assert os.stat(path / "features").st_ino == rolled_back_features, "the rolled-back version's folder recycled"
    assert not inodes(path) & held, "no file the release holds was extended: each written anew"
    check = store.verify("demo", "paper-v1")
    assert check.ok and check.files == release.doc["manifest"]["files"], check.problems

    ex.export_full("fresh", START)
    _same_files(path, tmp_path / "fresh")
    kinds = [(e.kind, e.mode) for e in history(store, "demo")]
    assert ("release", "full") in kinds and kinds[-1] == ("live", "incremental")
    assert ("version", "incremental") in kinds, "the version the live one replaced stays, as after any export"
    engine.dispose()


def test_a_rollback_is_refused_for_a_changed_release_and_while_another_writer_holds_the_snapshot(
        exported, market_db, tmp_path):
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    release = store.create("demo", label="r1").release
    version = path.resolve()
    with snapshot_write_lock(market_db, "demo", wait_s=0):
        with pytest.raises(SnapshotWriteLockTimeout, match="still being written"):
            rollback(store, "demo", "r1", lock_wait=1)
    (release.path / "calendars" / "day.txt").unlink()
    with pytest.raises(ReleaseError, match=r"differs from its manifest.*missing: calendars/day.txt.*snapshots verify"):
        rollback(store, "demo", "r1")
    assert path.resolve() == version and [p for p in (tmp_path / ".versions").iterdir()] == [version]
    engine.dispose()


def test_a_killed_rollback_leaves_the_live_snapshot_and_every_release_intact(exported, market_db, tmp_path):
    """Killed while linking: nothing changed. Killed between the swap and the meta rows: the live version is
    the release's and the next export trusts no meta row (it re-reads every instrument)."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    store.create("demo", label="r1")
    advance_market(engine, events=3)
    ex.export_incremental("demo")
    live, version = files(path), path.resolve().name
    rows = ex.meta.load("demo")
    killed(market_db, tmp_path, "rollback", "r1", tmp_path)
    assert path.resolve().name == version and files(path) == live and ex.meta.load("demo") == rows
    assert store.verify("demo", "r1").ok
    killed(market_db, tmp_path, "after-swap", "r1", tmp_path)
    released = without_meta(store.get("demo", "r1").manifest())
    assert without_meta(files(path)) == released
    assert store.verify("demo", "r1").ok and ex.meta.load("demo") == rows
    advance_market(engine, events=3)
    after = ex.export_incremental("demo")  # equal to a fresh export: test_rollback_then_two_incrementals_…
    assert after.mode == "incremental" and len(after.restated) == after.instruments, "no meta row trusted"
    assert store.verify("demo", "r1").ok
    engine.dispose()

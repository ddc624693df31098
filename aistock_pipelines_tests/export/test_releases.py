"""Releases on the demo market: every file of the snapshot (universes and benchmarks included), immutable
across exports with restatements, verified, kept or pruned, made under the writer locks, killed safely."""

from __future__ import annotations

import json
import os

import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.releases import ReleaseError, ReleaseStore
from aistock_pipelines.export.snapshot_lock import SnapshotWriteLockTimeout, snapshot_write_lock
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.export.helpers import START, read_bins
from aistock_pipelines_tests.export.release_helpers import (BENCHMARK_FOLDERS, UNIVERSE_FILES, files, killed,
                                                            market_files_exporter)

pytestmark = pytest.mark.db


def test_a_release_holds_every_file_and_keeps_its_bytes_across_incremental_exports(market_db, tmp_path):
    """A release links every file of the live version — universe files and benchmark bins included (same
    inodes, a few folders and its manifest on disk), records what a rollback needs, and keeps every byte
    over three incremental exports with restatements — the third recycles the released version's bins."""
    ex = market_files_exporter(market_db, tmp_path)
    result, path = ex.export_full("demo", START), tmp_path / "demo"
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    declared = load_snapshots_file(DEMO_SNAPSHOTS_FILE)
    made = store.create("demo", declaration=declared.declaration_doc("demo_allA"))
    release, meta = made.release, json.loads((path / "meta.json").read_text())
    assert made.created and release.name == meta["end"] and release.path == tmp_path / "releases" / "demo" / meta["end"]
    live_files = files(path)
    assert release.manifest() == live_files, "every file of the live version, sha256 and size"
    assert UNIVERSE_FILES <= set(live_files) and {rel.split("/")[1] for rel in live_files if rel.startswith(
        "features/")} >= BENCHMARK_FOLDERS, "the snapshot's universe files and benchmark bins are released"
    assert all(os.stat(release.path / rel).st_ino == os.stat(path / rel).st_ino for rel in live_files), "hard links"
    doc = release.doc
    assert doc["contents"] == {"instruments": result.instruments, "universes": ["csi300", "hs_liquid"],
                               "benchmarks": sorted(BENCHMARK_FOLDERS)}
    assert doc["daily_pv_sha256"] == result.sha256 and doc["export_id"] == result.export_id
    assert doc["version"] == path.resolve().name and doc["database"]["end"] == meta["end"]
    assert doc["database"]["as_of"] == meta["as_of"] and doc["declaration"]["declaration_hash"] == meta["declaration_hash"]
    assert doc["declaration"]["declared"]["universes"]["csi300"] == {"index_weight": "000300.SH", "spans": None,
                                                                      "table": None}
    assert doc["declaration"]["declared"]["benchmarks"]["codes"] == ["000300.SH", "399006.SZ"]
    assert doc["code_version"]["package"] and len(doc["meta_rows"]["rows"]) == result.instruments
    assert doc["manifest"]["files"] == len(live_files) and doc["manifest"]["bytes"] == sum(e.size for e in live_files.values())
    assert 0 < doc["bytes_added"] < 0.05 * doc["manifest"]["bytes"]
    assert store.create("demo").created is False, "the same version under its default name: nothing new"
    for _ in range(3):
        adv = advance_market(engine, events=4)
        got = ex.export_incremental("demo")
        assert got.mode == "incremental" and set(adv.restated) <= set(got.restated)
    check = store.verify("demo", release.name)
    assert check.ok and check.files == len(live_files), check.problems
    assert files(release.path) == live_files
    assert read_bins(path) != read_bins(release.path), "the live snapshot moved on"
    assert (path / "instruments" / "csi300.txt").read_bytes() != (release.path / "instruments" / "csi300.txt").read_bytes()
    engine.dispose()


def test_verify_catches_a_writer_that_extends_a_shared_inode_and_a_flipped_byte(exported, market_db, tmp_path,
                                                                                 monkeypatch):
    """Were the writer to extend a bin another name holds (a writer without the one-link rule, here), the
    release's bytes would change under it: verify names the files. A byte flipped in a release is named."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    release = store.create("demo").release

    def extend_even_if_shared(folder, name, data, offset, valid, length, trusted_before):
        fd = os.open(name, os.O_WRONLY, dir_fd=folder)
        try:
            os.pwrite(fd, data, offset)
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        return True

    monkeypatch.setattr(qlib_bins, "_extend", extend_even_if_shared)
    for _ in range(2):  # the second incremental export recycles the released version's bins
        advance_market(engine, events=2)
        ex.export_incremental("demo")
    monkeypatch.undo()
    check = store.verify("demo", release.name)
    assert not check.ok and all(p.startswith("size differs: features/") for p in check.problems)
    assert len(check.problems) > 1000, "every extended bin of the released version"

    flipped = store.create("demo", label="flipped").release  # a release of the version now live
    target = flipped.path / "calendars" / "day.txt"
    data = bytearray(target.read_bytes())
    data[5] ^= 0x01
    target.write_bytes(bytes(data))
    check = store.verify("demo", "flipped")
    assert len(check.problems) == 1 and check.problems[0].startswith("sha256 differs: calendars/day.txt (")
    engine.dispose()


def test_retention_deletes_exactly_the_expected_releases(exported, market_db, tmp_path):
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    store.create("demo", label="r1", keep=True)
    store.create("demo", label="r2")
    advance_market(engine, events=3)
    ex.export_incremental("demo")
    store.create("demo", label="r3")
    store.create("demo", label="r4")  # the same version as r3: hashes taken from r3 where inodes match
    live = files(path)
    made = store.create("demo", label="r5", keep_last=2)
    assert made.deleted == ["r2", "r3"]
    assert [r.name for r in store.list("demo")] == ["r1", "r4", "r5"] and store.get("demo", "r1").keep
    assert all(store.verify("demo", name).ok for name in ("r1", "r4", "r5"))
    assert files(path) == live, "the live snapshot is untouched"
    assert not any(p.name.startswith(".") and p.name != ".keep" for p in (tmp_path / "releases" / "demo").iterdir())
    store.set_keep("demo", "r1", False)
    assert store.prune("demo", 1) == ["r1", "r4"] and [r.name for r in store.list("demo")] == ["r5"]
    with pytest.raises(ReleaseError, match="not allowed"):
        store.create("demo", label="../escape")
    with pytest.raises(ReleaseError, match="not allowed"):
        store.create("demo", label="live")
    with pytest.raises(ReleaseError, match="no release 'nope'.*r5"):
        store.verify("demo", "nope")
    engine.dispose()


def test_a_release_takes_the_writer_locks_an_export_takes(exported, market_db, tmp_path):
    """A writer of the snapshot on another host (the database's advisory lock held) keeps a release, a
    retention run and a rollback waiting; past their wait they fail naming it. Without the database, a
    release is refused with the reason; reading releases needs none."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    store.create("demo", label="r1")
    with snapshot_write_lock(market_db, "demo", wait_s=0):
        with pytest.raises(SnapshotWriteLockTimeout, match="still being written by 'aistock writer .* demo'"):
            store.create("demo", label="r2", lock_wait=1)
        with pytest.raises(SnapshotWriteLockTimeout):
            store.prune("demo", 1, lock_wait=1)
    assert [r.name for r in store.list("demo")] == ["r1"]
    with pytest.raises(ReleaseError, match="writer lock in the AIstock database"):
        ReleaseStore(tmp_path).create("demo", label="r2")
    assert ReleaseStore(tmp_path).verify("demo", "r1").ok
    assert store.create("demo", label="r2").created, "the lock released, the release is made"
    engine.dispose()


def test_a_killed_release_leaves_the_live_snapshot_and_every_release_intact(exported, market_db, tmp_path):
    """Killed mid-way (SIGKILL while linking), a release leaves a partial folder the next release deletes;
    the live snapshot, the other releases and the writer lock are as they were."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    store = ReleaseStore(tmp_path, engine)
    store.create("demo", label="r1")
    live, version = files(path), path.resolve().name
    killed(market_db, tmp_path, "release", "r2", tmp_path)
    assert path.resolve().name == version and files(path) == live
    assert [r.name for r in store.list("demo")] == ["r1"] and store.verify("demo", "r1").ok
    assert any(p.name.startswith(".partial-r2-") for p in (tmp_path / "releases" / "demo").iterdir())
    advance_market(engine, events=3)
    assert ex.export_incremental("demo").mode == "incremental", "the killed release's lock died with it"
    assert store.create("demo", label="r2").created and store.verify("demo", "r2").ok
    assert sorted(p.name for p in (tmp_path / "releases" / "demo").iterdir()) == ["r1", "r2"], "leftovers deleted"
    engine.dispose()

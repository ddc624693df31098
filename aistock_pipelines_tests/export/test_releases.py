"""Releases on the demo market: immutable across exports with restatements, verified, kept or pruned,
rolled back to, compared."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins
from aistock_pipelines.export.release_files import manifest_of
from aistock_pipelines.export.releases import OWN_FILES, ReleaseError, ReleaseStore
from aistock_pipelines.export.rollback import rollback
from aistock_pipelines.export.snapshot_diff import diff_snapshot
from aistock_pipelines.export.snapshot_history import history
from aistock_pipelines_tests.export.helpers import START, read_bins, read_h5

pytestmark = pytest.mark.db


def _files(folder) -> dict:
    """sha256 and size of every file of a version or release folder but the release's own."""
    return manifest_of(folder, OWN_FILES)


def test_a_release_keeps_its_bytes_across_incremental_exports_with_restatements(exported, market_db, tmp_path):
    """A release links every file of the live version (same inodes, a few folders and its manifest on
    disk), records what a rollback needs, and keeps every byte over three incremental exports with
    restatements — the third recycles the released version's bin folders."""
    ex, result, path = exported
    store = ReleaseStore(tmp_path)
    made = store.create("demo", ex.meta)
    release = made.release
    meta = json.loads((path / "meta.json").read_text())
    assert made.created and release.name == meta["end"] and release.path == tmp_path / "releases" / "demo" / meta["end"]
    live_files = _files(path)
    assert release.manifest() == live_files, "every file of the live version, sha256 and size"
    assert all(os.stat(release.path / rel).st_ino == os.stat(path / rel).st_ino for rel in live_files), "hard links"
    doc = release.doc
    assert doc["daily_pv_sha256"] == result.sha256 and doc["export_id"] == result.export_id
    assert doc["version"] == path.resolve().name and doc["database"]["end"] == meta["end"]
    assert doc["database"]["as_of"] == meta["as_of"] and doc["declaration"]["declaration_hash"] == meta["declaration_hash"]
    assert doc["code_version"]["package"] and len(doc["meta_rows"]["rows"]) == result.instruments
    assert doc["manifest"]["files"] == len(live_files) and doc["manifest"]["bytes"] == sum(e.size for e in live_files.values())
    assert 0 < doc["bytes_added"] < 0.05 * doc["manifest"]["bytes"]
    assert store.create("demo", ex.meta).created is False, "the same version under its default name: nothing new"
    engine = create_db_engine(market_db)
    for _ in range(3):
        adv = advance_market(engine, events=4)
        got = ex.export_incremental("demo")
        assert got.mode == "incremental" and set(adv.restated) <= set(got.restated)
    check = store.verify("demo", release.name)
    assert check.ok and check.files == len(live_files), check.problems
    assert _files(release.path) == live_files
    assert read_bins(path) != read_bins(release.path), "the live snapshot moved on"
    engine.dispose()


def test_verify_catches_a_writer_that_extends_a_shared_inode_and_a_flipped_byte(exported, market_db, tmp_path,
                                                                                 monkeypatch):
    """Were the writer to extend a bin another name holds (a writer without the one-link rule, here), the
    release's bytes would change under it: verify names the files. A byte flipped in a release is named."""
    ex, _, path = exported
    store = ReleaseStore(tmp_path)
    release = store.create("demo", ex.meta).release

    def extend_even_if_shared(folder, name, data, offset, valid, length, trusted_before):
        fd = os.open(name, os.O_WRONLY, dir_fd=folder)
        try:
            os.pwrite(fd, data, offset)
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        return True

    monkeypatch.setattr(qlib_bins, "_extend", extend_even_if_shared)
    engine = create_db_engine(market_db)
    for _ in range(2):  # the second incremental export recycles the released version's bins
        advance_market(engine, events=2)
        ex.export_incremental("demo")
    monkeypatch.undo()
    check = store.verify("demo", release.name)
    assert not check.ok and all(p.startswith("size differs: features/") for p in check.problems)
    assert len(check.problems) > 1000, "every extended bin of the released version"
    engine.dispose()

    flipped = store.create("demo", ex.meta, label="flipped").release  # a release of the version now live
    target = flipped.path / "calendars" / "day.txt"
    data = bytearray(target.read_bytes())
    data[5] ^= 0x01
    target.write_bytes(bytes(data))
    check = store.verify("demo", "flipped")
    assert len(check.problems) == 1 and check.problems[0].startswith("sha256 differs: calendars/day.txt (")


def test_rollback_then_incremental_equals_a_fresh_full_export(exported, market_db, tmp_path):
    ex, _, path = exported
    store = ReleaseStore(tmp_path)
    engine = create_db_engine(market_db)
    release = store.create("demo", ex.meta, label="paper-v1").release
    restated = set()
    for _ in range(2):
        restated |= set(advance_market(engine, events=4).restated)
        ex.export_incremental("demo")
    old = path.resolve()
    old_h5 = read_h5(old)
    done = rollback(store, ex.meta, "demo", "paper-v1")
    assert done.replaced == old.name and done.meta_rows == release.doc["database"]["instruments"]
    assert path.resolve() == done.version and read_h5(old).equals(old_h5), "a reader of the old path keeps its files"
    live_meta = json.loads((path / "meta.json").read_text())
    assert live_meta["export_id"] == release.export_id and live_meta["replaces"] == old.name
    assert live_meta["last_export"]["mode"] == "rollback" and live_meta["last_export"]["release"] == "paper-v1"
    files = {rel: e for rel, e in _files(path).items() if rel != "meta.json"}
    assert files == {rel: e for rel, e in release.manifest().items() if rel != "meta.json"}
    assert {s.ts_code: s for s in ex.meta.load("demo").values()} == {s.ts_code: s for s in release.meta_states()}
    restated |= set(advance_market(engine, events=4).restated)
    after = ex.export_incremental("demo")
    assert after.mode == "incremental" and restated <= set(after.restated), "restatements since the release re-read"
    advance_market(engine, events=2)
    assert ex.export_incremental("demo").mode == "incremental"  # recycles the rolled-back version's folder
    ex.export_full("fresh", START)
    pd.testing.assert_frame_equal(read_h5(path), read_h5(tmp_path / "fresh"), check_exact=True)
    assert read_bins(path) == read_bins(tmp_path / "fresh")
    for f in ("calendars/day.txt", "instruments/all.txt"):
        assert (path / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes()
    assert store.verify("demo", "paper-v1").ok
    kinds = [(e.kind, e.mode) for e in history(store, "demo")]
    assert ("release", "full") in kinds and kinds[-1][0] == "live"
    engine.dispose()


def test_retention_deletes_exactly_the_expected_releases(exported, market_db, tmp_path):
    ex, _, path = exported
    store = ReleaseStore(tmp_path)
    engine = create_db_engine(market_db)
    store.create("demo", ex.meta, label="r1", keep=True)
    store.create("demo", ex.meta, label="r2")
    advance_market(engine, events=3)
    ex.export_incremental("demo")
    store.create("demo", ex.meta, label="r3")
    store.create("demo", ex.meta, label="r4")  # the same version as r3: hashes taken from r3 where inodes match
    live = _files(path)
    made = store.create("demo", ex.meta, label="r5", keep_last=2)
    assert made.deleted == ["r2", "r3"]
    assert [r.name for r in store.list("demo")] == ["r1", "r4", "r5"] and store.get("demo", "r1").keep
    assert all(store.verify("demo", name).ok for name in ("r1", "r4", "r5"))
    assert _files(path) == live, "the live snapshot is untouched"
    assert not any(p.name.startswith(".") and p.name != ".keep" for p in (tmp_path / "releases" / "demo").iterdir())
    store.set_keep("demo", "r1", False)
    assert store.prune("demo", 1) == ["r1", "r4"] and [r.name for r in store.list("demo")] == ["r5"]
    with pytest.raises(ReleaseError, match="not allowed"):
        store.create("demo", ex.meta, label="../escape")
    with pytest.raises(ReleaseError, match="not allowed"):
        store.create("demo", ex.meta, label="live")
    with pytest.raises(ReleaseError, match="no release 'nope'.*r5"):
        store.verify("demo", "nope")
    engine.dispose()


def test_the_diff_of_a_restating_day_names_the_restated_instruments(exported, market_db, tmp_path):
    ex, result, path = exported
    store = ReleaseStore(tmp_path)
    store.create("demo", ex.meta, label="before")
    engine = create_db_engine(market_db)
    adv = advance_market(engine, events=5)
    got = ex.export_incremental("demo")
    d = diff_snapshot(store, "demo", "before", "live")
    assert {r.instrument for r in d.restated} == set(adv.restated) == set(got.restated)
    assert all(r.max_price_change > 0 for r in d.restated)
    assert d.restated == sorted(d.restated, key=lambda r: -r.max_price_change)
    assert d.rows_added == adv.bars and d.rows_removed == 0 and d.columns_added == d.columns_removed == []
    assert d.rows_b - d.rows_a == adv.bars and d.range_b[1] == adv.trade_date.isoformat()
    back = diff_snapshot(store, "demo", "live", "before")  # rows not aligned this way: matched by key
    assert back.rows_removed == adv.bars and {r.instrument for r in back.restated} == set(adv.restated)
    replaced = json.loads((path / "meta.json").read_text())["replaces"]
    assert diff_snapshot(store, "demo", replaced, "live").restated == d.restated
    text = "\n".join(d.lines(top=3))
    assert d.restated[0].instrument in text and f"+{adv.bars:,} added" in text
    # a declaration change: the factor tables dropped
    from aistock_pipelines.export.snapshot_shape import SnapshotOptions

    ex.export_full("demo", START, options=SnapshotOptions(factor_tables=()))
    cols = diff_snapshot(store, "demo", "before", "live")
    assert cols.columns_removed and all(c.startswith(("db_", "mf_")) for c in cols.columns_removed)
    assert cols.columns_added == [] and cols.rows_added == adv.bars
    engine.dispose()


_KILLED_CHILD = """
import pathlib, sys, time
from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import release_files
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.releases import ReleaseStore
from aistock_pipelines.export.rollback import rollback

url, root, action, name, ready = sys.argv[1:6]

def hang(*args, **kwargs):
    pathlib.Path(ready).touch()
    time.sleep(600)

if action == "after-swap":  # the swap is done, the meta rows not yet
    MetaRepo.replace = hang
else:  # hang while linking the 50th file
    link, calls = release_files._link_or_copy, []
    def counting(*args):
        calls.append(1)
        if len(calls) == 50:
            hang()
        return link(*args)
    release_files._link_or_copy = counting
store, meta = ReleaseStore(pathlib.Path(root)), MetaRepo(create_db_engine(url))
if action == "release":
    store.create("demo", meta, label=name)
else:
    rollback(store, meta, "demo", name)
"""


def _killed(url: str, root, action: str, name: str, tmp_path) -> None:
    """Run a release or rollback in a child process and kill it (SIGKILL) at the point ``action`` names."""
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / f"ready-{action}"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, url, str(root), action, name, str(ready)])
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert child.poll() is None, f"the child ended before it could be killed ({child.returncode})"
        assert time.monotonic() < deadline, "the child never reached the point to be killed at"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def test_a_killed_release_or_rollback_leaves_the_live_snapshot_and_every_release_intact(exported, market_db, tmp_path):
    ex, _, path = exported
    store = ReleaseStore(tmp_path)
    store.create("demo", ex.meta, label="r1")
    live, version = _files(path), path.resolve().name
    _killed(market_db, tmp_path, "release", "r2", tmp_path)
    assert path.resolve().name == version and _files(path) == live
    assert [r.name for r in store.list("demo")] == ["r1"] and store.verify("demo", "r1").ok
    engine = create_db_engine(market_db)
    advance_market(engine, events=3)
    ex.export_incremental("demo")
    live, version = _files(path), path.resolve().name
    rows = ex.meta.load("demo")
    _killed(market_db, tmp_path, "rollback", "r1", tmp_path)
    assert path.resolve().name == version and _files(path) == live and ex.meta.load("demo") == rows
    assert store.verify("demo", "r1").ok
    # killed between the swap and the meta rows: the live version is the release's, the rows are not trusted
    _killed(market_db, tmp_path, "after-swap", "r1", tmp_path)
    released = {rel: e for rel, e in store.get("demo", "r1").manifest().items() if rel != "meta.json"}
    assert {rel: e for rel, e in _files(path).items() if rel != "meta.json"} == released
    assert store.verify("demo", "r1").ok and ex.meta.load("demo") == rows
    advance_market(engine, events=3)
    after = ex.export_incremental("demo")  # equal to a fresh export: test_rollback_then_incremental_…
    assert after.mode == "incremental" and len(after.restated) == after.instruments, "no meta row trusted"
    assert store.create("demo", ex.meta, label="r2").created and store.verify("demo", "r2").ok
    assert sorted(p.name for p in (tmp_path / "releases" / "demo").iterdir()) == ["r1", "r2"], "leftovers deleted"
    engine.dispose()

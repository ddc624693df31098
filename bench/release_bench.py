"""Release benchmark: the disk cost and time of releases of the benchmark snapshot, with verify, diff and
rollback beside them.

One command (inside the project's venv)::

    .venv/bin/python bench/release_bench.py                 # target size: 4,000 instruments × 1,500 days
    .venv/bin/python bench/release_bench.py --small         # smoke run: 300 × 250

The database comes from :func:`export_bench.prepare_database` (the same seeded template, a fresh work copy;
an embedded server in ``.aistock/bench-pgdata``). Steps, each timed once:

1. a full export of the ``allA`` variant (an ``export_bench`` worker process), then ``sync``;
2. **release** of that snapshot (every file hard-linked and hashed), ``--repeat`` times (each but the last
   moved aside again; the median is reported) — seconds, bytes added on disk, and the snapshot's own size on
   disk; a link-only pass of the same tree (no hashing) beside it, for the split;
3. a second release of the unchanged snapshot under a label (hashes taken over where the inode is the
   same), and **verify** of the first (every byte re-hashed);
4. one trading day appended with ``--events`` restatements and an incremental export; **diff** of the
   first release against the live version, and of the replaced version against it (what the asset's
   metadata computes after each export); a release of the new version;
5. **rollback** to the first release, then one more day and the incremental export after it (its bins are
   written anew, not extended), and verify of the first release again.

Each timed step logs the load average after it (kept in the results: the machine is shared).
Results: a markdown table on stdout (the one in ``docs/performance.md``, section "Releases") and a JSON
file under ``bench/results/``. The snapshots (``.aistock/bench-releases``) and the work database are
removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import export_bench  # noqa: E402 - the bench's database set-up and worker processes

DEFAULT_ROOT = REPO / ".aistock" / "bench-releases"
SNAPSHOT = "bench_allA"


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(bytes on disk, files) of a folder, each inode counted once."""
    seen, total, files = set(), 0, 0
    for top, dirs, names in os.walk(folder):
        total += os.stat(top).st_blocks * 512
        for name in names:
            st = os.stat(os.path.join(top, name))
            files += 1
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total, files


#: The 1-minute load average at the end of each timed step (the machine is shared: a figure means little
#: without it).
LOADS: dict[str, float] = {}


def timed(what: str, fn):
    os.sync()  # untimed: no measurement pays for the previous one's writeback
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    LOADS[what] = round(os.getloadavg()[0], 2)
    export_bench.log(f"{what}: {seconds:.2f} s (load average {LOADS[what]})")
    return out, seconds


def first_releases(store, root: Path, repeat: int) -> tuple[object, list[float]]:
    """The first release of the live version, timed ``repeat`` times, each but the last moved out of the
    releases afterwards (so every one links and hashes the whole version; moved, not deleted: a mass delete
    slows the next run's new folders, see ``export_bench.file_creation_us``); the last release, every time."""
    times = []
    for i in range(repeat):
        made, seconds = timed(f"release {i + 1}/{repeat}", lambda: store.create(SNAPSHOT))
        times.append(round(seconds, 3))
        if i < repeat - 1:
            (root / "set-aside").mkdir(exist_ok=True)
            os.rename(made.release.path, root / "set-aside" / str(i))
    return made, times


def measure(url: str, root: Path, tmp: Path, events: int, repeat: int) -> dict:
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.export.release_files import link_tree
    from aistock_pipelines.export.releases import ReleaseStore
    from aistock_pipelines.export.rollback import rollback
    from aistock_pipelines.export.snapshot_diff import diff_snapshot

    res: dict = {}
    export_bench.log("full export allA")
    res["full"] = export_bench.run_worker("full", {"url": url, "root": str(root), "snapshot_id": SNAPSHOT,
                                                   "variant": "allA"}, tmp, "full")
    live = (root / SNAPSHOT).resolve()
    res["snapshot_disk_bytes"], res["snapshot_files"] = disk_bytes(live)
    store = ReleaseStore(root, create_db_engine(url))
    first, res["release_seconds_all"] = first_releases(store, root, repeat)
    res["release_seconds"] = statistics.median(res["release_seconds_all"])
    res["release"] = {k: first.release.doc[k] for k in ("bytes_added", "manifest", "seconds")}
    _, res["link_only_seconds"] = timed("link only (no hashing)", lambda: link_tree(live, root / "link-only", hash_files=False))
    second, res["release_same_version_seconds"] = timed("release, same version", lambda: store.create(
        SNAPSHOT, label="same-version"))
    res["release_same_version_bytes_added"] = second.release.doc["bytes_added"]
    check, res["verify_seconds"] = timed("verify", lambda: store.verify(SNAPSHOT, first.release.name))
    res["verify_ok"] = check.ok
    res["advance"] = export_bench.run_worker("advance", {"url": url, "events": events}, tmp, "advance1")
    res["incremental"] = export_bench.run_worker("incremental", {"url": url, "root": str(root), "snapshot_id": SNAPSHOT},
                                                 tmp, "inc1")
    d, res["diff_release_seconds"] = timed("diff release → live", lambda: diff_snapshot(
        store, SNAPSHOT, first.release.name, "live"))
    replaced = json.loads(((root / SNAPSHOT) / "meta.json").read_text())["replaces"]
    d2, res["diff_replaced_seconds"] = timed("diff replaced → live", lambda: diff_snapshot(store, SNAPSHOT, replaced, "live"))
    res["diff"] = {"restated": len(d.restated), "rows_added": d.rows_added, "replaced_restated": len(d2.restated)}
    third, res["release_after_incremental_seconds"] = timed("release after the incremental", lambda: store.create(
        SNAPSHOT, label="after-incremental"))
    res["release_after_incremental_bytes_added"] = third.release.doc["bytes_added"]
    done, res["rollback_seconds"] = timed("rollback", lambda: rollback(store, SNAPSHOT, first.release.name))
    res["rollback_meta_rows"] = done.meta_rows
    res["advance2"] = export_bench.run_worker("advance", {"url": url, "events": events}, tmp, "advance2")
    res["incremental_after_rollback"] = export_bench.run_worker(
        "incremental", {"url": url, "root": str(root), "snapshot_id": SNAPSHOT}, tmp, "inc2")
    res["verify_after_ok"] = store.verify(SNAPSHOT, first.release.name).ok
    res["loadavg_after_step"] = dict(LOADS)
    store.engine.dispose()
    return res


def render(res: dict) -> str:
    size = res["snapshot_disk_bytes"]
    rel = res["release"]
    rows = [
        ("snapshot (allA) on disk", f"{size / 2**30:.2f} GiB, {res['snapshot_files']:,} files"),
        ("release: time", f"{res['release_seconds']:.2f} s (median of {res['release_seconds_all']}; "
                          f"link only: {res['link_only_seconds']:.2f} s)"),
        ("release: bytes added", f"{rel['bytes_added'] / 2**20:.1f} MiB = {rel['bytes_added'] / size:.2%} of the snapshot"),
        ("release of the unchanged snapshot again (label)", f"{res['release_same_version_seconds']:.2f} s, "
                                                             f"{res['release_same_version_bytes_added'] / 2**20:.1f} MiB"),
        ("verify (every byte re-hashed)", f"{res['verify_seconds']:.2f} s, ok={res['verify_ok']}"),
        ("incremental export (reference)", f"{res['incremental']['seconds']:.2f} s"),
        ("diff release → live", f"{res['diff_release_seconds']:.2f} s ({res['diff']['restated']} restated, "
                                 f"+{res['diff']['rows_added']:,} rows)"),
        ("diff replaced → live (export metadata)", f"{res['diff_replaced_seconds']:.2f} s"),
        ("release after the incremental", f"{res['release_after_incremental_seconds']:.2f} s, "
                                          f"{res['release_after_incremental_bytes_added'] / 2**20:.1f} MiB"),
        ("rollback to the first release", f"{res['rollback_seconds']:.2f} s ({res['rollback_meta_rows']} meta rows)"),
        ("incremental export after the rollback", f"{res['incremental_after_rollback']['seconds']:.2f} s"),
        ("first release verified after all of it", str(res["verify_after_ok"])),
    ]
    return "| measurement | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=4000)
    ap.add_argument("--days", type=int, default=1500)
    ap.add_argument("--events", type=int, default=20, help="qfq restatements per appended day")
    ap.add_argument("--repeat", type=int, default=3, help="first releases of the exported version timed")
    ap.add_argument("--small", action="store_true", help="smoke run: 300 instruments × 250 days")
    ap.add_argument("--db-url", help="an existing PostgreSQL server (admin URL with CREATEDB); default: embedded")
    ap.add_argument("--pgdata", type=Path, default=export_bench.DEFAULT_PGDATA)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="scratch snapshot root")
    ap.add_argument("--keep", action="store_true", help="keep the work database and the snapshots")
    args = ap.parse_args(argv)
    if args.small:
        args.instruments, args.days = 300, 250
    import psycopg
    from psycopg import sql as psql

    facts = export_bench.machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="aistock-release-bench-"))
    db = export_bench.prepare_database(args.instruments, args.days, args.pgdata, args.db_url, tmp, facts)
    try:
        shutil.rmtree(args.root, ignore_errors=True)
        args.root.mkdir(parents=True)
        probes = export_bench.settle_file_system(args.root)
        res = measure(db["url"], args.root, tmp, args.events, args.repeat)
        res.update(machine=facts, file_creation_us=probes, bars=db["bars"], instruments=db["instruments"])
        facts["loadavg_end"] = os.getloadavg()
        print(render(res))
        out = export_bench.RESULTS_DIR / f"{datetime.now():%Y%m%dT%H%M%S}-release-{args.instruments}x{args.days}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))
        export_bench.log(f"results: {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
            with psycopg.connect(db["admin_url"], autocommit=True) as conn:
                conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(db["work"])))
        if db["server"] is not None:
            db["server"].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of two checkouts of the export engine on one seeded database (same harness, same rounds).

    .venv/bin/python bench/export_ab.py --old /path/to/old/checkout            # 4,000 × 1,500, 3 rounds
    .venv/bin/python bench/export_ab.py --old ../ab-old --small                # smoke run

Arms: ``old`` (the checkout given by ``--old``), ``new`` (``--new``, default this checkout) and ``old2`` (the old checkout
again: the spread between ``old`` and ``old2`` is the harness's own noise). Every measurement runs in its
own Python process whose ``sys.path`` starts with the arm's checkout; the worker checks that
``aistock_pipelines`` was imported from there and records the file it imported (an A/B once compared the
new code with itself through ``sys.path``). Full exports of each variant run in rounds with the arms'
order rotated per round, beside one limit measurement (``export_bench.py``'s, the database's own COPY plus
``to_hdf``); then, per repeat, the market advances one day (``--events`` qfq restatements) and each arm
brings its own snapshot up to date. Output: a markdown table and a JSON file under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START = date(2021, 1, 4)
VARIANTS = {
    "allA": dict(columns="plain", instruments="ts_code", dtype="float64", factor_tables=None),
    "qlib": dict(columns="dollar", instruments="qlib", dtype="float32", factor_tables=()),
}


# ============================================================================================ worker


def _import_from(code: Path):
    """``aistock_pipelines`` imported from ``code`` (first on ``sys.path``), checked."""
    sys.path[:] = [str(code)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, HERE)]
    import aistock_pipelines

    got = Path(aistock_pipelines.__file__).resolve()
    if not got.is_relative_to(code.resolve()):
        raise SystemExit(f"imported {got}, not from {code}")
    return got


def _exporter(url: str, root: str):
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.export.exporter import QlibDailyExporter
    from aistock_pipelines.export.meta_repo import MetaRepo
    from aistock_pipelines.export.reader import DBReader
    from aistock_pipelines.export.snapshot_writer import SnapshotWriter
    from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
    from aistock_pipelines.snapshot_config import load_snapshots_file

    mapping = load_snapshots_file(DEMO_SNAPSHOTS_FILE).export_mapping()
    engine = create_db_engine(url)
    return QlibDailyExporter(DBReader(engine, mapping, url), SnapshotWriter(Path(root)), MetaRepo(engine))


def _options(variant: str):
    try:
        from aistock_pipelines.export.snapshot_shape import SnapshotOptions
    except ImportError:  # the engine before its restructuring
        from aistock_pipelines.export.snapshot_writer import SnapshotOptions
    v = dict(VARIANTS[variant])
    ft = v.pop("factor_tables")
    return SnapshotOptions(**v, factor_tables=tuple(ft) if ft is not None else None)


def _snapshot_digest(path: Path) -> str:
    """sha256 over the h5 frame's index, columns and values and every bin's bytes (the h5 file's own bytes
    differ between any two writes: HDF5 records object times)."""
    import hashlib

    import numpy as np
    import pandas as pd

    frame = pd.read_hdf(path / "daily_pv.h5", key="data")
    h = hashlib.sha256()
    h.update(np.asarray(frame.index.codes[0]).tobytes() + np.asarray(frame.index.codes[1]).tobytes())
    h.update("\n".join(map(str, [*frame.index.levels[0], *frame.index.levels[1], *frame.columns])).encode())
    h.update(np.ascontiguousarray(frame.to_numpy()).tobytes())
    for f in sorted((path / "features").rglob("*.bin")):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def worker_main(code: str, task: str, params_file: str, out_file: str) -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")
    imported = _import_from(Path(code))
    p = json.loads(Path(params_file).read_text())
    ex = _exporter(p["url"], p["root"])
    if task == "full":
        r = ex.export_full(p["snapshot_id"], START, options=_options(p["variant"]))
    else:
        r = ex.export_incremental(p["snapshot_id"])
    ex.reader.engine.dispose()
    digest = _snapshot_digest(Path(p["root"]) / p["snapshot_id"]) if p.get("digest") else None
    doc = {"seconds": r.timings["total"], "timings": r.timings, "rows": r.rows, "digest": digest,
           "restated": len(r.restated), "imported": str(imported),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out_file).write_text(json.dumps(doc, default=str))


# ============================================================================================ driver


def run(code: Path, task: str, params: dict, tmp: Path, label: str) -> dict:
    pfile, ofile = tmp / f"{label}.params.json", tmp / f"{label}.out.json"
    pfile.write_text(json.dumps(params, default=str))
    os.sync()  # untimed: no run pays for the previous one's writeback
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_worker", str(code), task, str(pfile),
                           str(ofile)], cwd=tmp)
    if proc.returncode != 0 or not ofile.exists():
        raise SystemExit(f"worker {label} failed ({proc.returncode})")
    doc = json.loads(ofile.read_text())
    doc["wall_seconds"] = time.perf_counter() - t
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the old engine")
    ap.add_argument("--new", type=Path, default=REPO, help="checkout of the new engine (default: this one)")
    ap.add_argument("--instruments", type=int, default=4000)
    ap.add_argument("--days", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--variants", default="allA,qlib")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--settle-us", type=float, default=50.0, help="wait until creating a file takes less (µs)")
    args = ap.parse_args(argv)
    if args.small:
        args.instruments, args.days, args.rounds = 300, 250, 2
    sys.path.insert(0, str(HERE))
    import export_bench as eb  # the bench's database set-up and its limit worker (this checkout)
    import psycopg
    from psycopg import sql as psql

    arms = {"old": args.old.resolve(), "new": args.new.resolve(), "old2": args.old.resolve()}
    variants = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="aistock-ab-"))
    facts = eb.machine_facts()
    db = eb.prepare_database(args.instruments, args.days, eb.DEFAULT_PGDATA, None, tmp, facts)
    url, admin_url, work = db["url"], db["admin_url"], db["work"]
    root = REPO / ".aistock" / "ab-snapshots"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    res: dict = {"arms": {k: str(v) for k, v in arms.items()}, "full": {}, "incremental": {}, "limit": [],
                 "started": datetime.now(timezone.utc).isoformat(), "machine": facts, "bars": db["bars"]}
    names = list(arms)
    try:
        res["file_creation_us"] = eb.settle_file_system(root, slow_us=args.settle_us)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for variant in variants:
                for arm in order:
                    sid = f"{arm}_{variant}_{r}"
                    doc = run(arms[arm], "full", {"url": url, "root": str(root), "snapshot_id": sid, "variant": variant},
                              tmp, f"full-{sid}")
                    res["full"].setdefault(f"{arm}/{variant}", []).append(doc)
                    eb.log(f"full {arm} {variant}: {doc['seconds']:.2f} s, {doc['peak_rss_mb']:.0f} MB ({doc['imported']})")
            lim = eb.run_worker("limit", {"url": url, "variant": variants[0], "out_h5": str(tmp / "limit.h5"),
                                          "h5_source": str(root / f"new_{variants[0]}_{r}" / "daily_pv.h5")}, tmp, f"limit{r}")
            res["limit"].append(sum(lim["runs"]["copy_server"]) + sum(lim["runs"]["to_hdf"]))
            eb.log(f"limit: {res['limit'][-1]:.2f} s")
        last = args.rounds - 1
        for rep in range(args.rounds):
            eb.run_worker("advance", {"url": url, "events": args.events}, tmp, f"advance{rep}")
            order = names[rep % 3:] + names[:rep % 3]
            for variant in variants:
                for arm in order:
                    sid = f"{arm}_{variant}_{last}"
                    doc = run(arms[arm], "incremental", {"url": url, "root": str(root), "snapshot_id": sid,
                                                         "digest": rep == args.rounds - 1}, tmp, f"inc-{sid}-{rep}")
                    res["incremental"].setdefault(f"{arm}/{variant}", []).append(doc)
                    eb.log(f"incremental {arm} {variant}: {doc['seconds']:.2f} s")
        for variant in variants:  # the arms' snapshots are the same bytes
            digests = {res["incremental"][f"{arm}/{variant}"][-1]["digest"] for arm in names}
            res.setdefault("same_output", {})[variant] = len(digests) == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(work)))
        if db["server"] is not None:
            db["server"].stop()
    out = args.json or eb.RESULTS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}-ab-{args.instruments}x{args.days}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(render(res, variants))
    return 0


def render(res: dict, variants: list[str]) -> str:
    med = statistics.median
    lines = ["| variant | measure | old | new | old2 | new/old | old2/old |", "|---|---|---|---|---|---|---|"]
    for variant in variants:
        for kind in ("full", "incremental"):
            s = {arm: med(d["seconds"] for d in res[kind][f"{arm}/{variant}"]) for arm in ("old", "new", "old2")}
            lines.append(f"| {variant} | {kind} s | {s['old']:.2f} | {s['new']:.2f} | {s['old2']:.2f} | "
                         f"{s['new'] / s['old']:.3f} | {s['old2'] / s['old']:.3f} |")
        rss = {arm: max(d["peak_rss_mb"] for d in res["full"][f"{arm}/{variant}"]) for arm in ("old", "new", "old2")}
        lines.append(f"| {variant} | full peak RSS MB | {rss['old']:.0f} | {rss['new']:.0f} | {rss['old2']:.0f} | "
                     f"{rss['new'] / rss['old']:.3f} | {rss['old2'] / rss['old']:.3f} |")
    limit = med(res["limit"])
    full_new = med(d["seconds"] for d in res["full"][f"new/{variants[0]}"])
    lines.append(f"\nlimit ({variants[0]}): {limit:.2f} s; new full / limit = {full_new / limit:.2f}")
    for variant in variants:
        inc = med(d["seconds"] for d in res["incremental"][f"new/{variant}"])
        full = med(d["seconds"] for d in res["full"][f"new/{variant}"])
        lines.append(f"new incremental / full ({variant}) = {inc / full:.2f}; same output in all arms: "
                     f"{res.get('same_output', {}).get(variant)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(*sys.argv[2:6])
    else:
        sys.exit(main())

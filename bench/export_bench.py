"""Export benchmark: baseline, limit, full and incremental exports side by side.

One command (inside the project's venv)::

    .venv/bin/python bench/export_bench.py                    # target size: 4,000 instruments × 1,500 days, 3 repeats
    .venv/bin/python bench/export_bench.py --small            # smoke run: 300 × 250, 1 repeat

What it measures, each measurement in a fresh Python subprocess (so every peak RSS is that of one process
that did only this, read with ``os.wait4`` per child), against the same database:

* **baseline** — ``pandas.read_sql`` (SQLAlchemy + psycopg) of the features as one SQL query (the view
  ``market.daily_features``: bars left-joined with the raw table for ``factor`` and with every factor table),
  ``set_index`` + ``sort_index``, ``to_hdf(format="fixed")``. This is what a hand-written export does; it
  writes no bins, no checksums.
* **limit** — the database's own cost of producing the rows the exporter reads: ``COPY (…) TO '/dev/null'
  (FORMAT binary)`` of each of the exporter's per-table SELECTs in turn, run by the server (needs superuser
  or ``pg_write_server_files``; with ``--db-url`` to a lesser role the bench falls back to ``COPY … TO
  STDOUT`` read and discarded by psycopg and says so), plus the ``to_hdf`` time of the exported frame (the
  full export's own ``daily_pv.h5`` read back row-major, the fastest layout to write). For reference it
  also prints the same COPYs ``TO STDOUT`` (the socket transfer any client pays) and the server's COPY of
  the baseline's SQL join. Server settings are the server's defaults for every measurement.
* **full** — ``QlibDailyExporter.export_full`` with the demo declaration's mapping, per variant:
  ``allA`` = plain columns / ts_code names / float64 / all factor tables (as ``demo_allA``);
  ``qlib`` = ``$`` columns / SH600000 names / float32 / bars only (as ``demo_qlib``, over the full range).
  Each run creates its own snapshot; none is deleted before the end (see ``kept``). Phase timings come from
  ``ExportResult.timings``. Before every measurement the bench calls ``sync`` (untimed), so a run starts
  with no writeback pending from the previous one; before the full runs it waits (up to 10 minutes) until
  creating a file is no longer slow (:func:`file_creation_us`; the probes are in the results).
* **incremental** — per repeat, ``advance_market`` appends one trading day with ``--events`` ex-dividend
  restatements (each rewrites that instrument's whole qfq history), then ``export_incremental`` per variant.
  Rows read from the database are reported beside the snapshot's size.
* **verify** — a fresh full export after the incrementals, compared with the incremental snapshot: equal
  ``daily_pv.h5`` frames and byte-equal Qlib bins (a correctness check at scale, not timed).

Baseline, full and limit runs are interleaved in rounds (a baseline while any are due, a full export per
variant, a limit), so each ratio compares measurements taken minutes apart, not a whole bench apart.
Times are medians over ``--repeat`` runs (baseline: ``--baseline-repeat``). Results: a markdown table on
stdout and a small JSON file under ``bench/results/`` (git-ignored).

The database: by default an embedded PostgreSQL server in ``.aistock/bench-pgdata`` (never the test
server's data directory). The demo market is seeded once into a template database ``bench_market_<spec
hash>`` and reused by later runs of the same size; each run works on a fresh copy (``CREATE DATABASE …
TEMPLATE``) because the incremental part appends days. The copy and the snapshots (under
``.aistock/bench-snapshots``) are removed at the end unless ``--keep``; the server is stopped again if the
bench started it. ``--drop-template`` also drops the seeded template.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_PGDATA = REPO / ".aistock" / "bench-pgdata"
DEFAULT_SNAPSHOTS = REPO / ".aistock" / "bench-snapshots"
RESULTS_DIR = REPO / "bench" / "results"
START = date(2021, 1, 4)

VARIANTS = {
    "allA": dict(columns="plain", instruments="ts_code", dtype="float64", factor_tables=None),
    "qlib": dict(columns="dollar", instruments="qlib", dtype="float32", factor_tables=()),
}


# ============================================================================================ workers
# Each worker runs in its own process: ``export_bench.py _worker TASK PARAMS.json OUT.json``.


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
    from aistock_pipelines.export.snapshot_shape import SnapshotOptions

    v = dict(VARIANTS[variant])
    ft = v.pop("factor_tables")
    return SnapshotOptions(**v, factor_tables=tuple(ft) if ft is not None else None)


def _export_queries(url: str, variant: str) -> tuple[str, list[str], list[tuple[str, dict]]]:
    """For the whole range: the hand-written export's query (the view's SQL join of bars, raw table and factor
    tables), the exporter's own per-table SELECTs (``ReadSession.statements``), and the statements (SQL with
    ``:name`` parameters) that prepare a session for both as the reader does: bound functions and bounds."""
    from aistock_pipelines.export.daily_features import feature_select_sql
    from aistock_pipelines.export.reader import BOUND_FUNCTIONS_DDL, READ_BOUNDS

    ex = _exporter(url, tempfile.gettempdir())
    reader = ex.reader_for(_options(variant))
    with reader.session() as s:
        end = s.last_bar(None)
        tables = s.statements(False)
    join = (feature_select_sql(reader.resolved)
            + " WHERE b.trade_date BETWEEN pg_temp.aistock_read_start() AND pg_temp.aistock_read_end()")
    ex.reader.engine.dispose()
    bounds = {READ_BOUNDS["start"]: START.isoformat(), READ_BOUNDS["end"]: end.isoformat(), READ_BOUNDS["codes"]: ""}
    return join, tables, [(ddl, {}) for ddl in BOUND_FUNCTIONS_DDL] + [
        ("SELECT set_config(:name, :value, false)", {"name": n, "value": v}) for n, v in bounds.items()]


def work_seed(p: dict) -> dict:
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.demo.market import MarketSpec, seed_demo_market

    spec = MarketSpec(n_instruments=p["instruments"], n_trading_days=p["days"], start=START)
    engine = create_db_engine(p["url"])
    t = time.perf_counter()
    summary = seed_demo_market(engine, spec)
    seconds = time.perf_counter() - t
    engine.dispose()
    return {"seconds": seconds, "bars": summary.bars, "instruments": summary.instruments,
            "first_date": str(summary.first_date), "last_date": str(summary.last_date),
            "trading_days": summary.trading_days}


def work_baseline(p: dict) -> dict:
    import pandas as pd
    import sqlalchemy as sa

    from aistock_pipelines.db import create_db_engine

    sql, _, prepare = _export_queries(p["url"], p["variant"])
    engine = create_db_engine(p["url"])
    out = Path(p["out_h5"])
    t0 = time.perf_counter()
    with engine.connect() as conn:
        for statement, params in prepare:
            conn.execute(sa.text(statement), params)
        df = pd.read_sql(sa.text(sql), conn)
    t1 = time.perf_counter()
    df.index = pd.MultiIndex.from_arrays(
        [pd.DatetimeIndex(pd.to_datetime(df.pop("trade_date"))).as_unit("ns"),
         pd.Index(df.pop("ts_code").to_numpy(dtype=object), dtype=object)], names=["datetime", "instrument"])
    df = df.astype("float64").sort_index()
    t2 = time.perf_counter()
    df.to_hdf(out, key="data", mode="w", format="fixed")
    t3 = time.perf_counter()
    size = out.stat().st_size
    out.unlink()
    engine.dispose()
    return {"seconds": t3 - t0, "rows": len(df), "columns": df.shape[1], "h5_bytes": size,
            "phases": {"read_sql": t1 - t0, "shape_sort": t2 - t1, "to_hdf": t3 - t2}}


def work_limit(p: dict) -> dict:
    """One round of the limit (the driver runs one per round and merges the ``runs``): the server's COPY of
    the exporter's per-table SELECTs (and, for reference, of the SQL join), the same COPY TO STDOUT
    discarded, to_hdf of the exported frame."""
    import psycopg
    import sqlalchemy as sa

    from aistock_pipelines.db import create_db_engine

    join, tables, prepare = _export_queries(p["url"], p["variant"])
    runs: dict[str, list[float]] = {"copy_server": [], "copy_join_server": [], "copy_stdout": [], "to_hdf": []}
    server_side_error = None
    engine = create_db_engine(p["url"])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as sa_conn:
        for statement, params in prepare:
            sa_conn.execute(sa.text(statement), params)
        conn = sa_conn.connection.driver_connection
        try:
            for key, queries in (("copy_server", tables), ("copy_join_server", [join])):
                t = time.perf_counter()
                for sql in queries:
                    conn.execute(f"COPY ({sql}) TO '/dev/null' (FORMAT binary)")
                runs[key].append(time.perf_counter() - t)
        except psycopg.errors.InsufficientPrivilege as e:
            server_side_error = str(e).splitlines()[0]
        t = time.perf_counter()
        n_bytes = 0
        with conn.cursor() as cur:
            for sql in tables:
                with cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as copy:
                    for block in copy:
                        n_bytes += len(block)
        runs["copy_stdout"].append(time.perf_counter() - t)
    from aistock_pipelines.export.stored_snapshot import read_h5

    frame = read_h5(Path(p["h5_source"]))  # the exported frame as the exporter holds it (row-major block)
    out = Path(p["out_h5"])
    t = time.perf_counter()
    frame.to_hdf(out, key="data", mode="w", format="fixed")
    runs["to_hdf"].append(time.perf_counter() - t)
    out.unlink()
    return {"runs": runs, "copy_binary_bytes": n_bytes, "rows": len(frame), "columns": frame.shape[1],
            "server_side_error": server_side_error}


def work_full(p: dict) -> dict:
    ex = _exporter(p["url"], p["root"])
    r = ex.export_full(p["snapshot_id"], START, options=_options(p["variant"]))
    ex.reader.engine.dispose()
    return _result_doc(r)


def work_incremental(p: dict) -> dict:
    ex = _exporter(p["url"], p["root"])
    r = ex.export_incremental(p["snapshot_id"])
    ex.reader.engine.dispose()
    return _result_doc(r)


def work_advance(p: dict) -> dict:
    import sqlalchemy as sa

    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.demo.market import advance_market

    engine = create_db_engine(p["url"])
    t = time.perf_counter()
    adv = advance_market(engine, events=p["events"])
    seconds = time.perf_counter() - t
    with engine.connect() as conn:
        restated_rows = conn.execute(sa.text(
            "SELECT count(*) FROM market.kline_daily_qfq WHERE ts_code = ANY(:c) AND trade_date >= :s"),
            {"c": adv.restated, "s": START}).scalar()
    engine.dispose()
    return {"seconds": seconds, "trade_date": str(adv.trade_date), "bars": adv.bars,
            "restated": adv.restated, "restated_history_rows": int(restated_rows)}


def work_verify(p: dict) -> dict:
    """Fresh full export vs the incremental snapshot: equal frames, byte-equal bins."""
    import numpy as np
    import pandas as pd

    ex = _exporter(p["url"], p["root"])
    ex.export_full(p["fresh_id"], START, options=_options(p["variant"]))
    ex.reader.engine.dispose()
    root = Path(p["root"])
    a = pd.read_hdf(root / p["snapshot_id"] / "daily_pv.h5", key="data")
    b = pd.read_hdf(root / p["fresh_id"] / "daily_pv.h5", key="data")
    frames_equal = a.index.equals(b.index) and list(a.columns) == list(b.columns) and all(
        np.array_equal(a[c].to_numpy(), b[c].to_numpy(), equal_nan=True) for c in a.columns)
    fa, fb = root / p["snapshot_id"] / "features", root / p["fresh_id"] / "features"
    files_a = sorted(q.relative_to(fa) for q in fa.rglob("*.bin"))
    files_b = sorted(q.relative_to(fb) for q in fb.rglob("*.bin"))
    bins_equal = files_a == files_b and all((fa / q).read_bytes() == (fb / q).read_bytes() for q in files_a)
    same_text = all((root / p["snapshot_id"] / f).read_text() == (root / p["fresh_id"] / f).read_text()
                    for f in ("calendars/day.txt", "instruments/all.txt"))
    return {"frames_equal": bool(frames_equal), "bins_equal": bool(bins_equal), "bin_files": len(files_a),
            "calendar_instruments_equal": bool(same_text), "rows": len(a)}


def _result_doc(r) -> dict:
    doc = r.summary()
    doc["start"], doc["end"] = str(doc["start"]), str(doc["end"])
    doc["restated_count"] = len(doc.pop("restated"))
    doc["seconds"] = r.timings.get("total")
    return doc


WORKERS = {"seed": work_seed, "baseline": work_baseline, "limit": work_limit, "full": work_full,
           "incremental": work_incremental, "advance": work_advance, "verify": work_verify}


def worker_main(task: str, params_file: str, out_file: str) -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")
    params = json.loads(Path(params_file).read_text())
    doc = WORKERS[task](params)
    doc["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_file).write_text(json.dumps(doc, default=str))


# ============================================================================================ driver


def run_worker(task: str, params: dict, tmp: Path, label: str) -> dict:
    """Run one worker process; returns its JSON plus wall seconds and the child's peak RSS (os.wait4)."""
    pfile, ofile = tmp / f"{label}.params.json", tmp / f"{label}.out.json"
    pfile.write_text(json.dumps(params, default=str))
    if ofile.exists():
        ofile.unlink()
    # Untimed: flush what earlier measurements wrote or deleted (a full export writes one file per
    # instrument and field), so no run pays for another's writeback.
    os.sync()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_worker", task, str(pfile), str(ofile)],
                            cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not ofile.exists():
        raise SystemExit(f"worker {label} ({task}) failed with exit code {proc.returncode}")
    doc = json.loads(ofile.read_text())
    doc["wall_seconds"] = wall
    doc["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # this process only (not the database server's)
    doc["peak_rss_mb_wait4"] = usage.ru_maxrss / 1024
    return doc


def log(msg: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def file_creation_us(root: Path, files: int = 1000) -> float:
    """Microseconds per new 6 KB file under ``root``: a probe of the file system's state. On ext4 without
    a journal, new inodes skip recently freed ones one lookup each, so for minutes after a mass delete —
    the previous bench's snapshots, say — creating a file costs many times its usual time, which every bin
    of a full export then pays (docs/performance.md). The files stay until the bench deletes its
    snapshots: deleting them now would slow the next probe the same way."""
    probe = root / f".probe-{time.time_ns()}"
    probe.mkdir(parents=True)
    t = time.perf_counter()
    for i in range(files):
        fd = os.open(probe / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"\0" * 6000)
        os.close(fd)
    return (time.perf_counter() - t) / files * 1e6


def settle_file_system(root: Path, slow_us: float = 50.0, max_wait: float = 900.0) -> list[float]:
    """Wait (up to ``max_wait`` s) until creating files is no longer slow; returns the probes (µs/file)."""
    probes = [file_creation_us(root)]
    waited = 0.0
    while probes[-1] > slow_us and waited < max_wait:
        log(f"creating a file takes {probes[-1]:.0f} µs (a recent mass delete?); waiting for the file system")
        time.sleep(30)
        waited += 30
        probes.append(file_creation_us(root))
    return probes


def machine_facts() -> dict:
    import numpy
    import pandas
    import tables

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "python": platform.python_version(),
            "pandas": pandas.__version__, "numpy": numpy.__version__, "tables": tables.__version__,
            "kernel": platform.release(), "loadavg_start": os.getloadavg()}


def fmt_s(xs: list[float]) -> str:
    """A measurement's seconds for the log ("n/a" when it was not taken)."""
    return f"{median(xs):.1f} s" if xs else "n/a"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def prepare_database(instruments: int, days: int, pgdata: Path, db_url_arg: str | None, tmp: Path,
                     facts: dict) -> dict:
    """The seeded template (made once per size) and a fresh, vacuumed work copy of it: their names, the
    work database's URL, the admin URL, the embedded server if this call started it, and what it holds."""
    import psycopg
    from psycopg import sql as psql
    from sqlalchemy.engine import make_url

    from aistock_pipelines.db import libpq_url
    from aistock_pipelines.demo.market import MarketSpec
    from aistock_pipelines.embedded_db import admin_server

    admin_url, started_server = admin_server(db_url_arg, pgdata)

    def db_url(name: str) -> str:
        return libpq_url(make_url(admin_url).set(database=name).render_as_string(hide_password=False))

    spec = MarketSpec(n_instruments=instruments, n_trading_days=days, start=START)
    spec_hash = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    template, work = f"bench_market_{spec_hash}", f"bench_work_{spec_hash}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
        facts["postgres_settings"] = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in (
            "shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit")}
        facts["superuser"] = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        have = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (template,)).fetchone()
    seeded = None
    if have:
        with psycopg.connect(db_url(template), autocommit=True) as conn:
            try:
                got = conn.execute("SELECT spec FROM market.demo_market_info").fetchone()
            except psycopg.Error:
                got = None
        if got and got[0] == spec.to_json():
            seeded = {"reused": True}
    if seeded is None:
        log(f"seeding {instruments} instruments × {days} days into {template} (once per size)")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(template)))
            conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(template)))
        seeded = run_worker("seed", {"url": db_url(template), "instruments": instruments, "days": days}, tmp, "seed")
        seeded["reused"] = False
        log(f"seeded {seeded['bars']:,} bars in {seeded['seconds']:.0f} s")
    t = time.perf_counter()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(work)))
        conn.execute(psql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            psql.Identifier(work), psql.Identifier(template)))
    url = db_url(work)
    with psycopg.connect(url, autocommit=True) as conn:
        bars = conn.execute("SELECT count(*) FROM market.kline_daily_qfq").fetchone()[0]
        n_inst = conn.execute("SELECT count(DISTINCT ts_code) FROM market.kline_daily_qfq").fetchone()[0]
        db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        conn.execute("VACUUM ANALYZE")  # visibility map + statistics, as a maintained database has
    log(f"work database {work}: {bars:,} bars, {n_inst} instruments, {db_bytes / 2**30:.1f} GiB "
        f"(copied in {time.perf_counter() - t:.0f} s)")
    return {"url": url, "admin_url": admin_url, "work": work, "template": template, "server": started_server,
            "spec": spec.to_json(), "seed": seeded, "bars": bars, "instruments": n_inst, "db_bytes": db_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instruments", type=int, default=4000)
    ap.add_argument("--days", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    ap.add_argument("--baseline-repeat", type=int, default=None, help="runs of the slow baseline (default: --repeat)")
    ap.add_argument("--events", type=int, default=20, help="qfq restatements per appended day")
    ap.add_argument("--variants", default="allA,qlib", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--small", action="store_true", help="smoke run: 300 instruments × 250 days, 1 repeat")
    ap.add_argument("--db-url", help="an existing PostgreSQL server (admin URL with CREATEDB); default: embedded")
    ap.add_argument("--pgdata", type=Path, default=DEFAULT_PGDATA, help="embedded server data directory")
    ap.add_argument("--snapshots", type=Path, default=DEFAULT_SNAPSHOTS, help="scratch snapshot root")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: baseline,limit,full,incremental,verify")
    ap.add_argument("--keep", action="store_true", help="keep the work database and the snapshots")
    ap.add_argument("--drop-template", action="store_true", help="also drop the seeded template database")
    ap.add_argument("--json", type=Path, help="results file (default: bench/results/<stamp>-<size>.json)")
    ap.add_argument("--render", type=Path, help="print the tables of an earlier results file and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    if args.small:
        args.instruments, args.days, args.repeat = 300, 250, 1
    baseline_repeat = args.baseline_repeat or args.repeat
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}")

    import psycopg
    from psycopg import sql as psql

    facts = machine_facts()
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="aistock-bench-"))
    db = prepare_database(args.instruments, args.days, args.pgdata, args.db_url, tmp, facts)
    url, admin_url, work, template, started_server = db["url"], db["admin_url"], db["work"], db["template"], db["server"]
    try:
        root = args.snapshots
        if root.exists():  # a run with --keep left its snapshots
            shutil.rmtree(root)
            os.sync()
            log("removed the previous run's snapshots; waiting 45 s (a file system without a journal slows "
                "inode creation for ~35 s after a mass delete, see docs/performance.md)")
            time.sleep(45)
        root.mkdir(parents=True)
        res: dict = {"spec": db["spec"], "bars": db["bars"], "instruments": db["instruments"],
                     "db_bytes": db["db_bytes"], "seed": db["seed"], "machine": facts, "repeat": args.repeat, "baseline_repeat": baseline_repeat,
                     "events": args.events, "variants": variants, "started": datetime.now(timezone.utc).isoformat()}

        main_variant = variants[0]

        def kept(variant: str) -> str:
            """The last full run's snapshot: the limit reads its h5, the incremental runs extend it."""
            return f"bench_{variant}_{args.repeat - 1}"

        # Rounds: each round runs one baseline (while any are due), one full export per variant and one limit
        # measurement, so every ratio compares measurements taken minutes apart: the references themselves
        # drift over a long run (docs/performance.md). Each full run creates its own snapshot and none is
        # deleted before the end: on ext4 without a journal every new inode first skips, one lookup each,
        # the inodes freed shortly before, so bins written right after a mass delete are much slower.
        if "baseline" not in skip:
            res["baseline"] = []
        if "full" not in skip:
            res["file_creation_us"] = settle_file_system(root)
            log(f"file creation probe: {res['file_creation_us'][-1]:.0f} µs per file")
            res["full"] = {v: [] for v in variants}
        for i in range(max(args.repeat, 0 if "baseline" in skip else baseline_repeat)):
            if "baseline" not in skip and i < baseline_repeat:
                log(f"baseline {i + 1}/{baseline_repeat}: pandas.read_sql + to_hdf")
                res["baseline"].append(run_worker("baseline", {"url": url, "variant": main_variant,
                                                               "out_h5": str(root / "baseline.h5")}, tmp, f"baseline{i}"))
                log(f"  {res['baseline'][-1]['seconds']:.1f} s")
            if i >= args.repeat:
                continue
            for v in variants if "full" not in skip else []:
                log(f"full {v} {i + 1}/{args.repeat}")
                r = run_worker("full", {"url": url, "root": str(root), "snapshot_id": f"bench_{v}_{i}", "variant": v},
                               tmp, f"full_{v}{i}")
                res["full"][v].append(r)
                log(f"  {r['seconds']:.1f} s, {r['rows']:,} rows, peak RSS {r['peak_rss_mb_wait4']:.0f} MB")
            if "limit" not in skip:
                h5 = root / f"bench_{main_variant}_{i}" / "daily_pv.h5"
                if not h5.exists():
                    log("limit needs the full export's daily_pv.h5: skipped (run without --skip full)")
                    continue
                log(f"limit {i + 1}/{args.repeat}: COPY … TO '/dev/null' and to_hdf")
                r = run_worker("limit", {"url": url, "variant": main_variant, "h5_source": str(h5),
                                         "out_h5": str(root / "limit.h5")}, tmp, f"limit{i}")
                if "limit" not in res:
                    res["limit"] = r
                else:
                    for key, xs in r["runs"].items():
                        res["limit"]["runs"][key] += xs
                log(f"  COPY server {fmt_s(r['runs']['copy_server'])} (SQL join {fmt_s(r['runs']['copy_join_server'])}), "
                    f"STDOUT {fmt_s(r['runs']['copy_stdout'])}, to_hdf {fmt_s(r['runs']['to_hdf'])}")
        for v in variants if "full" not in skip else []:
            snap = root / kept(v)
            res["full"][v][-1]["snapshot_bytes"] = {
                "daily_pv.h5": (snap / "daily_pv.h5").stat().st_size,
                "features": sum(f.stat().st_size for f in (snap / "features").rglob("*.bin")),
                "bin_files": sum(1 for _ in (snap / "features").rglob("*.bin"))}
        if "incremental" not in skip and "full" not in skip:
            res["advance"], res["incremental"] = [], {v: [] for v in variants}
            for i in range(args.repeat):
                adv = run_worker("advance", {"url": url, "events": args.events}, tmp, f"advance{i}")
                res["advance"].append(adv)
                log(f"advanced to {adv['trade_date']}: {adv['bars']} bars, {len(adv['restated'])} restated "
                    f"({adv['restated_history_rows']:,} history rows)")
                for v in variants:
                    r = run_worker("incremental", {"url": url, "root": str(root), "snapshot_id": kept(v)},
                                   tmp, f"inc_{v}{i}")
                    res["incremental"][v].append(r)
                    log(f"  incremental {v}: {r['seconds']:.1f} s, mode {r['mode']}, rows read {r['rows_read']:,} "
                        f"of {r['rows']:,}, peak RSS {r['peak_rss_mb_wait4']:.0f} MB")
            if "verify" not in skip:
                res["verify"] = {}
                for v in variants:
                    log(f"verify {v}: fresh full export vs the incremental snapshot")
                    res["verify"][v] = run_worker("verify", {"url": url, "root": str(root), "snapshot_id": kept(v),
                                                             "fresh_id": f"fresh_{v}", "variant": v}, tmp, f"verify_{v}")
                    log(f"  {res['verify'][v]}")
        facts["loadavg_end"] = os.getloadavg()
        res["total_seconds"] = time.perf_counter() - t_all
        print()
        print(render(res))
        out = args.json or RESULTS_DIR / f"{datetime.now():%Y%m%dT%H%M%S}-{args.instruments}x{args.days}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))
        log(f"results: {out}  (total {res['total_seconds'] / 60:.1f} min)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.snapshots, ignore_errors=True)
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(work)))
                if args.drop_template:
                    conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(template)))
        if started_server is not None:
            started_server.stop()
    return 0


# ============================================================================================ report


def render(res: dict) -> str:
    """The markdown tables of docs/performance.md."""
    lines: list[str] = []
    rows = res["bars"]
    m = res["machine"]
    lines.append(f"{res['instruments']:,} instruments, {rows:,} bar rows ({res['spec']['n_trading_days']} trading "
                 f"days), PostgreSQL {m.get('postgres')}; {m['cores']} cores ({m['cpu']}), {m['mem_mb'] / 1024:.0f} GiB; "
                 f"medians of {res['repeat']} runs (baseline: {res['baseline_repeat']}); load average "
                 f"{m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f} at end.")
    lines.append("")
    lines.append("| measurement | median s | runs (s) | rows read from DB | peak RSS MB | client CPU s |")
    lines.append("|---|---:|---|---:|---:|---:|")

    def cpu(runs):
        xs = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
        return f"{median(xs):.1f}" if xs else ""

    def fmt_runs(xs):
        return ", ".join(f"{x:.1f}" for x in xs)

    base = res.get("baseline") or []
    b_med = median([r["seconds"] for r in base])
    if base:
        lines.append(f"| baseline: `pandas.read_sql` + `to_hdf` | {b_med:.1f} | {fmt_runs([r['seconds'] for r in base])} "
                     f"| {base[0]['rows']:,} | {max(r['peak_rss_mb_wait4'] for r in base):.0f} | {cpu(base)} |")
    lim = res.get("limit")
    l_med = float("nan")
    if lim:
        runs = lim["runs"]
        copy_key = "copy_server" if runs["copy_server"] else "copy_stdout"
        c, h = median(runs[copy_key]), median(runs["to_hdf"])
        l_med = c + h
        what = "COPY … TO '/dev/null' (server)" if copy_key == "copy_server" else "COPY … TO STDOUT (discarded)"
        lines.append(f"| limit: {what} of the exporter's per-table SELECTs + `to_hdf` | {l_med:.1f} | copy {fmt_runs(runs[copy_key])}; "
                     f"to_hdf {fmt_runs(runs['to_hdf'])} | {lim['rows']:,} | – | |")
        if runs["copy_server"]:
            lines.append(f"| (for reference) the same COPY … TO STDOUT read by psycopg | {median(runs['copy_stdout']):.1f} | "
                         f"{fmt_runs(runs['copy_stdout'])} | | | |")
        if runs.get("copy_join_server"):
            lines.append(f"| (for reference) COPY of the SQL join (the view's query) TO '/dev/null' | "
                         f"{median(runs['copy_join_server']):.1f} | {fmt_runs(runs['copy_join_server'])} | | | |")
    full_med: dict[str, float] = {}
    for v, runs in (res.get("full") or {}).items():
        full_med[v] = median([r["seconds"] for r in runs])
        lines.append(f"| full export `{v}` | {full_med[v]:.1f} | {fmt_runs([r['seconds'] for r in runs])} | "
                     f"{runs[0]['rows_read']:,} | {max(r['peak_rss_mb_wait4'] for r in runs):.0f} | {cpu(runs)} |")
    inc_med: dict[str, float] = {}
    for v, runs in (res.get("incremental") or {}).items():
        inc_med[v] = median([r["seconds"] for r in runs])
        lines.append(f"| incremental day `{v}` | {inc_med[v]:.1f} | {fmt_runs([r['seconds'] for r in runs])} | "
                     f"{_commas(r['rows_read'] for r in runs)} of {runs[-1]['rows']:,} in the snapshot | "
                     f"{max(r['peak_rss_mb_wait4'] for r in runs):.0f} | {cpu(runs)} |")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    main = next(iter(full_med), None)
    if main and base:
        s = b_med / full_med[main]
        lines.append(f"| full ≥ 4× faster than baseline | {s:.1f}× (`{main}`) | {'yes' if s >= 4 else 'no'} |")
    if main and lim:
        q = full_med[main] / l_med
        lines.append(f"| full ≤ 2× limit | {q:.2f}× (`{main}`) | {'yes' if q <= 2 else 'no'} |")
    for v in inc_med:
        if v in full_med:
            q = inc_med[v] / full_med[v]
            lines.append(f"| incremental ≤ 1/3 of full | {q:.2f} (`{v}`) | {'yes' if q <= 1 / 3 else 'no'} |")
    for v, runs in (res.get("incremental") or {}).items():
        adv = res["advance"]
        expect = [a["bars"] + a["restated_history_rows"] for a in adv]
        ok = all(r["rows_read"] <= e for r, e in zip(runs, expect))
        lines.append(f"| incremental reads only the new day + restated histories | read "
                     f"{_commas(r['rows_read'] for r in runs)}; new day + restated = "
                     f"{_commas(expect)} (`{v}`) | {'yes' if ok else 'no'} |")
    for v, runs in (res.get("full") or {}).items():
        peak = max(r["peak_rss_mb_wait4"] for r in runs)
        lines.append(f"| full export peak RSS < 3 GB | {peak / 1024:.2f} GB (`{v}`) | {'yes' if peak < 3 * 1024 else 'no'} |")
    for v, doc in (res.get("verify") or {}).items():
        ok = doc["frames_equal"] and doc["bins_equal"] and doc["calendar_instruments_equal"]
        lines.append(f"| incremental snapshot == fresh full export | h5 frames equal: {doc['frames_equal']}, "
                     f"{doc['bin_files']:,} bins byte-equal: {doc['bins_equal']} (`{v}`) | {'yes' if ok else 'no'} |")
    lines.append("")
    phases = sorted({k for kind in ("full", "incremental") for runs in (res.get(kind) or {}).values()
                     for r in runs for k in r["timings"]}, key=_phase_order)
    if phases:
        lines.append("Per-phase medians (seconds, from `ExportResult.timings`):")
        lines.append("")
        cols = [(kind, v) for kind in ("full", "incremental") for v in (res.get(kind) or {})]
        lines.append("| phase | " + " | ".join(f"{k} `{v}`" for k, v in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for ph in phases:
            cells = []
            for kind, v in cols:
                xs = [r["timings"][ph] for r in res[kind][v] if ph in r["timings"]]
                cells.append(f"{median(xs):.2f}" if xs else "")
            lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    if base:
        ph = {k: median([r["phases"][k] for r in base]) for k in base[0]["phases"]}
        lines.append("")
        lines.append("Baseline phases (median s): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) + ".")
    return "\n".join(lines)


def _commas(xs) -> str:
    return ", ".join(f"{x:,}" for x in xs)


def _phase_order(name: str) -> tuple[int, str]:
    order = ["checksums", "read_db", "read_snapshot", "frame", "write_bins", "write_h5", "write_rdagent",
             "hash_h5", "wait_bins", "write_meta", "swap", "write_meta_repo", "total"]
    return (order.index(name) if name in order else len(order) - 1, name)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        worker_main(*sys.argv[2:5])
    else:
        sys.exit(main())

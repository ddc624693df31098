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
from datetime import date
from pathlib import Path
from typing import Sequence

from aistock_pipelines.settings import ENV_VARS, Settings

log = logging.getLogger("aistock_pipelines")


def _settings() -> Settings:
    return Settings.from_env()


# ------------------------------------------------------------------------------------------------- db


def cmd_db(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import redact, resolve_db_url
    from aistock_pipelines.embedded_db import EmbeddedPostgres

    settings = _settings()
    if args.action in ("start", "stop", "status") and not settings.uses_embedded_db:
        print(f"AISTOCK_DB_URL is set ({redact(settings.db_url or '')}); the embedded server is not used.")
        return 0
    server = EmbeddedPostgres(settings.embedded_pgdata)
    if args.action == "start":
        print(server.start())
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    elif args.action == "status":
        print(f"{'running' if server.is_running() else 'stopped'}: {server.pgdata}")
    elif args.action == "url":
        # The embedded URL has no password; a configured one is printed redacted.
        url = resolve_db_url(settings)
        print(url if settings.uses_embedded_db else redact(url))
    return 0


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo_seed(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import create_db_engine, resolve_db_url
    from aistock_pipelines.demo.market import MarketSpec, seed_demo_market

    spec = MarketSpec(n_instruments=args.instruments, n_trading_days=args.days,
                      start=date.fromisoformat(args.start), seed=args.seed, factor_tables=not args.no_factor_tables)
    engine = create_db_engine(resolve_db_url(_settings()))
    summary = seed_demo_market(engine, spec)
    print(json.dumps(summary.__dict__, default=str, indent=2))
    return 0


def cmd_demo_advance(args: argparse.Namespace) -> int:
    from aistock_pipelines.db import create_db_engine, resolve_db_url
    from aistock_pipelines.demo.market import advance_market

    engine = create_db_engine(resolve_db_url(_settings()))
    for _ in range(args.days):
        result = advance_market(engine, events=args.events)
        print(f"{result.trade_date}: {result.bars} bars, suspended {result.suspended}, restated {result.restated}")
    return 0


def cmd_demo_run(args: argparse.Namespace) -> int:
    from aistock_pipelines.demo_run import run_demo

    serve = not (args.no_serve or os.environ.get("AISTOCK_DEMO_NO_SERVE", "") not in ("", "0"))
    return run_demo(_settings(), serve=serve, reseed=args.reseed, port=args.port)


# ------------------------------------------------------------------------------------------- settings


def cmd_settings(_: argparse.Namespace) -> int:
    from aistock_pipelines.db import redact

    settings = _settings()
    for name, (default, meaning) in ENV_VARS.items():
        value = os.environ.get(name, "")
        if value and name.endswith("DB_URL"):
            value = redact(value)
        print(f"{name:24} {value or '(default: ' + default + ')'}\n{'':24} {meaning}")
    print(f"\nresolved: deployment={settings.deployment} home={settings.home} snapshots={settings.snapshot_root}")
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aistock-pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the embedded PostgreSQL server (used when AISTOCK_DB_URL is unset)")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    db.set_defaults(func=cmd_db)

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
    run = demo_sub.add_parser("run", help="seed, materialize the demo snapshots, serve the Dagster UI")
    run.add_argument("--no-serve", action="store_true", help="exit after materializing (or AISTOCK_DEMO_NO_SERVE=1)")
    run.add_argument("--reseed", action="store_true", help="recreate the demo market even if present")
    run.add_argument("--port", type=int, default=3000)
    run.set_defaults(func=cmd_demo_run)

    settings = sub.add_parser("settings", help="print every environment setting and its value")
    settings.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``aistock-pipelines doctor`` on the demo (a seeded database, a results server on 127.0.0.1, a Dagster
home) and with one thing broken at a time: each failure is named with its fix, and no secret is printed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from aistock_pipelines import doctor
from aistock_pipelines.db import libpq_url
from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir
from aistock_pipelines.demo_run import prepare_dagster_home
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES
from aistock_pipelines.rdagent.results_server import serve_in_thread
from aistock_pipelines.settings import ENV_VARS, Settings
from aistock_pipelines_tests.dagster_pg import dagster_pg_env

pytestmark = pytest.mark.db
REPO = Path(__file__).resolve().parents[1]
DB_SECRET = "db-secret-4711"
PG_SECRET = "pg-secret-0815"
CHECKS = ["settings", "snapshots file", "database", "tables", "snapshot root", "DAGSTER_HOME", "Dagster storage",
          "Dagster pools", "results API", "factor package"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def results_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_in_thread(build_demo_results_dir(tmp_path_factory.mktemp("results")), "127.0.0.1", 0) as url:
        yield url


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_password(url: str) -> str:
    return libpq_url(make_url(url).set(password=DB_SECRET).render_as_string(hide_password=False))


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, market_ro: str, results_url: str) -> Callable[..., dict]:
    """Configure this process like the demo (overrides: variable → value, None = unset); returns the env."""
    def configure(**overrides: str | None) -> dict[str, str]:
        env = {"AISTOCK_DB_URL": with_password(market_ro), "AISTOCK_HOME": str(tmp_path / "home"),
               "AISTOCK_SNAPSHOT_ROOT": str(tmp_path / "snapshots"), "RDAGENT_RESULTS_URL": results_url,
               "AISTOCK_FACTOR_PACKAGES": ",".join(DEMO_FACTOR_PACKAGES)}
        env["DAGSTER_HOME"] = str(prepare_dagster_home(Settings.from_env(env)))  # the demo's SQLite instance
        env.update(overrides)
        for name in [*ENV_VARS, "DAGSTER_HOME", "PGHOST", *(k for k in os.environ if k.startswith("DAGSTER_PG_"))]:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            if value is not None:
                monkeypatch.setenv(name, value)
        return {k: v for k, v in env.items() if v is not None}
    return configure


def run() -> tuple[dict[str, doctor.Check], str, int]:
    checks = doctor.run_checks()
    assert [c.name for c in checks] == CHECKS
    text = doctor.report(checks)
    assert DB_SECRET not in text and PG_SECRET not in text
    assert len(text.splitlines()) == len(CHECKS) + 1
    return {c.name: c for c in checks}, text, doctor.exit_code(checks)


def room_status(path: Path) -> str:
    """What the snapshot root's check says about this machine's free space (a shared disk may be short)."""
    return "OK" if shutil.disk_usage(path).free >= doctor.MIN_FREE_BYTES else "WARN"


def test_passes_on_the_demo(demo_env, tmp_path):
    env = demo_env()
    checks, text, code = run()
    assert code == 0, text  # a warning does not fail the command
    pools = checks["Dagster pools"]
    assert pools.status == "WARN" and "no stored limit for adhoc_snapshot_export, snapshot_demo_allA" in pools.detail
    # the fix, run as printed: Dagster's own CLI stores the limits
    subprocess.run(pools.fix, shell=True, check=True, capture_output=True, timeout=300,
                   env={**os.environ, **env, "PATH": f"{BIN}:{os.environ['PATH']}"})
    checks, text, code = run()
    assert code == 0 and {c.status for n, c in checks.items() if n != "snapshot root"} == {"OK"}, text
    assert checks["snapshot root"].status == room_status(tmp_path), text
    assert "3 pools with stored limits" in checks["Dagster pools"].detail
    assert "PostgreSQL" in checks["database"].detail and "postgresql://postgres:***@" in checks["database"].detail
    assert "5 tables, 29 columns" in checks["tables"].detail and "market.moneyflow" in checks["tables"].detail
    assert "atomic rename, symlink swap, hard links and flock work" in checks["snapshot root"].detail
    assert "SqliteRunStorage" in checks["Dagster storage"].detail
    assert "rd_factors_lib (from aistock_pipelines.demo.rd_factors_lib) 2026" in checks["factor package"].detail
    assert text.splitlines()[-1] == "10 OK, 0 WARN, 0 FAIL"


def test_production_instance_on_postgresql(demo_env, pg_server, tmp_path):
    """The repository's dagster.yaml, unchanged, with DAGSTER_PG_* credentials (whose password is never shown)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    demo_env(AISTOCK_DEPLOYMENT="production", DAGSTER_HOME=str(home),
             **dagster_pg_env(pg_server.create_database("doctor_dagster"), password=PG_SECRET))
    checks, text, code = run()
    assert code == 0, text
    assert "PostgresRunStorage answers (0 runs recorded)" in checks["Dagster storage"].detail
    assert "concurrency, run_coordinator, run_launcher, storage, telemetry" in checks["DAGSTER_HOME"].detail
    demo_env(AISTOCK_DEPLOYMENT="production", DAGSTER_HOME=str(home), DAGSTER_PG_PASSWORD=None,
             **{k: v for k, v in dagster_pg_env(pg_server.admin_url).items() if k != "DAGSTER_PG_PASSWORD"})
    checks, text, code = run()
    assert code == 1 and checks["DAGSTER_HOME"].status == "FAIL"
    assert "reads unset variables DAGSTER_PG_PASSWORD" in checks["DAGSTER_HOME"].line()


def test_database_down(demo_env, tmp_path):
    port = closed_port()
    demo_env(AISTOCK_DB_URL=f"postgresql://reader:{DB_SECRET}@127.0.0.1:{port}/aistock")
    checks, text, code = run()
    assert code == 1
    line = checks["database"].line()
    assert line.startswith("FAIL  database") and f"cannot connect to postgresql://reader:***@127.0.0.1:{port}/aistock" in line
    assert "fix: start the server or correct AISTOCK_DB_URL" in line
    assert checks["tables"].status == "WARN" and "not checked" in checks["tables"].detail
    assert checks["settings"].status == "OK" and checks["snapshot root"].status == room_status(tmp_path)


def test_missing_column_and_wrong_type(demo_env, market_db):
    with psycopg.connect(market_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE market.kline_daily_qfq DROP COLUMN amount_li CASCADE")
    demo_env(AISTOCK_DB_URL=market_db)
    checks, text, code = run()
    assert code == 1
    line = checks["tables"].line()
    assert line.startswith("FAIL  tables") and "table market.kline_daily_qfq has no column(s) ['amount_li']" in line
    assert "fix: create the table/column, or map the field" in line
    with psycopg.connect(market_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE market.kline_daily_qfq ADD COLUMN amount_li int8")
        conn.execute("ALTER TABLE market.trading_calendar ALTER COLUMN is_trading TYPE text")
    checks, text, code = run()
    assert code == 1 and "market.trading_calendar.is_trading is text, expected boolean" in checks["tables"].line()
    assert "fix: alter the column type or map another column" in checks["tables"].line()


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: chmod for a normal user; root ignores modes, so
    then a kernel file system that refuses new entries (sysfs)."""
    if os.geteuid() != 0:
        path = tmp_path / "readonly"
        path.mkdir(mode=0o555)
        return path
    path = Path("/sys")
    try:
        (path / "aistock-probe").mkdir()
    except OSError:
        return path
    (path / "aistock-probe").rmdir()
    pytest.skip("no directory here refuses root's writes")


def test_a_snapshot_root_short_of_room_is_a_warning(demo_env, tmp_path, monkeypatch):
    demo_env()
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free + 1024**3)
    checks, text, code = run()
    assert code == 0 and checks["snapshot root"].status == "WARN", text
    assert "fix: free space: a snapshot needs room for two versions" in checks["snapshot root"].line()


def test_unwritable_snapshot_root(demo_env, tmp_path):
    root = unwritable_dir(tmp_path)
    demo_env(AISTOCK_SNAPSHOT_ROOT=str(root))
    checks, text, code = run()
    assert code == 1
    line = checks["snapshot root"].line()
    assert line.startswith("FAIL  snapshot root") and f" {root} is not writable: " in line
    assert "give the pipelines' user write access, or set AISTOCK_SNAPSHOT_ROOT" in line


def test_dagster_home_unset(demo_env):
    demo_env(DAGSTER_HOME=None)
    checks, text, code = run()
    assert code == 1
    line = checks["DAGSTER_HOME"].line()
    assert line.startswith("FAIL  DAGSTER_HOME") and "DAGSTER_HOME is not set" in line
    assert "export DAGSTER_HOME=/srv/dagster" in line
    assert checks["Dagster storage"].status == "WARN" and "not checked" in checks["Dagster storage"].detail
    assert checks["Dagster pools"].status == "WARN" and "not checked" in checks["Dagster pools"].detail


def test_results_api_down(demo_env):
    demo_env(RDAGENT_RESULTS_URL=f"http://127.0.0.1:{closed_port()}")
    checks, text, code = run()
    assert code == 1 and [c.name for c in checks.values() if c.status == "FAIL"] == ["results API"]
    assert "nothing answers http://127.0.0.1:" in checks["results API"].line()
    assert "set RDAGENT_RESULTS_URL" in checks["results API"].line()


def test_the_command_line(demo_env, tmp_path):
    env = {**os.environ, **demo_env()}
    cli = [sys.executable, "-m", "aistock_pipelines.cli", "doctor"]
    ok = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    statuses = {line[6:23].strip(): line.split()[0] for line in ok.stdout.splitlines()[:-1]}
    expected = {**{name: "OK" for name in CHECKS}, "Dagster pools": "WARN", "snapshot root": room_status(tmp_path)}
    assert statuses == expected, ok.stdout
    env.pop("DAGSTER_HOME")
    failed = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert failed.returncode == 1 and "FAIL  DAGSTER_HOME" in failed.stdout
    assert DB_SECRET not in ok.stdout + ok.stderr + failed.stdout + failed.stderr

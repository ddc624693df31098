"""The production deployment end to end, started the way an operator starts it, driven through the
webserver's GraphQL API (what the UI calls).

Started here: a database of its own for Dagster's storage on the test PostgreSQL server, ``DAGSTER_HOME``
holding the repository's ``dagster.yaml`` unchanged (credentials from ``DAGSTER_PG_*``), the code location as
a gRPC code server (``dagster code-server start``) named in a workspace file (deploy/workspace.yaml with this
host's address), ``dagster-webserver`` and ``dagster-daemon``; an AIstock market ending yesterday with a
trade calendar a year ahead; an RD-Agent results server on 127.0.0.1. Partition keys come from the
webserver (the assets' own partitions definitions), days from the trade calendar. Everything is stopped at
the end and the test checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pandas as pd
import psycopg
import pytest
import yaml

from aistock_pipelines.db import create_db_engine, libpq_url
from aistock_pipelines.demo import cn_calendar
from aistock_pipelines.demo.market import MarketSpec, seed_demo_market
from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir
from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_writer import SnapshotWriter
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES
from aistock_pipelines.rdagent.results_server import serve_in_thread
from aistock_pipelines.settings import ENV_VARS
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.dagster_pg import dagster_pg_env
from aistock_pipelines_tests.test_deploy import LOCATION, option

pytestmark = [pytest.mark.slow, pytest.mark.db]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHANGHAI = ZoneInfo("Asia/Shanghai")
REPOSITORY = "__repository__"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
#: Snapshots of the test's declarations: one backfilled, two written by concurrent runs.
FULL, POOLED, BESIDE = "e2e_full", "e2e_pooled", "e2e_beside"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """One long-running Dagster process in a session (process group) of its own, logging to a file."""

    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        """SIGTERM to the whole group (the code server's run workers too), SIGKILL after 30 s."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class Deployment:
    env: dict[str, str]
    home: Path
    market_url: str
    dagster_url: str
    results_dir: Path
    snapshots_yaml: Path
    services: dict[str, Service]
    web_port: int
    last_bar: date
    extra: dict[str, Any] = field(default_factory=dict)

    # --------------------------------------------------------------------------------- GraphQL
    def gql(self, query: str, **variables: Any) -> dict:
        reply = httpx.post(f"http://127.0.0.1:{self.web_port}/graphql", json={"query": query, "variables": variables},
                           timeout=120).json()
        assert "errors" not in reply, (reply["errors"], self.logs())
        return reply["data"]

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{s.tail()}" for name, s in self.services.items())

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 240, every: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(every)

    # --------------------------------------------------------------------------------- lifecycle
    def start(self, *names: str) -> None:
        for name in names:
            self.services[name].start(self.env, self.home)
            if name == "code-server":  # the health check deploy/compose.yaml uses too
                self.wait("the code server", self._code_server_healthy, timeout=180)
        if "webserver" in names:
            self.wait("the webserver and the code location", self._location_loaded, timeout=300)
        if "daemon" in names:
            self.wait("a healthy daemon", self._daemon_healthy, timeout=180)

    def stop(self, *names: str) -> None:
        for name in names:
            self.services[name].stop()

    def _code_server_healthy(self) -> bool:
        port = option(self.services["code-server"].args, "-p")
        check = subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "-h", "127.0.0.1", "-p", port],
                               env=self.env, capture_output=True, timeout=60)
        return check.returncode == 0

    def _location_loaded(self) -> bool:
        try:
            data = self.gql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                            "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
        except (httpx.HTTPError, ValueError):
            return False
        entries = data["workspaceOrError"]["locationEntries"]
        loaded = [e for e in entries if e["name"] == LOCATION and e["loadStatus"] == "LOADED"]
        if loaded and loaded[0]["locationOrLoadError"]["__typename"] == "PythonError":
            raise AssertionError(f"the code location failed to load: {loaded[0]['locationOrLoadError']['message']}")
        return bool(loaded)

    def _daemon_healthy(self) -> bool:
        data = self.gql("{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }")
        healthy = {d["daemonType"] for d in data["instance"]["daemonHealth"]["allDaemonStatuses"] if d["healthy"]}
        return {"SCHEDULER", "SENSOR", "BACKFILL", "QUEUED_RUN_COORDINATOR"} <= healthy

    # --------------------------------------------------------------------------------- queries
    def runs(self, tag: tuple[str, str] | None = None) -> list[dict]:
        flt = {"tags": [{"key": tag[0], "value": tag[1]}]} if tag else {}
        data = self.gql("query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { "
                        "runId jobName status startTime endTime tags { key value } } } } }", f=flt)
        return data["runsOrError"]["results"]

    def run(self, run_id: str) -> dict:
        return next(r for r in self.runs() if r["runId"] == run_id)

    def wait_runs_finished(self, run_ids: list[str], timeout: float = 300) -> list[dict]:
        def finished() -> list[dict] | None:
            by_id = {r["runId"]: r for r in self.runs()}
            done = [by_id[i] for i in run_ids if i in by_id and by_id[i]["status"] in FINISHED]
            return done if len(done) == len(run_ids) else None
        runs = self.wait(f"runs {run_ids} to finish", finished, timeout=timeout)
        failed = [r["runId"] for r in runs if r["status"] != "SUCCESS"]
        assert not failed, f"runs failed: {failed}\n{self.logs()}"
        return runs

    def partition_keys(self, snapshot_id: str) -> list[str]:
        data = self.gql("query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode { "
                        "partitionKeys } } }", k={"path": ["snapshots", snapshot_id]})
        return data["assetNodeOrError"]["partitionKeys"]

    def sensor(self, name: str) -> dict:
        data = self.gql("query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { "
                        "sensorState { status typeSpecificData { ... on SensorData { lastCursor } } "
                        "ticks(limit: 50) { status timestamp runIds skipReason error { message } } } } } }",
                        s={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name})
        return data["sensorOrError"]["sensorState"]

    def schedules(self, future_ticks: int = 0) -> dict[str, dict]:
        ticks = (f"futureTicks(limit: {future_ticks}) {{ results {{ timestamp evaluationResult {{ skipReason "
                 "error { message } runRequests { runKey tags { key value } } } } }") if future_ticks else ""
        data = self.gql("query($r: RepositorySelector!) { schedulesOrError(repositorySelector: $r) { "
                        "... on Schedules { results { name cronSchedule executionTimezone "
                        f"scheduleState {{ id status }} {ticks} }} }} }} }}",
                        r={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY})
        return {s["name"]: s for s in data["schedulesOrError"]["results"]}

    def event_count(self, run_id: str) -> int:
        data = self.gql("query($id: ID!) { logsForRun(runId: $id, limit: 100000) { ... on EventConnection { "
                        "events { __typename } } } }", id=run_id)
        return len(data["logsForRun"]["events"])


# ------------------------------------------------------------------------------------------ set-up


def recent_market() -> MarketSpec:
    """40 instruments whose last bar is the last trading day before today (Asia/Shanghai), so the trade
    calendar (seeded a year past the last bar) covers the schedules' next ticks."""
    today = datetime.now(SHANGHAI).date()
    start = today - timedelta(days=150)
    days = [d for d, trading in cn_calendar.calendar_days(start, today - timedelta(days=1)) if trading]
    return MarketSpec(n_instruments=40, start=days[0], n_trading_days=len(days), seed=20261204)


def write_snapshots_yaml(path: Path, start: date) -> None:
    demo = yaml.safe_load((REPO / "aistock_pipelines" / "demo" / "snapshots.yaml").read_text())
    declarations = [
        {"id": FULL, "start": start.isoformat(), "end": None, "columns": "plain", "instruments": "ts_code",
         "dtype": "float64"},
        {"id": POOLED, "start": start.isoformat(), "end": None, "columns": "dollar", "instruments": "qlib",
         "dtype": "float32", "factor_tables": []},
        {"id": BESIDE, "start": start.isoformat(), "end": None, "factor_tables": ["moneyflow"]},
    ]
    path.write_text(yaml.safe_dump({"factor_tables": demo["factor_tables"], "snapshots": declarations}))


def workspace_file(path: Path, port: int) -> None:
    """deploy/workspace.yaml, pointed at this host's code server."""
    workspace = yaml.safe_load((REPO / "deploy" / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=port)
    path.write_text(yaml.safe_dump(workspace))


def services(home: Path, workspace: Path, grpc_port: int, web_port: int) -> dict[str, Service]:
    return {
        "code-server": Service("code-server", [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1",
                                               "-p", str(grpc_port), "-m", "aistock_pipelines.definitions",
                                               "--location-name", LOCATION], home / "code-server.log"),
        "webserver": Service("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port),
                                           "-w", str(workspace)], home / "webserver.log"),
        "daemon": Service("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], home / "daemon.log"),
    }


def deployment_env(home: Path, market_url: str, dagster_url: str, results_url: str, yaml_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS and not k.startswith("DAGSTER_") and k != "PGHOST"}
    dagster_home = home / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")  # unchanged
    return {**base, **dagster_pg_env(dagster_url, password="e2e-unused"), "DAGSTER_HOME": str(dagster_home),
            "AISTOCK_DEPLOYMENT": "production", "AISTOCK_DB_URL": market_url, "AISTOCK_HOME": str(home / "aistock"),
            "AISTOCK_SNAPSHOT_ROOT": str(home / "snapshots"), "AISTOCK_SNAPSHOTS_FILE": str(yaml_path),
            "RDAGENT_RESULTS_URL": results_url, "AISTOCK_FACTOR_PACKAGES": ",".join(DEMO_FACTOR_PACKAGES)}


def leftovers(dagster_home: str) -> list[str]:
    """Processes whose environment names this deployment's DAGSTER_HOME (every process it started), by ps."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"DAGSTER_HOME={dagster_home}".encode() in environ:
            found.append(f"{pid} {args}")
    return found


@pytest.fixture(scope="module")
def deployment(pg_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("production")
    spec = recent_market()
    market_url = pg_server.create_database("e2e_market")
    engine = create_db_engine(market_url)
    summary = seed_demo_market(engine, spec)
    engine.dispose()
    dagster_url = pg_server.create_database("e2e_dagster")
    results_dir = build_demo_results_dir(home / "rdagent_results")
    yaml_path = home / "snapshots.yaml"
    write_snapshots_yaml(yaml_path, spec.start)
    grpc_port, web_port = free_port(), free_port()
    workspace_file(home / "workspace.yaml", grpc_port)
    with ExitStack() as stack:
        results_url = stack.enter_context(serve_in_thread(results_dir, "127.0.0.1", 0))
        env = deployment_env(home, market_url, dagster_url, results_url, yaml_path)
        dep = Deployment(env, home, market_url, dagster_url, results_dir, yaml_path,
                         services(home, home / "workspace.yaml", grpc_port, web_port), web_port, summary.last_date)
        stack.callback(dep.stop, "daemon", "webserver", "code-server")
        dep.start("code-server", "webserver", "daemon")
        dep.extra["doctor"] = apply_doctor_fixes(dep)
        yield dep


def doctor(dep: Deployment) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aistock_pipelines.cli", "doctor"], env=dep.env, cwd=dep.home,
                          capture_output=True, text=True, timeout=300)


def apply_doctor_fixes(dep: Deployment) -> str:
    """What an operator does on a new deployment: run the doctor and apply the fix it prints for the pools
    (Dagster stores a pool's limit only when it first dequeues one of its runs)."""
    first = doctor(dep)
    pools = next(line for line in first.stdout.splitlines() if line.startswith("WARN  Dagster pools"))
    fix = pools.split(" — fix: ", 1)[1]
    env = {**dep.env, "PATH": f"{BIN}:{dep.env['PATH']}"}
    subprocess.run(fix, shell=True, check=True, capture_output=True, timeout=300, env=env, cwd=dep.home)
    return first.stdout


# ------------------------------------------------------------------------------------------ helpers


def launch_backfill(dep: Deployment, snapshot_id: str, start: str, end: str) -> str:
    data = dep.gql("mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { "
                   "__typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }",
                   p={"partitionsByAssets": [{"assetKey": {"path": ["snapshots", snapshot_id]},
                                              "partitions": {"range": {"start": start, "end": end}}}]})
    result = data["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def launch_partition_runs(dep: Deployment, requests: list[tuple[str, str]]) -> list[str]:
    """One request, several runs (as the UI's multi-launch): (snapshot id, partition key) each."""
    params = [{"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                            "jobName": f"snapshot_{sid}_job"},
               "executionMetadata": {"tags": [{"key": "dagster/partition", "value": key}]}} for sid, key in requests]
    data = dep.gql("mutation($p: [ExecutionParams!]!) { launchMultipleRuns(executionParamsList: $p) { "
                   "__typename ... on LaunchMultipleRunsResult { launchMultipleRunsResult { __typename "
                   "... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } } } }", p=params)
    results = data["launchMultipleRuns"]["launchMultipleRunsResult"]
    assert all(r["__typename"] == "LaunchRunSuccess" for r in results), results
    return [r["run"]["runId"] for r in results]


def registered_through(dep: Deployment, snapshot_id: str) -> list[str] | None:
    """The snapshot's partition keys once they reach the last bar (and nothing later), else None."""
    keys = dep.partition_keys(snapshot_id)
    return keys if keys and date.fromisoformat(keys[-1]) == dep.last_bar else None


def trading_days(url: str, after: date, count: int) -> list[date]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date > %s "
                            "ORDER BY cal_date LIMIT %s", (after, count)).fetchall()
    return [r[0] for r in rows]


def is_trading(url: str, day: date) -> bool:
    with psycopg.connect(libpq_url(url)) as conn:
        return conn.execute("SELECT is_trading FROM market.trading_calendar WHERE cal_date = %s", (day,)).fetchone()[0]


def direct_export(dep: Deployment, snapshot_id: str, root: Path) -> Path:
    config = load_snapshots_file(dep.snapshots_yaml)
    decl = config.get(snapshot_id)
    engine = create_db_engine(dep.market_url)
    exporter = QlibDailyExporter(DBReader(engine, config.export_mapping(), dep.market_url), SnapshotWriter(root),
                                 MetaRepo(engine))
    result = exporter.export_full(f"{snapshot_id}_direct", decl.start, dep.last_bar, decl.ts_codes,
                                  options=decl.options())
    engine.dispose()
    return result.path


def assert_same_snapshot(a: Path, b: Path) -> None:
    """Same frame value for value, same calendar, instruments and bins byte for byte."""
    pd.testing.assert_frame_equal(pd.read_hdf(a / "daily_pv.h5", "data"), pd.read_hdf(b / "daily_pv.h5", "data"),
                                  check_exact=True)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".txt", ".bin"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix in (".txt", ".bin"))
    assert len(files) > 40
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []


# ------------------------------------------------------------------------------------------ tests


def test_doctor_checks_the_production_deployment(deployment: Deployment):
    dep = deployment
    first = dep.extra["doctor"].splitlines()
    assert [line.split()[0] for line in first[:-1]].count("WARN") == 1, first  # only the pools, fixed since
    after = doctor(dep)
    assert after.returncode == 0 and after.stdout.splitlines()[-1] == "10 OK, 0 WARN, 0 FAIL", after.stdout
    assert "PostgresRunStorage answers" in after.stdout and "deployment production" in after.stdout
    assert "e2e-unused" not in after.stdout + after.stderr


def test_a_partition_range_backfill_is_one_daemon_run_equal_to_a_direct_export(deployment: Deployment, tmp_path):
    dep = deployment
    # on a new instance the snapshot_trading_days sensor registers the partitions: the trading days with bars
    keys = dep.wait("the trading days registered by the sensor", lambda: registered_through(dep, FULL), timeout=240)
    start = load_snapshots_file(dep.snapshots_yaml).get(FULL).start
    assert keys == [d.isoformat() for d in trading_days(dep.market_url, start - timedelta(days=1), len(keys))]
    backfill_id = launch_backfill(dep, FULL, keys[0], keys[-1])
    dep.extra["pool_runs"] = launch_partition_runs(  # started now, checked in the next test (they overlap)
        dep, [(POOLED, keys[-1]), (POOLED, keys[-1]), (BESIDE, keys[-1])])
    direct = direct_export(dep, FULL, tmp_path)  # meanwhile, in this process
    runs = dep.wait("the backfill's run", lambda: dep.runs(("dagster/backfill", backfill_id)), timeout=180)
    [run] = dep.wait_runs_finished([r["runId"] for r in runs])
    assert len(dep.runs(("dagster/backfill", backfill_id))) == 1
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (keys[0], keys[-1])
    status = dep.wait("the backfill to complete", lambda: dep.gql(
        "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }",
        id=backfill_id)["partitionBackfillOrError"]["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), timeout=120)
    assert status
    meta = json.loads((dep.home / "snapshots" / FULL / "meta.json").read_text())
    assert meta["last_export"]["mode"] == "full" and meta["end"] == dep.last_bar.isoformat()
    assert_same_snapshot(dep.home / "snapshots" / FULL, direct)


def test_runs_of_one_snapshot_queue_on_its_pool_while_another_snapshot_runs_beside(deployment: Deployment):
    dep = deployment
    first, second, beside = dep.wait_runs_finished(dep.extra["pool_runs"])
    pooled = sorted([first, second], key=lambda r: r["startTime"])
    assert pooled[0]["endTime"] <= pooled[1]["startTime"], f"one writer per snapshot: {pooled}"
    overlaps = [r for r in pooled if r["startTime"] < beside["endTime"] and beside["startTime"] < r["endTime"]]
    assert overlaps, f"the run for {BESIDE} ran alone: {pooled} {beside}"
    assert (dep.home / "snapshots" / POOLED / "daily_pv.h5").exists()
    assert (dep.home / "snapshots" / BESIDE / "daily_pv.h5").exists()


def add_factor(results_dir: Path, name: str) -> None:
    path = results_dir / "aistock" / "factor_catalog.json"
    catalog = json.loads(path.read_text())
    catalog["factors"].append({"name": name, "source": "rdagent_generated", "expression": "$close/$open - 1"})
    catalog["generated_at_utc"] = datetime.now(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(catalog))


def sensor_ticks(dep: Deployment, name: str, after: float = 0.0) -> list[dict]:
    """The sensor's evaluated ticks after ``after`` (unix time), oldest first (a tick in progress is left out)."""
    ticks = [t for t in dep.sensor(name)["ticks"] if t["status"] in ("SUCCESS", "SKIPPED", "FAILURE")]
    return sorted((t for t in ticks if t["timestamp"] > after), key=lambda t: t["timestamp"])


def test_the_sensor_syncs_a_changed_catalog_and_nothing_otherwise(deployment: Deployment):
    dep = deployment
    sensor = "rdagent_results_sensor"
    first = dep.wait("the sensor's first run", lambda: [t for t in sensor_ticks(dep, sensor) if t["runIds"]],
                     timeout=180)[0]
    dep.wait_runs_finished(first["runIds"])
    quiet = dep.wait("a tick after the first sync", lambda: sensor_ticks(dep, sensor, first["timestamp"]), timeout=150)
    assert all(t["status"] == "SKIPPED" and not t["runIds"] for t in quiet), quiet
    assert "no RD-Agent catalog changed" in quiet[0]["skipReason"]
    changed_at = time.time()
    add_factor(dep.results_dir, "e2e_new_factor")
    tick = dep.wait("a tick after the change", lambda: sensor_ticks(dep, sensor, changed_at), timeout=150)[0]
    assert tick["status"] == "SUCCESS" and len(tick["runIds"]) == 1, tick
    assert tick["timestamp"] - changed_at <= 60 + 15  # the sensor's interval, plus the daemon's loop
    [run] = dep.wait_runs_finished(tick["runIds"])
    assert {t["key"]: t["value"] for t in run["tags"]}["rdagent/changed"] == "factors"
    with psycopg.connect(libpq_url(dep.market_url)) as conn:
        assert conn.execute("SELECT count(*) FROM rdagent.factor_registry WHERE name = 'e2e_new_factor' "
                            "AND active").fetchone()[0] == 1
    # the first sync and the change; every other tick launched nothing
    assert [t["runIds"] for t in sensor_ticks(dep, sensor) if t["runIds"]] == [first["runIds"], tick["runIds"]]


def test_schedules_run_and_tick_after_the_close_of_the_next_trading_days(deployment: Deployment):
    dep = deployment
    schedules = dep.schedules(future_ticks=6)
    post_close = {name: s for name, s in schedules.items() if name.endswith("_post_close")}
    assert {n.removeprefix("snapshot_").removesuffix("_post_close") for n in post_close} == {FULL, POOLED, BESIDE}
    assert {s["scheduleState"]["status"] for s in schedules.values()} == {"RUNNING"}
    now = datetime.now(SHANGHAI)
    expected = [datetime.combine(d, clock(18, 30), SHANGHAI)
                for d in trading_days(dep.market_url, now.date() - timedelta(days=1), 10)]
    expected = [t for t in expected if t > now]
    for name, schedule in post_close.items():
        assert schedule["executionTimezone"] == "Asia/Shanghai"
        ticks = schedule["futureTicks"]["results"]
        when = [datetime.fromtimestamp(t["timestamp"], SHANGHAI) for t in ticks]
        trading = [w for w in when if is_trading(dep.market_url, w.date())]
        assert trading == expected[:len(trading)] and len(trading) >= 3, (name, when, expected)
        for w, tick in zip(when, ticks):
            result = tick["evaluationResult"]
            assert result["error"] is None, result
            if w in trading:  # a preview: it names the day it will register and request, and registers nothing
                assert not result["runRequests"], result
                assert f"it will register {w.date().isoformat()}" in result["skipReason"], result
            else:  # a weekday holiday: the schedule skips it and says why
                assert not result["runRequests"] and "not a trading day" in result["skipReason"]
    assert registered_through(dep, FULL), "a preview must not register a future day as a partition"


def test_history_event_logs_and_schedule_state_survive_a_restart(deployment: Deployment):
    dep = deployment
    before = {r["runId"]: r["status"] for r in dep.runs()}
    finished = [i for i, s in before.items() if s == "SUCCESS"]
    assert len(finished) >= 5
    events = {i: dep.event_count(i) for i in finished[:3]}
    stopped = f"snapshot_{BESIDE}_post_close"
    state_id = dep.schedules()[stopped]["scheduleState"]["id"]
    result = dep.gql("mutation($id: String!) { stopRunningSchedule(id: $id) { __typename "
                     "... on ScheduleStateResult { scheduleState { status } } } }", id=state_id)
    assert result["stopRunningSchedule"]["scheduleState"]["status"] == "STOPPED"
    cursor = dep.sensor("rdagent_results_sensor")["typeSpecificData"]["lastCursor"]
    assert cursor and "factors" in json.loads(cursor)

    dep.stop("daemon", "webserver")
    dep.start("webserver", "daemon")

    after = {r["runId"]: r["status"] for r in dep.runs()}
    assert {i: after.get(i) for i in finished} == {i: "SUCCESS" for i in finished}
    assert {i: dep.event_count(i) for i in events} == events and min(events.values()) > 10
    states = {name: s["scheduleState"]["status"] for name, s in dep.schedules().items()}
    assert states.pop(stopped) == "STOPPED" and set(states.values()) == {"RUNNING"}
    assert dep.sensor("rdagent_results_sensor")["typeSpecificData"]["lastCursor"] == cursor
    with psycopg.connect(libpq_url(dep.dagster_url)) as conn:  # where it lives: Dagster's PostgreSQL database
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] >= len(before)
        rows = conn.execute("SELECT status, instigator_body FROM instigators WHERE instigator_type = 'SCHEDULE'").fetchall()
        assert [status for status, body in rows if f'"{stopped}"' in body] == ["STOPPED"]


def test_shutdown_leaves_nothing_running(deployment: Deployment):
    dep = deployment
    home = dep.env["DAGSTER_HOME"]
    assert len(leftovers(home)) >= 3  # the check sees the deployment's processes while it runs
    dep.stop("daemon", "webserver", "code-server")
    deadline = time.monotonic() + 30
    while leftovers(home) and time.monotonic() < deadline:
        time.sleep(1)
    assert leftovers(home) == []

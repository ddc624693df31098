"""The rest of the snapshot graph with real resources: source observations, ``market/daily_features``,
blocking asset checks (passing, then on deliberately corrupted snapshots), the ad-hoc export job, the
Dagster CLI ranged materialization and ``aistock-pipelines snapshots list/show``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from dagster import AssetCheckKey, AssetKey, AssetSelection, DagsterInstance, materialize
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from aistock_pipelines.cli import main
from aistock_pipelines.definitions import build_definitions
from aistock_pipelines.orchestration.adhoc_export import JOB_NAME as ADHOC_JOB
from aistock_pipelines.orchestration.market_assets import OBSERVE_JOB
from aistock_pipelines.orchestration.snapshot_checks import CHECKS
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.helpers import instance_with_trading_days
from aistock_pipelines.settings import Settings

pytestmark = pytest.mark.db
REPO = Path(__file__).resolve().parents[2]
QLIB = AssetKey(["snapshots", "demo_qlib"])
RANGE = {"dagster/asset_partition_range_start": "2023-01-03", "dagster/asset_partition_range_end": "2024-06-19"}


@pytest.fixture(scope="module")
def world(pg_server, market_template, tmp_path_factory):
    """A writable market copy, a snapshot root and the code location's Definitions built for them."""
    url = pg_server.create_database("checks", template=market_template.template_name)
    root = tmp_path_factory.mktemp("snapshots")
    settings = Settings.from_env({"AISTOCK_DB_URL": url, "AISTOCK_SNAPSHOT_ROOT": str(root),
                                  "AISTOCK_HOME": str(root.parent / "home")})
    return url, root, build_definitions(settings)


@pytest.fixture(scope="module")
def exported(world):
    """demo_qlib materialized over a range together with its checks (they run in the same run)."""
    url, root, defs = world
    asset = defs.get_assets_def(QLIB)
    checks = [c for c in defs.asset_checks if QLIB in {k.asset_key for k in c.check_keys}]
    instance = instance_with_trading_days(url, load_snapshots_file(Settings.from_env().snapshots_file))
    result = materialize([asset, *checks], resources=defs.resources, instance=instance, tags=RANGE)
    return result


def _check_results(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_checks_pass_on_a_fresh_snapshot(exported):
    assert exported.success
    results = _check_results(exported)
    assert set(results) == set(CHECKS)
    assert all(r.passed for r in results.values()), {n: r.description for n, r in results.items() if not r.passed}
    assert results["row_parity_with_database"].metadata["database_rows"].value > 80_000
    assert results["bins_match_h5"].metadata["instruments_checked"].value == 25


def _run_checks(world):
    url, root, defs = world
    checks = [c for c in defs.asset_checks if QLIB in {k.asset_key for k in c.check_keys}]
    result = materialize([defs.get_assets_def(QLIB), *checks], selection=AssetSelection.checks_for_assets(QLIB),
                         resources=defs.resources, instance=DagsterInstance.ephemeral(), raise_on_error=False)
    return _check_results(result)


@pytest.fixture
def corruptible(world, exported):
    """Lets a test corrupt the current snapshot version; restores it afterwards."""
    url, root, defs = world
    version = (root / "demo_qlib").resolve()
    backup = root.parent / "backup"
    shutil.copytree(version, backup, dirs_exist_ok=True)
    yield version
    shutil.rmtree(version)
    shutil.copytree(backup, version)
    shutil.rmtree(backup)


def test_checks_fail_on_corrupted_snapshots(world, corruptible):
    frame = pd.read_hdf(corruptible / "daily_pv.h5", key="data")
    broken = pd.concat([frame, frame.iloc[[10]]])  # a duplicate index entry, appended out of order
    broken.iloc[5, broken.columns.get_loc("$high")] = broken.iloc[5, broken.columns.get_loc("$low")] - 1
    broken.to_hdf(corruptible / "daily_pv.h5", key="data", format="fixed")
    (corruptible / "rdagent" / "notes.txt").write_text("RD-Agent refuses this")
    symbol = frame.index.get_level_values("instrument")[0].lower()
    bin_path = corruptible / "features" / symbol / "close.day.bin"
    raw = np.fromfile(bin_path, dtype="<f4")
    raw[3] += 1
    raw.tofile(bin_path)

    results = _run_checks(world)
    failed = {name for name, r in results.items() if not r.passed}
    assert failed == set(CHECKS) - {"calendar_matches_trade_calendar"}
    assert "1 duplicate index entries" in results["index_unique_sorted"].description
    assert "high below low" in results["ohlc_sane"].description
    day = frame.index[10][0].strftime("%Y-%m-%d")
    assert f"1 days differ ({day}: snapshot" in results["row_parity_with_database"].description
    assert "rdagent/notes.txt" in results["rdagent_folders_clean"].description
    assert f"{frame.index[0][1]}/close: 1 values differ" in results["bins_match_h5"].description


def test_calendar_check_fails_on_a_shortened_calendar(world, corruptible):
    calendar = corruptible / "calendars" / "day.txt"
    calendar.write_text("\n".join(calendar.read_text().split()[1:]) + "\n")
    results = _run_checks(world)
    assert "1 trading days missing, e.g. ['2023-01-03']" in results["calendar_matches_trade_calendar"].description
    assert "rows on days missing from calendars/day.txt" in results["bins_match_h5"].description
    assert results["index_unique_sorted"].passed and results["rdagent_folders_clean"].passed


def test_daily_features_view_and_source_observations(world, make_engine):
    url, root, defs = world
    instance = DagsterInstance.ephemeral()
    result = materialize([defs.get_assets_def(AssetKey(["market", "daily_features"]))], resources=defs.resources,
                         instance=instance)
    md = result.asset_materializations_for_node("market__daily_features")[0].metadata
    assert md["column_count"].value == len(md["columns"].value)
    engine = make_engine(url)
    with engine.connect() as conn:
        view = pd.read_sql(sa.text("SELECT ts_code, close, volume, factor, db_pb FROM market.daily_features "
                                   "WHERE trade_date = '2024-06-19' ORDER BY ts_code"), conn)
        raw = pd.read_sql(sa.text("SELECT q.ts_code, q.close_li, q.volume_hand, q.close_li::float8 / r.close_li AS f, "
                                  "d.pb::float8 AS pe FROM market.kline_daily_qfq q "
                                  "JOIN market.kline_daily_raw r USING (ts_code, trade_date) "
                                  "LEFT JOIN market.daily_basic d USING (ts_code, trade_date) "
                                  "WHERE q.trade_date = '2024-06-19' ORDER BY q.ts_code"), conn)
    assert len(view) == len(raw) > 250
    np.testing.assert_array_equal(view["close"].to_numpy(), raw["close_li"].to_numpy() / 1000)
    np.testing.assert_array_equal(view["volume"].to_numpy(), raw["volume_hand"].to_numpy() * 100.0)
    np.testing.assert_array_equal(view["factor"].to_numpy(), raw["f"].to_numpy())
    np.testing.assert_array_equal(view["db_pb"].to_numpy(), raw["pe"].to_numpy())

    observed = defs.resolve_job_def(OBSERVE_JOB).execute_in_process(instance=instance, resources=defs.resources)
    assert observed.success
    observations = {e.event_specific_data.asset_observation.asset_key.to_user_string():
                    e.event_specific_data.asset_observation.metadata
                    for e in observed.all_events if e.event_type_value == "ASSET_OBSERVATION"}
    assert set(observations) == {"market/kline_daily_qfq", "market/kline_daily_raw", "market/daily_basic",
                                 "market/moneyflow"}
    qfq = observations["market/kline_daily_qfq"]
    with engine.connect() as conn:
        last, n = conn.execute(sa.text("SELECT trade_date, count(*) FROM market.kline_daily_qfq GROUP BY 1 "
                                       "ORDER BY 1 DESC LIMIT 1")).one()
    assert qfq["latest_trade_date"].value == last.isoformat() and qfq["rows_on_latest_day"].value == n


def test_adhoc_export_job(world):
    url, root, defs = world
    job = defs.resolve_job_def(ADHOC_JOB)
    codes = ["000000.SZ", "000011.SZ", "000018.SZ"]
    config = {"ops": {"export_snapshot": {"config": {
        "snapshot_id": "adhoc_three", "mode": "full", "codes": codes, "start": "2022-01-04", "end": "2022-06-30",
        "columns": "dollar", "instruments": "qlib", "dtype": "float32", "factor_tables": []}}}}
    instance = DagsterInstance.ephemeral()
    result = job.execute_in_process(run_config=config, instance=instance, resources=defs.resources)
    assert result.success
    frame = pd.read_hdf(root / "adhoc_three" / "daily_pv.h5", key="data")
    present = sorted(frame.index.get_level_values("instrument").unique())
    assert present == ["SZ000000", "SZ000011", "SZ000018"]
    assert frame.index.get_level_values("datetime").max() <= pd.Timestamp("2022-06-30")
    assert list(frame.columns)[:4] == ["$open", "$high", "$low", "$close"] and frame.dtypes.unique().tolist() == [np.float32]
    output_md = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata
    assert output_md["rows"].value == len(frame) and output_md["mode"].value == "full"
    assert output_md["checks_passed"].value == f"{len(CHECKS)}/{len(CHECKS)}"  # the snapshot checks ran too
    assert {output_md[f"check_{name}"].value for name in CHECKS} == {"passed"}

    # again without overwrite: refused, the snapshot untouched
    again = job.execute_in_process(run_config=config, instance=instance, resources=defs.resources, raise_on_error=False)
    assert not again.success and "exists" in str(again.failure_data_for_node("export_snapshot").error)
    # incremental to a later end
    config["ops"]["export_snapshot"]["config"].update({"mode": "incremental", "end": "2022-07-29", "start": None})
    inc = job.execute_in_process(run_config=config, instance=instance, resources=defs.resources)
    assert inc.success
    assert pd.read_hdf(root / "adhoc_three" / "daily_pv.h5", key="data").index.get_level_values(0).max() == pd.Timestamp("2022-07-29")
    # codes without bars: a clear error, nothing written
    config["ops"]["export_snapshot"]["config"].update({"snapshot_id": "adhoc_none", "mode": "full",
                                                       "start": "2022-01-04", "codes": ["999999.SZ"]})
    none = job.execute_in_process(run_config=config, instance=instance, resources=defs.resources, raise_on_error=False)
    assert "no bars for codes ['999999.SZ']" in str(none.failure_data_for_node("export_snapshot").error)
    assert not (root / "adhoc_none").exists()
    # a declared snapshot is refused, with the way out in the message
    config["ops"]["export_snapshot"]["config"].update({"snapshot_id": "demo_qlib"})
    declared = job.execute_in_process(run_config=config, instance=instance, resources=defs.resources, raise_on_error=False)
    assert "materialize snapshots/demo_qlib instead" in str(declared.failure_data_for_node("export_snapshot").error)


def test_cli_partition_range_and_snapshot_listing(world, tmp_path, monkeypatch, capsys):
    """The documented shell commands: a ranged materialize is one run; then the snapshot CLI lists it."""
    url, _, _ = world
    root = tmp_path / "snapshots"
    env = {**os.environ, "AISTOCK_DB_URL": url, "AISTOCK_SNAPSHOT_ROOT": str(root), "DAGSTER_HOME": str(tmp_path),
           "AISTOCK_HOME": str(tmp_path / "home")}
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    out = subprocess.run([dagster, "asset", "materialize", "-m", "aistock_pipelines.definitions",
                          "--select", "snapshots/demo_qlib", "--partition-range", "2024-01-02...2024-03-29"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    meta = json.loads((root / "demo_qlib" / "meta.json").read_text())
    assert meta["end"] == "2024-03-29"
    assert len(list((tmp_path / "history" / "runs").glob("*-*.db"))) == 1  # one run-id database: one run for the range
    with DagsterInstance.from_config(str(tmp_path)) as instance:  # the checks ran in that run
        executions = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(QLIB, name) for name in CHECKS])
    assert {e.status for e in executions.values()} == {AssetCheckExecutionRecordStatus.SUCCEEDED}
    assert len(executions) == len(CHECKS)

    for name, value in {"AISTOCK_DB_URL": url, "AISTOCK_SNAPSHOT_ROOT": str(root)}.items():
        monkeypatch.setenv(name, value)
    assert main(["snapshots", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    row = next(line for line in listing if line.startswith("demo_qlib"))
    assert "2023-01-03" in row and "2024-03-29" in row and str(meta["instrument_count"]) in row
    assert any(line.startswith("demo_allA") and "not exported" in line for line in listing)
    assert main(["snapshots", "show", "demo_qlib"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["row_count"] == meta["row_count"] and Path(shown["path"]).name.startswith("demo_qlib@")

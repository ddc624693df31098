"""The code location loads, statically and through Dagster's own CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DefaultSensorStatus, Definitions

from aistock_pipelines.definitions import defs
from aistock_pipelines.orchestration.market_assets import market_definitions
from aistock_pipelines.orchestration.rdagent_assets import rdagent_definitions
from aistock_pipelines.orchestration.snapshot_definitions import snapshot_definitions
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file

REPO = Path(__file__).resolve().parents[1]


def test_definitions_are_loadable():
    Definitions.validate_loadable(defs)
    assert set(defs.resources) >= {"aistock_db", "snapshot_store", "rdagent_api"}


def test_code_location_holds_snapshots_and_rdagent_sync():
    repo = defs.get_repository_def()
    keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert {"snapshots/demo_allA", "snapshots/demo_qlib", "rdagent/factor_catalog", "rdagent/strategy_catalog",
            "rdagent/loop_catalog", "rdagent/model_catalog", "rdagent/alpha158_meta", "rdagent/loop_artifacts"} <= keys
    sensor = repo.get_sensor_def("rdagent_results_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert repo.has_job("rdagent_sync_job") and repo.has_job("snapshot_demo_allA_job")
    assert repo.has_job("snapshot_release") and repo.has_job("snapshot_rollback")
    assert repo.get_schedule_def("snapshot_demo_allA_release").job_name == "snapshot_release"
    checks = {k.name for k in repo.asset_graph.asset_check_keys if k.asset_key == AssetKey(["rdagent", "factor_catalog"])}
    assert "factor_package_aligned" in checks


def _own_keys(domain: Definitions) -> set[str]:
    return {key.to_user_string() for a in domain.assets for key in a.keys}


def test_each_domain_brings_its_own_definitions_without_resources():
    config = load_snapshots_file(DEMO_SNAPSHOTS_FILE)
    market, snapshots, rdagent = market_definitions(config), snapshot_definitions(config), rdagent_definitions()
    assert _own_keys(market) == {"market/kline_daily_qfq", "market/kline_daily_raw", "market/daily_basic",
                                 "market/moneyflow", "market/daily_features"}
    assert _own_keys(snapshots) == {"snapshots/demo_allA", "snapshots/demo_qlib"}
    assert {k.split("/")[0] for k in _own_keys(rdagent)} == {"rdagent"}
    assert [s.name for s in market.schedules] == ["observe_market_sources"]
    assert {s.name for s in snapshots.schedules} == {"snapshot_demo_allA_post_close", "snapshot_demo_qlib_post_close"}
    assert {j.name for j in snapshots.jobs} == {"snapshot_demo_allA_job", "snapshot_demo_qlib_job", "adhoc_snapshot_export"}
    assert not (market.resources or snapshots.resources or rdagent.resources)
    repo = defs.get_repository_def()
    all_keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert all_keys == _own_keys(market) | _own_keys(snapshots) | _own_keys(rdagent)


def test_dagster_cli_validates_the_workspace(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}  # never fall back to ./dagster.yaml (production)
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    out = subprocess.run([dagster, "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All code locations passed validation" in out.stdout + out.stderr

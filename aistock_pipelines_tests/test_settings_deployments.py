"""A setting behaves the same in every deployment: its documented default, and an explicit value.

The production resources once read ``RDAGENT_RESULTS_URL`` as a required ``EnvVar``: documented with a
default, yet an unset variable failed every sensor tick with ``DagsterInvalidConfigError``. These tests
resolve the resources each deployment gets (as Dagster does for a run or a tick) and compare them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_resources, build_sensor_context, instance_for_test

from aistock_pipelines.definitions import build_definitions
from aistock_pipelines.orchestration.rdagent_assets import SENSOR_NAME
from aistock_pipelines.resources import resources_for
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE, ENV_VARS, Settings

DB_URL = "postgresql://alice:s3cret@db.internal:5432/aistock"
#: Settings a deployment may leave unset; AISTOCK_DB_URL is required in production by design (documented).
DEFAULTED = ["AISTOCK_HOME", "AISTOCK_SNAPSHOT_ROOT", "AISTOCK_SNAPSHOTS_FILE", "RDAGENT_RESULTS_URL",
             "AISTOCK_FACTOR_PACKAGES"]


def resolved(monkeypatch: pytest.MonkeyPatch, deployment: str, env: dict[str, str]) -> dict[str, object]:
    """What a run of ``deployment`` sees: the resolved resources and the settings the code location uses."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AISTOCK_DEPLOYMENT": deployment, "AISTOCK_DB_URL": DB_URL, **env}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    with build_resources(resources_for(settings)) as res:
        return {"db": res.aistock_db.resolved_url(), "home": res.aistock_db.home, "root": res.snapshot_store.root,
                "results": res.rdagent_api.base_url, "snapshots_file": settings.snapshots_file,
                "factor_packages": settings.factor_packages}


def test_every_defaulted_setting_is_documented_with_a_default():
    test_only = {"AISTOCK_TEST_DB_URL", "AISTOCK_KEEP_TEST_DB"}  # read by the tests and bin/test, not Settings
    assert set(DEFAULTED) | {"AISTOCK_DEPLOYMENT", "AISTOCK_DB_URL"} | test_only == set(ENV_VARS)
    defaults = Settings.from_env({})
    assert defaults.rdagent_results_url in ENV_VARS["RDAGENT_RESULTS_URL"][0]
    assert ",".join(defaults.factor_packages) in ENV_VARS["AISTOCK_FACTOR_PACKAGES"][0]


def test_defaults_are_the_same_in_local_and_production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)  # AISTOCK_HOME defaults to ./.aistock
    local = resolved(monkeypatch, "local", {})
    production = resolved(monkeypatch, "production", {})
    assert production == local
    assert production == {"db": DB_URL, "home": str(tmp_path / ".aistock"), "root": str(tmp_path / ".aistock" / "snapshots"),
                          "results": "http://127.0.0.1:9000", "snapshots_file": DEMO_SNAPSHOTS_FILE,
                          "factor_packages": ("rd_factors_lib",)}


@pytest.mark.parametrize("name, value, expected", [
    ("AISTOCK_HOME", "{tmp}/home", {"home": "{tmp}/home", "root": "{tmp}/home/snapshots"}),
    ("AISTOCK_SNAPSHOT_ROOT", "{tmp}/snaps/", {"root": "{tmp}/snaps"}),
    ("RDAGENT_RESULTS_URL", "http://results.internal:9100/", {"results": "http://results.internal:9100"}),
    ("AISTOCK_FACTOR_PACKAGES", "rd_factors_lib, my_factors", {"factor_packages": ("rd_factors_lib", "my_factors")}),
    ("AISTOCK_DB_URL", f" {DB_URL}\n", {"db": DB_URL}),  # a secret file's trailing newline
])
def test_explicit_values_are_the_same_in_local_and_production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             name: str, value: str, expected: dict):
    value = value.format(tmp=tmp_path)
    local = resolved(monkeypatch, "local", {name: value})
    production = resolved(monkeypatch, "production", {name: value})
    assert production == local
    assert {k: production[k] for k in expected} == {
        k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in expected.items()}


def test_production_sensor_tick_with_the_results_url_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The reported failure: every tick raised DagsterInvalidConfigError. Now it polls the default URL."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AISTOCK_DEPLOYMENT", "production")
    monkeypatch.setenv("AISTOCK_DB_URL", DB_URL)
    monkeypatch.setenv("AISTOCK_HOME", str(tmp_path))
    defs = build_definitions(Settings.from_env())
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with instance_for_test() as instance:
        assert isinstance(instance, DagsterInstance)
        context = build_sensor_context(instance=instance, resources=defs.resources)
        outcome = sensor(context)  # whatever answers on 127.0.0.1:9000, or a skip naming it
    assert isinstance(outcome, (SkipReason, SensorResult))
    if isinstance(outcome, SkipReason):
        assert "http://127.0.0.1:9000" in (outcome.skip_message or "")

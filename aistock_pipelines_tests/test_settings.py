from pathlib import Path

import pytest

from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE, Settings, SettingsError


def test_defaults_use_embedded_database_under_home(tmp_path: Path):
    s = Settings.from_env({"AISTOCK_HOME": str(tmp_path)})
    assert s.uses_embedded_db
    assert s.deployment == "local"
    assert s.embedded_pgdata == tmp_path / "pgdata"
    assert s.snapshot_root == tmp_path / "snapshots"
    assert s.snapshots_file == DEMO_SNAPSHOTS_FILE
    assert s.rdagent_results_url == "http://127.0.0.1:9000"
    assert s.factor_packages == ("rd_factors_lib",)


def test_explicit_values_win(tmp_path: Path):
    s = Settings.from_env({
        "AISTOCK_DB_URL": "postgresql://u:p@db:5432/aistock",
        "AISTOCK_SNAPSHOT_ROOT": str(tmp_path / "snaps"),
        "RDAGENT_RESULTS_URL": "http://127.0.0.1:9100/",
        "AISTOCK_FACTOR_PACKAGES": "rd_factors_lib, my_factors",
    })
    assert not s.uses_embedded_db
    assert s.snapshot_root == tmp_path / "snaps"
    assert s.rdagent_results_url == "http://127.0.0.1:9100"
    assert s.factor_packages == ("rd_factors_lib", "my_factors")


def test_production_requires_a_database_url():
    with pytest.raises(SettingsError, match="AISTOCK_DB_URL"):
        Settings.from_env({"AISTOCK_DEPLOYMENT": "production"})
    with pytest.raises(SettingsError, match="'local' or 'production'"):
        Settings.from_env({"AISTOCK_DEPLOYMENT": "staging"})



def test_an_unusable_database_url_is_named_without_its_password():
    with pytest.raises(SettingsError, match=r"u:\*\*\*@db:54x2/aistock is not a usable PostgreSQL URL \(its port"):
        Settings.from_env({"AISTOCK_DB_URL": "postgresql://u:pw9@db:54x2/aistock"})
    with pytest.raises(SettingsError, match="scheme 'mysql' is not postgresql"):
        Settings.from_env({"AISTOCK_DB_URL": "mysql://u@db/aistock"})

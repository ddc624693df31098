"""``aistock-pipelines rdagent sync``: the CLI path over the real server and database."""

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from aistock_pipelines.cli import main

pytestmark = pytest.mark.db


def _env(monkeypatch: pytest.MonkeyPatch, engine: Engine, url: str, tmp_path: Path) -> None:
    monkeypatch.setenv("AISTOCK_DB_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("RDAGENT_RESULTS_URL", url)
    monkeypatch.setenv("AISTOCK_HOME", str(tmp_path))


def test_cli_sync_prints_counts_and_fills_tables(registry_engine, demo_server, tmp_path, monkeypatch, capsys):
    _env(monkeypatch, registry_engine, demo_server, tmp_path)
    assert main(["rdagent", "sync"]) == 0
    out = capsys.readouterr().out
    assert "factors: inserted 15, updated 0, unchanged 0, deactivated 0" in out
    assert "loop_artifacts: inserted 7," in out
    with registry_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM rdagent.factor_registry")).scalar() == 15
    assert main(["rdagent", "sync", "factors"]) == 0
    assert "factors: inserted 0, updated 0, unchanged 15, deactivated 0" in capsys.readouterr().out


def test_cli_sync_reports_an_unreachable_server(registry_engine, closed_port_url, tmp_path, monkeypatch, capsys):
    _env(monkeypatch, registry_engine, closed_port_url, tmp_path)
    assert main(["rdagent", "sync", "factors"]) == 1
    assert "factors: FAILED" in capsys.readouterr().err


def test_cli_sync_rejects_unknown_kinds(registry_engine, demo_server, tmp_path, monkeypatch, capsys):
    _env(monkeypatch, registry_engine, demo_server, tmp_path)
    assert main(["rdagent", "sync", "factorz"]) == 2
    assert "unknown kinds factorz" in capsys.readouterr().err

"""The code location loads, statically and through Dagster's own CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dagster import Definitions

from aistock_pipelines.definitions import defs

REPO = Path(__file__).resolve().parents[1]


def test_definitions_are_loadable():
    Definitions.validate_loadable(defs)
    assert set(defs.resources) >= {"aistock_db", "snapshot_store", "rdagent_api"}


def test_dagster_cli_validates_the_workspace(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}  # never fall back to ./dagster.yaml (production)
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    out = subprocess.run([dagster, "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All code locations passed validation" in out.stdout + out.stderr

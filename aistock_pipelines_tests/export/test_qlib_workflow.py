"""Qlib's standard workflow runs unmodified on a demo snapshot: pyqlib itself, in its own environment.

``market: csi300`` and ``benchmark: SH000300``, as Qlib's examples and RD-Agent's Qlib scenario run them:
Alpha158 → LightGBM → TopkDropoutStrategy backtest. The environment is ``.venv-qlib`` (``bin/qlib-env``,
created on first use: about two minutes), apart from the project's, because pyqlib brings mlflow, jupyter
and ~130 more packages the Dagster code location has no use for.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.mapping import ExportMapping
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.export.helpers import make_exporter

pytestmark = [pytest.mark.db, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "aistock_pipelines_tests" / "qlib_consumer" / "workflow.py"
DEMO_DECLARATIONS = REPO / "aistock_pipelines" / "demo" / "snapshots.yaml"
START = date(2023, 1, 3)  # demo_qlib's start
SEGMENTS = ("2023-04-03", "2023-10-31", "2023-12-29", "2024-06-14")  # train start, train end, valid end, test end


@pytest.fixture(scope="session")
def qlib_python() -> str:
    done = subprocess.run([str(REPO / "bin" / "qlib-env")], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"bin/qlib-env failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def universe_days(path: Path, calendar: list[date]) -> set[tuple[str, str]]:
    out = set()
    for line in path.read_text().splitlines():
        symbol, a, b = line.split("\t")
        out |= {(f"{d:%Y-%m-%d}", symbol) for d in calendar if date.fromisoformat(a) <= d <= date.fromisoformat(b)}
    return out


def test_alpha158_lightgbm_topk_backtest_against_sh000300(market_db, tmp_path, qlib_python):
    declared = load_snapshots_file(DEMO_DECLARATIONS)
    ex = make_exporter(market_db, tmp_path / "snapshots", ExportMapping(), declared.market_files())
    ex.export_full("demo_qlib", START, options=SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32"))
    snapshot = tmp_path / "snapshots" / "demo_qlib"

    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # mlflow 3.17 refuses Qlib's default file store without it
    done = subprocess.run([qlib_python, str(WORKFLOW), str(snapshot), str(out), "csi300", "SH000300", *SEGMENTS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"Qlib's workflow failed:\n{done.stderr[-5000:]}"
    result = json.loads(out.read_text())
    calendar = qlib_format.read_calendar(snapshot / "calendars" / "day.txt")

    features = result["features"]
    assert features["columns"] == 158 and features["all_nan"] == [], "every Alpha158 feature has values"
    assert features["instruments"] >= 55 and features["rows"] > 8000
    # the market file decides who is in the dataset, day by day
    members = universe_days(snapshot / "instruments" / "csi300.txt", calendar)
    predicted = {tuple(p) for p in result["predictions"]}
    test_days = {f"{d:%Y-%m-%d}" for d in calendar if SEGMENTS[2] < f"{d:%Y-%m-%d}" <= SEGMENTS[3]}
    assert predicted == {m for m in members if m[0] in test_days}
    assert result["market_instruments"] == len({s for _, s in members})

    report = result["report"]
    assert report["dates"] == sorted(test_days)
    assert sum(report["turnover"]) > 1 and result["holdings"]["changes"] >= 10, "the strategy trades"
    assert result["holdings"]["distinct_stocks"] > 10 and len(set(report["account"])) > 10
    # the benchmark's returns are the index's close-to-close returns in the database
    engine = create_db_engine(market_db)
    with engine.connect() as conn:
        close = pd.read_sql(sa.text("SELECT trade_date, close FROM market.index_daily WHERE ts_code = '000300.SH' "
                                    "AND trade_date >= :s ORDER BY trade_date"), conn, params={"s": START})
    engine.dispose()
    close = close.set_index("trade_date").close.astype(float).reindex(calendar)
    expected = (close / close.shift(1) - 1).loc[[date.fromisoformat(d) for d in report["dates"]]]
    assert expected.notna().all()
    np.testing.assert_allclose(report["bench"], expected.to_numpy(), rtol=0, atol=5e-7)
    assert np.std(report["bench"]) > 1e-3

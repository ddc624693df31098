"""Build the demo RD-Agent results directory (the layout the results API server reads).

The catalogs under ``rdagent_results/aistock/*.json`` are kept as data files: they are what RD-Agent's
export tools write (pretty-printed, ``ensure_ascii=False``, and one bare ``NaN`` token in
``factor_hl_range.best_performance``, because Python's ``json.dump`` writes NaN and upstream does not
guard against it). They are copied byte for byte.

``registry.sqlite`` is never committed: it is built here from the small description in
``ARTIFACTS`` / ``ARTIFACT_FILES``, so the binary file is always reproducible and reviewable as code.

Layout produced by :func:`build_demo_results_dir`::

    <target>/registry.sqlite
    <target>/aistock/factor_catalog.json
    <target>/aistock/strategy_catalog.json
    <target>/aistock/loop_catalog.json
    <target>/aistock/model_catalog.json      (only with ``with_models=True``)
    <target>/aistock/alpha158_meta.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any

#: Catalog file names as RD-Agent publishes them under ``<RDagentDB>/aistock/``.
CATALOG_FILES = (
    "factor_catalog.json",
    "strategy_catalog.json",
    "loop_catalog.json",
    "model_catalog.json",
    "alpha158_meta.json",
)

#: The two task runs of the demo: RD-Agent names runs either by a uuid hex or by a start timestamp.
RUN_UUID = "3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35"
RUN_TS = "2025-12-18_10-38-22-336632"

WS_A = "a1c4e8f2b3d94e7a8c5f0d2b6e9a1c37"  # RUN_UUID loop 1, running
WS_B = "b7d2f9a4c1e84b3d9f6a2c8e5b0d4f19"  # RUN_UUID loop 1, coding
WS_D = "d5f1b8e3a9c64d2f7b0e4a8c1d6f3b52"  # RUN_TS loop 3, model SOTA
WS_E = "e8a3c7f0d2b54e9a6c1f8b3d7e0a5c64"  # RUN_TS loop 3, second model

SCHEMA = """
CREATE TABLE artifacts (
    artifact_id  TEXT PRIMARY KEY,
    task_run_id  TEXT    NOT NULL,
    loop_id      INTEGER NOT NULL,
    workspace_id TEXT    NOT NULL,
    artifact_type TEXT   NOT NULL,
    name         TEXT,
    status       TEXT,
    primary_flag INTEGER NOT NULL DEFAULT 0,
    entry_path   TEXT,
    summary_json TEXT
);
CREATE TABLE artifact_files (
    file_id      TEXT PRIMARY KEY,
    artifact_id  TEXT NOT NULL REFERENCES artifacts(artifact_id),
    workspace_id TEXT NOT NULL,
    path         TEXT NOT NULL,
    sha256       TEXT,
    size_bytes   INTEGER,
    mtime_utc    TEXT,
    kind         TEXT
);
CREATE INDEX ix_artifacts_loop ON artifacts (task_run_id, loop_id);
CREATE INDEX ix_artifact_files_artifact ON artifact_files (artifact_id);
"""

# (artifact_id, task_run_id, loop_id, workspace_id, artifact_type, name, status, primary_flag,
#  entry_path, summary_json)
ARTIFACTS: tuple[tuple[Any, ...], ...] = (
    ("art-a-report", RUN_UUID, 1, WS_A, "report", "qlib_report", "present", 1, "ret.pkl",
     json.dumps({"annualized_return": 0.1187, "max_drawdown": -0.0934, "ic": 0.0312})),
    ("art-a-factor-meta", RUN_UUID, 1, WS_A, "factor_meta", "factor_meta", "present", 0,
     "factor_meta.json", json.dumps({"factor_count": 2, "source": "rdagent_generated"})),
    ("art-a-model", RUN_UUID, 1, WS_A, "model", "LGBModel", "present", 0, "mlruns", None),
    # a coding workspace of the same loop: an artifact with no registered files
    ("art-b-feedback", RUN_UUID, 1, WS_B, "feedback", "feedback", "missing", 0, "feedback.json", ""),
    ("art-d-report", RUN_TS, 3, WS_D, "report", "qlib_report", "present", 1, "ret.pkl",
     # summary written by an old backfill with a NaN (Python json writes the bare token)
     json.dumps({"annualized_return": 0.1342, "sharpe": float("nan")})),
    ("art-d-model", RUN_TS, 3, WS_D, "model", "LGBModel", "present", 0, "model.pkl",
     json.dumps({"model_type": "LGBModel", "num_leaves": 210})),
    # a summary_json that is not JSON: the server answers summary {}
    ("art-e-report", RUN_TS, 3, WS_E, "report", "qlib_report", "present", 0, "ret.pkl",
     "{not json"),
)


def _file(file_id: str, artifact_id: str, workspace_id: str, path: str, size_bytes: int, mtime_utc: str,
          kind: str) -> tuple[Any, ...]:
    """One ``artifact_files`` row; the sha256 is derived from the path (the demo has no real files)."""
    sha256 = hashlib.sha256(f"{workspace_id}/{path}".encode()).hexdigest()
    return (file_id, artifact_id, workspace_id, path, sha256, size_bytes, mtime_utc, kind)


# (file_id, artifact_id, workspace_id, path, sha256, size_bytes, mtime_utc, kind)
ARTIFACT_FILES: tuple[tuple[Any, ...], ...] = (
    _file("file-a-ret", "art-a-report", WS_A, "ret.pkl", 48213, "2025-12-16T03:40:11+00:00", "pickle"),
    _file("file-a-qlibres", "art-a-report", WS_A, "qlib_res.csv", 1932, "2025-12-16T03:40:12+00:00", "csv"),
    _file("file-a-retcurve", "art-a-report", WS_A, "ret_curve.png", 84502, "2025-12-16T03:40:15+00:00",
          "image"),
    _file("file-a-meta", "art-a-factor-meta", WS_A, "factor_meta.json", 2741, "2025-12-16T03:12:44+00:00",
          "json"),
    _file("file-a-params", "art-a-model", WS_A, "mlruns/1/8d2c4e6f/artifacts/params.pkl", 1204877,
          "2025-12-16T03:39:58+00:00", "model"),
    _file("file-d-ret", "art-d-report", WS_D, "ret.pkl", 51877, "2025-12-18T11:02:31+00:00", "pickle"),
    _file("file-d-model", "art-d-model", WS_D, "model.pkl", 2310554, "2025-12-18T11:01:09+00:00", "model"),
    _file("file-e-ret", "art-e-report", WS_E, "ret.pkl", 50966, "2025-12-18T11:18:47+00:00", "pickle"),
)


def _package_dir() -> Path:
    """Where the committed catalog files live (works from a checkout and from an installed wheel)."""
    return Path(str(resources.files("aistock_pipelines.demo") / "rdagent_results"))


def build_registry(db_path: Path) -> Path:
    """Write ``registry.sqlite`` from ``ARTIFACTS``/``ARTIFACT_FILES``, replacing any previous file."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db_path.unlink(missing_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.executescript(SCHEMA)
            conn.executemany(f"INSERT INTO artifacts VALUES ({','.join('?' * 10)})", ARTIFACTS)
            conn.executemany(f"INSERT INTO artifact_files VALUES ({','.join('?' * 8)})", ARTIFACT_FILES)
    finally:
        conn.close()
    return db_path


def build_demo_results_dir(target: Path, *, with_models: bool = True) -> Path:
    """Generate the demo results directory into ``target`` and return ``target``.

    ``with_models=False`` leaves out ``model_catalog.json``: most RD-Agent installations publish no
    model catalog, and ``GET /catalog/models`` then answers 404.
    """
    target = Path(target)
    aistock = target / "aistock"
    aistock.mkdir(parents=True, exist_ok=True)
    source = _package_dir() / "aistock"
    for name in CATALOG_FILES:
        if name == "model_catalog.json" and not with_models:
            (aistock / name).unlink(missing_ok=True)
            continue
        shutil.copyfile(source / name, aistock / name)
    build_registry(target / "registry.sqlite")
    return target


def load_demo_catalog(name: str) -> Any:
    """Parse one committed catalog file (tests compare fetched records against this)."""
    return json.loads((_package_dir() / "aistock" / name).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo RD-Agent results directory.")
    parser.add_argument("target", type=Path, help="directory to create (aistock/ and registry.sqlite)")
    parser.add_argument("--without-models", action="store_true", help="omit model_catalog.json")
    args = parser.parse_args(argv)
    print(build_demo_results_dir(args.target, with_models=not args.without_models))


if __name__ == "__main__":
    main()

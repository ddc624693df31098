"""The results library: views over a real sync of the demo results, pointer resolution and package versions."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from aistock_pipelines.demo.rdagent_results_builder import RUN_TS, RUN_UUID, WS_A, WS_D, WS_E, load_demo_catalog
from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES, FactorPackages
from aistock_pipelines.rdagent.library import glance, record_factor_impl
from aistock_pipelines.rdagent.library_views import VIEWS
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
from aistock_pipelines.rdagent.sync import sync_all
from aistock_pipelines_tests.rdagent.generated_results import Generated, generate_results_dir

DEMO_PACKAGES = FactorPackages.parse(DEMO_FACTOR_PACKAGES)
WS_0 = "c3e9a6d1f7b24c5e8a0d3f6b9c2e7a48"
WS_B = "b7d2f9a4c1e84b3d9f6a2c8e5b0d4f19"
WS_4 = "f2b6d9e4c8a14f7b3e5d0c9a6f2b8e71"
MODEL_STRATEGY, FACTOR_STRATEGY, BARE_STRATEGY = (
    "0c6165af647756ada46daa72372dca65", "b7e6f747e4515ae48b2f3c7f487eb009", "82afdc871dbf5b02b8daebfa297259f4")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    return generate_results_dir(tmp_path_factory.mktemp("generated"))


def view_rows(engine: Engine, view: str, order: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(f"SELECT * FROM rdagent.{view} ORDER BY {order}")).mappings()]


@pytest.fixture
def demo_library(registry_engine: Engine, demo_server: str) -> Engine:
    with RDAgentResultsClient(demo_server) as client:
        sync_all(registry_engine, client)
    record_factor_impl(registry_engine, DEMO_PACKAGES)
    return registry_engine


# The demo factors' best_performance, flattened by hand: (sharpe, annualized_return, max_drawdown).
DEMO_PERFORMANCE = {
    ("Price_Volume_Divergence_5D", "rdagent_generated"): (0.74, 0.0511, None),  # the later duplicate
    ("factor_hl_range", "rdagent_generated"): (None, 0.0412, -0.1123),  # a mapping, its sharpe NaN
    ("factor_mom_20d", "rdagent_generated"): (1.42, 0.1187, None),
    ("factor_mom_20d", "sota"): (1.57, 0.1302, None),
    ("factor_turnover_adj_mom_10d", "rdagent_generated"): (0.88, 0.064, None),
    ("factor_vol_ratio_5d", "rdagent_generated"): (0.96, 0.0735, None),
}
#: (impl_resolves, impl_status) with the demo package (version 20260114, every pointer of the demo catalog).
DEMO_IMPL = {
    ("factor_hl_range", "rdagent_generated"): (True, "aligned"),
    ("factor_mom_20d", "rdagent_generated"): (True, "aligned"),
    ("factor_mom_20d", "sota"): (True, "aligned"),
    ("factor_turnover_adj_mom_10d", "rdagent_generated"): (True, "aligned"),
    ("factor_vol_ratio_5d", "rdagent_generated"): (True, "aligned"),
}


def test_factor_library_on_the_demo(demo_library: Engine) -> None:
    records = {(r["name"], r["source"]): r for r in load_demo_catalog("factor_catalog.json")["factors"]}
    alpha = {f["name"]: f for f in load_demo_catalog("alpha158_meta.json")["factors"]}
    rows = view_rows(demo_library, "factor_library", "catalog DESC, name, source")
    catalog = [r for r in rows if r["catalog"] == "factor_catalog"]
    assert [(r["name"], r["source"]) for r in catalog] == sorted(records)
    for row in catalog:
        record = records[(row["name"], row["source"])]
        assert (row["expression"], row["description"], row["tags"]) == (
            record.get("expression"), record.get("description_cn"), record.get("tags"))
        sharpe, annualized, drawdown = DEMO_PERFORMANCE.get((row["name"], row["source"]), (None, None, None))
        assert (row["sharpe"], row["annualized_return"], row["max_drawdown"]) == (sharpe, annualized, drawdown)
        assert (row["ic"], row["ic_ir"], row["rank_ic"]) == (None, None, None)  # no demo factor reports them
        assert (row["impl_module"], row["impl_func"], row["impl_version"]) == (
            record.get("impl_module"), record.get("impl_func"), record.get("impl_version"))
        resolves, status = DEMO_IMPL.get((row["name"], row["source"]), (None, None))
        assert (row["impl_resolves"], row["impl_status"]) == (resolves, status)
        assert row["impl_installed_version"] == ("20260114" if status else None)
    # Alpha158 factors the factor catalog lacks, once each
    only_alpha = [r for r in rows if r["catalog"] == "alpha158_meta"]
    in_catalog = {name for name, source in records if source == "qlib_alpha158"}
    assert [r["name"] for r in only_alpha] == sorted(set(alpha) - in_catalog)
    assert all((r["source"], r["expression"], r["tags"], r["impl_resolves"]) ==
               ("qlib_alpha158", alpha[r["name"]]["expression"], alpha[r["name"]]["tags"], None) for r in only_alpha)


def test_loop_leaderboard_on_the_demo(demo_library: Engine) -> None:
    records = {(r["task_run_id"], r["loop_id"], r["workspace_id"]): r for r in load_demo_catalog("loop_catalog.json")["loops"]}
    rows = {(r["task_run_id"], r["loop_id"], r["workspace_id"]): r
            for r in view_rows(demo_library, "loop_leaderboard", "task_run_id, loop_id, workspace_id")}
    assert set(rows) == set(records)
    kpis = ("annualized_return", "annualized_return_basis", "max_drawdown", "information_ratio", "ic", "ic_ir",
            "rank_ic")
    expected = {
        (RUN_UUID, 0, WS_0): (0.0402, "excess_return_with_cost", None, None, None, None, None),
        (RUN_UUID, 1, WS_A): (0.1187, "excess_return_with_cost", -0.0934, None, 0.0312, 0.2487, 0.0405),
        (RUN_UUID, 1, WS_B): (None,) * 7,
        (RUN_TS, 3, WS_D): (0.1342, "unspecified", -0.0871, None, 0.0381, 0.3125, None),  # top-level fields
        (RUN_TS, 3, WS_E): (0.0915, "unspecified", -0.1204, None, 0.0297, 0.2411, None),
        (RUN_TS, 4, WS_4): (None,) * 7,
    }
    artifacts = {(RUN_UUID, 1): 4, (RUN_TS, 3): 3}
    for key, row in rows.items():
        record = records[key]
        assert tuple(row[k] for k in kpis) == expected[key], key
        assert (row["strategy_id"], row["decision"], row["action"], row["step_name"], row["factors"]) == (
            record["strategy_id"], record["decision"], record["action"], record["step_name"], record["factor_names"])
        assert row["factor_count"] == len(record["factor_names"])
        assert row["feedback"] == record["summary_texts"] and row["paths"] == record["paths"]
        assert row["loop_artifacts"] == artifacts.get(key[:2], 0)
        assert row["first_seen_at"] == row["last_seen_at"]


def test_strategy_and_model_libraries_on_the_demo(demo_library: Engine) -> None:
    strategies = {r["strategy_id"]: r for r in view_rows(demo_library, "strategy_library", "strategy_id")}
    files = {s["strategy_id"]: s for s in load_demo_catalog("strategy_catalog.json")["strategies"]}
    assert set(strategies) == set(files)
    segments = (date(2010, 1, 7), date(2018, 12, 31), date(2019, 1, 2), date(2020, 12, 31), date(2021, 1, 4),
                date(2025, 6, 30))
    seg_columns = ("train_start", "train_end", "valid_start", "valid_end", "test_start", "test_end")
    model = strategies[MODEL_STRATEGY]
    assert (model["model_type"], model["market"], model["benchmark"], model["features"], model["feature_count"]) == (
        "LGBModel", "csi300", "SH000300", files[MODEL_STRATEGY]["feature_list"], 8)
    assert tuple(model[c] for c in seg_columns) == segments
    assert (model["loop_count"], model["positive_decisions"], model["best_annualized_return"]) == (2, 1, 0.1342)
    assert model["loops"] == [{"task_run_id": RUN_TS, "loop_id": 3, "workspace_id": WS_D},
                              {"task_run_id": RUN_TS, "loop_id": 3, "workspace_id": WS_E}]
    factor = strategies[FACTOR_STRATEGY]
    assert (factor["loop_count"], factor["positive_decisions"], factor["best_annualized_return"]) == (3, 1, 0.1187)
    bare = strategies[BARE_STRATEGY]
    assert (bare["model_type"], bare["market"], bare["benchmark"], bare["features"], bare["feature_count"],
            bare["train_start"], bare["loop_count"]) == (None, None, None, None, None, None, 1)

    models = {r["model_id"]: r for r in view_rows(demo_library, "model_library", "model_id")}
    files = {m["model_id"]: m for m in load_demo_catalog("model_catalog.json")["models"]}
    assert set(models) == set(files)
    for model_id, row in models.items():
        record = files[model_id]
        assert (row["model_type"], row["task_run_id"], row["loop_id"], row["workspace_id"]) == (
            record["model_type"], record["task_run_id"], record["loop_id"], record["workspace_id"])
        assert row["features"] == record.get("flattened_feature_list")
        has_config = "dataset_config" in record
        assert tuple(row[c] for c in seg_columns) == (segments if has_config else (None,) * 6)
        assert row["loop_in_leaderboard"] is True
    linked = {m: (r["strategy_id"], r["market"], r["benchmark"], r["decision"], r["annualized_return"])
              for m, r in models.items()}
    assert linked == {
        "e637cc739ce351769c6d376a9c0dee2b": (FACTOR_STRATEGY, "csi300", "SH000300", True, 0.1187),
        "feb0c0ecd14156c3a7fa1270c2e89277": (MODEL_STRATEGY, "csi300", "SH000300", True, 0.1342),
        "3e08a2a8010654e989c6666ca133e85d": (MODEL_STRATEGY, "csi300", "SH000300", False, 0.0915),
        # no dataset config of its own: the market comes from its loop's strategy
        "2248ca1ab7db5a95b3e4d96cba0d8f13": (FACTOR_STRATEGY, "csi300", "SH000300", None, None),
    }


def test_views_are_documented_and_created_once(demo_library: Engine) -> None:
    with demo_library.connect() as conn:
        comments = dict(conn.execute(text(
            "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'rdagent' AND c.relkind = 'v'")).all())
        oids = conn.execute(text("SELECT to_regclass('rdagent.factor_library')::oid")).scalar_one()
    assert set(comments) == set(VIEWS)
    assert all("[definition sha256:" in c for c in comments.values())
    rs.ensure_registry_schema(demo_library)  # unchanged definitions: the views are kept, not re-created
    with demo_library.connect() as conn:
        assert conn.execute(text("SELECT to_regclass('rdagent.factor_library')::oid")).scalar_one() == oids


def test_an_old_registry_gets_the_new_columns(registry_engine: Engine, demo_server: str) -> None:
    """A registry synced before the library existed (no views, fewer columns) is upgraded by the next sync,
    which rewrites exactly the rows whose new columns are not NULL."""
    with RDAgentResultsClient(demo_server) as client:
        sync_all(registry_engine, client, ["factors", "loops"])
        with registry_engine.begin() as conn:
            for view in VIEWS:
                conn.exec_driver_sql(f"DROP VIEW rdagent.{view}")
            conn.exec_driver_sql("ALTER TABLE rdagent.factor_registry DROP COLUMN ic, DROP COLUMN sharpe")
            conn.exec_driver_sql("ALTER TABLE rdagent.loop_result DROP COLUMN annualized_return_basis")
        again = sync_all(registry_engine, client, ["factors", "loops"])
    assert (again["factors"].updated, again["factors"].unchanged) == (5, 10)  # the five with a Sharpe ratio
    assert (again["loops"].updated, again["loops"].unchanged) == (4, 2)  # the four with a return
    [row] = [r for r in view_rows(registry_engine, "factor_library", "name")
             if (r["name"], r["source"]) == ("factor_mom_20d", "sota")]
    assert (row["sharpe"], row["annualized_return"], row["ic"]) == (1.57, 0.1302, None)


def test_record_factor_impl_keeps_a_version_history(
    registry_engine: Engine, demo_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "lib" / "tmp_factors_lib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "generated.py").write_text(
        "import pandas as pd\n\ndef factor_mom_20d(df: pd.DataFrame) -> pd.Series:\n    return df.iloc[:, 0]\n")
    (package / "VERSION").write_text("20260101\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    packages = FactorPackages.parse(["rd_factors_lib=tmp_factors_lib"])
    with RDAgentResultsClient(demo_server) as client:
        sync_all(registry_engine, client, ["factors"])

    first = record_factor_impl(registry_engine, packages)
    assert (first.pointers, first.resolving, first.not_resolving, first.new_version_rows) == (5, 0, 5, ("rd_factors_lib",))
    statuses = {(r["name"], r["source"]): (r["impl_resolves"], r["impl_status"], r["impl_installed_version"])
                for r in view_rows(registry_engine, "factor_library", "name") if r["impl_module"]}
    assert statuses[("factor_mom_20d", "sota")] == (False, "package_older", "20260101")
    assert statuses[("factor_hl_range", "rdagent_generated")] == (False, "missing_implementation", "20260101")

    again = record_factor_impl(registry_engine, packages)
    assert (again.changed, again.removed, again.new_version_rows) == (0, 0, ())

    (package / "VERSION").write_text("20260301\n")  # the package is upgraded
    upgraded = record_factor_impl(registry_engine, packages)
    assert (upgraded.changed, upgraded.resolving, upgraded.new_version_rows) == (5, 2, ("rd_factors_lib",))
    statuses = {(r["name"], r["source"]): (r["impl_resolves"], r["impl_status"])
                for r in view_rows(registry_engine, "factor_library", "name") if r["impl_module"]}
    assert statuses[("factor_mom_20d", "sota")] == (True, "package_newer")
    with registry_engine.connect() as conn:
        t = rs.factor_package_version
        history = conn.execute(select(t.c.package, t.c.import_name, t.c.installed_version, t.c.recorded_at,
                                      t.c.last_checked_at).order_by(t.c.recorded_at)).all()
    assert [(h.package, h.import_name, h.installed_version) for h in history] == [
        ("rd_factors_lib", "tmp_factors_lib", "20260101"), ("rd_factors_lib", "tmp_factors_lib", "20260301")]
    assert history[0].last_checked_at > history[0].recorded_at and history[1].recorded_at > history[0].last_checked_at
    sys.modules.pop("tmp_factors_lib.generated", None)
    sys.modules.pop("tmp_factors_lib", None)


def test_glances_read_the_views(demo_library: Engine) -> None:
    factors = glance(demo_library, "factors")
    assert [r["name"] for r in factors.rows][:1] == ["CLOSE0"]  # no demo factor has an IC: by name then
    assert factors.numbers == {"factors": 15, "factors_with_ic": 0, "factors_with_pointer": 5,
                               "pointers_resolving": 5, "pointers_not_resolving": 0}
    loops = glance(demo_library, "loops")
    assert loops.numbers == {"loops": 6, "loops_positive_decision": 2, "loops_with_result": 5,
                             "best_annualized_return": 0.1342, "best_ic": 0.0381}
    artifacts = glance(demo_library, "loop_artifacts")
    report = next(r for r in artifacts.rows if r["artifact"] == "qlib_report" and r["loop_id"] == 1)
    assert report["files"] == "qlib_res.csv (1,932 B), ret.pkl (48,213 B), ret_curve.png (84,502 B)"
    assert (report["total_bytes"], report["primary"]) == (1932 + 48213 + 84502, True)
    assert report["summary"] == '{"annualized_return": 0.1187, "ic": 0.0312, "max_drawdown": -0.0934}'
    assert artifacts.numbers["artifacts"] == 7 and artifacts.numbers["loops_with_artifacts"] == 2
    assert glance(demo_library, "models").numbers == {"models": 4, "model_types": 1}
    assert glance(demo_library, "unknown") is None


# ------------------------------------------------------------------------- generated results
def _compare(rows: dict[Any, dict[str, Any]], expected: dict[Any, dict[str, Any]]) -> None:
    assert set(rows) == set(expected)
    mismatches = {key: ({c: rows[key][c] for c in want}, want) for key, want in expected.items()
                  if {c: rows[key][c] for c in want} != want}
    assert not mismatches, list(mismatches.items())[:3]


def _state(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every registry table, minus the columns a re-sync is meant to move."""
    moving = {"last_seen_at", "checked_at", "last_checked_at", "last_synced_at", "last_published_at", "stats"}
    tables = (*rs.REGISTRY_TABLES, rs.factor_impl_resolution, rs.factor_package_version, rs.sync_state)
    with engine.connect() as conn:
        return {t.name: [{k: v for k, v in r.items() if k not in moving}
                         for r in conn.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                for t in tables}


def test_views_equal_the_generated_records(registry_engine: Engine, generated: Generated, start_server) -> None:
    with RDAgentResultsClient(start_server(generated.path)) as client:
        results = sync_all(registry_engine, client)
        record_factor_impl(registry_engine, DEMO_PACKAGES)
        assert {k: results[k].records for k in generated.records} == generated.records
        library = view_rows(registry_engine, "factor_library", "name, source")
        _compare({(r["name"], r["source"]): r for r in library if r["catalog"] == "factor_catalog"}, generated.factors)
        _compare({r["name"]: r for r in library if r["catalog"] == "alpha158_meta"}, generated.alpha_only)
        _compare({(r["task_run_id"], r["loop_id"], r["workspace_id"]): r
                  for r in view_rows(registry_engine, "loop_leaderboard", "task_run_id")}, generated.loops)
        _compare({r["strategy_id"]: r for r in view_rows(registry_engine, "strategy_library", "strategy_id")},
                 generated.strategies)
        _compare({r["model_id"]: r for r in view_rows(registry_engine, "model_library", "model_id")}, generated.models)

        before = _state(registry_engine)
        again = sync_all(registry_engine, client)
        impl = record_factor_impl(registry_engine, DEMO_PACKAGES)
    assert {k: (s.inserted, s.updated, s.deactivated) for k, s in again.items() if (s.inserted, s.updated,
            s.deactivated) != (0, 0, 0)} == {}
    assert (impl.changed, impl.removed, impl.new_version_rows) == (0, 0, ())
    assert _state(registry_engine) == before


def test_the_researchers_guide_examples_run(demo_library: Engine) -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "researchers.md").read_text(encoding="utf-8")
    section = guide[guide.index("## RD-Agent results library"):]
    block = section[section.index("```sql") + len("```sql"):]
    statements = [s.strip() for s in block[:block.index("```")].split(";") if s.strip()]
    assert len(statements) == 4
    with demo_library.connect() as conn:
        counts = [len(conn.exec_driver_sql(statement).all()) for statement in statements]
    assert counts == [0, 2, 2, 3]  # no demo factor reports an IC; two accepted loops; two strategies; 3 models × 1 artifact

"""The Dagster wiring with real resources: materialisation, the asset check, the job and the sensor."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckSeverity,
    FloatMetadataValue,
    IntMetadataValue,
    TableMetadataValue,
    AssetKey,
    DagsterInstance,
    Definitions,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from aistock_pipelines.demo.rdagent_results_builder import WS_D, build_demo_results_dir, load_demo_catalog
from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.orchestration.rdagent_assets import (
    CHECK_NAME,
    JOB_NAME,
    RDAGENT_ASSETS,
    SENSOR_NAME,
    factor_package_check,
    rdagent_assets,
    rdagent_definitions,
    rdagent_results_sensor,
    results_client,
)
from aistock_pipelines.rdagent.factor_impl import DEMO_FACTOR_PACKAGES
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
from aistock_pipelines.rdagent.sync import NOT_PUBLISHED, catalog_fingerprint
from aistock_pipelines.resources import AIstockDatabase, RDAgentResultsApi, resources_for
from aistock_pipelines.settings import Settings
from aistock_pipelines_tests.rdagent.fixtures import HANG
from aistock_pipelines_tests.rdagent.generated_results import generate_results_dir

ALL_KEYS = [AssetKey(["rdagent", n]) for n in ("factor_catalog", "strategy_catalog", "loop_catalog", "model_catalog",
                                               "alpha158_meta", "loop_artifacts", "run_registry")]


def key(name: str) -> AssetKey:
    return AssetKey(["rdagent", name])


@pytest.fixture(scope="module")
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:
        yield inst


def api(base_url: str, **overrides: Any) -> RDAgentResultsApi:
    return RDAgentResultsApi(**{"base_url": base_url, "connect_timeout_s": 1.0, "read_timeout_s": 2.0, **overrides})


def resources(db_url: str, base_url: str) -> dict[str, Any]:
    return {"aistock_db": AIstockDatabase(url=db_url), "rdagent_api": api(base_url)}


def count(engine: Engine, table, *, active: bool | None = None) -> int:
    query = select(func.count()).select_from(table)
    if active is not None:
        query = query.where(table.c.active.is_(active))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def tick(instance: DagsterInstance, base_url: str, cursor: str | None, **api_kwargs: Any) -> SensorResult | SkipReason:
    context = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"rdagent_api": api(base_url, **api_kwargs)})
    return rdagent_results_sensor(context)


def test_definitions_merge_into_a_code_location() -> None:
    rdagent = rdagent_definitions()
    merged = Definitions.merge(rdagent, Definitions(resources=resources_for(Settings.from_env({}))))
    Definitions.validate_loadable(merged)
    graph = merged.resolve_asset_graph()
    assert set(graph.get_all_asset_keys()) == set(ALL_KEYS)
    assert {graph.get(k).group_name for k in ALL_KEYS} == {"rdagent"}
    assert graph.get(key("loop_artifacts")).parent_keys == {key("loop_catalog")}
    assert [c.name for c in graph.asset_check_keys] == [CHECK_NAME]
    job = merged.resolve_job_def(JOB_NAME)
    assert job.tags == {"aistock/job": "rdagent_sync"}
    assert set(job.asset_layer.selected_asset_keys) == set(ALL_KEYS)
    assert [c.name for c in job.asset_layer.asset_graph.asset_check_keys] == [CHECK_NAME]
    sensor = merged.resolve_sensor_def(SENSOR_NAME)
    assert sensor.minimum_interval_seconds == 60 and sensor.job_name == JOB_NAME
    assert not rdagent.resources  # supplied by the code location


def test_sensor_client_timeouts_are_capped() -> None:
    slow = RDAgentResultsApi(base_url="http://127.0.0.1:9", connect_timeout_s=30, read_timeout_s=120)
    with results_client(slow, for_sensor=True) as client:
        assert (client._http.timeout.connect, client._http.timeout.read, client.retries) == (2.0, 5.0, 0)
    with results_client(slow) as client:
        assert (client._http.timeout.connect, client._http.timeout.read) == (30, 120)


sync_metadata_keys = {"published", "inserted", "updated", "unchanged", "deactivated", "reactivated", "records",
                      "duplicates_merged", "generated_at_utc", "fingerprint"}


def test_materialize_with_real_resources(
    registry_engine: Engine, demo_server: str, instance: DagsterInstance
) -> None:
    db_url = registry_engine.url.render_as_string(hide_password=False)
    result = materialize([*RDAGENT_ASSETS, factor_package_check(DEMO_FACTOR_PACKAGES)],
                         resources=resources(db_url, demo_server), instance=instance)
    assert result.success
    meta = {e.asset_key: {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}
    assert set(meta) == set(ALL_KEYS)
    with RDAgentResultsClient(demo_server) as client:
        factors = client.fetch_catalog("factors")
    assert {k: v for k, v in meta[key("factor_catalog")].items() if k in sync_metadata_keys} == {
        "published": True, "inserted": 15, "updated": 0, "unchanged": 0, "deactivated": 0, "reactivated": 0,
        "records": 16, "duplicates_merged": 1, "generated_at_utc": "2026-01-14T08:30:12.345678+00:00",
        "fingerprint": catalog_fingerprint(factors),
    }
    assert type(meta[key("factor_catalog")]["inserted"]) is int
    assert (meta[key("loop_artifacts")]["inserted"], meta[key("loop_artifacts")]["generated_at_utc"]) == (7, "")
    assert meta[key("alpha158_meta")]["inserted"] == 20
    tables = {rs.factor_registry: 15, rs.strategy_registry: 3, rs.loop_result: 6, rs.model_registry: 4,
              rs.alpha158_meta: 20, rs.loop_artifacts: 7}
    assert {t.name: count(registry_engine, t, active=True) for t in tables} == {t.name: n for t, n in tables.items()}
    with registry_engine.connect() as conn:
        sharpe = conn.execute(select(rs.loop_result.c.sharpe).where(rs.loop_result.c.workspace_id.like("d5f1%")))
        assert sharpe.scalar_one() == 1.57

    [check] = result.get_asset_check_evaluations()
    # the demo catalog's pointers all resolve in the bundled package (a missing one: the next test)
    assert (check.check_name, check.passed, check.severity) == (CHECK_NAME, True, AssetCheckSeverity.WARN)
    check_meta = {k: v.value for k, v in check.metadata.items()}
    assert (check_meta["aligned"], check_meta["missing_implementation"], check_meta["pointers"]) == (5, 0, 5)
    assert json.loads(check_meta["installed_versions"]) == {"rd_factors_lib": "20260114"}
    assert check_meta["problems"] == []


def test_check_without_the_demo_mapping_reports_every_pointer_missing(
    registry_engine: Engine, demo_server: str, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AISTOCK_FACTOR_PACKAGES", raising=False)  # default: the real rd_factors_lib
    db_url = registry_engine.url.render_as_string(hide_password=False)
    result = materialize([RDAGENT_ASSETS[0], factor_package_check()], resources=resources(db_url, demo_server),
                         instance=instance)
    [check] = result.get_asset_check_evaluations()
    assert check.passed is False
    assert check.metadata["missing_implementation"].value == 5
    assert check.metadata["installed_versions"].value == '{"rd_factors_lib": null}'


def test_failed_sync_fails_the_asset_and_keeps_rows(
    registry_engine: Engine, demo_server: str, fake_api, instance: DagsterInstance
) -> None:
    db_url = registry_engine.url.render_as_string(hide_password=False)
    factor_asset = RDAGENT_ASSETS[0]
    assert materialize([factor_asset], resources=resources(db_url, demo_server), instance=instance).success
    bad = fake_api({"/catalog/factors": b'{"version": "v1", "factors": [{"name": "x"'})
    result = materialize([factor_asset], resources=resources(db_url, bad.base_url), instance=instance,
                         raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "is not valid JSON" in failure.step_failure_data.user_failure_data.description
    assert count(registry_engine, rs.factor_registry, active=True) == 15


def _run(defs: Definitions, request, instance: DagsterInstance):
    job = defs.resolve_job_def(JOB_NAME)
    return job.execute_in_process(instance=instance, asset_selection=request.asset_selection, tags=request.tags)


def test_sensor_requests_only_the_changed_catalog(
    registry_engine: Engine, results_dir: Path, start_server, instance: DagsterInstance
) -> None:
    base_url = start_server(results_dir)
    db_url = registry_engine.url.render_as_string(hide_password=False)
    defs = Definitions.merge(rdagent_definitions(factor_packages=DEMO_FACTOR_PACKAGES),
                             Definitions(resources=resources(db_url, base_url)))

    first = tick(instance, base_url, None)
    assert isinstance(first, SensorResult)
    [request] = first.run_requests
    assert request.asset_selection == ALL_KEYS
    assert request.tags["aistock/job"] == "rdagent_sync"
    cursor = json.loads(first.cursor)
    assert set(cursor) == {"factors", "strategies", "loops", "models", "alpha158", "loop_artifacts", "task_runs",
                           "run_loops", "workspaces"}
    run = _run(defs, request, instance)
    assert run.success and run.dagster_run.tags["aistock/job"] == "rdagent_sync"
    assert len(run.get_asset_check_evaluations()) == 1  # the job carries the check

    unchanged = tick(instance, base_url, first.cursor)
    assert isinstance(unchanged, SkipReason) and unchanged.skip_message == "no RD-Agent catalog changed"

    path = results_dir / "aistock" / "strategy_catalog.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["strategies"][1]["freq"] = "5min"
    path.write_text(json.dumps(payload), encoding="utf-8")
    changed = tick(instance, base_url, first.cursor)
    assert isinstance(changed, SensorResult)
    [request] = changed.run_requests
    assert request.asset_selection == [key("strategy_catalog")]
    assert request.tags["rdagent/changed"] == "strategies"
    new_cursor = json.loads(changed.cursor)
    assert {k for k in cursor if cursor[k] != new_cursor[k]} == {"strategies"}

    run = _run(defs, request, instance)
    assert run.success
    [event] = run.get_asset_materialization_events()
    assert event.asset_key == key("strategy_catalog")
    assert (event.materialization.metadata["updated"].value, event.materialization.metadata["unchanged"].value) == (1, 2)
    with registry_engine.connect() as conn:
        freq = conn.execute(select(rs.strategy_registry.c.raw["freq"].astext)
                            .where(rs.strategy_registry.c.strategy_id == payload["strategies"][1]["strategy_id"]))
        assert freq.scalar_one() == "5min"

    loops = results_dir / "aistock" / "loop_catalog.json"
    data = json.loads(loops.read_text(encoding="utf-8"))
    data["loops"].pop()
    loops.write_text(json.dumps(data), encoding="utf-8")
    after_loops = tick(instance, base_url, changed.cursor)
    assert after_loops.run_requests[0].asset_selection == [key("loop_catalog"), key("loop_artifacts")]


def test_sensor_models_404_is_a_fingerprint_of_its_own(tmp_path: Path, start_server, instance: DagsterInstance) -> None:
    directory = build_demo_results_dir(tmp_path / "r", with_models=False)
    base_url = start_server(directory)
    first = tick(instance, base_url, None)
    assert json.loads(first.cursor)["models"] == NOT_PUBLISHED
    assert key("model_catalog") in first.run_requests[0].asset_selection
    assert isinstance(tick(instance, base_url, first.cursor), SkipReason)
    (directory / "aistock" / "model_catalog.json").write_text(
        json.dumps(load_demo_catalog("model_catalog.json")), encoding="utf-8")
    published = tick(instance, base_url, first.cursor)
    assert published.run_requests[0].asset_selection == [key("model_catalog")]
    assert json.loads(published.cursor)["models"].startswith("2026-01-14T08:30:12.345678+00:00|sha256:")


def test_sensor_skips_when_the_server_is_down(closed_port_url: str, instance: DagsterInstance) -> None:
    started = time.monotonic()
    result = tick(instance, closed_port_url, '{"factors": "x"}')
    assert isinstance(result, SkipReason)
    assert f"RD-Agent results API at {closed_port_url} is not usable" in result.skip_message
    assert "ConnectError" in result.skip_message
    assert time.monotonic() - started < 2


def test_sensor_skips_when_the_server_hangs(fake_api, instance: DagsterInstance) -> None:
    server = fake_api({"/catalog/factors": HANG})
    started = time.monotonic()
    result = tick(instance, server.base_url, None, read_timeout_s=0.4)
    elapsed = time.monotonic() - started
    assert isinstance(result, SkipReason) and "timed out" in result.skip_message
    assert server.paths == ["/catalog/factors"]  # no retry, no further catalogs
    assert 0.4 <= elapsed < 1.5  # the resource's read timeout, once


def test_sensor_with_one_unreadable_catalog(fake_api, instance: DagsterInstance) -> None:
    empty = lambda k: {"version": "v1", "generated_at_utc": "t", k: []}  # noqa: E731
    server = fake_api({"/catalog/factors": b"<html>oops</html>", "/catalog/strategies": empty("strategies"),
                       "/catalog/loops": empty("loops"), "/catalog/models": empty("models")})
    result = tick(instance, server.base_url, None)
    assert result.run_requests[0].asset_selection == [
        key("strategy_catalog"), key("loop_catalog"), key("model_catalog"), key("alpha158_meta"), key("loop_artifacts"),
        key("run_registry"),
    ]
    cursor = json.loads(result.cursor)
    assert "factors" not in cursor and cursor["alpha158"] == NOT_PUBLISHED  # factors retried next tick
    again = tick(instance, server.base_url, result.cursor)
    assert isinstance(again, SkipReason) and again.skip_message == "no RD-Agent catalog changed (unreadable: factors)"


#: asset -> the key of its glance table in the materialization metadata
GLANCE_TABLES = {"factor_catalog": "top_factors", "strategy_catalog": "top_strategies", "loop_catalog": "newest_loops",
                 "model_catalog": "newest_models", "alpha158_meta": "alpha158_sample",
                 "loop_artifacts": "artifacts_by_loop", "run_registry": "registry_listings"}


def test_each_catalog_asset_shows_the_library(
    registry_engine: Engine, tmp_path: Path, start_server, instance: DagsterInstance
) -> None:
    """Hundreds of generated factors and loops: every asset's latest materialization in the instance's
    event log carries its table (with a schema) and the numbers the Plots tab draws."""
    generated = generate_results_dir(tmp_path / "generated")
    db_url = registry_engine.url.render_as_string(hide_password=False)
    result = materialize(rdagent_assets(DEMO_FACTOR_PACKAGES), instance=instance,
                         resources=resources(db_url, start_server(generated.path)))
    assert result.success
    metadata = {}
    for name, table_key in GLANCE_TABLES.items():
        event = instance.get_latest_materialization_event(key(name))
        assert event is not None and event.run_id == result.run_id
        metadata[name] = meta = event.asset_materialization.metadata
        table = meta[table_key]
        assert isinstance(table, TableMetadataValue) and table.records, name
        columns = [c.name for c in table.schema.columns]
        assert all(set(r.data) == set(columns) for r in table.records), name

    factors = metadata["factor_catalog"]
    ics = [f["ic"] for f in generated.factors.values() if f["ic"] is not None]
    assert isinstance(factors["best_ic"], FloatMetadataValue) and factors["best_ic"].value == max(ics)
    assert isinstance(factors["factors"], IntMetadataValue) and factors["factors"].value == len(generated.factors)
    assert factors["factors_with_ic"].value == len(ics)
    resolving = sum(f["impl_resolves"] is True for f in generated.factors.values())
    assert factors["pointers_resolving"].value == factors["impl_resolving"].value == resolving
    top = [r.data for r in factors["top_factors"].value.records]
    assert [r["ic"] for r in top] == sorted(ics, reverse=True)[:len(top)]
    best = max(generated.factors, key=lambda k: generated.factors[k]["ic"] or -1)
    assert (top[0]["name"], top[0]["source"], top[0]["impl_resolves"]) == (*best, generated.factors[best]["impl_resolves"])

    loops = metadata["loop_catalog"]
    assert loops["loops"].value == len(generated.loops)
    assert loops["loops_positive_decision"].value == sum(v["decision"] is True for v in generated.loops.values())
    returns = [v["annualized_return"] for v in generated.loops.values() if v["annualized_return"] is not None]
    assert loops["best_annualized_return"].value == max(returns)
    newest = loops["newest_loops"].value.records[0].data
    expected = generated.loops[(newest["task_run_id"], newest["loop_id"], newest["workspace_id"])]
    assert {k: newest[k] for k in ("annualized_return", "annualized_return_basis", "ic", "decision")} == {
        k: expected[k] for k in ("annualized_return", "annualized_return_basis", "ic", "decision")}

    assert metadata["strategy_catalog"]["strategies"].value == len(generated.strategies)
    assert metadata["model_catalog"]["models"].value == len(generated.models)
    assert metadata["alpha158_meta"]["alpha158_factors"].value == generated.records["alpha158"]
    artifacts = metadata["loop_artifacts"]
    assert artifacts["artifacts"].value == generated.records["loop_artifacts"]
    rows = [r.data for r in artifacts["artifacts_by_loop"].value.records]
    assert any(r["files"].startswith("out/") and r["total_bytes"] > 0 for r in rows)
    assert any(r["summary"] == '{"ic": 0.0312, "note": "月度"}' for r in rows)  # sorted keys, as written
    assert any(r["summary"] == "(612 characters, not shown)" for r in rows)
    listings = [r.data for r in metadata["run_registry"]["registry_listings"].value.records]
    assert listings == [{"listing": k, "offered": False, "rows": 0} for k in ("task_runs", "run_loops", "workspaces")]


def test_sensor_sees_an_artifact_only_change(
    registry_engine: Engine, results_dir: Path, start_server, instance: DagsterInstance
) -> None:
    base_url = start_server(results_dir)
    db_url = registry_engine.url.render_as_string(hide_password=False)
    defs = Definitions.merge(rdagent_definitions(factor_packages=DEMO_FACTOR_PACKAGES),
                             Definitions(resources=resources(db_url, base_url)))
    first = tick(instance, base_url, None)
    assert _run(defs, first.run_requests[0], instance).success
    assert isinstance(tick(instance, base_url, first.cursor), SkipReason)

    # RD-Agent registers one more file of a loop's report; no catalog changes
    with closing(sqlite3.connect(results_dir / "registry.sqlite")) as conn, conn:
        conn.execute("INSERT INTO artifact_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     ("file-d-curve", "art-d-report", WS_D, "ret_curve.png", "ab" * 32, 90111,
                      "2025-12-18T11:03:00+00:00", "image"))
    changed = tick(instance, base_url, first.cursor)
    assert isinstance(changed, SensorResult)
    [request] = changed.run_requests
    assert request.asset_selection == [key("loop_artifacts")] and request.tags["rdagent/changed"] == "loop_artifacts"
    run = _run(defs, request, instance)
    [event] = run.get_asset_materialization_events()
    meta = event.materialization.metadata
    assert (meta["updated"].value, meta["unchanged"].value) == (1, 6)
    # the sensor's fingerprint is the one the sync records
    assert json.loads(changed.cursor)["loop_artifacts"] == meta["fingerprint"].value
    with registry_engine.connect() as conn:
        files = conn.execute(select(rs.loop_artifacts.c.files).where(rs.loop_artifacts.c.artifact_id == "art-d-report"))
        assert [f["path"] for f in files.scalar_one()] == ["ret.pkl", "ret_curve.png"]
    assert isinstance(tick(instance, base_url, changed.cursor), SkipReason)

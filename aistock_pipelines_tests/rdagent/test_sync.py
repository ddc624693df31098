"""The registry sync against real HTTP servers (conformant and misbehaving) and a real PostgreSQL."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from aistock_pipelines.demo.rdagent_results_builder import (
    ARTIFACT_FILES,
    ARTIFACTS,
    RUN_TS,
    RUN_UUID,
    WS_A,
    WS_D,
    WS_E,
    build_demo_results_dir,
    load_demo_catalog,
)
from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent import registry_writes, sync
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
from aistock_pipelines.rdagent.sync import (
    NOT_PUBLISHED,
    SyncAllError,
    SyncError,
    catalog_fingerprint,
    normalise_kpis,
    poll_fingerprints,
    strategy_segments,
    sync_all,
    sync_catalog,
    sync_loop_artifacts,
)
from aistock_pipelines_tests.rdagent.fixtures import HANG

FAST = {"backoff": 0.01, "connect_timeout": 1.0, "read_timeout": 2.0, "retries": 1}
GENERATED = "2026-01-14T08:30:12.345678+00:00"


def client_for(base_url: str, **overrides: Any) -> RDAgentResultsClient:
    return RDAgentResultsClient(base_url, **{**FAST, **overrides})


def rows(engine: Engine, table: Table, *, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Full table contents in key order (minus ``exclude``d columns)."""
    keys = [c for c in table.primary_key.columns]
    with engine.connect() as conn:
        result = conn.execute(select(table).order_by(*keys)).mappings().all()
    return [{k: v for k, v in row.items() if k not in exclude} for row in result]


def everything(engine: Engine, *, exclude: tuple[str, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    return {t.name: rows(engine, t, exclude=exclude) for t in (*rs.REGISTRY_TABLES, rs.sync_state)}


def nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value


def envelope(key: str, records: list, generated: str = GENERATED) -> dict:
    return {"version": "v1", "generated_at_utc": generated, "source": "rdagent_tools", key: records}


@pytest.fixture
def synced(registry_engine: Engine, demo_server: str) -> Engine:
    """A registry holding a full sync of the demo results."""
    with client_for(demo_server) as client:
        sync_all(registry_engine, client)
    return registry_engine


# ----------------------------------------------------------------------------------- full sync
def test_full_sync_counts(registry_engine: Engine, demo_server: str) -> None:
    with client_for(demo_server) as client:
        results = sync_all(registry_engine, client)
    counts = {k: (s.records, s.duplicates_merged, s.inserted, s.updated, s.unchanged, s.deactivated)
              for k, s in results.items()}
    assert counts == {
        "factors": (16, 1, 15, 0, 0, 0),
        "strategies": (3, 0, 3, 0, 0, 0),
        "loops": (6, 0, 6, 0, 0, 0),
        "models": (4, 0, 4, 0, 0, 0),
        "alpha158": (20, 0, 20, 0, 0, 0),
        "loop_artifacts": (7, 0, 7, 0, 0, 0),
        "task_runs": (0, 0, 0, 0, 0, 0), "run_loops": (0, 0, 0, 0, 0, 0), "workspaces": (0, 0, 0, 0, 0, 0),
    }
    assert [k for k, s in results.items() if s.published] == [*sync.CATALOGS, "loop_artifacts"]
    assert {results[k].fingerprint for k in sync.RUN_REGISTRY_KINDS} == {sync.NOT_OFFERED}  # the real API's 404
    assert results["factors"].generated_at_utc == GENERATED
    assert results["alpha158"].generated_at_utc == "2026-01-10T02:15:40.118204+00:00"
    assert results["factors"].fingerprint.startswith(f"{GENERATED}|sha256:")


def test_factor_rows_equal_the_catalog(synced: Engine) -> None:
    expected: dict[tuple[str, str], dict] = {}
    for record in load_demo_catalog("factor_catalog.json")["factors"]:
        expected[(record["name"], record["source"])] = nan_to_none(record)  # last occurrence wins
    stored = rows(synced, rs.factor_registry)
    assert [(r["name"], r["source"]) for r in stored] == sorted(expected)
    for row in stored:
        record = expected[(row["name"], row["source"])]
        assert row["raw"] == record
        assert (row["expression"], row["formula_hint"], row["description_cn"], row["tags"], row["region"]) == (
            record.get("expression"), record.get("formula_hint"), record.get("description_cn"),
            record.get("tags"), record.get("region"),
        )
        assert (row["impl_module"], row["impl_func"], row["impl_version"]) == (
            record.get("impl_module"), record.get("impl_func"), record.get("impl_version"),
        )
        assert row["active"] is True and row["deactivated_at"] is None
        assert row["catalog_generated_at_utc"] == GENERATED
        assert row["first_seen_at"] == row["changed_at"] == row["last_seen_at"]
    pvd = next(r for r in stored if r["name"] == "Price_Volume_Divergence_5D")
    assert pvd["expression"] == "Rank(Corr(Rank($close), Rank($volume), 5))"  # the later duplicate
    hl = next(r for r in stored if r["name"] == "factor_hl_range")
    assert hl["raw"]["best_performance"]["sharpe"] is None  # NaN in the file
    with synced.connect() as conn:  # stored as JSON null, not as a missing key
        assert conn.exec_driver_sql(
            "SELECT raw->'best_performance'->'sharpe' = 'null'::jsonb FROM rdagent.factor_registry "
            "WHERE name = 'factor_hl_range'"
        ).scalar_one() is True


EXPECTED_KPIS = {
    # (task_run_id, loop_id, workspace_id): (annualized_return, max_drawdown, sharpe, ic, icir, win_rate)
    (RUN_UUID, 0, "c3e9a6d1f7b24c5e8a0d3f6b9c2e7a48"): (0.0402, None, None, None, None, None),
    (RUN_UUID, 1, WS_A): (0.1187, -0.0934, None, 0.0312, 0.2487, None),
    (RUN_UUID, 1, "b7d2f9a4c1e84b3d9f6a2c8e5b0d4f19"): (None,) * 6,
    (RUN_TS, 3, WS_D): (0.1342, -0.0871, 1.57, 0.0381, 0.3125, 0.5412),
    (RUN_TS, 3, WS_E): (0.0915, -0.1204, 1.03, 0.0297, 0.2411, None),
    (RUN_TS, 4, "f2b6d9e4c8a14f7b3e5d0c9a6f2b8e71"): (None,) * 6,
}


def test_loop_rows_and_kpis(synced: Engine) -> None:
    records = {(r["task_run_id"], r["loop_id"], r["workspace_id"]): r
               for r in load_demo_catalog("loop_catalog.json")["loops"]}
    stored = rows(synced, rs.loop_result)
    assert len(stored) == 6
    for row in stored:
        key = (row["task_run_id"], row["loop_id"], row["workspace_id"])
        record = records[key]
        assert row["raw"] == record
        kpis = tuple(row[c] for c in ("annualized_return", "max_drawdown", "sharpe", "ic", "icir", "win_rate"))
        assert kpis == EXPECTED_KPIS[key]
        assert (row["status"], row["has_result"], row["decision"], row["strategy_id"]) == (
            record["status"], record["has_result"], record["decision"], record["strategy_id"],
        )
        assert (row["factor_names"], row["metrics"], row["summary_texts"], row["paths"]) == (
            record["factor_names"], record["metrics"], record["summary_texts"], record["paths"],
        )
        assert row["model_run_id"] is None and row["factor_impl_version"] is None


def test_strategy_model_alpha_and_artifact_rows(synced: Engine) -> None:
    strategies = {r["strategy_id"]: r for r in rows(synced, rs.strategy_registry)}
    files = {r["strategy_id"]: r for r in load_demo_catalog("strategy_catalog.json")["strategies"]}
    assert set(strategies) == set(files)
    model = strategies["0c6165af647756ada46daa72372dca65"]
    assert model["model_type"] == "LGBModel"
    assert (model["train_start"], model["train_end"], model["valid_start"], model["valid_end"],
            model["test_start"], model["test_end"]) == (
        date(2010, 1, 7), date(2018, 12, 31), date(2019, 1, 2), date(2020, 12, 31), date(2021, 1, 4),
        date(2025, 6, 30),
    )
    assert model["portfolio_config"]["kwargs"]["topk"] == 50
    assert model["workspace_example"]["loop_id"] == 3
    bare = strategies["82afdc871dbf5b02b8daebfa297259f4"]  # no configs at all
    assert (bare["model_type"], bare["train_start"], bare["dataset_config"], bare["template_files"]) == (
        None, None, None, ["conf.yaml"],
    )
    for strategy_id, row in strategies.items():
        assert row["raw"] == files[strategy_id]

    models = {r["model_id"]: r for r in rows(synced, rs.model_registry)}
    assert {m: (r["task_run_id"], r["loop_id"], r["workspace_id"], r["model_type"]) for m, r in models.items()} == {
        "e637cc739ce351769c6d376a9c0dee2b": (RUN_UUID, 1, WS_A, "LGBModel"),
        "feb0c0ecd14156c3a7fa1270c2e89277": (RUN_TS, 3, WS_D, "LGBModel"),
        "3e08a2a8010654e989c6666ca133e85d": (RUN_TS, 3, WS_E, "LGBModel"),
        "2248ca1ab7db5a95b3e4d96cba0d8f13": (RUN_TS, 4, "f2b6d9e4c8a14f7b3e5d0c9a6f2b8e71", "LGBModel"),
    }
    assert models["3e08a2a8010654e989c6666ca133e85d"]["model_config"]["kwargs"]["num_leaves"] == 64
    assert models["2248ca1ab7db5a95b3e4d96cba0d8f13"]["model_config"] is None  # absent -> SQL NULL

    alpha = rows(synced, rs.alpha158_meta)
    meta = load_demo_catalog("alpha158_meta.json")["factors"]
    assert {r["name"]: (r["expression"], r["tags"], r["raw"]) for r in alpha} == {
        f["name"]: (f["expression"], f["tags"], f) for f in meta
    }

    artifacts = {r["artifact_id"]: r for r in rows(synced, rs.loop_artifacts)}
    assert {a: (r["task_run_id"], r["loop_id"], r["type"], r["name"], r["status"], r["primary_flag"], r["entry_path"])
            for a, r in artifacts.items()} == {
        a[0]: (a[1], a[2], a[4], a[5], a[6], bool(a[7]), a[8]) for a in ARTIFACTS
    }
    for artifact_id, row in artifacts.items():
        ordered = sorted((f for f in ARTIFACT_FILES if f[1] == artifact_id), key=lambda f: f[3])  # by path
        assert [(f["file_id"], f["path"], f["sha256"], f["size_bytes"]) for f in row["files"]] == [
            (f[0], f[3], f[4], f[5]) for f in ordered
        ]
        assert row["workspace_id"] is None  # the endpoint does not say
    assert artifacts["art-a-report"]["summary"] == {"annualized_return": 0.1187, "max_drawdown": -0.0934, "ic": 0.0312}
    assert artifacts["art-d-report"]["summary"] == {"annualized_return": 0.1342, "sharpe": None}
    assert artifacts["art-e-report"]["summary"] == {}  # broken summary_json upstream
    assert artifacts["art-b-feedback"]["files"] == []

    state = {r["kind"]: r for r in rows(synced, rs.sync_state)}
    assert set(state) == set(sync.SYNC_KINDS)
    assert state["alpha158"]["envelope"]["config_path"].endswith("conf_baseline.yaml")
    assert state["loop_artifacts"]["envelope"] == {"loops": 4, "full": True}
    assert state["factors"]["record_count"] == 16 and state["factors"]["published"] is True


def test_resync_changes_nothing_but_last_seen(synced: Engine, demo_server: str) -> None:
    before = everything(synced)
    with client_for(demo_server) as client:
        again = sync_all(synced, client)
    assert {k: (s.inserted, s.updated, s.deactivated, s.unchanged) for k, s in again.items()} == {
        "factors": (0, 0, 0, 15), "strategies": (0, 0, 0, 3), "loops": (0, 0, 0, 6),
        "models": (0, 0, 0, 4), "alpha158": (0, 0, 0, 20), "loop_artifacts": (0, 0, 0, 7),
        "task_runs": (0, 0, 0, 0), "run_loops": (0, 0, 0, 0), "workspaces": (0, 0, 0, 0),
    }
    after = everything(synced)
    for name in (t.name for t in rs.REGISTRY_TABLES):
        strip = lambda table: [{k: v for k, v in r.items() if k != "last_seen_at"} for r in table]  # noqa: E731
        assert strip(after[name]) == strip(before[name]), name
        assert all(a["last_seen_at"] > b["last_seen_at"] for a, b in zip(after[name], before[name])), name


# ----------------------------------------------------------------------- changes upstream
def _edit(path: Path, change) -> None:
    payload = json.loads(path.read_text(encoding="utf-8"))
    change(payload)
    path.write_text(json.dumps(payload), encoding="utf-8")


def test_deactivate_update_and_reactivate(
    registry_engine: Engine, results_dir: Path, start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_writes, "_KEYS_PER_STATEMENT", 1)  # exercise the chunked lookups and updates
    base_url = start_server(results_dir)
    loop_file = results_dir / "aistock" / "loop_catalog.json"
    original = loop_file.read_text(encoding="utf-8")
    with client_for(base_url) as client:
        sync_all(registry_engine, client)
        first = rows(registry_engine, rs.loop_result)

        def drop_run_ts_loop_3_and_edit(payload: dict) -> None:
            payload["loops"] = [l for l in payload["loops"] if not (l["task_run_id"] == RUN_TS and l["loop_id"] == 3)]
            payload["loops"][0]["metrics"] = {"Unnamed: 0": "1day.excess_return_with_cost.annualized_return", "0": 0.05}

        _edit(loop_file, drop_run_ts_loop_3_and_edit)
        stats = sync_catalog(registry_engine, client, "loops")
        assert (stats.inserted, stats.updated, stats.unchanged, stats.deactivated) == (0, 1, 3, 2)
        artifacts = sync_loop_artifacts(registry_engine, client)
        assert (artifacts.inserted, artifacts.updated, artifacts.unchanged, artifacts.deactivated) == (0, 0, 4, 3)

        middle = {(r["task_run_id"], r["loop_id"], r["workspace_id"]): r for r in rows(registry_engine, rs.loop_result)}
        assert len(middle) == 6  # never deleted
        gone = [middle[(RUN_TS, 3, WS_D)], middle[(RUN_TS, 3, WS_E)]]
        assert [r["active"] for r in gone] == [False, False]
        assert all(r["deactivated_at"] is not None for r in gone)
        assert gone[0]["sharpe"] == 1.57  # the last known content is kept
        edited = middle[(RUN_UUID, 0, "c3e9a6d1f7b24c5e8a0d3f6b9c2e7a48")]
        assert edited["annualized_return"] == 0.05 and edited["changed_at"] > edited["first_seen_at"]
        inactive_artifacts = {r["artifact_id"] for r in rows(registry_engine, rs.loop_artifacts) if not r["active"]}
        assert inactive_artifacts == {"art-d-report", "art-d-model", "art-e-report"}

        loop_file.write_text(original, encoding="utf-8")
        back = sync_catalog(registry_engine, client, "loops")
        assert (back.inserted, back.updated, back.reactivated, back.deactivated, back.unchanged) == (0, 3, 2, 0, 3)
        assert sync_loop_artifacts(registry_engine, client).reactivated == 3
    final = rows(registry_engine, rs.loop_result)
    assert all(r["active"] and r["deactivated_at"] is None for r in final)
    for got, was in zip(final, first):
        assert got["raw"] == was["raw"] and got["first_seen_at"] == was["first_seen_at"]


def test_models_not_published_keeps_rows(synced: Engine, tmp_path: Path, start_server) -> None:
    before = rows(synced, rs.model_registry)
    state_before = {r["kind"]: r for r in rows(synced, rs.sync_state)}["models"]
    base_url = start_server(build_demo_results_dir(tmp_path / "no_models", with_models=False))
    with client_for(base_url) as client:
        stats = sync_catalog(synced, client, "models")
    assert (stats.published, stats.fingerprint, stats.deactivated, stats.records) == (False, NOT_PUBLISHED, 0, 0)
    assert rows(synced, rs.model_registry) == before
    assert len(before) == 4 and all(r["active"] for r in before)
    state = {r["kind"]: r for r in rows(synced, rs.sync_state)}["models"]
    assert (state["published"], state["fingerprint"]) == (False, NOT_PUBLISHED)
    assert state["last_published_at"] == state_before["last_published_at"]  # when it was last there
    assert state["generated_at_utc"] == GENERATED and state["record_count"] == 4  # last published copy
    assert state["last_synced_at"] > state_before["last_synced_at"]


# --------------------------------------------------------------------------------- bad input
BIG = {"version": "v1", "generated_at_utc": "t", "factors": [{"name": f"f{i}", "source": "s"} for i in range(2000)]}


@pytest.mark.parametrize(
    ("kind", "reply", "message"),
    [
        ("factors", b'{"version": "v1", "factors": [', "is not valid JSON"),
        ("factors", b"<html>502 Bad Gateway</html>", "is not valid JSON"),
        ("factors", envelope("strategies", [{"strategy_id": "x"}]), "has no 'factors' list"),
        ("strategies", {"version": "v1", "generated_at_utc": "t", "strategies": {"a": 1}},
         "strategies: Input should be a valid list"),
        ("factors", BIG, "over the 4096-byte cap"),
        ("loops", envelope("loops", [{"task_run_id": RUN_TS, "loop_id": "3a", "workspace_id": "w"}]),
         r"loops\.0\.loop_id: Input should be a valid integer"),
        ("loops", (500, {"detail": "registry locked"}), "HTTP 500: registry locked"),
        ("models", HANG, "timed out"),
    ],
    ids=["malformed-json", "html", "wrong-envelope-key", "wrong-envelope-type", "over-cap", "non-int-loop-id",
         "server-error", "hang"],
)
def test_bad_catalog_leaves_previous_rows(
    synced: Engine, fake_api, kind: str, reply: Any, message: str
) -> None:
    before = everything(synced)
    api = fake_api({f"/catalog/{kind}": reply})
    with client_for(api.base_url, max_body_bytes=4096, read_timeout=0.3) as client:
        with pytest.raises(SyncError, match=message) as caught:
            sync_catalog(synced, client, kind)
    assert caught.value.kind == kind
    assert "keeps its previous rows" in str(caught.value)
    assert everything(synced) == before


def test_server_down_leaves_previous_rows(synced: Engine, closed_port_url: str) -> None:
    before = everything(synced)
    with client_for(closed_port_url) as client:
        with pytest.raises(SyncAllError) as caught:
            sync_all(synced, client)
    assert set(caught.value.errors) == set(sync.SYNC_KINDS)  # none committed
    assert "ConnectError" in str(caught.value.errors["factors"])
    assert "not attempted: the results API was unreachable during the factors sync" in str(
        caught.value.errors["loop_artifacts"])
    assert caught.value.results == {}
    assert everything(synced) == before


def test_artifacts_422_leaves_previous_rows(synced: Engine, fake_api) -> None:
    before = everything(synced)
    detail = {"detail": [{"type": "int_parsing", "loc": ["path", "loop_id"], "msg": "Input should be a valid integer"}]}
    empty = lambda run, loop: {"task_run_id": run, "loop_id": loop, "artifacts": []}  # noqa: E731
    api = fake_api({f"/loops/{RUN_TS}/3/artifacts": empty(RUN_TS, 3), f"/loops/{RUN_TS}/4/artifacts": empty(RUN_TS, 4),
                    f"/loops/{RUN_UUID}/0/artifacts": (422, detail)})
    with client_for(api.base_url) as client:
        with pytest.raises(SyncError, match="unexpected HTTP 422") as caught:
            sync_loop_artifacts(synced, client)
    assert caught.value.kind == "loop_artifacts"
    assert everything(synced) == before
    # loops are fetched in (task_run_id, loop_id) order and the first failure stops the sync
    assert api.paths == [f"/loops/{RUN_TS}/3/artifacts", f"/loops/{RUN_TS}/4/artifacts", f"/loops/{RUN_UUID}/0/artifacts"]


def test_non_integer_loop_id_is_refused_before_any_request(synced: Engine, fake_api) -> None:
    api = fake_api({})
    with client_for(api.base_url) as client:
        with pytest.raises(SyncError, match=r"loop ids must be \(str task_run_id, int loop_id\)"):
            sync_loop_artifacts(synced, client, loops=[(RUN_TS, "3")])  # type: ignore[list-item]
    assert api.paths == []


def test_nan_values_are_stored_as_json_null(registry_engine: Engine, fake_api) -> None:
    body = (
        b'{"version": "v1", "generated_at_utc": "t1", "loops": [{"task_run_id": "r", "loop_id": 1, '
        b'"workspace_id": "w", "sharpe": NaN, "ic": Infinity, "max_drawdown": -0.2, '
        b'"metrics": {"sharpe": 1.25, "ic": NaN, "annualized_return": -Infinity}}]}'
    )
    api = fake_api({"/catalog/loops": body})
    with client_for(api.base_url) as client:
        stats = sync_catalog(registry_engine, client, "loops")
    assert stats.inserted == 1
    [row] = rows(registry_engine, rs.loop_result)
    assert row["raw"]["sharpe"] is None and row["raw"]["metrics"] == {"sharpe": 1.25, "ic": None, "annualized_return": None}
    # top-level NaN falls back to the metrics value; NaN everywhere stays NULL
    assert (row["sharpe"], row["ic"], row["annualized_return"], row["max_drawdown"]) == (1.25, None, None, -0.2)
    with registry_engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT jsonb_typeof(raw->'sharpe'), jsonb_typeof(raw->'metrics'->'ic') FROM rdagent.loop_result"
        ).one() == ("null", "null")


def test_duplicate_keys_in_one_response(registry_engine: Engine, fake_api) -> None:
    loops = [
        {"task_run_id": "r", "loop_id": 1, "workspace_id": "w", "status": "running", "sharpe": 0.5},
        {"task_run_id": "r", "loop_id": 2, "workspace_id": "w", "status": "success"},
        {"task_run_id": "r", "loop_id": 1, "workspace_id": "w", "status": "success", "decision": True},
    ]
    factors = [{"name": "a", "source": "s", "expression": "x"}, {"name": "a", "source": "t"},
               {"name": "a", "source": "s", "expression": "y"}, {"name": "a", "source": "s", "tags": ["z"]}]
    api = fake_api({"/catalog/loops": envelope("loops", loops), "/catalog/factors": envelope("factors", factors)})
    with client_for(api.base_url) as client:
        loop_stats = sync_catalog(registry_engine, client, "loops")
        factor_stats = sync_catalog(registry_engine, client, "factors")
    assert (loop_stats.records, loop_stats.duplicates_merged, loop_stats.inserted) == (3, 1, 2)
    assert (factor_stats.records, factor_stats.duplicates_merged, factor_stats.inserted) == (4, 2, 2)
    first = rows(registry_engine, rs.loop_result)[0]
    # the last occurrence wins as a whole: no sharpe from the first record survives
    assert (first["status"], first["decision"], first["sharpe"], first["raw"]) == ("success", True, None, loops[2])
    a_s = rows(registry_engine, rs.factor_registry)[0]
    assert (a_s["source"], a_s["expression"], a_s["tags"]) == ("s", None, ["z"])


def test_database_error_rolls_back(synced: Engine, fake_api) -> None:
    """A record PostgreSQL refuses (a NUL character) fails the whole catalog, nothing half-written."""
    before = everything(synced)
    factors = [{"name": "fresh", "source": "s"}, {"name": "KMID", "source": "qlib_alpha158", "description_cn": "a\u0000b"}]
    api = fake_api({"/catalog/factors": envelope("factors", factors)})
    with client_for(api.base_url) as client:
        with pytest.raises(SyncError, match="rolled back") as caught:
            sync_catalog(synced, client, "factors")
    assert "a\\u0000b" not in str(caught.value) and "fresh" not in str(caught.value)  # no record contents
    assert everything(synced) == before


def test_failure_after_writes_rolls_back(synced: Engine, results_dir: Path, start_server, monkeypatch) -> None:
    """Upserts and deactivations already executed are undone when a later statement fails."""
    before = everything(synced)
    _edit(results_dir / "aistock" / "strategy_catalog.json", lambda p: p["strategies"].pop(0))

    def broken_state(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("UPDATE rdagent.sync_state", {}, Exception("server closed the connection"))

    monkeypatch.setattr(sync, "write_state", broken_state)
    with client_for(start_server(results_dir)) as client:
        with pytest.raises(SyncError, match="server closed the connection.*rolled back"):
            sync_catalog(synced, client, "strategies")
    assert everything(synced) == before


# ------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"metrics": {"Unnamed: 0": "1day.excess_return_with_cost.annualized_return", "0": 0.04}},
         {"annualized_return": 0.04}),
        ({"metrics": [{"Unnamed: 0": "IC", "0": 0.03}, {"Unnamed: 0": "Rank IC", "0": 0.9},
                      {"Unnamed: 0": "ICIR", "0": "0.25"}]},
         {"ic": 0.03, "icir": 0.25, "rank_ic": 0.9}),
        ({"metrics": {"Unnamed: 0": {"0": "IC", "1": "1day.excess_return_without_cost.max_drawdown",
                                     "2": "1day.excess_return_with_cost.max_drawdown"},
                      "0": {"0": 0.02, "1": -0.05, "2": -0.07}}},
         {"ic": 0.02, "max_drawdown": -0.07}),
        ({"metrics": {"Unnamed: 0": ["Sharpe Ratio", "Win Rate"], "0": [1.1, 0.55]}},
         {"sharpe": 1.1, "win_rate": 0.55}),
        ({"metrics": {"1day.excess_return_without_cost.annualized_return": 0.2, "annualized_return": 0.1,
                      "max_drawdown": -0.1, "mdd": -0.3, "IC_IR": 0.4, "information_ratio": 2.0}},
         {"annualized_return": 0.2, "annualized_return_basis": "excess_return_without_cost", "max_drawdown": -0.1,
          "icir": 0.4, "information_ratio": 2.0}),
        ({"sharpe": 1.57, "ic_ir": 0.31, "metrics": {"sharpe": 1.0, "icir": 0.2, "win_rate": 0.6}},
         {"sharpe": 1.57, "icir": 0.31, "win_rate": 0.6}),
        ({"annualized_return": 0.3, "metrics": {"Unnamed: 0": {"0": "1day.excess_return_without_cost.annualized_return",
                                                              "1": "1day.excess_return_with_cost.annualized_return",
                                                              "2": "1day.excess_return_with_cost.information_ratio"},
                                                "0": {"0": 0.25, "1": 0.21, "2": 1.4}}},
         {"annualized_return": 0.21, "annualized_return_basis": "excess_return_with_cost", "information_ratio": 1.4}),
        ({"annualized_return": 0.3, "rank_ic": 0.05, "metrics": {"annualized_return": 0.1, "Rank IC": 0.04}},
         {"annualized_return": 0.3, "annualized_return_basis": "unspecified", "rank_ic": 0.05}),
        ({"metrics": {"ic_mean": 0.02, "rank_ic_mean": 0.03, "ann_return": 0.1, "mdd": -0.2}},
         {"ic": 0.02, "rank_ic": 0.03, "annualized_return": 0.1, "annualized_return_basis": "unspecified",
          "max_drawdown": -0.2}),
        ({"metrics": {"ic": True, "sharpe": "n/a", "win_rate": None, "max_drawdown": 10 ** 400, "ic_ir": "NaN"}}, {}),
        ({"metrics": "not a dict"}, {}),
        ({}, {}),
    ],
    ids=["artefact-record", "artefact-list", "artefact-columns", "artefact-lists", "dict-spellings",
         "top-level-wins", "with-cost-wins", "top-level-over-unprefixed", "registry-names", "non-numbers",
         "garbage", "absent"],
)
def test_normalise_kpis(record: dict, expected: dict) -> None:
    full: dict[str, Any] = dict.fromkeys((*sync.KPI_COLUMNS, "annualized_return_basis"))
    if "annualized_return" in expected and "annualized_return_basis" not in expected:
        expected = {**expected, "annualized_return_basis": "excess_return_with_cost"}
    full.update(expected)
    assert normalise_kpis(record) == full


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"kwargs": {"segments": {"train": ["2010-01-07", "2018-12-31"], "valid": ["2019-01-02", "2020-12-31"],
                                  "test": ["2021-01-04 00:00:00", "20250630"]}}},
         (date(2010, 1, 7), date(2018, 12, 31), date(2019, 1, 2), date(2020, 12, 31), date(2021, 1, 4),
          date(2025, 6, 30))),
        ({"segments": {"train": ["2010-01-07", "2018-12-31"], "validation": ["2019-01-02", None]}},
         (date(2010, 1, 7), date(2018, 12, 31), date(2019, 1, 2), None, None, None)),
        ({"kwargs": {"segments": {"train": "2010-01-07", "test": ["2021-13-45", "x"]}}}, (None,) * 6),
        ({"kwargs": {}}, (None,) * 6),
        (None, (None,) * 6),
    ],
)
def test_strategy_segments(config: Any, expected: tuple) -> None:
    got = strategy_segments(config)
    assert tuple(got[k] for k in ("train_start", "train_end", "valid_start", "valid_end", "test_start", "test_end")) \
        == expected


def test_fingerprints_and_poll(demo_server: str, fake_api) -> None:
    assert catalog_fingerprint(None) == NOT_PUBLISHED
    with client_for(demo_server) as client:
        factors = client.fetch_catalog("factors")
        poll = poll_fingerprints(client)
    assert catalog_fingerprint(factors) == f"{GENERATED}|sha256:{factors.sha256}"
    assert poll.fingerprints["factors"] == catalog_fingerprint(factors)
    assert set(poll.fingerprints) == set(sync.CATALOGS) and not poll.errors

    api = fake_api({"/catalog/factors": b"{broken", "/catalog/strategies": envelope("strategies", [])})
    ticks = iter([0.0, 0.0, 1.0, 100.0])
    with client_for(api.base_url) as client:
        partial = poll_fingerprints(client, budget_s=10, clock=lambda: next(ticks))
    assert set(partial.errors) == {"factors"} and "not valid JSON" in partial.errors["factors"]
    assert partial.fingerprints == {"strategies": partial.fingerprints["strategies"]}
    assert partial.not_polled == ("loops", "models", "alpha158")
    assert api.paths == ["/catalog/factors", "/catalog/strategies"]


def test_explicit_loops_only_touch_their_artifacts(synced: Engine, fake_api) -> None:
    moved = {"artifact_id": "art-a-model", "artifact_type": "model", "name": "LGBModel", "status": "present",
             "primary_flag": False, "entry_path": "mlruns", "summary": {}, "files": []}
    api = fake_api({f"/loops/{RUN_TS}/3/artifacts": {"task_run_id": RUN_TS, "loop_id": 3, "artifacts": [moved]}})
    with client_for(api.base_url) as client:
        stats = sync_loop_artifacts(synced, client, loops=[(RUN_TS, 3)])
    # art-a-model was stored under another loop: an update, not an insert; RUN_TS/3's own three are gone
    assert (stats.records, stats.inserted, stats.updated, stats.deactivated) == (1, 0, 1, 3)
    stored = {r["artifact_id"]: r for r in rows(synced, rs.loop_artifacts)}
    assert {a for a, r in stored.items() if r["active"]} == {
        "art-a-report", "art-a-factor-meta", "art-a-model", "art-b-feedback",
    }
    assert (stored["art-a-model"]["task_run_id"], stored["art-a-model"]["loop_id"]) == (RUN_TS, 3)
    assert stored["art-a-report"]["loop_id"] == 1  # other loops untouched


def test_unknown_kinds_are_programming_errors(registry_engine: Engine, demo_server: str) -> None:
    with client_for(demo_server) as client:
        with pytest.raises(ValueError, match="unknown catalog"):
            sync_catalog(registry_engine, client, "loop_artifacts")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unknown sync kinds"):
            sync_all(registry_engine, client, kinds=["factor"])

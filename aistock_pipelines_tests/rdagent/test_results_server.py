"""The conformant RD-Agent results API server, over real HTTP on 127.0.0.1, plus the demo data it serves."""

from __future__ import annotations

import inspect
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from aistock_pipelines.demo.rdagent_results_builder import (
    RUN_TS,
    RUN_UUID,
    build_demo_results_dir,
    load_demo_catalog,
)
from aistock_pipelines.rdagent.results_server import serve

CATALOG_FILES = {
    "/catalog/factors": "factor_catalog.json",
    "/catalog/strategies": "strategy_catalog.json",
    "/catalog/loops": "loop_catalog.json",
    "/catalog/models": "model_catalog.json",
    "/alpha158/meta": "alpha158_meta.json",
}


def get(base_url: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=5.0) as client:
        return client.get(path)


def read_file(directory: Path, name: str) -> object:
    return json.loads((directory / "aistock" / name).read_text(encoding="utf-8"))


# -- plain endpoints -----------------------------------------------------------------------------
def test_health(demo_server: str) -> None:
    response = get(demo_server, "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/catalog/strategies", "/catalog/loops", "/catalog/models", "/alpha158/meta"])
def test_catalog_body_is_the_file(demo_server: str, demo_results_dir: Path, path: str) -> None:
    response = get(demo_server, path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == read_file(demo_results_dir, CATALOG_FILES[path])


def test_factor_catalog_nan_becomes_null(demo_server: str, demo_results_dir: Path) -> None:
    response = get(demo_server, "/catalog/factors")
    assert response.status_code == 200
    assert b"NaN" not in response.content
    body = response.json()
    hl_range = next(f for f in body["factors"] if f["name"] == "factor_hl_range")
    assert hl_range["best_performance"] == {
        "sharpe": None, "ann_ret": 0.0412, "mdd": -0.1123, "loop_id": 3, "task_run_id": RUN_TS,
    }
    # everything else is the file verbatim
    expected = read_file(demo_results_dir, "factor_catalog.json")
    next(f for f in expected["factors"] if f["name"] == "factor_hl_range")["best_performance"]["sharpe"] = None
    assert body == expected


def test_query_parameters_are_ignored(demo_server: str) -> None:
    plain = get(demo_server, "/catalog/factors")
    with_params = get(demo_server, "/catalog/factors?source=sota&limit=1&page=2")
    assert with_params.status_code == 200
    assert with_params.content == plain.content
    assert len(with_params.json()["factors"]) == 16


def test_factor_package_bundle_is_not_implemented(demo_server: str) -> None:
    response = get(demo_server, "/factor_package/bundle?version=20260114")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


# -- 404s for missing / invalid files --------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "invalid json", "empty", "json null"])
def test_missing_or_invalid_file_is_404(results_dir: Path, start_server, damage: str) -> None:
    for name in CATALOG_FILES.values():
        file = results_dir / "aistock" / name
        if damage == "missing":
            file.unlink()
        else:
            text = {"invalid json": '{"version": "v1", "factors": [', "empty": "", "json null": "null"}[damage]
            file.write_text(text, encoding="utf-8")
    base_url = start_server(results_dir)
    for path, name in CATALOG_FILES.items():
        response = get(base_url, path)
        assert (path, response.status_code) == (path, 404)
        assert response.json() == {"detail": f"{name} not found"}
    assert get(base_url, "/health").status_code == 200


def test_without_models_build_answers_404(tmp_path: Path, start_server) -> None:
    directory = build_demo_results_dir(tmp_path / "no_models", with_models=False)
    assert not (directory / "aistock" / "model_catalog.json").exists()
    base_url = start_server(directory)
    assert get(base_url, "/catalog/models").json() == {"detail": "model_catalog.json not found"}
    assert get(base_url, "/catalog/factors").status_code == 200


def test_files_are_reread_on_every_request(results_dir: Path, start_server) -> None:
    base_url = start_server(results_dir)
    assert len(get(base_url, "/catalog/strategies").json()["strategies"]) == 3
    path = results_dir / "aistock" / "strategy_catalog.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["generated_at_utc"] = "2026-02-01T00:00:00+00:00"
    payload["strategies"] = payload["strategies"][:1]
    path.write_text(json.dumps(payload), encoding="utf-8")
    body = get(base_url, "/catalog/strategies").json()
    assert body["generated_at_utc"] == "2026-02-01T00:00:00+00:00"
    assert len(body["strategies"]) == 1
    path.unlink()
    assert get(base_url, "/catalog/strategies").status_code == 404


# -- /factors/{name} -----------------------------------------------------------------------------
def test_factor_by_name(demo_server: str, demo_results_dir: Path) -> None:
    response = get(demo_server, "/factors/factor_vol_ratio_5d")
    assert response.status_code == 200
    expected = next(
        f for f in read_file(demo_results_dir, "factor_catalog.json")["factors"] if f["name"] == "factor_vol_ratio_5d"
    )
    assert response.json() == expected
    assert response.json()["impl_func"] == "factor_vol_ratio_5d"


def test_factor_first_exact_match_wins(demo_server: str) -> None:
    # two records named Price_Volume_Divergence_5D, same source: the first one in the file is returned
    assert get(demo_server, "/factors/Price_Volume_Divergence_5D").json()["expression"] == "Corr($close, $volume, 5)"
    # factor_mom_20d exists as rdagent_generated then sota: the first one wins
    assert get(demo_server, "/factors/factor_mom_20d").json()["source"] == "rdagent_generated"


@pytest.mark.parametrize("name", ["factor_MOM_20d", "FACTOR_MOM_20D", "factor_mom_20", "kmid", "nope"])
def test_factor_match_is_exact_and_case_sensitive(demo_server: str, name: str) -> None:
    response = get(demo_server, f"/factors/{name}")
    assert response.status_code == 404
    assert response.json() == {"detail": "factor not found"}


def test_factor_nan_becomes_null(demo_server: str) -> None:
    response = get(demo_server, "/factors/factor_hl_range")
    assert b"NaN" not in response.content
    assert response.json()["best_performance"]["sharpe"] is None


def test_factor_without_catalog(results_dir: Path, start_server) -> None:
    (results_dir / "aistock" / "factor_catalog.json").unlink()
    response = get(start_server(results_dir), "/factors/KMID")
    assert response.status_code == 404
    assert response.json() == {"detail": "factor_catalog.json not found"}


# -- /loops/{task_run_id}/{loop_id}/artifacts ------------------------------------------------------
def test_loop_artifacts_exact_body(demo_server: str) -> None:
    response = get(demo_server, f"/loops/{RUN_TS}/3/artifacts")
    assert response.status_code == 200
    body = response.json()
    assert body["task_run_id"] == RUN_TS and body["loop_id"] == 3
    by_id = {a["artifact_id"]: a for a in body["artifacts"]}
    assert list(by_id) == ["art-d-model", "art-d-report", "art-e-report"]  # by type, then name
    assert by_id["art-d-report"] == {
        "artifact_id": "art-d-report",
        "artifact_type": "report",
        "name": "qlib_report",
        "status": "present",
        "primary_flag": True,
        "entry_path": "ret.pkl",
        "summary": {"annualized_return": 0.1342, "sharpe": None},  # NaN in summary_json -> null
        "files": [
            {
                "file_id": "file-d-ret",
                "path": "ret.pkl",
                "sha256": by_id["art-d-report"]["files"][0]["sha256"],
                "size_bytes": 51877,
                "mtime_utc": "2025-12-18T11:02:31+00:00",
                "kind": "pickle",
            }
        ],
    }
    assert len(by_id["art-d-report"]["files"][0]["sha256"]) == 64
    assert by_id["art-d-model"]["primary_flag"] is False
    assert by_id["art-d-model"]["summary"] == {"model_type": "LGBModel", "num_leaves": 210}
    assert by_id["art-e-report"]["summary"] == {}  # broken summary_json -> {}


def test_loop_artifacts_several_files_and_no_files(demo_server: str) -> None:
    body = get(demo_server, f"/loops/{RUN_UUID}/1/artifacts").json()
    by_id = {a["artifact_id"]: a for a in body["artifacts"]}
    assert sorted(by_id) == ["art-a-factor-meta", "art-a-model", "art-a-report", "art-b-feedback"]
    assert [f["path"] for f in by_id["art-a-report"]["files"]] == ["qlib_res.csv", "ret.pkl", "ret_curve.png"]
    assert by_id["art-b-feedback"]["files"] == []
    assert by_id["art-b-feedback"]["summary"] == {}
    assert by_id["art-a-model"]["summary"] == {}  # NULL summary_json


@pytest.mark.parametrize(("task_run_id", "loop_id"), [(RUN_TS, 99), ("unknown-run", 3), (RUN_UUID, 3)])
def test_loop_artifacts_unknown_ids_are_empty(demo_server: str, task_run_id: str, loop_id: int) -> None:
    response = get(demo_server, f"/loops/{task_run_id}/{loop_id}/artifacts")
    assert response.status_code == 200
    assert response.json() == {"task_run_id": task_run_id, "loop_id": loop_id, "artifacts": []}


@pytest.mark.parametrize("loop_id", ["abc", "1.5", "one"])
def test_loop_artifacts_non_integer_loop_id_is_422(demo_server: str, loop_id: str) -> None:
    response = get(demo_server, f"/loops/{RUN_TS}/{loop_id}/artifacts")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["path", "loop_id"]
    assert error["type"] == "int_parsing"


def test_loop_artifacts_without_registry_is_500(results_dir: Path, start_server) -> None:
    (results_dir / "registry.sqlite").unlink()
    response = get(start_server(results_dir), f"/loops/{RUN_TS}/3/artifacts")
    assert response.status_code == 500
    assert response.json()["detail"].startswith("registry query failed:")
    assert not (results_dir / "registry.sqlite").exists()  # read-only open never creates the file


# -- serve() -------------------------------------------------------------------------------------
def test_serve_defaults_to_loopback_and_rejects_missing_dir(tmp_path: Path) -> None:
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["port"].default == 9000
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        serve(tmp_path / "does_not_exist", port=0)


# -- the demo data itself ------------------------------------------------------------------------
def test_demo_build_is_deterministic(tmp_path: Path) -> None:
    first = build_demo_results_dir(tmp_path / "one")
    second = build_demo_results_dir(tmp_path / "two")
    for name in CATALOG_FILES.values():
        assert (first / "aistock" / name).read_bytes() == (second / "aistock" / name).read_bytes()
    dumps = []
    for directory in (first, second):
        conn = sqlite3.connect(directory / "registry.sqlite")
        dumps.append(list(conn.iterdump()))
        conn.close()
    assert dumps[0] == dumps[1]
    assert sum(line.startswith('INSERT INTO "artifact_files"') for line in dumps[0]) == 8


def test_demo_catalogs_are_consistent() -> None:
    factors = load_demo_catalog("factor_catalog.json")["factors"]
    strategies = load_demo_catalog("strategy_catalog.json")["strategies"]
    loops = load_demo_catalog("loop_catalog.json")["loops"]
    models = load_demo_catalog("model_catalog.json")["models"]
    keys = [(f["name"], f["source"]) for f in factors]
    assert keys.count(("Price_Volume_Divergence_5D", "rdagent_generated")) == 2
    assert {s for n, s in keys if n == "factor_mom_20d"} == {"rdagent_generated", "sota"}
    assert {s for _, s in keys} == {"qlib_alpha158", "qlib_alpha360", "rdagent_generated", "sota"}
    shipped = {f["impl_func"] for f in factors if f.get("impl_module") == "rd_factors_lib.generated"}
    assert {"factor_mom_20d", "factor_vol_ratio_5d", "factor_hl_range"} <= shipped
    strategy_ids = {s["strategy_id"] for s in strategies}
    assert all(len(sid) == 32 and int(sid, 16) >= 0 for sid in strategy_ids)
    assert {loop["strategy_id"] for loop in loops} <= strategy_ids
    assert len({(lp["task_run_id"], lp["loop_id"], lp["workspace_id"]) for lp in loops}) == len(loops) == 6
    assert {lp["task_run_id"] for lp in loops} == {RUN_UUID, RUN_TS}
    assert len({m["model_id"] for m in models}) == len(models) == 4
    assert {m["model_type"] for m in models} == {"LGBModel"}
    alpha = load_demo_catalog("alpha158_meta.json")
    assert len(alpha["factors"]) == 20
    assert {"name": "KMID", "expression": "($close-$open)/$open"}.items() <= alpha["factors"][0].items()

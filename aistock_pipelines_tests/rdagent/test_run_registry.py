"""``/task_runs``, ``/loops``, ``/workspaces``: synced when a server offers them, "not offered" (404) otherwise."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
from aistock_pipelines.rdagent.sync import (
    NOT_OFFERED,
    POLL_KINDS,
    RUN_REGISTRY_KINDS,
    SyncAllError,
    SyncError,
    poll_fingerprints,
    sync_all,
    sync_run_registry,
)

TASK_RUNS = [
    {"task_run_id": "3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35", "scenario": "fin_quant", "status": "running",
     "created_at_utc": "2026-01-14T08:00:00+00:00", "git_sha": "abc123"},
    {"task_run_id": 20251218103822, "status": ["odd"]},  # an all-digit id written as a number
]
LOOPS = [
    {"task_run_id": "3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35", "loop_id": 1, "action": "factor", "status": "success",
     "has_result": 1, "best_workspace_id": "a1c4", "ic_mean": 0.03},
    {"task_run_id": "3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35", "loop_id": 2, "status": "failed", "has_result": 0,
     "error_message": "qrun failed"},
]
WORKSPACES = [
    {"workspace_id": "a1c4", "task_run_id": "3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35", "loop_id": "1",
     "workspace_role": "experiment_workspace", "experiment_type": "qlib_factor", "step_name": "running",
     "status": "success", "workspace_path": "/ws/a1c4"},
]


def client_for(url: str) -> RDAgentResultsClient:
    return RDAgentResultsClient(url, retries=0, connect_timeout=1.0, read_timeout=2.0)


def table_rows(engine: Engine, table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()]


def offered(task_runs=TASK_RUNS, loops=LOOPS, workspaces=WORKSPACES) -> dict[str, Any]:
    """The three body shapes a server might use: a bare list, an envelope keyed by name, ``items``."""
    return {"/task_runs": task_runs, "/loops": {"version": "v1", "loops": loops}, "/workspaces": {"items": workspaces}}


def test_offered_listings_are_mirrored(registry_engine: Engine, fake_api) -> None:
    api = fake_api(offered())
    with client_for(api.base_url) as client:
        stats = {kind: sync_run_registry(registry_engine, client, kind) for kind in RUN_REGISTRY_KINDS}
    assert {k: (s.published, s.records, s.inserted) for k, s in stats.items()} == {
        "task_runs": (True, 2, 2), "run_loops": (True, 2, 2), "workspaces": (True, 1, 1)}
    body = json.dumps(TASK_RUNS).encode()
    assert stats["task_runs"].fingerprint == f"sha256:{hashlib.sha256(body).hexdigest()}"
    runs = table_rows(registry_engine, rs.task_run_registry)
    assert [(r["task_run_id"], r["scenario"], r["status"], r["created_at_utc"]) for r in runs] == [
        ("20251218103822", None, None, None),
        ("3f9c2b7e5d1a4c8f9e0b6a2d4c7e1f35", "fin_quant", "running", "2026-01-14T08:00:00+00:00")]
    assert runs[1]["raw"] == TASK_RUNS[0]  # unknown fields kept
    loops = table_rows(registry_engine, rs.loop_registry)
    assert [(r["loop_id"], r["action"], r["status"], r["has_result"], r["best_workspace_id"]) for r in loops] == [
        (1, "factor", "success", True, "a1c4"), (2, None, "failed", False, None)]
    [workspace] = table_rows(registry_engine, rs.workspace_registry)
    assert (workspace["loop_id"], workspace["workspace_role"], workspace["workspace_path"]) == (
        1, "experiment_workspace", "/ws/a1c4")

    smaller = fake_api(offered(loops=LOOPS[:1]))
    with client_for(smaller.base_url) as client:
        again = [sync_run_registry(registry_engine, client, kind) for kind in RUN_REGISTRY_KINDS]
    assert [(s.inserted, s.updated, s.unchanged, s.deactivated) for s in again] == [
        (0, 0, 2, 0), (0, 0, 1, 1), (0, 0, 1, 0)]
    assert [r["active"] for r in table_rows(registry_engine, rs.loop_registry)] == [True, False]


def test_not_offered_is_recorded_and_fails_nothing(registry_engine: Engine, fake_api, demo_server: str) -> None:
    with client_for(fake_api(offered()).base_url) as client:
        sync_run_registry(registry_engine, client, "task_runs")
    before = table_rows(registry_engine, rs.task_run_registry)
    with client_for(demo_server) as client:  # the conformant server, like the real API: 404
        results = sync_all(registry_engine, client)
    assert {k: (results[k].published, results[k].fingerprint) for k in RUN_REGISTRY_KINDS} == dict.fromkeys(
        RUN_REGISTRY_KINDS, (False, NOT_OFFERED))
    assert table_rows(registry_engine, rs.task_run_registry) == before  # not deactivated: just not offered
    with registry_engine.connect() as conn:
        state = {r.kind: r for r in conn.execute(select(rs.sync_state))}
    assert (state["task_runs"].published, state["task_runs"].record_count) == (False, 2)  # last offered copy
    assert state["run_loops"].published is False and state["run_loops"].last_published_at is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"detail": "disabled"}, "expected a list of records"),
        ([{"task_run_id": "x"}, {"status": "running"}], r"task_runs record #1 does not have the expected shape "
                                                        r"\(task_run_id: Field required\)"),
        (b"<html>", "is not valid JSON"),
    ],
    ids=["no-list", "record-without-key", "not-json"],
)
def test_a_bad_listing_fails_only_its_kind(registry_engine: Engine, fake_api, body: Any, message: str) -> None:
    api = fake_api({**offered(), "/task_runs": body})
    with client_for(api.base_url) as client:
        with pytest.raises(SyncAllError) as caught:
            sync_all(registry_engine, client, RUN_REGISTRY_KINDS)
    assert set(caught.value.errors) == {"task_runs"} and set(caught.value.results) == {"run_loops", "workspaces"}
    error = caught.value.errors["task_runs"]
    assert isinstance(error, SyncError)
    assert re.search(message, str(error)) and "keeps its previous rows" in str(error)
    assert table_rows(registry_engine, rs.task_run_registry) == []


def test_the_sensor_poll_fingerprints_listings_and_artifacts(fake_api) -> None:
    empty = {"version": "v1", "generated_at_utc": "t", "loops": [
        {"task_run_id": "r", "loop_id": 2, "workspace_id": "w1"}, {"task_run_id": "r", "loop_id": 2, "workspace_id": "w2"},
        {"task_run_id": "q", "loop_id": 1, "workspace_id": "w3"}]}
    artifacts = lambda run, loop: {"task_run_id": run, "loop_id": loop, "artifacts": []}  # noqa: E731
    api = fake_api({"/task_runs": TASK_RUNS, "/catalog/loops": empty, "/loops/r/2/artifacts": artifacts("r", 2),
                    "/loops/q/1/artifacts": artifacts("q", 1)})
    with client_for(api.base_url) as client:
        poll = poll_fingerprints(client, POLL_KINDS)
    assert poll.loops == (("q", 1), ("r", 2))  # distinct loops, sorted
    assert poll.fingerprints["task_runs"].startswith("sha256:")
    assert (poll.fingerprints["run_loops"], poll.fingerprints["workspaces"]) == (NOT_OFFERED, NOT_OFFERED)
    assert poll.fingerprints["loop_artifacts"].startswith("sha256:") and not poll.errors
    assert api.paths[-2:] == ["/loops/q/1/artifacts", "/loops/r/2/artifacts"]  # after the listings, one GET per loop

    no_loops = fake_api({})
    with client_for(no_loops.base_url) as client:
        poll = poll_fingerprints(client, POLL_KINDS)
    assert "loop_artifacts" not in poll.fingerprints and poll.loops is None  # no loop catalog: nothing to follow

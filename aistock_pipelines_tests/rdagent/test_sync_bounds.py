"""Bounded sync: hostile nesting rejected per catalog, artifact memory flat in the number of loops."""

from __future__ import annotations

import gc
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient, ResultsApiOutOfTime, ResultsApiUnavailable
from aistock_pipelines.rdagent.sync import SyncAllError, sync_all, sync_loop_artifacts
from aistock_pipelines_tests.rdagent.fixtures import LOOPBACK, Drip

FAST = {"backoff": 0.01, "connect_timeout": 1.0, "read_timeout": 5.0, "retries": 0}
ENVELOPE = {"version": "v1", "generated_at_utc": "2026-01-14T08:30:12+00:00", "source": "rdagent_tools"}


def nested(depth: int) -> str:
    """A JSON array nested ``depth`` levels deep (≈ 2 bytes a level)."""
    return "[" * depth + "1" + "]" * depth


def catalog_body(list_key: str, record: dict[str, Any], deep: int | None = None) -> bytes:
    """An envelope with one record; ``deep`` adds a ``payload`` nested that deep, spliced in as text."""
    text = json.dumps({**ENVELOPE, list_key: [record]})
    if deep is None:
        return text.encode()
    return text.replace('"__deep__"', nested(deep)).encode()


@pytest.mark.db
@pytest.mark.parametrize("depth", [500, 990, 100_000])
def test_a_deeply_nested_catalog_fails_alone_with_a_sync_error(
    registry_engine: Engine, fake_api: Callable[..., Any], depth: int
) -> None:
    routes = {
        "/catalog/factors": catalog_body("factors", {"name": "f", "source": "sota", "payload": "__deep__"}, depth),
        "/catalog/strategies": catalog_body("strategies", {"strategy_id": "s1"}),
        "/catalog/loops": catalog_body("loops", {"task_run_id": "r", "loop_id": 1, "workspace_id": "w"}),
        "/catalog/models": (404, {"detail": "model_catalog.json not found"}),
        "/alpha158/meta": {**ENVELOPE, "factors": [{"name": "KMID", "expression": "($close-$open)/$open"}]},
        "/loops/r/1/artifacts": {"task_run_id": "r", "loop_id": 1, "artifacts": []},
        "/task_runs": [{"task_run_id": "r", "status": "done"}],
        "/workspaces": json.dumps([{"workspace_id": "w", "payload": "__deep__"}]).replace(
            '"__deep__"', nested(depth)).encode(),
    }
    api = fake_api(routes)
    with RDAgentResultsClient(api.base_url, **FAST) as client, pytest.raises(SyncAllError) as raised:
        sync_all(registry_engine, client)
    assert set(raised.value.errors) == {"factors", "workspaces"}
    message = str(raised.value.errors["factors"])
    assert "nested too deeply" in message and "factor_registry keeps its previous rows" in message
    assert "workspace_registry keeps its previous rows" in str(raised.value.errors["workspaces"])
    assert set(raised.value.results) == {"strategies", "loops", "models", "alpha158", "loop_artifacts", "task_runs",
                                         "run_loops"}
    assert not raised.value.results["run_loops"].published  # /loops not offered: 404
    with registry_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(rs.strategy_registry)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(rs.task_run_registry)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(rs.factor_registry)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(rs.workspace_registry)).scalar_one() == 0


# ------------------------------------------------------------------------------------ artifact memory
ARTIFACTS_PER_LOOP = 20
FILES_PER_ARTIFACT = 60


def artifacts_body(task_run_id: str, loop_id: int) -> bytes:
    """A large listing: every artifact with many files (≈ 0.6 MB a loop), ids unique per loop."""
    artifacts = [
        {"artifact_id": f"{task_run_id}-{loop_id}-{a}", "artifact_type": "model", "name": f"a{a}",
         "status": "present", "primary_flag": a == 0, "entry_path": f"ws/{loop_id}/{a}",
         "summary": {"note": "x" * 40, "metrics": {"ic": 0.01 * a}},
         "files": [{"file_id": f"{loop_id}-{a}-{f}", "path": f"workspace/{loop_id}/{a}/file_{f:03d}.pkl",
                    "sha256": f"{loop_id:016x}{a:016x}{f:032x}", "size_bytes": 1000 + f,
                    "mtime_utc": "2026-01-14T08:30:12Z", "kind": "model"} for f in range(FILES_PER_ARTIFACT)]}
        for a in range(ARTIFACTS_PER_LOOP)
    ]
    return json.dumps({"task_run_id": task_run_id, "loop_id": loop_id, "artifacts": artifacts}).encode()


@pytest.fixture
def artifacts_server() -> Iterator[str]:
    """Answers ``/loops/<run>/<loop>/artifacts`` for any loop, building each body on request."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            _, _, run, loop, _ = self.path.split("/")
            body = artifacts_body(run, int(loop))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def peak_sync_memory(engine: Engine, base_url: str, loops: int) -> tuple[int, int]:
    """Peak Python heap (tracemalloc) of one artifact sync over ``loops`` loops, and the rows it wrote."""
    wanted = [("run", loop) for loop in range(loops)]
    with RDAgentResultsClient(base_url, **FAST) as client:
        rs.ensure_registry_schema(engine)
        gc.collect()
        tracemalloc.start()
        try:
            stats = sync_loop_artifacts(engine, client, wanted)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return peak, stats.inserted


@pytest.mark.db
def test_artifact_sync_memory_is_flat_in_the_number_of_loops(registry_engine: Engine, artifacts_server: str) -> None:
    body_bytes = len(artifacts_body("run", 0))
    few, inserted_few = peak_sync_memory(registry_engine, artifacts_server, 6)
    with registry_engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA rdagent CASCADE")
    many, inserted_many = peak_sync_memory(registry_engine, artifacts_server, 24)
    print(f"artifact sync: body {body_bytes / 1e6:.2f} MB a loop; peak heap 6 loops {few / 1e6:.2f} MB, "
          f"24 loops {many / 1e6:.2f} MB")
    assert (inserted_few, inserted_many) == (6 * ARTIFACTS_PER_LOOP, 24 * ARTIFACTS_PER_LOOP)
    # Both runs fill more than one write batch. Holding every loop would add 18 loops' parsed listings
    # (several body sizes each); the artifact ids kept to settle duplicates are a few kB.
    assert many - few < 2 * body_bytes, (few, many)


# ----------------------------------------------------------------------------------------- deadlines
@pytest.mark.parametrize("head", [True, False], ids=["body-drips", "headers-drip"])
def test_a_server_sending_a_byte_every_two_seconds_is_cut_off_at_the_request_deadline(
    slow_api: Callable[..., str], head: bool
) -> None:
    url = slow_api({"/catalog/factors": Drip(catalog_body("factors", {"name": "f", "source": "sota"}), head=head)})
    started = time.monotonic()
    # Each byte arrives well within the read timeout: only the whole-request deadline can end this.
    with RDAgentResultsClient(url, connect_timeout=1.0, read_timeout=5.0, retries=2, backoff=0.1,
                              request_deadline=3.0) as client:
        with pytest.raises(ResultsApiUnavailable, match=r"within the 3\.0 s deadline per request") as raised:
            client.fetch_catalog("factors")
    elapsed = time.monotonic() - started
    assert not isinstance(raised.value, ResultsApiOutOfTime)
    assert 2.9 < elapsed < 4.0, elapsed


def test_the_callers_deadline_caps_every_request(slow_api: Callable[..., str]) -> None:
    body = catalog_body("factors", {"name": "f", "source": "sota"})
    url = slow_api({"/catalog/factors": Drip(body, pieces=4, pause=0.3)})  # complete after ≈ 1.2 s
    with RDAgentResultsClient(url, **FAST, request_deadline=10.0, deadline_at=time.monotonic() + 5.0) as client:
        assert client.fetch_catalog("factors").records == [{"name": "f", "source": "sota"}]
    started = time.monotonic()
    with RDAgentResultsClient(url, **FAST, request_deadline=10.0, deadline_at=time.monotonic() + 0.6) as client:
        with pytest.raises(ResultsApiOutOfTime, match="the caller's time limit"):
            client.fetch_catalog("factors")
        assert time.monotonic() - started < 1.0
        with pytest.raises(ResultsApiOutOfTime, match="not attempted"):
            client.fetch_catalog("factors")

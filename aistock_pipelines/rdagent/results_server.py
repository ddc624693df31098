"""A read-only RD-Agent results API, conformant with the upstream server's observable contract.

It plays the RD-Agent side for the demo and the tests, so its behaviour is the upstream one, quirks
included, rather than an idealised API:

* every request re-reads its file (no caching, no ETag, no paging; query parameters are ignored);
* a catalog file that is missing *or not valid JSON* answers 404 ``{"detail": "<file> not found"}``;
* ``/loops/{task_run_id}/{loop_id}/artifacts`` answers 200 with ``artifacts: []`` for unknown ids and
  FastAPI's own 422 for a non-integer ``loop_id``.

One deliberate difference: NaN/Infinity (which Python's ``json`` happily reads from a file) are sent as
``null``. Upstream would crash with a 500 there, because Starlette renders with ``allow_nan=False``;
clients only ever see ``null`` from a working server.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from aistock_pipelines.conventions import RESULTS_API_HOST, RESULTS_API_PORT
from aistock_pipelines.rdagent.json_values import sanitize_json

#: ``/catalog/<kind>`` -> file under ``<results_dir>/aistock/``.
CATALOG_FILES: dict[str, str] = {
    "factors": "factor_catalog.json",
    "strategies": "strategy_catalog.json",
    "loops": "loop_catalog.json",
    "models": "model_catalog.json",
}
ALPHA158_META_FILE = "alpha158_meta.json"
REGISTRY_FILE = "registry.sqlite"

_ARTIFACTS_SQL = """
SELECT a.artifact_id, a.artifact_type, a.name, a.status, a.primary_flag, a.entry_path, a.summary_json,
       f.file_id, f.path AS file_path, f.sha256, f.size_bytes, f.mtime_utc, f.kind
FROM artifacts AS a
LEFT JOIN artifact_files AS f ON f.artifact_id = a.artifact_id
WHERE a.task_run_id = ? AND a.loop_id = ?
ORDER BY a.artifact_type, a.name, a.artifact_id, f.path
"""


def _load_json(path: Path) -> Any | None:
    """The parsed file, or ``None`` when it is missing or unreadable (upstream maps both to 404)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _json_response(payload: Any) -> JSONResponse:
    return JSONResponse(sanitize_json(payload))


def _parse_summary(raw: Any) -> Any:
    """``summary_json`` parsed; empty, NULL or broken JSON becomes ``{}`` as upstream does."""
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def query_loop_artifacts(db_path: Path, task_run_id: str, loop_id: int) -> list[dict[str, Any]]:
    """Artifacts of one loop with their files, read from ``registry.sqlite`` opened read-only."""
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(_ARTIFACTS_SQL, (task_run_id, loop_id)).fetchall()
    finally:
        conn.close()

    artifacts: dict[str, dict[str, Any]] = {}
    for row in rows:
        artifact_id = str(row["artifact_id"])
        artifact = artifacts.get(artifact_id)
        if artifact is None:
            artifact = artifacts[artifact_id] = {
                "artifact_id": artifact_id,
                "artifact_type": row["artifact_type"],
                "name": row["name"],
                "status": row["status"],
                "primary_flag": bool(row["primary_flag"]),
                "entry_path": row["entry_path"],
                "summary": _parse_summary(row["summary_json"]),
                "files": [],
            }
        if row["file_id"] is not None:
            artifact["files"].append(
                {
                    "file_id": row["file_id"],
                    "path": row["file_path"],
                    "sha256": row["sha256"],
                    "size_bytes": row["size_bytes"],
                    "mtime_utc": row["mtime_utc"],
                    "kind": row["kind"],
                }
            )
    return list(artifacts.values())


def create_app(results_dir: Path) -> FastAPI:
    """The API over ``results_dir`` (the directory holding ``aistock/`` and ``registry.sqlite``)."""
    results_dir = Path(results_dir)
    aistock_dir = results_dir / "aistock"
    app = FastAPI(title="RD-Agent Results API (aistock_pipelines conformant server)")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    def _file_endpoint(file_name: str):  # noqa: ANN202 - FastAPI reads the inner signature
        def endpoint() -> JSONResponse:
            payload = _load_json(aistock_dir / file_name)
            if payload is None:
                raise HTTPException(status_code=404, detail=f"{file_name} not found")
            return _json_response(payload)

        return endpoint

    for kind, file_name in CATALOG_FILES.items():
        app.add_api_route(
            f"/catalog/{kind}", _file_endpoint(file_name), methods=["GET"], name=f"catalog_{kind}"
        )
    app.add_api_route("/alpha158/meta", _file_endpoint(ALPHA158_META_FILE), methods=["GET"])

    @app.get("/factors/{name}")
    def factor(name: str) -> JSONResponse:
        file_name = CATALOG_FILES["factors"]
        payload = _load_json(aistock_dir / file_name)
        if not isinstance(payload, dict):
            raise HTTPException(status_code=404, detail=f"{file_name} not found")
        factors = payload.get("factors") or []
        if not isinstance(factors, list):
            raise HTTPException(status_code=404, detail="invalid factor_catalog format")
        for record in factors:
            if isinstance(record, dict) and record.get("name") == name:
                return _json_response(record)
        raise HTTPException(status_code=404, detail="factor not found")

    @app.get("/loops/{task_run_id}/{loop_id}/artifacts")
    def loop_artifacts(task_run_id: str, loop_id: int) -> JSONResponse:
        try:
            artifacts = query_loop_artifacts(results_dir / REGISTRY_FILE, task_run_id, loop_id)
        except sqlite3.Error as exc:
            raise HTTPException(status_code=500, detail=f"registry query failed: {exc}") from exc
        return _json_response({"task_run_id": task_run_id, "loop_id": loop_id, "artifacts": artifacts})

    return app


def serve(results_dir: Path, host: str = RESULTS_API_HOST, port: int = RESULTS_API_PORT) -> None:
    """Run the API in the foreground (blocking) until interrupted."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(
            f"results directory {results_dir} does not exist; pass the RD-Agent results directory "
            "(the one holding aistock/ and registry.sqlite), e.g. one made by build_demo_results_dir()"
        )
    uvicorn.run(create_app(results_dir), host=host, port=port, log_level="info")


@contextmanager
def serve_in_thread(results_dir: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``results_dir`` from a background thread; yields the base URL, stops on exit.

    ``port=0`` binds an ephemeral port first, so there is no race between choosing and binding it.
    Used by the tests and handy for a demo run inside one process.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(Path(results_dir)),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"rdagent-results-{bound_port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"results server on {host}:{bound_port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5.0)
        sock.close()

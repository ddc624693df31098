"""The results API client against the real server module and against scripted misbehaving servers."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from aistock_pipelines.demo.rdagent_results_builder import RUN_TS, RUN_UUID, build_demo_results_dir
from aistock_pipelines.rdagent.results_client import (
    RDAgentResultsClient,
    ResultsApiBadResponse,
    ResultsApiError,
    ResultsApiUnavailable,
)

FAST = {"backoff": 0.01, "connect_timeout": 1.0, "read_timeout": 2.0}


def file_records(directory: Path, name: str, key: str) -> list[dict]:
    return json.loads((directory / "aistock" / name).read_text(encoding="utf-8"))[key]


# -- scripted misbehaving servers ------------------------------------------------------------------
@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    content_length: bool = True  # False: body delimited by connection close (HTTP/1.0)
    hang: bool = False  # accept the request, never answer


def json_reply(payload: object, status: int = 200) -> Reply:
    return Reply(status=status, body=json.dumps(payload).encode())


def envelope(key: str, records: list) -> dict:
    return {"version": "v1", "generated_at_utc": "2026-01-14T08:30:12+00:00", "source": "rdagent_tools", key: records}


@dataclass
class Scripted:
    base_url: str
    paths: list[str]  # request paths in arrival order


@pytest.fixture
def scripted_server() -> Iterator[Callable[[list[Reply]], Scripted]]:
    """Factory: a ThreadingHTTPServer on 127.0.0.1:0 answering request n with ``replies[n]`` (last repeats)."""
    release = threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def start(replies: list[Reply]) -> Scripted:
        paths: list[str] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                with lock:
                    reply = replies[min(len(paths), len(replies) - 1)]
                    paths.append(self.path)
                if reply.hang:
                    release.wait(timeout=10)
                    return
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.content_length:
                        self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up on purpose (body over its cap)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        host, port = server.server_address[:2]
        return Scripted(base_url=f"http://{host}:{port}", paths=paths)

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


# -- against the conformant server -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "file_name"),
    [("strategies", "strategy_catalog.json"), ("loops", "loop_catalog.json"), ("models", "model_catalog.json")],
)
def test_fetch_catalog_records_equal_the_files(
    demo_server: str, demo_results_dir: Path, kind: str, file_name: str
) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        catalog = client.fetch_catalog(kind)
    assert catalog is not None
    assert catalog.kind == kind
    assert (catalog.version, catalog.generated_at_utc, catalog.source) == (
        "v1", "2026-01-14T08:30:12.345678+00:00", "rdagent_tools",
    )
    assert catalog.records == file_records(demo_results_dir, file_name, kind)
    raw = httpx.get(f"{demo_server}/catalog/{kind}", trust_env=False).content
    assert catalog.sha256 == hashlib.sha256(raw).hexdigest()
    assert catalog.size_bytes == len(raw)
    assert catalog.url == f"{demo_server}/catalog/{kind}"


def test_fetch_factor_catalog_values(demo_server: str, demo_results_dir: Path) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        catalog = client.fetch_catalog("factors")
    assert catalog is not None
    expected = file_records(demo_results_dir, "factor_catalog.json", "factors")
    assert len(catalog.records) == len(expected) == 16
    # duplicates are passed through as served: deduplication is the caller's decision
    keys = [(r["name"], r["source"]) for r in catalog.records]
    assert keys == [(r["name"], r["source"]) for r in expected]
    assert keys.count(("Price_Volume_Divergence_5D", "rdagent_generated")) == 2
    mom = catalog.records[keys.index(("factor_mom_20d", "rdagent_generated"))]
    assert mom["impl_module"] == "rd_factors_lib.generated"
    assert mom["impl_func"] == "factor_mom_20d"
    assert mom["impl_version"] == "20260114"
    assert mom["interface_info"]["entry"] == "rd_factors_lib.generated:factor_mom_20d"
    hl_range = catalog.records[keys.index(("factor_hl_range", "rdagent_generated"))]
    assert hl_range["best_performance"]["sharpe"] is None  # NaN in the file -> null on the wire
    for got, want in zip(catalog.records, expected):
        if want["name"] != "factor_hl_range":
            assert got == want


def test_loop_records_keep_both_metric_shapes(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        loops = client.fetch_catalog("loops")
    assert loops is not None
    by_key = {(r["task_run_id"], r["loop_id"], r["workspace_id"]): r for r in loops.records}
    assert len(by_key) == 6
    older = [r for r in loops.records if r["task_run_id"] == RUN_UUID and r["loop_id"] == 1 and r["decision"]]
    assert older[0]["metrics"][0] == {"Unnamed: 0": "IC", "0": 0.0312}
    newer = [r for r in loops.records if r["task_run_id"] == RUN_TS and r["loop_id"] == 3 and r["decision"]]
    assert (newer[0]["sharpe"], newer[0]["metrics"]["icir"]) == (1.57, 0.3125)


def test_fingerprint_is_stable_and_follows_the_file(results_dir: Path, start_server) -> None:
    base_url = start_server(results_dir)
    with RDAgentResultsClient(base_url, **FAST) as client:
        first = client.fetch_catalog("strategies")
        second = client.fetch_catalog("strategies")
        path = results_dir / "aistock" / "strategy_catalog.json"
        payload = json.loads(path.read_text(encoding="utf-8"))
        payload["strategies"][0]["freq"] = "1min"
        path.write_text(json.dumps(payload), encoding="utf-8")
        third = client.fetch_catalog("strategies")
    assert first is not None and second is not None and third is not None
    assert first.sha256 == second.sha256
    assert third.sha256 != first.sha256
    assert third.records[0]["freq"] == "1min"


def test_models_not_published_is_none(tmp_path: Path, start_server) -> None:
    base_url = start_server(build_demo_results_dir(tmp_path / "r", with_models=False))
    with RDAgentResultsClient(base_url, **FAST) as client:
        assert client.fetch_catalog("models") is None
        assert client.fetch_catalog("loops") is not None


def test_invalid_catalog_file_is_none(results_dir: Path, start_server) -> None:
    (results_dir / "aistock" / "loop_catalog.json").write_text('{"loops": [', encoding="utf-8")
    (results_dir / "aistock" / "alpha158_meta.json").unlink()
    with RDAgentResultsClient(start_server(results_dir), **FAST) as client:
        assert client.fetch_catalog("loops") is None
        assert client.fetch_alpha158_meta() is None


def test_fetch_alpha158_meta(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        meta = client.fetch_alpha158_meta()
    assert meta is not None
    assert meta.source == "qlib_alpha158"
    assert meta.config_path.endswith("conf_baseline.yaml")
    assert [f.name for f in meta.factors] == [
        "KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2", "OPEN0",
        "HIGH0", "LOW0", "VWAP0", "ROC5", "ROC10", "ROC20", "MA5", "MA10", "STD5", "BETA5",
    ]
    assert meta.factors[0].expression == "($close-$open)/$open"
    assert meta.factors[-1].model_dump() == {
        "name": "BETA5", "expression": "Slope($close, 5)/$close", "source": "qlib_alpha158", "region": "cn",
        "tags": ["alpha158", "rolling"],
    }
    raw = httpx.get(f"{demo_server}/alpha158/meta", trust_env=False).content
    assert meta.sha256 == hashlib.sha256(raw).hexdigest()


def test_fetch_factor(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        factor = client.fetch_factor("Price_Volume_Divergence_5D")
        assert factor is not None and factor["expression"] == "Corr($close, $volume, 5)"
        assert client.fetch_factor("factor_hl_range")["best_performance"]["sharpe"] is None
        assert client.fetch_factor("factor_HL_range") is None
        assert client.fetch_factor("a/b") is None  # unaddressable upstream; must not hit another route


def test_fetch_loop_artifacts(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        result = client.fetch_loop_artifacts(RUN_UUID, 1)
        empty = client.fetch_loop_artifacts("unknown-run", 7)
    assert (result.task_run_id, result.loop_id) == (RUN_UUID, 1)
    report = next(a for a in result.artifacts if a.artifact_id == "art-a-report")
    assert report.primary_flag is True
    assert report.summary == {"annualized_return": 0.1187, "max_drawdown": -0.0934, "ic": 0.0312}
    assert [(f.path, f.size_bytes, f.kind) for f in report.files] == [
        ("qlib_res.csv", 1932, "csv"), ("ret.pkl", 48213, "pickle"), ("ret_curve.png", 84502, "image"),
    ]
    assert report.files[1].sha256 == hashlib.sha256(b"a1c4e8f2b3d94e7a8c5f0d2b6e9a1c37/ret.pkl").hexdigest()
    assert len(result.sha256) == 64
    assert (empty.task_run_id, empty.loop_id, empty.artifacts) == ("unknown-run", 7, [])
    with pytest.raises(TypeError):
        client.fetch_loop_artifacts(RUN_UUID, "1")  # type: ignore[arg-type]


def test_health(demo_server: str, closed_port_url: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client:
        assert client.health() is True
    with RDAgentResultsClient(closed_port_url, **FAST) as client:
        assert client.health() is False


def test_body_over_cap_on_real_server(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, max_body_bytes=1000, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=r"over the 1000-byte cap \(declares \d+ bytes\)"):
            client.fetch_catalog("factors")
        assert client.fetch_factor("KMID") is not None  # small bodies still fine


def test_unknown_kind_is_a_programming_error(demo_server: str) -> None:
    with RDAgentResultsClient(demo_server, **FAST) as client, pytest.raises(ValueError, match="unknown catalog kind"):
        client.fetch_catalog("factor")  # type: ignore[arg-type]


# -- availability, retries, timeouts -------------------------------------------------------------
def test_server_down_is_unavailable_quickly(closed_port_url: str) -> None:
    started = time.monotonic()
    with RDAgentResultsClient(closed_port_url, retries=2, **FAST) as client:
        with pytest.raises(ResultsApiUnavailable) as caught:
            client.fetch_catalog("factors")
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert f"{closed_port_url}/catalog/factors" in message
    assert "3 attempt(s)" in message and "ConnectError" in message
    assert caught.value.url == f"{closed_port_url}/catalog/factors"


def test_hanging_server_times_out(scripted_server) -> None:
    server = scripted_server([Reply(hang=True)])
    started = time.monotonic()
    with RDAgentResultsClient(server.base_url, retries=1, backoff=0.01, read_timeout=0.3) as client:
        with pytest.raises(ResultsApiUnavailable, match="timed out"):
            client.fetch_catalog("loops")
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 1.5  # two attempts of ~0.3 s each
    assert server.paths == ["/catalog/loops", "/catalog/loops"]


def test_5xx_is_retried_then_succeeds(scripted_server) -> None:
    ok = json_reply(envelope("strategies", [{"strategy_id": "abc"}]))
    server = scripted_server([json_reply({"detail": "boom"}, 500), Reply(status=503, body=b"busy"), ok])
    with RDAgentResultsClient(server.base_url, retries=3, **FAST) as client:
        catalog = client.fetch_catalog("strategies")
    assert catalog is not None and catalog.records == [{"strategy_id": "abc"}]
    assert len(server.paths) == 3


def test_5xx_forever_is_unavailable_after_all_retries(scripted_server) -> None:
    server = scripted_server([json_reply({"detail": "registry query failed: disk I/O error"}, 500)])
    with RDAgentResultsClient(server.base_url, retries=2, **FAST) as client:
        with pytest.raises(ResultsApiUnavailable, match="HTTP 500: registry query failed: disk I/O error"):
            client.fetch_loop_artifacts(RUN_TS, 3)
    assert len(server.paths) == 3
    assert server.paths[0] == f"/loops/{RUN_TS}/3/artifacts"


@pytest.mark.parametrize("status", [400, 401, 403, 405, 422, 429])
def test_4xx_is_not_retried(scripted_server, status: int) -> None:
    server = scripted_server([json_reply({"detail": "nope"}, status)])
    with RDAgentResultsClient(server.base_url, retries=3, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=f"unexpected HTTP {status} \\(nope\\)") as caught:
            client.fetch_catalog("factors")
    assert caught.value.status_code == status
    assert len(server.paths) == 1


def test_404_is_none_and_not_retried(scripted_server) -> None:
    server = scripted_server([json_reply({"detail": "factor_catalog.json not found"}, 404)])
    with RDAgentResultsClient(server.base_url, retries=3, **FAST) as client:
        assert client.fetch_catalog("factors") is None
        with pytest.raises(ResultsApiBadResponse, match="no loop artifacts endpoint"):
            client.fetch_loop_artifacts(RUN_TS, 3)
    assert len(server.paths) == 2


def test_dropped_connection_is_retried(scripted_server) -> None:
    # declares 100 bytes, sends 5, closes: httpx raises RemoteProtocolError (a transport error)
    broken = Reply(body=b'{"ve', headers={"Content-Type": "application/json", "Content-Length": "100"},
                   content_length=False)
    ok = json_reply(envelope("models", [{"model_id": "m1"}]))
    server = scripted_server([broken, ok])
    with RDAgentResultsClient(server.base_url, retries=1, **FAST) as client:
        catalog = client.fetch_catalog("models")
    assert catalog is not None and catalog.records == [{"model_id": "m1"}]
    assert len(server.paths) == 2


# -- bad bodies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"{not json", b"<html>proxy error</html>", b"", b'{"a": 1} trailing'])
def test_malformed_json(scripted_server, body: bytes) -> None:
    server = scripted_server([Reply(body=body)])
    with RDAgentResultsClient(server.base_url, retries=3, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match="is not valid JSON") as caught:
            client.fetch_catalog("factors")
    assert f"{server.base_url}/catalog/factors" in str(caught.value)
    assert len(server.paths) == 1  # a bad body is not retried


def test_nan_tokens_become_none(scripted_server) -> None:
    body = (b'{"version": "v1", "generated_at_utc": "t", "loops": [{"task_run_id": "r", "loop_id": 1, '
            b'"workspace_id": "w", "sharpe": NaN, "ic": Infinity, "mdd": -Infinity, "big": 1e999, "x": 1.5}]}')
    server = scripted_server([Reply(body=body)])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        catalog = client.fetch_catalog("loops")
    assert catalog is not None
    assert catalog.records == [{"task_run_id": "r", "loop_id": 1, "workspace_id": "w",
                                "sharpe": None, "ic": None, "mdd": None, "big": None, "x": 1.5}]
    assert catalog.source is None  # optional in the envelope


@pytest.mark.parametrize(
    ("kind", "payload", "expected"),
    [
        (
            "factors",
            envelope("strategies", [{"strategy_id": "s"}]),
            r"has no 'factors' list \(list keys present: \['strategies'\]\)",
        ),
        ("loops", [{"task_run_id": "r"}], r"<root>: Input should be a valid dictionary"),
        ("models", {"generated_at_utc": "t", "models": []}, r"version: Field required"),
        ("models", {"version": "v1", "models": []}, r"generated_at_utc: Field required"),
        (
            "strategies",
            {"version": 1, "generated_at_utc": "t", "strategies": []},
            r"version: Input should be a valid string",
        ),
        ("strategies", envelope("strategies", {"s": {}}), r"strategies: Input should be a valid list"),
    ],
)
def test_wrong_envelope(scripted_server, kind: str, payload: object, expected: str) -> None:
    server = scripted_server([json_reply(payload)])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=expected):
            client.fetch_catalog(kind)


@pytest.mark.parametrize(
    ("kind", "records", "expected"),
    [
        ("factors", [{"name": "a", "source": "s"}, {"name": "b"}], r"factors\.1\.source: Field required"),
        ("factors", ["KMID"], r"factors\.0: Input should be a valid dictionary"),
        ("factors", [{"name": 5, "source": "s"}], r"factors\.0\.name: Input should be a valid string"),
        ("factors", [{"name": "", "source": "s"}], r"factors\.0\.name: String should have at least 1 character"),
        ("strategies", [{"strategy_id": None}], r"strategies\.0\.strategy_id: Input should be a valid string"),
        (
            "loops",
            [{"task_run_id": "r", "loop_id": "x", "workspace_id": "w"}],
            r"loops\.0\.loop_id: Input should be a valid integer",
        ),
        (
            "loops",
            [{"task_run_id": "r", "loop_id": True, "workspace_id": "w"}],
            r"loops\.0\.loop_id: Value error, loop_id must be an integer",
        ),
        ("loops", [{"task_run_id": None, "loop_id": 1, "workspace_id": "w"}], r"loops\.0\.task_run_id"),
        ("loops", [{"task_run_id": "r", "loop_id": 1}], r"loops\.0\.workspace_id: Field required"),
        ("models", [{"model_type": "LGBModel"}], r"models\.0\.model_id: Field required"),
    ],
)
def test_bad_records(scripted_server, kind: str, records: list, expected: str) -> None:
    server = scripted_server([json_reply(envelope(kind, records))])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=expected) as caught:
            client.fetch_catalog(kind)
    assert "input_value" not in str(caught.value)  # offending values are not echoed


def test_loop_record_coercions(scripted_server) -> None:
    records = [{"task_run_id": 20251218, "loop_id": "3", "workspace_id": "w", "extra": {"k": [1]}}]
    server = scripted_server([json_reply(envelope("loops", records))])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        catalog = client.fetch_catalog("loops")
    assert catalog is not None
    assert catalog.records == [{"task_run_id": "20251218", "loop_id": 3, "workspace_id": "w", "extra": {"k": [1]}}]


def test_unknown_envelope_fields_are_kept(scripted_server) -> None:
    payload = {**envelope("models", []), "schema_rev": 7}
    server = scripted_server([json_reply(payload)])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        catalog = client.fetch_catalog("models")
    assert catalog is not None and catalog.envelope_extra == {"schema_rev": 7} and catalog.records == []


def test_body_over_cap_while_streaming(scripted_server) -> None:
    # no Content-Length: the cap can only be enforced while reading
    big = b'{"version": "v1", "generated_at_utc": "t", "factors": [' + b'{"name": "x", "source": "s"},' * 400_000
    server = scripted_server([Reply(body=big, content_length=False)])
    with RDAgentResultsClient(server.base_url, max_body_bytes=64 * 1024, retries=3, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=r"over the 65536-byte cap \(exceeded it after") as caught:
            client.fetch_catalog("factors")
    stopped_at = int(re.search(r"exceeded it after (\d+) bytes", str(caught.value)).group(1))
    assert 64 * 1024 < stopped_at < len(big) // 10  # aborted early, not after reading everything
    assert len(server.paths) == 1


def test_bad_alpha158_meta_and_factor(scripted_server) -> None:
    server = scripted_server([json_reply({"version": "v1", "generated_at_utc": "t", "factors": [{"name": "KMID"}]}),
                              json_reply({"name": "KMID"})])
    with RDAgentResultsClient(server.base_url, **FAST) as client:
        with pytest.raises(ResultsApiBadResponse, match=r"alpha158 meta .*factors\.0\.expression: Field required"):
            client.fetch_alpha158_meta()
        with pytest.raises(ResultsApiBadResponse, match=r"factor 'KMID' .*source: Field required"):
            client.fetch_factor("KMID")


def test_errors_share_one_base_class() -> None:
    assert issubclass(ResultsApiUnavailable, ResultsApiError)
    assert issubclass(ResultsApiBadResponse, ResultsApiError)
    with pytest.raises(ResultsApiError, match="invalid URL"):
        RDAgentResultsClient("ftp://127.0.0.1:1", **FAST).fetch_catalog("factors")

"""Fixtures for the RD-Agent results API tests: real HTTP servers on 127.0.0.1, ephemeral ports only.

A plugin of the root conftest, so the Dagster wiring tests in ``orchestration/`` use them too.

* ``demo_results_dir`` / ``demo_server``: the demo directory and the conformant server over it, shared by
  the read-only tests of a session.
* ``results_dir`` + ``start_server``: a private copy and server for tests that edit files.
* ``closed_port_url``: a loopback port nobody listens on.
* ``fake_api``: a routed misbehaving server (``http.server.ThreadingHTTPServer``) for the sync tests.
* ``registry_engine``: an engine on the session's registry database, emptied (no ``rdagent`` schema)
  before each test.

The scripted (request-order) misbehaving server lives next to the client tests, its only user.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir
from aistock_pipelines.rdagent.results_server import serve_in_thread
from aistock_pipelines_tests.helpers import disposing_engine

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="session")
def demo_results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only demo directory (tests that modify files must use ``results_dir``)."""
    return build_demo_results_dir(tmp_path_factory.mktemp("rdagent_demo"))


@pytest.fixture(scope="session")
def demo_server(demo_results_dir: Path) -> Iterator[str]:
    with serve_in_thread(demo_results_dir, host=LOOPBACK, port=0) as base_url:
        yield base_url


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """A private, writable demo directory."""
    return build_demo_results_dir(tmp_path / "results")


@pytest.fixture
def start_server() -> Iterator[Callable[[Path], str]]:
    """Factory: start the conformant server over a directory; all are stopped at teardown."""
    with ExitStack() as stack:
        yield lambda directory: stack.enter_context(serve_in_thread(directory, host=LOOPBACK, port=0))


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nobody listens on (port bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    return f"http://{LOOPBACK}:{port}"


@pytest.fixture(scope="session")
def registry_db(pg_server) -> str:
    """One database for all registry tests (URL); ``registry_engine`` empties it before each test.

    Resetting a schema is much cheaper than a database per test: every ``DROP DATABASE`` forces a
    checkpoint.
    """
    return pg_server.create_database("rdagent_registry")


@pytest.fixture
def registry_engine(registry_db: str) -> Iterator[Engine]:
    """An engine on a database without the ``rdagent`` schema (the sync creates it itself)."""
    with disposing_engine(registry_db) as engine:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS rdagent CASCADE")
        yield engine


#: Route value meaning "accept the request and never answer".
HANG = "hang"


@dataclass
class FakeApi:
    """A started fake server: its base URL and the request paths it received, in order."""

    base_url: str
    paths: list[str] = field(default_factory=list)


def _encode(reply: Any) -> tuple[int, bytes]:
    """``bytes`` -> 200 with that body; ``(status, payload)``; anything else -> 200 with its JSON."""
    status, payload = reply if isinstance(reply, tuple) else (200, reply)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return status, body


@pytest.fixture
def fake_api() -> Iterator[Callable[[dict[str, Any]], FakeApi]]:
    """Factory: a ThreadingHTTPServer on 127.0.0.1:0 answering by request path.

    Route values: raw ``bytes`` (200, sent as is: malformed JSON, NaN tokens, huge bodies), a JSON-able
    object (200), ``(status, payload)``, or :data:`HANG`. Unknown paths answer 404 like FastAPI.
    """
    release = threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Any]) -> FakeApi:
        api = FakeApi(base_url="")
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                with lock:
                    api.paths.append(self.path)
                reply = routes.get(self.path, (404, {"detail": "Not Found"}))
                if isinstance(reply, str) and reply == HANG:
                    release.wait(timeout=10)
                    return
                status, body = _encode(reply)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up on purpose (body over its cap)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        api.base_url = f"http://{LOOPBACK}:{server.server_address[1]}"
        return api

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Drip:
    """How :func:`slow_api` answers: ``head`` bytes of the response sent at once, the rest in
    ``pieces`` pieces (``0`` = byte by byte) with ``pause`` seconds before each."""

    body: bytes
    head: bool = True
    pieces: int = 0
    pause: float = 2.0


@pytest.fixture
def slow_api() -> Iterator[Callable[[dict[str, Drip]], str]]:
    """Factory: a server on 127.0.0.1:0 that answers each known path slowly (:class:`Drip`), others 404.

    With ``head=False`` even the status line and headers drip, which no per-read timeout ever ends.
    """
    stop = threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Drip]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                drip = routes.get(self.path)
                body = drip.body if drip else b'{"detail": "Not Found"}'
                status = "200 OK" if drip else "404 Not Found"
                head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                if drip is None:
                    self.wfile.write(head + body)
                    return
                at_once, slow = (head, body) if drip.head else (b"", head + body)
                size = 1 if drip.pieces == 0 else -(-len(slow) // drip.pieces)
                try:
                    self.wfile.write(at_once)
                    self.wfile.flush()
                    for start in range(0, len(slow), size):
                        if stop.wait(drip.pause):
                            return
                        self.wfile.write(slow[start:start + size])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the deadline is for

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://{LOOPBACK}:{server.server_address[1]}"

    yield start
    stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()

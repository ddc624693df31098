"""Fixtures for the RD-Agent results API tests: real HTTP servers on 127.0.0.1, ephemeral ports only.

* ``demo_results_dir`` / ``demo_server``: the demo directory and the conformant server over it, shared by
  the read-only tests of a session.
* ``results_dir`` + ``start_server``: a private copy and server for tests that edit files.
* ``closed_port_url``: a loopback port nobody listens on.

The misbehaving-server fixture lives next to the client tests, its only user.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from aistock_pipelines.demo.rdagent_results_builder import build_demo_results_dir
from aistock_pipelines.rdagent.results_server import serve_in_thread

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

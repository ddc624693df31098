"""``aistock-pipelines db stop`` stops every embedded server of the checkout (the database and the tests'
server), ``--test`` only the tests'; afterwards ``ps`` shows none of their processes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aistock_pipelines.embedded_db import EmbeddedPostgres
from aistock_pipelines_tests.helpers import processes_of

pytestmark = [pytest.mark.db, pytest.mark.slow]


def cli(home: Path, *args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "aistock-pipelines"), *args], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "AISTOCK_HOME": str(home), "AISTOCK_DB_URL": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_db_stop_stops_the_database_and_the_test_server(tmp_path):
    home = tmp_path / "home"
    servers = [EmbeddedPostgres(home / "pgdata"), EmbeddedPostgres(home / "test-pgdata", database="postgres")]
    try:
        for server in servers:
            server.start()
        assert cli(home, "db", "status").splitlines() == [f"embedded: running ({home / 'pgdata'})",
                                                          f"test: running ({home / 'test-pgdata'})"]
        assert cli(home, "db", "stop", "--test").strip() == f"test: stopped ({home / 'test-pgdata'})"
        assert [server.is_running() for server in servers] == [True, False]
        assert cli(home, "db", "stop").splitlines() == [f"embedded: stopped ({home / 'pgdata'})",
                                                        f"test: not running ({home / 'test-pgdata'})"]
        assert processes_of(str(home)) == []  # no postmaster, no backend left
    finally:
        for server in servers:
            server.stop()


def test_stop_counts_an_exited_demo_not_yet_reaped_as_stopped(tmp_path):
    """A demo started by another program has exited once it stopped, even before that program reaps it."""
    home = tmp_path / "home"
    home.mkdir()
    demo = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "lambda *_: exit(0)); time.sleep(60)"])
    try:
        (home / "demo.pid").write_text(f"{demo.pid}\n")
        time.sleep(1)  # its handler is installed
        out = cli(home, "stop")  # the child exits on SIGTERM and stays a zombie: this test does not wait for it
        assert out.splitlines()[0] == f"demo (pid {demo.pid}): stopped"
        assert not (home / "demo.pid").exists()
    finally:
        demo.kill()
        assert demo.wait(timeout=10) == 0

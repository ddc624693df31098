"""The embedded server: starts, keeps its data across processes, stops cleanly; a configured URL bypasses it."""

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from aistock_pipelines.embedded_db import EmbeddedPostgres, admin_server, resolve_db_url
from aistock_pipelines.settings import Settings

pytestmark = pytest.mark.db

_SCRIPT = """
import sys, psycopg
from pathlib import Path
from aistock_pipelines.embedded_db import EmbeddedPostgres
url = EmbeddedPostgres(Path(sys.argv[1])).start()
with psycopg.connect(url, autocommit=True) as c:
    if sys.argv[2] == "write":
        c.execute("CREATE TABLE kept (v text)")
        c.execute("INSERT INTO kept VALUES ('written by process one')")
    else:
        print(c.execute("SELECT v FROM kept").fetchone()[0])
"""


def _run(pgdata: Path, mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(pgdata), mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_start_survive_process_restart_and_stop(tmp_path: Path):
    pgdata = tmp_path / "pgdata"
    server = EmbeddedPostgres(pgdata)
    try:
        _run(pgdata, "write")  # process one starts the server and writes
        assert server.is_running(), "the server outlives the process that started it"
        assert server.stop() is True
        assert not server.is_running()
        # process two finds the data directory, starts the server again and reads process one's row
        assert _run(pgdata, "read") == "written by process one"
        url = server.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0] >= "180000"
            assert conn.execute("SELECT current_database()").fetchone()[0] == "aistock"
    finally:
        server.stop()
    assert not server.is_running()
    assert server.stop() is False  # stopping a stopped server is harmless


def test_a_configured_url_is_used_as_is(tmp_path: Path):
    settings = Settings.from_env({"AISTOCK_DB_URL": "postgresql://u:p@db:5432/aistock", "AISTOCK_HOME": str(tmp_path)})
    assert resolve_db_url(settings) == "postgresql://u:p@db:5432/aistock"
    assert admin_server("postgresql+psycopg://u:p@db/postgres", tmp_path / "pgdata") == ("postgresql://u:p@db/postgres", None)
    assert not (tmp_path / "pgdata").exists()  # no embedded server was started

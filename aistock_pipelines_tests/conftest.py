"""Shared fixtures: a real PostgreSQL server and the seeded demo market.

The server is the embedded one (PostgreSQL 18, data under ``.aistock/test-pgdata``) unless
``AISTOCK_TEST_DB_URL`` names another (CI also runs the suite against Debian's PostgreSQL 15). Each test
session works in databases of its own, created here and dropped at the end: the demo market is seeded
once into a template database and tests that modify data get a copy (``CREATE DATABASE … TEMPLATE``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import ExitStack
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import Engine, make_url

from aistock_pipelines.db import libpq_url
from aistock_pipelines.demo.market import MarketSpec, SeedSummary, seed_demo_market
from aistock_pipelines_tests.helpers import disposing_engine

REPO = Path(__file__).resolve().parents[1]

#: The RD-Agent results API fixtures serve both the rdagent/ tests and the Dagster wiring tests in orchestration/.
pytest_plugins = ["aistock_pipelines_tests.rdagent.fixtures"]

#: The demo market the tests run on: the default demo size (≥ 300 instruments, > 3 years).
TEST_MARKET = MarketSpec()


def _server_url() -> str:
    from aistock_pipelines.embedded_db import admin_server

    return admin_server(os.environ.get("AISTOCK_TEST_DB_URL", "").strip() or None, REPO / ".aistock" / "test-pgdata")[0]


def _with_database(url: str, name: str) -> str:
    return libpq_url(make_url(url).set(database=name).render_as_string(hide_password=False))


@dataclass
class TestServer:
    """A PostgreSQL server on which the session creates (and later drops) its own databases."""

    admin_url: str
    prefix: str = field(default_factory=lambda: f"aistock_t{uuid.uuid4().hex[:8]}")
    created: list[str] = field(default_factory=list)

    def create_database(self, suffix: str, template: str | None = None) -> str:
        name = f"{self.prefix}_{suffix}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            conn.execute(stmt)
        self.created.append(name)
        return _with_database(self.admin_url, name)

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in reversed(self.created):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    server = TestServer(admin_url=_server_url())
    yield server
    server.drop_all()


@dataclass
class SeededMarket:
    template_name: str
    summary: SeedSummary
    spec: MarketSpec


@pytest.fixture(scope="session")
def market_template(pg_server: TestServer) -> SeededMarket:
    """The demo market, seeded once per session into a template nobody connects to afterwards
    (PostgreSQL copies a template only while it has no sessions)."""
    url = pg_server.create_database("market")
    with disposing_engine(url) as engine:
        summary = seed_demo_market(engine, TEST_MARKET)
    return SeededMarket(template_name=f"{pg_server.prefix}_market", summary=summary, spec=TEST_MARKET)


@pytest.fixture(scope="session")
def market_ro(pg_server: TestServer, market_template: SeededMarket) -> str:
    """A session-wide copy of the demo market for tests that only read (URL). Do not modify it."""
    return pg_server.create_database("market_ro", template=market_template.template_name)


_copies = iter(range(10**6))


@pytest.fixture
def market_db(pg_server: TestServer, market_template: SeededMarket) -> str:
    """A private, writable copy of the seeded demo market (URL)."""
    return pg_server.create_database(f"copy{next(_copies)}", template=market_template.template_name)


@pytest.fixture
def empty_db(pg_server: TestServer) -> str:
    return pg_server.create_database(f"empty{next(_copies)}")


@pytest.fixture
def make_engine() -> Iterator[Callable[[str], Engine]]:
    """Factory: an engine on a database URL, disposed when the test ends (even when it fails)."""
    with ExitStack() as stack:
        yield lambda url: stack.enter_context(disposing_engine(url))

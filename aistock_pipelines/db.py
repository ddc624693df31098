"""Connection URLs and engines for the AIstock database.

One URL is configured (``AISTOCK_DB_URL``, libpq style); SQLAlchemy needs the psycopg 3 dialect named in it,
and the ADBC bulk reader needs the plain libpq form. Both are derived here so no module formats URLs itself.
"""

from __future__ import annotations

import re
from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url


def sqlalchemy_url(url: str) -> str:
    """``postgresql://…`` → ``postgresql+psycopg://…`` (psycopg 3, a core dependency)."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        raise ValueError(f"only PostgreSQL URLs are supported, got backend {u.get_backend_name()!r}")
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """Strip a SQLAlchemy driver suffix so libpq (ADBC, psql) accepts the URL."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def redact(url: str) -> str:
    """The URL with its password masked: the only form that may appear in logs and metadata."""
    return make_url(url).render_as_string(hide_password=True)


def create_db_engine(url: str) -> Engine:
    return sa.create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=2, max_overflow=4)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """Process-wide engine cache: one pool per database URL."""
    return create_db_engine(url)

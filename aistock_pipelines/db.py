"""Connection URLs and engines for the AIstock database.

One URL is configured (``AISTOCK_DB_URL``, libpq style); SQLAlchemy needs the psycopg 3 dialect named in it,
and the ADBC bulk reader needs the plain libpq form. Both are derived here so no module formats URLs itself.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import parse_qsl, unquote

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


_USERINFO_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:([^@/?#]*)@")


def passwords(url: str | None) -> list[str]:
    """The passwords a URL carries (userinfo and ``?password=``), as written and decoded, longest first."""
    found: set[str] = set()
    match = _USERINFO_PASSWORD.match(url or "")
    if match and match.group(1):
        found |= {match.group(1), unquote(match.group(1))}
    query = (url or "").partition("?")[2]
    found |= {value for key, value in parse_qsl(query) if key == "password" and value}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """``text`` with every password of ``url`` masked: for messages that may echo a connection string."""
    for secret in passwords(url):
        text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """The URL with its password masked: the only form that may appear in logs and metadata.
    Never raises: a URL SQLAlchemy cannot parse is masked as text (its parse error would echo it)."""
    try:
        rendered = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any parse error; the text is masked below either way
        rendered = url
    return scrub(rendered, url)


def create_db_engine(url: str) -> Engine:
    return sa.create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=2, max_overflow=4)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """Process-wide engine cache: one pool per database URL."""
    return create_db_engine(url)

"""Small helpers for idioms the tests repeat."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine

from aistock_pipelines.db import create_db_engine


@contextmanager
def disposing_engine(url: str) -> Iterator[Engine]:
    """An engine on ``url`` whose pool is closed on exit, so no test leaves connections to its database behind."""
    engine = create_db_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()

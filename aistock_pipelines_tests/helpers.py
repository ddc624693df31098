"""Small helpers for idioms the tests repeat."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance
from sqlalchemy.engine import Engine

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.orchestration.trading_day_partitions import register_trading_days
from aistock_pipelines.snapshot_config import SnapshotsFile


@contextmanager
def disposing_engine(url: str) -> Iterator[Engine]:
    """An engine on ``url`` whose pool is closed on exit, so no test leaves connections to its database behind."""
    engine = create_db_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def instance_with_trading_days(url: str, config: SnapshotsFile) -> DagsterInstance:
    """An ephemeral Dagster instance with every snapshot's trading days registered as its partitions."""
    instance = DagsterInstance.ephemeral()
    with disposing_engine(url) as engine:
        register_trading_days(instance, engine, config)
    return instance


def processes_of(marker: str) -> list[str]:
    """Running processes whose command line or environment names ``marker`` (a test's own folder): what
    ``ps`` would show of the processes a test started, without matching other checkouts' processes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if int(pid) != os.getpid() and (marker.encode() in cmdline or marker.encode() in environ):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {command[:160]}")
    return found

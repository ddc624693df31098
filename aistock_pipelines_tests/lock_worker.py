"""A second process for the cross-host lock tests (``python -m aistock_pipelines_tests.lock_worker …``).

``hold URL ID``: take the snapshot's write lock, print ``held <pid>``, keep it until stdin closes.
``export URL ROOT ID [CODES]``: a full export (the real exporter) into ROOT — another host's snapshot root,
so only the database lock can keep two writers apart; prints the result as JSON.
Both print the lock module's log records as ``log <unix time> <message>`` lines, so a test can order them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import date
from pathlib import Path

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_lock import snapshot_write_lock
from aistock_pipelines.export.snapshot_writer import SnapshotWriter

START = date(2021, 1, 4)


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"log {record.created:.6f} {record.getMessage()}", flush=True)


def _log_lock_records() -> None:
    logger = logging.getLogger("aistock_pipelines.export.snapshot_lock")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_Lines())


def hold(url: str, snapshot_id: str) -> None:
    with snapshot_write_lock(url, snapshot_id):
        print(f"held {time.time():.6f}", flush=True)
        sys.stdin.read()  # until the test closes our stdin


def export(url: str, root: str, snapshot_id: str, codes: str = "") -> None:
    engine = create_db_engine(url)
    exporter = QlibDailyExporter(DBReader(engine, url=url), SnapshotWriter(Path(root)), MetaRepo(engine))
    result = exporter.export_full(snapshot_id, START, ts_codes=codes.split(",") if codes else None)
    print("result " + json.dumps({"rows": result.rows, "sha256": result.sha256, "done": time.time()}), flush=True)


if __name__ == "__main__":
    _log_lock_records()
    command, *args = sys.argv[1:]
    {"hold": hold, "export": export}[command](*args)

"""Helpers of the release tests: the files of a version or release, an exporter whose snapshots hold the
demo's universes and benchmarks, and a release or rollback killed (SIGKILL) at a chosen point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.release_document import OWN_FILES
from aistock_pipelines.export.release_files import FileEntry, manifest_of
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import load_snapshots_file
from aistock_pipelines_tests.export.helpers import make_exporter

#: What the demo's universes and benchmarks put into a snapshot with ``instruments: ts_code``.
UNIVERSE_FILES = {"instruments/csi300.txt", "instruments/hs_liquid.txt"}
BENCHMARK_FOLDERS = {"000300.sh", "399006.sz"}


def files(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file of a version or release folder but the release's own."""
    return manifest_of(folder, OWN_FILES)


def without_meta(entries: dict[str, FileEntry]) -> dict[str, FileEntry]:
    return {rel: e for rel, e in entries.items() if rel != "meta.json"}


def market_files_exporter(url: str, root: Path) -> QlibDailyExporter:
    """The demo mapping's exporter, writing the demo snapshots file's universes and benchmarks too."""
    return make_exporter(url, root, market_files=load_snapshots_file(DEMO_SNAPSHOTS_FILE).market_files())


def inodes(folder: Path) -> set[int]:
    return {os.stat(folder / rel).st_ino for rel in files(folder)}


_KILLED_CHILD = """
import pathlib, sys, time
from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import release_walk
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.releases import ReleaseStore
from aistock_pipelines.export.rollback import rollback

url, root, action, name, ready = sys.argv[1:6]

def hang(*args, **kwargs):
    pathlib.Path(ready).touch()
    time.sleep(600)

if action == "after-swap":  # the swap is done, the meta rows not yet
    MetaRepo.replace = hang
else:  # hang while linking the 50th file of the share this process walks (worker processes walk the others)
    link, calls = release_walk._link_or_copy, []
    def counting(*args):
        calls.append(1)
        if len(calls) == 50:
            hang()
        return link(*args)
    release_walk._link_or_copy = counting
store = ReleaseStore(pathlib.Path(root), create_db_engine(url))
if action == "release":
    store.create("demo", label=name)
else:
    rollback(store, "demo", name)
"""


def killed(url: str, root: Path, action: str, name: str, tmp_path: Path) -> None:
    """Run a release (``release``) or a rollback (``rollback``: killed while linking; ``after-swap``: killed
    between the swap and the meta rows) in a child process and kill it (SIGKILL) at that point."""
    ready = tmp_path / f"ready-{action}"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, url, str(root), action, name, str(ready)])
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert child.poll() is None, f"the child ended before it could be killed ({child.returncode})"
        assert time.monotonic() < deadline, "the child never reached the point to be killed at"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

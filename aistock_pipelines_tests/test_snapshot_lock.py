"""The cross-host writer lock, with real processes: each writer gets its own snapshot root (as on two hosts,
where ``flock`` cannot see the other), so only the PostgreSQL advisory lock keeps them apart."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from aistock_pipelines.db import libpq_url
from aistock_pipelines.export.snapshot_lock import SnapshotWriteLockTimeout, lock_key, snapshot_write_lock

pytestmark = pytest.mark.db
REPO = Path(__file__).resolve().parents[1]


class Worker:
    """``python -m aistock_pipelines_tests.lock_worker ARGS``; its stdout lines arrive in a queue."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "aistock_pipelines_tests.lock_worker", *args], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if line.startswith(prefix):
                    return line
            try:
                self.seen.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} from worker {self.proc.args[3:]} (exit {self.proc.poll()}): "
                                     f"{self.seen} {self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def log_times(self, text: str) -> list[float]:
        return [float(line.split()[1]) for line in self.seen if line.startswith("log ") and text in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield lambda *args: started.append(Worker(*args)) or started[-1]
    for worker in started:
        worker.stop()


def waiting_on_lock(url: str, pid: int) -> bool:
    """Whether process ``pid``'s lock connection waits for an advisory lock right now."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name LIKE %s",
            (f"aistock writer % pid {pid} %",)).fetchone()[0]


def some_codes(url: str, n: int = 30) -> str:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT DISTINCT ts_code FROM market.kline_daily_qfq ORDER BY 1 LIMIT %s", (n,)).fetchall()
    return ",".join(r[0] for r in rows)


def test_a_second_writer_waits_for_the_first_and_other_snapshots_do_not(market_db, tmp_path, workers):
    codes = some_codes(market_db)
    holder = workers("hold", market_db, "shared")
    holder.wait_for("held")
    second = workers("export", market_db, str(tmp_path / "host_b"), "shared", codes)
    other = workers("export", market_db, str(tmp_path / "host_c"), "other", codes)
    deadline = time.monotonic() + 60
    while not waiting_on_lock(market_db, second.proc.pid):
        assert time.monotonic() < deadline and second.proc.poll() is None, second.seen
        time.sleep(0.2)
    other.wait_for("result")  # another snapshot is exported while "shared" is held
    assert (tmp_path / "host_c" / "other" / "daily_pv.h5").exists()
    assert second.proc.poll() is None and not (tmp_path / "host_b" / "shared").exists()
    told = second.wait_for("log ", timeout=5)
    assert f"snapshot shared is being written by 'aistock writer {socket.gethostname()}" in told
    assert f"pid {holder.proc.pid} shared'" in told and "waiting up to 900 s" in told
    released_at = time.time()
    holder.proc.stdin.close()
    assert holder.proc.wait(timeout=30) == 0
    result = json.loads(second.wait_for("result")[len("result "):])
    assert result["rows"] > 0 and result["done"] >= released_at
    assert second.log_times("write lock acquired after waiting")[0] >= released_at - 1.0
    assert (tmp_path / "host_b" / "shared" / "daily_pv.h5").exists()
    assert second.proc.wait(timeout=30) == 0


def test_two_exports_of_one_snapshot_do_not_overlap(market_db, tmp_path, workers):
    codes = some_codes(market_db, 120)
    runs = [workers("export", market_db, str(tmp_path / f"host_{n}"), "same", codes) for n in "ab"]
    results = [json.loads(w.wait_for("result", timeout=300)[len("result "):]) for w in runs]
    assert results[0]["rows"] == results[1]["rows"] > 0
    spans = sorted((w.log_times("write lock held")[0], w.log_times("write lock released")[0]) for w in runs)
    assert spans[0][1] <= spans[1][0], f"the two writers held the snapshot at the same time: {spans}"


def test_the_wait_ends_with_the_holder_named_and_a_killed_holder_releases(market_db, workers):
    holder = workers("hold", market_db, "timeout_demo")
    holder.wait_for("held")
    began = time.monotonic()
    with pytest.raises(SnapshotWriteLockTimeout) as caught:
        with snapshot_write_lock(market_db, "timeout_demo", wait_s=1.5):
            pytest.fail("the lock is held by the worker")
    assert 1.4 < time.monotonic() - began < 15
    message = str(caught.value)
    assert f"'aistock writer {socket.gethostname()}" in message and f"pid {holder.proc.pid} timeout_demo'" in message
    assert "after waiting 2 s" in message and "connected since" in message
    with pytest.raises(SnapshotWriteLockTimeout, match="after waiting 0 s"):
        with snapshot_write_lock(market_db, "timeout_demo", wait_s=0):
            pass
    with snapshot_write_lock(market_db, "another_id", wait_s=0):  # other ids are free
        pass
    os.kill(holder.proc.pid, signal.SIGKILL)  # a crashed writer: the server drops its session and its lock
    holder.proc.wait(timeout=30)
    began = time.monotonic()
    with snapshot_write_lock(market_db, "timeout_demo", wait_s=60):
        assert time.monotonic() - began < 30


def test_lock_is_released_on_error_and_keys_are_stable(market_db):
    with pytest.raises(RuntimeError, match="boom"):
        with snapshot_write_lock(market_db, "errs", wait_s=0):
            raise RuntimeError("boom")
    with snapshot_write_lock(market_db, "errs", wait_s=0):  # released by the failed export
        pass
    # pinned: writers running two versions of the code must still exclude each other
    assert (lock_key("demo_allA"), lock_key("demo_qlib")) == (285060781, 17972010)

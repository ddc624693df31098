"""A quiet console for long commands: one line per step with its duration, and while a step runs a live
progress line (rewritten in place on a terminal; elsewhere, a line every ``heartbeat_s`` at most)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import sqlalchemy as sa

PREFIX = "==>"


class Step:
    """The running step: ``progress`` sets its live status, ``done`` its final detail."""

    def __init__(self, name: str, poll: Callable[[], str | None] | None = None):
        self.name, self.poll = name, poll
        self.status, self.detail = "", ""
        self.started = time.monotonic()

    def progress(self, text: str) -> None:
        self.status = text

    def done(self, text: str) -> None:
        self.detail = text

    def live(self) -> str:
        polled = self.poll() if self.poll else None
        return "; ".join(t for t in (self.status, polled) if t)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class StepConsole:
    def __init__(self, stream: TextIO | None = None, heartbeat_s: float = 15.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    @contextmanager
    def step(self, name: str, poll: Callable[[], str | None] | None = None) -> Iterator[Step]:
        """Run a step; its line is printed when it ends (``FAILED`` and the error when it raises)."""
        step, stop = Step(name, poll), threading.Event()
        ticker = threading.Thread(target=self._tick, args=(step, stop), daemon=True, name=f"progress {name}")
        ticker.start()
        try:
            yield step
        except BaseException as e:
            stop.set()
            ticker.join()
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "FAILED"
            self.line(f"{PREFIX} {name}: {what} after {step.elapsed():.1f} s: {e or type(e).__name__}")
            raise
        stop.set()
        ticker.join()
        self.line(f"{PREFIX} {name}: {step.detail or 'done'} ({step.elapsed():.1f} s)")

    def _tick(self, step: Step, stop: threading.Event) -> None:
        last_print = time.monotonic()
        while not stop.wait(1.0):
            try:
                status = step.live()
            except Exception:  # a progress probe never fails the step it watches
                status = step.status
            text = f"{PREFIX} {step.name}: {status or 'working'} … {step.elapsed():.0f} s"
            if self.tty:
                with self._lock:
                    self.stream.write("\r\033[K" + text[:160])
                    self.stream.flush()
            elif time.monotonic() - last_print >= self.heartbeat_s:
                self.line(text)
                last_print = time.monotonic()


def copy_progress(engine: sa.Engine) -> Callable[[], str | None]:
    """A probe of the server's running COPY commands in the engine's database (``pg_stat_progress_copy``):
    the demo's bulk loads and the exporter's bulk reads both move their rows through COPY."""

    def probe() -> str | None:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT CASE WHEN relid = 0 THEN NULL ELSE relid::regclass::text END, command, tuples_processed "
                "FROM pg_stat_progress_copy WHERE datname = current_database()")).all()
        parts = [f"{'reading' if cmd == 'COPY TO' else 'loading'} {table or 'rows'}: {n:,} rows"
                 for table, cmd, n in rows if n]
        return "; ".join(parts) or None

    return probe

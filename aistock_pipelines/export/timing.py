"""Phase timings of an export: ``with timer.phase("write_h5"):`` adds the block's seconds to that phase."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """Seconds per named phase, summed over every block timed under that name (thread-safe enough: each
    phase is timed by one thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> dict[str, float]:
        """The phases so far plus ``total``: seconds since the timer was made."""
        return {**self.seconds, "total": time.perf_counter() - self._start}

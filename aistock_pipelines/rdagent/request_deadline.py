"""A whole-request time limit for httpx, which only has per-operation timeouts.

httpx's read timeout bounds each socket read, so a server sending one byte every two seconds keeps a
request alive for ever, headers included. A :class:`RequestDeadline` is armed around one request: every
socket the request opens is registered through httpcore's ``trace`` extension, and a timer shuts those
sockets down when the deadline passes, which ends any blocked read at once. Callers also check
:attr:`expired` between body chunks and pass :meth:`timeout` so no single operation outlives it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx

#: The httpcore trace event that hands over a newly connected network stream.
_CONNECTED = "connection.connect_tcp.complete"


class RequestDeadline:
    """``seconds`` from now; use as a context manager around one request (with its retries)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    @property
    def expired(self) -> bool:
        return self._fired or time.monotonic() >= self._at

    def remaining(self) -> float:
        return max(self._at - time.monotonic(), 0.0)

    def timeout(self, base: httpx.Timeout) -> httpx.Timeout:
        """``base`` with every phase capped at the time left (at least a millisecond)."""
        left = max(self.remaining(), 0.001)

        def cap(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(connect=cap(base.connect), read=cap(base.read), write=cap(base.write),
                             pool=cap(base.pool))

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore ``trace`` hook: remember each socket the request connects."""
        if event != _CONNECTED:
            return
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            fired = self._fired
        if fired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def __enter__(self) -> RequestDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    """End both directions: a read blocked in another thread returns at once (``close`` would not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by httpx

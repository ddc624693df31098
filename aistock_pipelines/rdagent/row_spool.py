"""Registry rows parked on disk between fetching and writing, read back in bounded batches.

The loop artifacts sync fetches one listing per loop before its single transaction (no transaction waits
on the network). Held in memory, all loops' rows grow with the number of loops; spooled, memory holds one
loop's listing while fetching and one batch while writing. Only each key's position stays in memory, so
that a key received twice keeps its last record, exactly as within one response.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from typing import Any

Key = tuple[Any, ...]
Row = dict[str, Any]

#: A batch ends once this many pickled bytes were read, or at this many rows (bind parameter limits).
BATCH_BYTES = 1024 * 1024
BATCH_ROWS = 1000


class RowSpool:
    """Append ``(key, row)`` pairs; :meth:`batches` yields them back, the last record of each key only."""

    def __init__(self, batch_bytes: int = BATCH_BYTES, batch_rows: int = BATCH_ROWS) -> None:
        self._file = tempfile.TemporaryFile(prefix="aistock-rows-")
        self._last: dict[Key, int] = {}
        self.batch_bytes = batch_bytes
        self.batch_rows = batch_rows
        self.received = 0

    def add(self, key: Key, row: Row) -> None:
        """Park one row; a later row with the same key replaces it."""
        self._last[key] = self.received
        pickle.dump((key, row), self._file, protocol=pickle.HIGHEST_PROTOCOL)
        self.received += 1

    @property
    def duplicates(self) -> int:
        """Rows dropped because a later one had the same key."""
        return self.received - len(self._last)

    def batches(self) -> Iterator[dict[Key, Row]]:
        """The kept rows in order of arrival, in batches bounded by bytes and rows."""
        self._file.seek(0)
        batch: dict[Key, Row] = {}
        start = 0
        for index in range(self.received):
            key, row = pickle.load(self._file)  # noqa: S301 - our own file, written above
            if self._last[key] == index:
                batch[key] = row
            if batch and (self._file.tell() - start >= self.batch_bytes or len(batch) >= self.batch_rows):
                yield batch
                batch, start = {}, self._file.tell()
        if batch:
            yield batch

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowSpool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

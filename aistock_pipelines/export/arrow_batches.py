"""The bulk read's Arrow batches: statements streamed on one cursor, read ahead by a second thread, and
each batch's keys and values decoded without a Python object per row."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aistock_pipelines.export.daily_features import PACKED_COLUMN, SourceSelect
from aistock_pipelines.export.gates import DataGateError

T = TypeVar("T")


def statement_batches(conn: adbc.Connection, statements: list[str]) -> Iterator[tuple[int, pa.RecordBatch | None]]:
    """``(i, batch)`` for each Arrow batch of statement ``i``, then ``(i, None)`` when it is done: the
    statements one after another on one cursor (one transaction, one view of the database)."""
    with conn.cursor() as cur:
        for i, sql in enumerate(statements):
            cur.execute(sql)
            for batch in cur.fetch_record_batch():
                yield i, batch
            yield i, None


def prefetched(items: Iterable[T], depth: int = 3) -> Iterator[T]:
    """``items``, produced by a second thread while the caller works on the previous ones.

    Without it the socket is drained only between the caller's copies, so the server waits on a full
    socket buffer while the client copies, and the client waits while the server produces. PyArrow
    releases the GIL while the ADBC driver reads and decodes the next batch. If the caller stops early, the thread stops after its current item, closes
    ``items`` (a generator's cursor closes in the thread that used it) and is joined."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                slots.put(item)
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as e:  # handed to the caller, raised there
            slots.put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=pump, name="adbc-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pending put, then wait for the thread to return
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def batch_keys(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, list[str], pa.RecordBatch]:
    """A batch's trade_date as int32 days since 1970, its ts_code as indices into a per-batch dictionary (no
    Python object per row), and the batch itself without the rows whose key is NULL (they join nothing)."""
    if batch.column(0).null_count or batch.column(1).null_count:
        batch = batch.filter(pc.and_(pc.is_valid(batch.column(0)), pc.is_valid(batch.column(1))))
    codes = pc.dictionary_encode(batch.column(1))
    return (batch.column(0).cast(pa.int32()).to_numpy(zero_copy_only=False),
            codes.indices.to_numpy(zero_copy_only=False), codes.dictionary.to_pylist(), batch)


def value_block(select: SourceSelect, batch: pa.RecordBatch) -> np.ndarray:
    """A batch's value columns (after trade_date and ts_code) as one float64 ``(rows, len(names))`` array:
    for the packed column of :meth:`SourceSelect.packed_sql` (rows of ``8 × len(names)`` bytes of big-endian
    float8s) a big-endian view of the batch's own buffer — swapped where it is copied into the block, so
    no batch-sized array is allocated — else the plain columns stacked."""
    column = batch.column(2)
    if batch.num_columns == 3 and batch.schema.field(2).name == PACKED_COLUMN:
        width, n = len(select.names), len(column)
        if column.null_count or not pa.types.is_binary(column.type):
            raise DataGateError(f"{select.label}: the packed read returned NULL or {column.type} values")
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * column.offset)
        if int(offsets[-1] - offsets[0]) != 8 * width * n:
            raise DataGateError(f"{select.label}: the packed read returned rows of unexpected length")
        packed = np.frombuffer(column.buffers()[2], dtype=">f8", count=width * n, offset=int(offsets[0]))
        return packed.reshape(n, width)
    return np.column_stack([c.to_numpy(zero_copy_only=False).astype(np.float64, copy=False) for c in batch.columns[2:]])

"""Bulk loads of the demo's tables through COPY."""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.csv as arrow_csv
from sqlalchemy.engine import Connection


def copy_frame(conn: Connection, table: str, frame: pd.DataFrame) -> None:
    """Bulk-load a frame with COPY (CSV written by Arrow: fast, and doubles keep their shortest exact form,
    so adjustment factors round-trip bit for bit)."""
    if frame.empty:
        return
    cols = ", ".join(frame.columns)
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT csv)") as copy:
            step = 1_000_000
            for i in range(0, len(frame), step):
                buf = io.BytesIO()
                arrow_csv.write_csv(pa.Table.from_pandas(frame.iloc[i : i + step], preserve_index=False), buf,
                                    arrow_csv.WriteOptions(include_header=False, quoting_style="needed"))
                copy.write(buf.getvalue())

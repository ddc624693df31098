"""MetaRepo: per-snapshot, per-instrument export state in ``market.qlib_export_meta``.

Several snapshots share one database, so the key is
``(snapshot_id, ts_code, freq)``. Besides ``last_datetime`` each row keeps the row count and the fingerprint
of the instrument's exported history, which is how an incremental export detects qfq restatements.
Rows are replaced only after the snapshot files are committed (:func:`build.commit`), in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData(schema="market")

qlib_export_meta = sa.Table(
    "qlib_export_meta",
    metadata,
    sa.Column("snapshot_id", sa.Text, primary_key=True),
    sa.Column("ts_code", sa.Text, primary_key=True),
    sa.Column("freq", sa.Text, primary_key=True),
    sa.Column("first_datetime", sa.Date, nullable=False),
    sa.Column("last_datetime", sa.Date, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("checksum", sa.Text, nullable=False),
    sa.Column("export_id", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class InstrumentState:
    ts_code: str
    first_datetime: date
    last_datetime: date
    rows: int
    checksum: str
    export_id: str


class MetaRepo:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._ready = False

    def ensure_schema(self) -> None:
        if not self._ready:
            with self.engine.begin() as conn:
                conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS market"))
                metadata.create_all(conn, checkfirst=True)
            self._ready = True

    def get_last_datetime(self, snapshot_id: str, ts_code: str, freq: str = "1d") -> date | None:
        self.ensure_schema()
        t = qlib_export_meta.c
        with self.engine.connect() as conn:
            return conn.execute(sa.select(t.last_datetime).where(
                t.snapshot_id == snapshot_id, t.ts_code == ts_code, t.freq == freq)).scalar()

    def load(self, snapshot_id: str, freq: str = "1d") -> dict[str, InstrumentState]:
        self.ensure_schema()
        t = qlib_export_meta.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.ts_code, t.first_datetime, t.last_datetime, t.rows, t.checksum, t.export_id)
                                .where(t.snapshot_id == snapshot_id, t.freq == freq)).all()
        return {r.ts_code: InstrumentState(*r) for r in rows}

    def replace(self, snapshot_id: str, states: list[InstrumentState], freq: str = "1d") -> None:
        """Make the stored state of ``snapshot_id`` exactly ``states`` (one transaction). The rows go in
        through ``COPY`` on the transaction's own psycopg connection (every export replaces them all, one
        per instrument: faster than an ``INSERT`` of many values)."""
        self.ensure_schema()
        now = datetime.now(timezone.utc)
        columns = [c.name for c in qlib_export_meta.columns]
        with self.engine.begin() as conn:
            conn.execute(sa.delete(qlib_export_meta).where(
                qlib_export_meta.c.snapshot_id == snapshot_id, qlib_export_meta.c.freq == freq))
            if states:
                cursor = conn.connection.driver_connection.cursor()  # psycopg 3 (db.sqlalchemy_url)
                names = ", ".join(f'"{c}"' for c in columns)
                with cursor, cursor.copy(f"COPY market.qlib_export_meta ({names}) FROM STDIN") as copy:
                    for s in states:
                        copy.write_row((snapshot_id, s.ts_code, freq, s.first_datetime, s.last_datetime, s.rows,
                                        s.checksum, s.export_id, now))

    def delete(self, snapshot_id: str, freq: str = "1d") -> None:
        self.ensure_schema()
        with self.engine.begin() as conn:
            conn.execute(sa.delete(qlib_export_meta).where(
                qlib_export_meta.c.snapshot_id == snapshot_id, qlib_export_meta.c.freq == freq))

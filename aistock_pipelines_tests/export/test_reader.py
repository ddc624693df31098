"""The bulk reader: bound parameters, shared views, the key join, the read-ahead thread."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export.reader import DBReader, ReaderError
from aistock_pipelines.export.fingerprints import server_fingerprints
from aistock_pipelines_tests.export.helpers import DEMO_MAPPING, START, read_bars

pytestmark = pytest.mark.db



def test_seed_reader_interface_returns_the_snapshot_frame(exported, market_db):
    """``DBReader.load_daily`` (seed §5.3) gives exactly what a float64 / ts_code snapshot stores, ``change``
    included (one definition of it: ``frames``), and ``get_all_ts_codes`` keeps delisted codes."""
    ex, result, path = exported
    reader = DBReader(create_db_engine(market_db), DEMO_MAPPING, market_db)
    frame = reader.load_daily(None, START, None)
    # pandas reads the stored instrument level back as its string dtype; the reader's is object (to_hdf needs it)
    pd.testing.assert_frame_equal(frame, read_bars(path), check_exact=True, check_index_type=False)
    assert frame.index.levels[1].dtype == object
    assert frame["change"].notna().sum() > 0
    codes = reader.get_all_ts_codes()
    assert codes == sorted(frame.index.unique(level="instrument")) and len(codes) == result.instruments
    reader.engine.dispose()


def test_bulk_reads_bind_their_bounds_folded_or_per_row(market_db):
    """Dates and codes reach the server as bound parameters (set_config), never as SQL text; with the
    session's IMMUTABLE bound functions (planned like literals) and without them (a connection that cannot
    create temporary objects) the rows are the same."""
    import adbc_driver_postgresql.dbapi as adbc

    reader = DBReader(create_db_engine(market_db), DEMO_MAPPING, market_db)
    first, last = date(2022, 3, 1), date(2022, 6, 30)
    with reader.session() as s:
        for sql in s.statements(False, folded=True) + s.statements(True, folded=True):
            assert "pg_temp.aistock_read_start()" in sql and "2022" not in sql and "$" not in sql
        whole = s.load_daily(None, first, last)
        codes = sorted(whole.index.get_level_values("instrument").unique())[::7]
        some = s.load_daily(codes, first, last)
        assert s.bind_bounds(first, last, None) is True, "DBReader.connect() created the bound functions"
    days = whole.index.get_level_values("datetime")
    assert days.min() == pd.Timestamp("2022-03-01") and days.max() == pd.Timestamp("2022-06-30"), "both ends inclusive"
    expected = whole[whole.index.get_level_values("instrument").isin(codes)]
    pd.testing.assert_frame_equal(some, expected)
    plain = adbc.connect(reader._url, autocommit=True)  # no bound functions: current_setting per row
    try:
        with reader.session(plain) as s:
            assert s.bind_bounds(first, last, None) is False
            pd.testing.assert_frame_equal(s.load_daily(None, first, last), whole)
            pd.testing.assert_frame_equal(s.load_daily(codes, first, last), expected)
    finally:
        plain.close()
    with pytest.raises(Exception, match="malformed ts_code"):
        with reader.session() as s:
            s.load_daily(["000001.SZ'); DROP TABLE market.kline_daily_qfq; --"], first, last)
    reader.engine.dispose()


def test_a_shared_view_is_the_same_database_state_on_a_second_connection(market_db):
    """A full export computes its fingerprints on a second connection beside the bulk read
    (``session(shared=True)`` → ``session(snapshot=…)``): a restatement committed in between is seen by
    neither, so the fingerprints describe exactly the rows read; a fresh view sees it."""
    reader = DBReader(create_db_engine(market_db), DEMO_MAPPING, market_db)
    day = date(2022, 3, 1)
    with reader.session(shared=True) as s:
        assert s.snapshot
        before = server_fingerprints(s, START, None, day, None).table
        with reader.engine.begin() as conn:
            n = conn.execute(sa.text("UPDATE market.kline_daily_qfq SET close_li = close_li + 1 WHERE trade_date = :d"),
                             {"d": day}).rowcount
        assert n > 0
        with reader.session(snapshot=s.snapshot) as twin:
            pd.testing.assert_frame_equal(server_fingerprints(twin, START, None, day, None).table, before)
    with reader.session() as fresh:
        after = server_fingerprints(fresh, START, None, day, None).table
    traded = before.index[before["last_date"] == day]
    assert len(traded) == n and (after.loc[traded, "sum_all"] != before.loc[traded, "sum_all"]).all()
    with pytest.raises(ReaderError, match="malformed snapshot id"):
        with reader.session(snapshot="1'; DROP TABLE market.kline_daily_qfq; --"):
            pass
    reader.engine.dispose()


def test_key_join_of_the_bulk_read_equals_the_view(market_db):
    """The reader joins the source tables on (ts_code, trade_date) in Python; ``market.daily_features`` joins
    the same SELECTs in SQL. Equal, value for value, also where the join is unusual: a raw close of 0 (factor
    NULL), a missing raw row, a factor row without a bar (dropped), a bar without factor rows (NaN). A factor
    table with a duplicate key is refused, naming the table and an example."""
    from aistock_pipelines.export.daily_features import create_view
    from aistock_pipelines.export.gates import DataGateError

    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        code, dup = conn.exec_driver_sql(
            "SELECT ts_code FROM market.kline_daily_qfq WHERE trade_date IN ('2022-03-02', '2022-03-03', '2022-03-10') "
            "GROUP BY ts_code HAVING count(*) = 3 ORDER BY 1 LIMIT 2").scalars().all()
        conn.exec_driver_sql(f"UPDATE market.kline_daily_raw SET close_li = 0 WHERE ts_code = '{code}' AND trade_date = '2022-03-02'")
        conn.exec_driver_sql(f"DELETE FROM market.kline_daily_raw WHERE ts_code = '{code}' AND trade_date = '2022-03-03'")
        conn.exec_driver_sql("DELETE FROM market.daily_basic WHERE trade_date = '2022-03-04'")
        conn.exec_driver_sql(f"UPDATE market.daily_basic SET pe_ttm = NULL, pb = 'NaN' WHERE ts_code = '{code}' AND trade_date = '2022-03-10'")
        conn.exec_driver_sql("INSERT INTO market.daily_basic (ts_code, trade_date, pb) VALUES ('999999.SZ', '2022-03-04', 1.5)")
    reader = DBReader(engine, DEMO_MAPPING, market_db)
    create_view(engine, reader.resolved)
    first, last = date(2022, 3, 1), date(2022, 3, 31)
    frame = reader.load_daily(None, first, last)
    with engine.connect() as conn:
        view = pd.read_sql(sa.text("SELECT * FROM market.daily_features WHERE trade_date BETWEEN :a AND :b"), conn,
                           params={"a": first, "b": last})
    view.index = pd.MultiIndex.from_arrays([pd.to_datetime(view.pop("trade_date")), view.pop("ts_code")],
                                           names=["datetime", "instrument"])
    view = view.sort_index()
    assert frame.index.equals(view.index)
    factor = view["factor"].to_numpy(dtype=float)
    assert np.isnan(frame.loc[(pd.Timestamp("2022-03-02"), code), "factor"])
    assert np.isnan(frame.loc[(pd.Timestamp("2022-03-03"), code), "factor"])
    assert frame.xs(pd.Timestamp("2022-03-04"))["db_pb"].isna().all()
    # NULL and NaN both arrive as NaN through the packed float8 transport; the row's other values are kept
    row = frame.loc[(pd.Timestamp("2022-03-10"), code)]
    assert np.isnan(row["db_pe_ttm"]) and np.isnan(row["db_pb"]) and row["db_turnover_rate"] > 0
    with reader.session() as s:
        assert all("float8send" in sql for sql in s.statements(False)), "per-table reads use the packed transport"
    for name in view.columns:
        got = frame[name].to_numpy()
        want = view[name].to_numpy(dtype=float) / factor if name == "volume" else view[name].to_numpy(dtype=float)
        np.testing.assert_array_equal(got, want, err_msg=name)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE market.daily_basic DROP CONSTRAINT daily_basic_pkey")
        conn.exec_driver_sql("INSERT INTO market.daily_basic SELECT * FROM market.daily_basic "
                             f"WHERE ts_code = '{dup}' AND trade_date = '2022-03-10'")
    with pytest.raises(DataGateError, match=rf"duplicate \(ts_code, trade_date\) rows in market.daily_basic: 2022-03-10 {dup}"):
        reader.load_daily(None, first, last)
    with pytest.raises(DataGateError, match=rf"rows in market.kline_daily_qfq left-joined with .*market.daily_basic.*: 2022-03-10 {dup}"):
        reader.load_daily([dup], first, last)  # listed codes: the SQL join per code, whose bars then repeat
    # the refused read ended its transaction cleanly: the next read on a new session works
    pd.testing.assert_frame_equal(reader.load_daily([code], first, last),
                                  frame[frame.index.get_level_values("instrument") == code])
    engine.dispose()


def test_prefetched_batches_keep_order_raise_errors_and_stop_early():
    """The read-ahead thread of bulk reads: every batch in order, a reader error raised in the caller,
    and a caller that stops early leaves no thread behind."""
    import threading

    import pyarrow as pa

    from aistock_pipelines.export.arrow_batches import prefetched as _prefetched

    schema = pa.schema([("x", pa.int64())])
    batches = [pa.record_batch([pa.array([i, i + 1])], schema=schema) for i in range(0, 40, 2)]
    got = [b.column(0).to_pylist() for b in _prefetched(pa.RecordBatchReader.from_batches(schema, iter(batches)))]
    assert got == [[i, i + 1] for i in range(0, 40, 2)]

    def failing():
        yield batches[0]
        raise OSError("server closed the connection")

    with pytest.raises(OSError, match="server closed"):
        list(_prefetched(pa.RecordBatchReader.from_batches(schema, failing())))

    stream = _prefetched(pa.RecordBatchReader.from_batches(schema, iter(batches)), depth=1)
    assert next(stream).column(0).to_pylist() == [0, 1]
    stream.close()  # the caller stops: the thread must be gone before the cursor would close
    assert not [t for t in threading.enumerate() if t.name == "adbc-prefetch"]

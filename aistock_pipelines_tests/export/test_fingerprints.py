"""Per-instrument fingerprints: their definition, the client equal to the server, a view that cannot be shared."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.fingerprints import server_fingerprints
from aistock_pipelines.export.row_fingerprints import client_fingerprints
from aistock_pipelines_tests.export.helpers import DEMO_MAPPING, START, make_exporter, read_h5

pytestmark = pytest.mark.db



@pytest.mark.parametrize("counted_by", ["client", "server"])
def test_a_view_that_cannot_be_shared_is_fingerprinted_first_with_the_same_result(exported, monkeypatch, counted_by):
    """A server that refuses to export the read's snapshot (``session(shared=True)`` leaves ``snapshot``
    None): the full export does the work meant for a second connection — the server's fingerprints, or the
    bars' count when the client counts the fingerprints — first, on its own connection, and then reads:
    the same file and the same stored fingerprints as the export that ran it beside the read."""
    from aistock_pipelines.export import row_fingerprints

    ex, _, path = exported
    before, states = read_h5(path), ex.meta.load("demo")
    session = DBReader.session

    def never_shared(self, conn=None, *, shared=False, snapshot=None):
        assert snapshot is None, "work ran on a second connection although the view was not shared"
        return session(self, conn)

    monkeypatch.setattr(DBReader, "session", never_shared)
    if counted_by == "server":
        monkeypatch.setattr(row_fingerprints, "client_fingerprints", lambda s, ts_codes: None)
    result = ex.export_full("demo", START)
    assert result.timings["checksums"] > 0 and result.rows == len(before)
    pd.testing.assert_frame_equal(read_h5(path), before, check_exact=True)
    again = ex.meta.load("demo")
    assert {c: (st.rows, st.checksum, st.first_datetime, st.last_datetime) for c, st in again.items()} == \
        {c: (st.rows, st.checksum, st.first_datetime, st.last_datetime) for c, st in states.items()}
    assert {st.export_id for st in again.values()} == {result.export_id}


def test_fingerprints_are_their_documented_definition(market_db):
    """The server's per-instrument fingerprint (evaluated in few aggregates, ``reader._weighted_sums``)
    equals the definition computed here row by row with Python integers: Σ (1·open + 3·high + 7·low +
    13·close + 17·volume + 19·amount + 41·raw close) × (days since 1990-01-01 + 1), a NULL adding nothing —
    over the old part, the new part and both."""
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        codes = conn.exec_driver_sql("SELECT DISTINCT ts_code FROM market.kline_daily_qfq ORDER BY 1 LIMIT 3").scalars().all()
        conn.exec_driver_sql("ALTER TABLE market.kline_daily_qfq ALTER COLUMN volume_hand DROP NOT NULL")
        conn.exec_driver_sql(f"UPDATE market.kline_daily_qfq SET volume_hand = NULL, amount_li = 2^62 + 12345 "
                             f"WHERE ts_code = '{codes[0]}' AND trade_date = '2022-03-02'")
        bars = conn.exec_driver_sql(
            "SELECT b.ts_code, b.trade_date - DATE '1990-01-01' + 1, b.open_li, b.high_li, b.low_li, b.close_li, "
            "b.volume_hand, b.amount_li, r.close_li FROM market.kline_daily_qfq b LEFT JOIN market.kline_daily_raw r "
            "USING (ts_code, trade_date) WHERE b.ts_code = ANY(%(c)s) AND b.trade_date BETWEEN %(s)s AND %(e)s",
            {"c": codes, "s": START, "e": date(2022, 6, 30)}).all()
    split, weights = (date(2022, 3, 31) - date(1990, 1, 1)).days + 1, (1, 3, 7, 13, 17, 19, 41)
    expected = {(c, part): 0 for c in codes for part in ("old", "all")}
    for code, day, *values in bars:
        row = sum(w * (v or 0) for w, v in zip(weights, values)) * day
        expected[code, "all"] += row
        if day <= split:
            expected[code, "old"] += row
    reader = DBReader(engine, DEMO_MAPPING, market_db)
    with reader.session() as s:
        sums = server_fingerprints(s, START, date(2022, 3, 31), date(2022, 6, 30), codes).table
    assert {(c, part): int(sums.loc[c, f"sum_{part}"]) for c in codes for part in ("old", "all")} == expected
    assert expected[codes[0], "old"] > 2**62  # the int8 split into halves was exercised
    reader.engine.dispose()


def test_fingerprints_counted_from_the_rows_read_equal_the_servers(market_db, tmp_path):
    """A full export counts the fingerprints from the rows it reads (``RowFingerprints``) instead of asking
    the server: equal to the server's, instrument by instrument, also where the rows are unusual — a NULL
    volume, a raw close of 0, amounts of ±2^49, a raw row without its bar (counted, as the server counts it, though the key
    join drops it), raw rows of a code without bars (not an instrument). A value the client cannot count
    exactly (an amount above 2^50) leaves the fingerprints to the server, naming the column."""
    engine = create_db_engine(market_db)
    end = date(2022, 6, 30)
    with engine.begin() as conn:
        a, b, c = conn.exec_driver_sql("SELECT DISTINCT ts_code FROM market.kline_daily_qfq ORDER BY 1 LIMIT 3").scalars().all()
        conn.exec_driver_sql("ALTER TABLE market.kline_daily_qfq ALTER COLUMN volume_hand DROP NOT NULL")
        conn.exec_driver_sql(f"UPDATE market.kline_daily_qfq SET volume_hand = NULL WHERE ts_code = '{a}' AND trade_date = '2022-03-02'")
        conn.exec_driver_sql(f"UPDATE market.kline_daily_raw SET close_li = 0 WHERE ts_code = '{b}' AND trade_date = '2022-03-03'")
        # amounts near the limit, either sign: the top of a row's weighted sum (and its sign) counts too
        conn.exec_driver_sql(f"UPDATE market.kline_daily_qfq SET amount_li = 2^49 + 12345 WHERE ts_code = '{a}' AND trade_date = '2022-03-04'")
        conn.exec_driver_sql(f"UPDATE market.kline_daily_qfq SET amount_li = -(2^49 + 7) WHERE ts_code = '{b}' AND trade_date = '2022-03-02'")
        assert conn.exec_driver_sql(f"DELETE FROM market.kline_daily_qfq WHERE ts_code = '{c}' AND trade_date = '2022-03-04'").rowcount == 1
        conn.exec_driver_sql("INSERT INTO market.kline_daily_raw SELECT '999999.SZ', trade_date, open_li, high_li, low_li, "
                             f"close_li, volume_hand, amount_li, adjust_type, source FROM market.kline_daily_raw WHERE ts_code = '{a}'")
    reader = DBReader(engine, DEMO_MAPPING, market_db)

    def both() -> tuple:
        with reader.session() as s:
            counted = client_fingerprints(s, None)
            s.load_daily_block(None, START, end, fingerprints=counted)
            return counted, server_fingerprints(s, START, None, end, None).table

    counted, server = both()
    assert counted.result() is not None, counted.failure
    client = counted.result().table
    pd.testing.assert_frame_equal(client.sort_index(), server.sort_index())
    assert "999999.SZ" not in client.index and client.loc[c, "rows_all"] == server.loc[c, "rows_all"] > 0
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE market.kline_daily_qfq SET amount_li = 2^51 WHERE ts_code = '{a}' AND trade_date = '2022-03-03'")
    counted, server = both()
    assert counted.result() is None and "amount_li" in counted.failure
    # … so the export asks the server, after its read (the raw close of 0 above is let through as NaN)
    ex = make_exporter(market_db, tmp_path, replace(DEMO_MAPPING, missing_raw="nan"))
    ex.export_full("demo", START, end)
    stored = ex.meta.load("demo")
    assert {code: (st.rows, st.checksum) for code, st in stored.items()} == \
        {code: (int(n), s) for code, n, s in zip(server.index, server["rows_all"], server["sum_all"])}
    with reader.session() as s:
        assert client_fingerprints(s, [a]) is None  # listed codes: the raw close arrives divided into ``factor``
    reader.engine.dispose()

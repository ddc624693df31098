"""The export engine against the real database and real files: values, restatement, bins, atomicity."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import tables

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.exporter import DataGateError, QlibDailyExporter
from aistock_pipelines.export.mapping import ExportMapping, FactorTable, FieldSpec, MappingError
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader, ReaderError
from aistock_pipelines.export.fingerprints import server_fingerprints
from aistock_pipelines.export.row_fingerprints import client_fingerprints
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.snapshot_writer import SnapshotWriter
from aistock_pipelines.export.versions import SnapshotLocked

pytestmark = pytest.mark.db

START = date(2021, 1, 4)
DEMO_MAPPING = ExportMapping(factor_tables=(
    FactorTable("daily_basic", "market.daily_basic", prefix="db_"),
    FactorTable("moneyflow", "market.moneyflow", columns={
        "mf_net_amount": FieldSpec("net_mf_amount", 10000.0, "yuan"),
        "mf_net_vol": FieldSpec("net_mf_vol", 100.0, "shares")}),
))


def make_exporter(url: str, root: Path, mapping: ExportMapping = DEMO_MAPPING) -> QlibDailyExporter:
    engine = create_db_engine(url)
    return QlibDailyExporter(DBReader(engine, mapping, url), SnapshotWriter(root), MetaRepo(engine))


def read_h5(path: Path) -> pd.DataFrame:
    return pd.read_hdf(path / "daily_pv.h5", key="data")


@pytest.fixture
def exported(market_db, tmp_path):
    ex = make_exporter(market_db, tmp_path)
    result = ex.export_full("demo", START)
    return ex, result, tmp_path / "demo"


def test_every_value_equals_the_database_after_unit_scaling(exported, market_db):
    ex, result, path = exported
    frame = read_h5(path)
    engine = create_db_engine(market_db)
    with engine.connect() as conn:  # an independent path: SQLAlchemy + psycopg, integers scaled in Python
        db = pd.read_sql(
            "SELECT q.trade_date, q.ts_code, q.open_li, q.high_li, q.low_li, q.close_li, q.volume_hand, q.amount_li,"
            " r.close_li AS raw_close_li, b.total_mv, b.pe_ttm, m.net_mf_amount, m.net_mf_vol"
            " FROM market.kline_daily_qfq q JOIN market.kline_daily_raw r USING (ts_code, trade_date)"
            " LEFT JOIN market.daily_basic b USING (ts_code, trade_date)"
            " LEFT JOIN market.moneyflow m USING (ts_code, trade_date)", conn)
    db.index = pd.MultiIndex.from_arrays([pd.to_datetime(db.trade_date), db.ts_code], names=["datetime", "instrument"])
    db = db.sort_index()
    assert frame.index.equals(db.index), "exactly the database's rows, delisted and IPO instruments included"
    assert frame.index.is_unique and frame.index.is_monotonic_increasing
    assert len(frame) == result.rows == len(db) and result.instruments == 320
    for col, li in (("open", "open_li"), ("high", "high_li"), ("low", "low_li"), ("close", "close_li"), ("amount", "amount_li")):
        np.testing.assert_array_equal(frame[col].to_numpy(), db[li].to_numpy(dtype=float) / 1000)
    factor = db.close_li.to_numpy(dtype=float) / db.raw_close_li.to_numpy(dtype=float)
    np.testing.assert_array_equal(frame["factor"].to_numpy(), factor)
    raw_shares = db.volume_hand.to_numpy(dtype=float) * 100
    np.testing.assert_array_equal(frame["volume"].to_numpy(), raw_shares / factor)
    np.testing.assert_allclose(frame["volume"] * frame["factor"], raw_shares, rtol=1e-12)
    np.testing.assert_allclose(frame["close"] / frame["factor"], db.raw_close_li / 1000, rtol=1e-12)
    np.testing.assert_array_equal(frame["vwap"].to_numpy(), db.amount_li.to_numpy(dtype=float) / 1000 / raw_shares * factor)
    np.testing.assert_array_equal(frame["db_total_mv"].to_numpy(), db.total_mv.astype(float).to_numpy())
    np.testing.assert_array_equal(frame["db_pe_ttm"].to_numpy(), db.pe_ttm.to_numpy(dtype=float))
    np.testing.assert_array_equal(frame["mf_net_amount"].to_numpy(), db.net_mf_amount.astype(float).to_numpy() * 10000.0)
    np.testing.assert_array_equal(frame["mf_net_vol"].to_numpy(), db.net_mf_vol.astype(float).to_numpy() * 100.0)
    assert frame["db_total_mv"].isna().sum() > 0, "missing factor rows stay NaN (left join: bars define the rows)"
    prev = frame["close"].groupby(level="instrument").shift(1)
    np.testing.assert_array_equal(frame["change"].to_numpy(), (frame["close"] / prev - 1).to_numpy())
    engine.dispose()


def test_seed_reader_interface_returns_the_snapshot_frame(exported, market_db):
    """``DBReader.load_daily`` (seed §5.3) gives exactly what a float64 / ts_code snapshot stores, ``change``
    included (one definition of it: ``frames``), and ``get_all_ts_codes`` keeps delisted codes."""
    ex, result, path = exported
    reader = DBReader(create_db_engine(market_db), DEMO_MAPPING, market_db)
    frame = reader.load_daily(None, START, None)
    # pandas reads the stored instrument level back as its string dtype; the reader's is object (to_hdf needs it)
    pd.testing.assert_frame_equal(frame, read_h5(path), check_exact=True, check_index_type=False)
    assert frame.index.levels[1].dtype == object
    assert frame["change"].notna().sum() > 0
    codes = reader.get_all_ts_codes()
    assert codes == sorted(frame.index.unique(level="instrument")) and len(codes) == result.instruments
    reader.engine.dispose()


def test_layout_meta_calendar_instruments(exported, market_db):
    ex, result, path = exported
    assert path.is_symlink(), "the snapshot path is swapped atomically as a symlink"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["row_count"] == result.rows and meta["instrument_count"] == 320
    assert meta["start"] == "2021-01-04" and meta["end"] == result.end.isoformat()
    assert meta["daily_pv_sha256"] == result.sha256
    cols = {c["name"]: c for c in meta["columns"]}
    assert cols["close"]["source"] == "market.kline_daily_qfq.close_li" and cols["close"]["scale"] == 0.001
    engine = create_db_engine(market_db)
    with engine.connect() as conn:
        trading = [r[0] for r in conn.execute(sa.text(
            "SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date BETWEEN :a AND :b ORDER BY 1"),
            {"a": START, "b": result.end})]
    engine.dispose()
    assert qlib_format.read_calendar(path / "calendars" / "day.txt") == trading
    lines = (path / "instruments" / "all.txt").read_text().splitlines()
    assert len(lines) == 320 and all(len(line.split("\t")) == 3 for line in lines)
    spans = {line.split("\t")[0]: line.split("\t")[1:] for line in lines}
    frame = read_h5(path)
    dates = frame.reset_index().groupby("instrument").datetime.agg(["min", "max"])
    for code in list(spans)[:50]:
        assert spans[code] == [f"{dates.at[code, 'min']:%Y-%m-%d}", f"{dates.at[code, 'max']:%Y-%m-%d}"]
    # one dataset only, under key "data" (RD-Agent reads without a key)
    with tables.open_file(path / "daily_pv.h5") as h5:
        assert [g._v_name for g in h5.root._f_iter_nodes()] == ["data"]
    assert pd.read_hdf(path / "rdagent" / "daily_pv.h5").equals(frame)
    for folder in ("rdagent", "rdagent_debug"):
        assert sorted(p.name for p in (path / folder).iterdir()) == ["README.md", "daily_pv.h5"]
    debug = pd.read_hdf(path / "rdagent_debug" / "daily_pv.h5")
    assert debug.index.get_level_values("instrument").nunique() == 100
    assert debug.index.get_level_values("datetime").min() >= pd.Timestamp(result.end) - pd.DateOffset(years=2)
    assert "| `volume` |" in (path / "rdagent" / "README.md").read_text()


def test_bins_decode_to_the_h5_values(exported):
    _, result, path = exported
    frame = read_h5(path)
    calendar = pd.to_datetime(qlib_format.read_calendar(path / "calendars" / "day.txt"))
    # a suspended instrument (gaps inside its span) and an IPO
    counts = frame.groupby(level="instrument").size()
    spans = frame.reset_index().groupby("instrument").datetime.agg(["min", "max"])
    expected_days = spans.apply(lambda r: ((calendar >= r["min"]) & (calendar <= r["max"])).sum(), axis=1)
    suspended = (expected_days - counts)[lambda s: s > 0].index[0]
    ipo = spans[spans["min"] > calendar[0]].index[0]
    for code in (suspended, ipo, frame.index.get_level_values("instrument")[0]):
        sub = frame.xs(code, level="instrument")
        for field in ("close", "volume", "factor", "change", "db_total_mv"):
            file = path / "features" / code.lower() / f"{field}.day.bin"
            assert file.exists()
            raw = file.read_bytes()
            assert len(raw) % 4 == 0
            start, values = qlib_bins.read_bin(file)
            assert calendar[start] == sub.index[0], "element 0 is the calendar position of the first row"
            assert len(values) == len(calendar[(calendar >= sub.index[0]) & (calendar <= sub.index[-1])])
            on_calendar = pd.Series(values, index=calendar[start:start + len(values)])
            expected = sub[field].reindex(on_calendar.index).astype(np.float32).to_numpy()
            np.testing.assert_array_equal(on_calendar.to_numpy(), expected)
    assert np.isnan(qlib_bins.read_bin(path / "features" / suspended.lower() / "close.day.bin")[1]).any()


def test_restatement_then_incremental_equals_fresh_full_export(market_db, tmp_path):
    ex = make_exporter(market_db, tmp_path)
    options = SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32")
    ex.export_full("inc", START, options=options)
    folders = {d.name: d.stat().st_ino for d in (tmp_path / "inc" / "features").iterdir()}
    engine = create_db_engine(market_db)
    restated: set[str] = set()
    for _ in range(2):
        adv = advance_market(engine, events=5)
        result = ex.export_incremental("inc")
        assert result.mode == "incremental" and result.end == adv.trade_date and result.applied == "in place"
        assert set(result.restated) == set(adv.restated), "exactly the restated instruments are detected"
        assert result.rows_read < 10_000, "reads only the new day plus the restated histories"
        restated |= set(adv.restated)
    incremental = read_h5(tmp_path / "inc")
    ex.export_full("fresh", START, options=options)
    fresh = read_h5(tmp_path / "fresh")
    pd.testing.assert_frame_equal(incremental, fresh, check_exact=True)
    assert list(fresh.columns[:4]) == ["$open", "$high", "$low", "$close"] and fresh["$close"].dtype == np.float32
    assert fresh.index.get_level_values("instrument")[0][:2] in ("SH", "SZ", "BJ")
    # the bins follow the restatement too — every file byte for byte, though the second incremental export
    # recycled the instrument folders of the version the first one replaced
    inc_bins = {p.relative_to(tmp_path / "inc"): p.read_bytes() for p in (tmp_path / "inc" / "features").rglob("*.bin")}
    fresh_bins = {p.relative_to(tmp_path / "fresh"): p.read_bytes() for p in (tmp_path / "fresh" / "features").rglob("*.bin")}
    assert inc_bins == fresh_bins and any(qlib_format.to_qlib_symbol(c).lower() in str(p) for c in restated for p in inc_bins)
    # a full export writes most bins beside its read, from the float64 block still in ts_code order; they
    # equal bins written in one go from the finished file's frame (float32, qlib names)
    plain = pd.DataFrame(np.ascontiguousarray(fresh.to_numpy()), index=fresh.index,
                         columns=[c.lstrip("$") for c in fresh.columns])
    calendar = qlib_format.read_calendar(tmp_path / "fresh" / "calendars" / "day.txt")
    qlib_bins.write_bins(tmp_path / "direct" / "features", plain, calendar, list(plain.columns))
    direct = {p.relative_to(tmp_path / "direct"): p.read_bytes() for p in (tmp_path / "direct" / "features").rglob("*.bin")}
    assert direct == fresh_bins
    assert len(list((tmp_path / ".versions").glob("inc@*"))) == 2, "the current version and the one it replaced"
    untouched = sorted(set(folders) - {qlib_format.to_qlib_symbol(c).lower() for c in restated})
    assert all((tmp_path / "inc" / "features" / d).stat().st_ino == folders[d] for d in untouched), \
        "the full export's folders, recycled by the second incremental export"
    engine.dispose()


def test_a_history_that_lost_a_day_is_merged_and_equals_a_fresh_export(exported, market_db, tmp_path):
    """A restatement usually changes values only (the stored rows are patched in place); a history that
    lost an old day (a corrected feed) cannot be patched: the incremental export merges instead, with the
    same result as a fresh full export."""
    ex, _, path = exported
    engine = create_db_engine(market_db)
    adv = advance_market(engine, events=1)
    with engine.begin() as conn:
        code, gone = conn.exec_driver_sql(
            "SELECT ts_code, min(trade_date) + 3 FROM market.kline_daily_qfq WHERE trade_date < %(d)s "
            "GROUP BY ts_code ORDER BY 1 LIMIT 1", {"d": adv.trade_date}).one()
        gone = conn.exec_driver_sql("SELECT min(trade_date) FROM market.kline_daily_qfq WHERE ts_code = %(c)s "
                                    "AND trade_date >= %(g)s", {"c": code, "g": gone}).scalar_one()
        conn.exec_driver_sql("DELETE FROM market.kline_daily_qfq WHERE ts_code = %(c)s AND trade_date = %(g)s",
                             {"c": code, "g": gone})
        conn.exec_driver_sql("DELETE FROM market.kline_daily_raw WHERE ts_code = %(c)s AND trade_date = %(g)s",
                             {"c": code, "g": gone})
    got = ex.export_incremental("demo")
    assert got.applied == "merge" and code in got.restated
    incremental = read_h5(path)
    assert (pd.Timestamp(gone), code) not in incremental.index
    ex.export_full("fresh", START)
    pd.testing.assert_frame_equal(incremental, read_h5(tmp_path / "fresh"), check_exact=True)
    for field in ("close", "change", "factor"):
        name = f"features/{code.lower()}/{field}.day.bin"
        assert (path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    engine.dispose()


def test_bins_written_before_the_restatements_are_known_leave_the_current_version_intact(exported, market_db, tmp_path):
    """An incremental export has every bin extended from the current version's files while the server still
    computes the fingerprints — restated instruments' too, through links to the current version's inodes.
    The current version (which a backtest may be reading) keeps its values; the new one has the restated
    ones; an instrument gone from the database loses its folder."""
    ex, _, path = exported
    twin = ex.writer.map_values("demo", np.zeros((1, len(read_h5(path).columns))))
    assert twin is not None and not twin.flags.writeable, "the bins ahead read a second, read-only mapping"
    engine = create_db_engine(market_db)
    previous = path.resolve()
    before = read_h5(previous)
    old_bins = {p.relative_to(previous): p.read_bytes() for p in (previous / "features").rglob("*.bin")}
    with engine.begin() as conn:
        gone = conn.exec_driver_sql("SELECT max(ts_code) FROM market.kline_daily_qfq").scalar_one()
        for table in ("kline_daily_qfq", "kline_daily_raw", "daily_basic", "moneyflow"):
            conn.exec_driver_sql(f"DELETE FROM market.{table} WHERE ts_code = %(c)s", {"c": gone})
    adv = advance_market(engine, events=3)
    got = ex.export_incremental("demo")
    assert set(adv.restated) <= set(got.restated) and gone in got.restated and got.applied == "merge"
    assert path.resolve() != previous and previous.exists()
    pd.testing.assert_frame_equal(read_h5(previous), before, check_exact=True)
    for name, data in old_bins.items():  # extended in place, perhaps: the old bytes are a prefix
        assert (previous / name).read_bytes()[:len(data)] == data, name
    assert not (path / "features" / gone.lower()).exists() and gone not in (path / "instruments" / "all.txt").read_text()
    ex.export_full("fresh", START)
    fresh = {p.relative_to(tmp_path / "fresh"): p.read_bytes() for p in (tmp_path / "fresh" / "features").rglob("*.bin")}
    assert {p.relative_to(path): p.read_bytes() for p in (path / "features").rglob("*.bin")} == fresh
    assert json.loads((path / "meta.json").read_text())["files"]["bins"] == len(fresh)
    engine.dispose()


def test_incremental_is_idempotent(exported, market_db):
    ex, result, path = exported
    advance_market(create_db_engine(market_db), events=2)
    first = ex.export_incremental("demo")
    version = path.resolve()
    second = ex.export_incremental("demo")
    assert second.mode == "unchanged" and second.sha256 == first.sha256
    assert path.resolve() == version, "nothing rewritten"
    assert read_h5(path).index.is_unique


def test_changed_declaration_rebuilds_instead_of_mixing(exported):
    ex, result, path = exported
    rebuilt = ex.export_incremental("demo", options=SnapshotOptions(columns="dollar"))
    assert rebuilt.mode == "rebuild"
    frame = read_h5(path)
    assert all(c.startswith("$") for c in frame.columns) and len(frame) == result.rows


@pytest.mark.parametrize("corruption, message", [
    ("UPDATE market.kline_daily_qfq SET close_li = -5 WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "close <= 0"),
    ("UPDATE market.kline_daily_qfq SET high_li = low_li - 1 WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "high < low"),
    ("ALTER TABLE market.kline_daily_qfq ALTER COLUMN open_li DROP NOT NULL;"
     "UPDATE market.kline_daily_qfq SET open_li = NULL WHERE ctid IN (SELECT ctid FROM market.kline_daily_qfq LIMIT 1)", "NULL prices"),
    ("ALTER TABLE market.kline_daily_qfq DROP CONSTRAINT kline_daily_qfq_pkey;"
     "INSERT INTO market.kline_daily_qfq SELECT * FROM market.kline_daily_qfq LIMIT 1", "duplicate"),
])
def test_data_gates_refuse_and_keep_the_previous_snapshot(exported, market_db, corruption, message):
    ex, result, path = exported
    before = (path / "daily_pv.h5").read_bytes()
    engine = create_db_engine(market_db)
    with engine.begin() as conn:
        conn.exec_driver_sql(corruption)
    with pytest.raises(DataGateError, match=message):
        ex.export_full("demo", START)
    assert (path / "daily_pv.h5").read_bytes() == before
    # the refused export's own version — bins written beside its read included — is gone
    assert list((path.parent / ".versions").iterdir()) == [path.resolve()]
    engine.dispose()


def test_mapping_errors_name_the_table_and_column(market_db, tmp_path):
    bad_column = ExportMapping(fields={**ExportMapping().fields, "close": FieldSpec("close_yuan", 1.0)})
    with pytest.raises(MappingError, match=r"market.kline_daily_qfq has no column\(s\) \['close_yuan'\]"):
        make_exporter(market_db, tmp_path, bad_column).export_full("x", START)
    missing = ExportMapping(factor_tables=(FactorTable("f", "market.no_such_table", prefix="f_"),))
    with pytest.raises(MappingError, match="market.no_such_table does not exist"):
        make_exporter(market_db, tmp_path, missing).export_full("x", START)
    with pytest.raises(MappingError, match="comes from both"):
        ExportMapping(factor_tables=(FactorTable("f", "market.moneyflow", columns={"close": FieldSpec("net_mf_vol")}),))
    clash = ExportMapping(factor_tables=(FactorTable("a", "market.daily_basic", prefix="x_"),
                                         FactorTable("b", "market.daily_basic", prefix="x_")))
    with pytest.raises(MappingError, match="x_turnover_rate"):
        make_exporter(market_db, tmp_path, clash).export_full("x", START)
    with pytest.raises(MappingError, match="scale must be a finite non-zero number"):
        FieldSpec("close_li", 0.0)
    wide = ExportMapping(fields={**ExportMapping().fields, **{f"x{i}": FieldSpec("open_li", 0.001) for i in range(17)}})
    with pytest.raises(MappingError, match="23 bar fields, at most 22 can be fingerprinted"):
        make_exporter(market_db, tmp_path, wide).export_full("x", START)
    assert not (tmp_path / "x").exists()


def test_crash_mid_write_leaves_previous_snapshot_and_next_run_recovers(exported, market_db, monkeypatch):
    ex, result, path = exported
    before = read_h5(path)
    advance_market(create_db_engine(market_db), events=2)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(qlib_bins, "write_bins", crash)
    with pytest.raises(OSError, match="simulated"):
        ex.export_incremental("demo")
    pd.testing.assert_frame_equal(read_h5(path), before, check_exact=True)
    assert json.loads((path / "meta.json").read_text())["export_id"] == result.export_id
    previous = path.resolve()
    leftovers = list((path.parent / ".versions").iterdir())
    assert len(leftovers) == 2, "the half-written version is still there until the next run"
    monkeypatch.undo()
    after = ex.export_incremental("demo")
    assert after.mode == "incremental" and after.rows > result.rows
    # the crash leftover is gone; the version this export replaced stays (complete) until the next export
    assert sorted(p.name for p in (path.parent / ".versions").iterdir()) == sorted([path.resolve().name, previous.name])
    pd.testing.assert_frame_equal(read_h5(previous), before, check_exact=True)
    replaced = path.resolve()
    advance_market(create_db_engine(market_db), events=0)
    ex.export_incremental("demo")  # the next writing export deletes the version the last one replaced
    assert sorted(p.name for p in (path.parent / ".versions").iterdir()) == sorted([path.resolve().name, replaced.name])


def test_a_second_writer_is_locked_out(exported):
    ex, result, path = exported
    with ex.writer.lock("demo"):
        with pytest.raises(SnapshotLocked, match="another process"):
            ex.export_full("demo", START)


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
    ex = make_exporter(market_db, tmp_path)  # … so the export asks the server, after its read
    ex.export_full("demo", START, end)
    stored = ex.meta.load("demo")
    assert {code: (st.rows, st.checksum) for code, st in stored.items()} == \
        {code: (int(n), s) for code, n, s in zip(server.index, server["rows_all"], server["sum_all"])}
    with reader.session() as s:
        assert client_fingerprints(s, [a]) is None  # listed codes: the raw close arrives divided into ``factor``
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

"""LiveDataAdapter: the latest ``window`` trading days, exactly as the snapshot holds them.

Training, backtest and live trading must see the same features, so the live frame is not a second
implementation of the snapshot: it is built by the same pieces, in the same order —

    ReadSession.load_daily   (mapping, unit scaling, factor-table joins, derived columns: one SQL)
    check_gates              (the exporter's refusals)
    exporter.finalize        (round to the snapshot dtype, then ``change`` from the rounded closes)
    snapshot_writer.read_view (column style, instrument naming, dtypes — as ``pd.read_hdf`` returns them)
    suspension.with_suspension_rows (the NaN rows of suspended days, when the snapshot declares them)

The one thing a window adds is its left edge: ``change`` of a window's first row needs the instrument's
previous *bar* (not trading day — suspensions), so that close is read too, bounded below by the
snapshot's start exactly as the snapshot's own history is. Hence ``get_feature_df`` equals the
corresponding slice of a fresh snapshot, value for value, including right after a qfq restatement
(everything is read from the database at call time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Iterable
from zoneinfo import ZoneInfo

import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE, QLIB_SYMBOL, TS_CODE
from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.gates import DataGateError, DataNotReady, check_gates, finalize
from aistock_pipelines.export.mapping import PRICE_FIELDS, ResolvedMapping
from aistock_pipelines.export.derived import logical_frame
from aistock_pipelines.export.frames import INDEX_NAMES
from aistock_pipelines.export.reader import DBReader, ReadSession
from aistock_pipelines.export.snapshot_shape import SnapshotOptions, read_view
from aistock_pipelines.export.suspension import with_suspension_rows
from aistock_pipelines.live.latest_bar import PRE_CLOSE, LatestBarProvider, validate_latest_bars

EXCHANGE_TZ = ZoneInfo(EXCHANGE_TIMEZONE)


class LiveDataError(ValueError):
    """A request the adapter cannot answer without misaligning data; the message says what and why."""


class UnknownSymbolError(LiveDataError):
    """Malformed symbols, symbols with no bar at all in the snapshot's history (a typo, another market), or
    symbols outside its declared universe. ``symbols`` lists them as given."""

    def __init__(self, message: str, symbols: list[str]):
        super().__init__(message)
        self.symbols = symbols


class NoDataError(LiveDataError):
    """``now`` lies before the first bar of the history (or before the snapshot's start)."""


class InsufficientHistoryError(LiveDataError):
    """The calendar holds fewer than ``window`` trading days between the history's start and ``now``."""


def to_trade_day(now: date | datetime | pd.Timestamp | str) -> date:
    """The exchange-local calendar day of ``now``. Naive datetimes are taken as Asia/Shanghai wall time;
    aware ones are converted first (a UTC evening is already the next morning in Shanghai)."""
    if isinstance(now, str):
        now = pd.Timestamp(now)
    if isinstance(now, pd.Timestamp):
        now = now.to_pydatetime()
    if isinstance(now, datetime):
        return (now.astimezone(EXCHANGE_TZ) if now.tzinfo is not None else now).date()
    if isinstance(now, date):
        return now
    raise TypeError(f"now must be a date, datetime, pandas Timestamp or ISO string, got {type(now).__name__}")


def normalize_symbols(symbols: Iterable[str] | str) -> dict[str, str]:
    """ts_code → the symbol as given. Accepts both namings (``000001.SZ`` and Qlib's ``SZ000001``, any
    case); one instrument given twice counts once."""
    if isinstance(symbols, str):
        symbols = [symbols]
    out: dict[str, str] = {}
    bad = []
    for given in symbols:
        s = str(given).strip().upper()
        if TS_CODE.match(s):
            out.setdefault(s, given)
        elif QLIB_SYMBOL.match(s):
            out.setdefault(qlib_format.from_qlib_symbol(s), given)
        else:
            bad.append(given)
    if bad:
        raise UnknownSymbolError(f"malformed symbol(s) {bad[:5]}: expected e.g. 000001.SZ or SZ000001", bad)
    if not out:
        raise LiveDataError("no symbols requested")
    return out


class LiveDataAdapter:
    """Feature frames for live trading, identical to the snapshot's ``daily_pv.h5`` rows.

    ``reader`` carries the mapping (bars, raw table, factor tables); ``options`` the snapshot's layout
    (``columns`` plain|dollar, ``instruments`` ts_code|qlib, ``dtype``, ``factor_tables``); ``start`` the
    snapshot's first day (history before it does not exist for the snapshot, so none is read: the first
    row's ``change`` is NaN there as in the file); ``universe`` the declared instrument list, if any.
    :meth:`for_snapshot` takes all of these from a declared snapshot.
    """

    def __init__(self, reader: DBReader, latest_bar_provider: LatestBarProvider | None = None, *,
                 options: SnapshotOptions = SnapshotOptions(), start: date | None = None,
                 universe: list[str] | None = None, snapshot_id: str | None = None):
        if latest_bar_provider is not None and not callable(getattr(latest_bar_provider, "latest_bars", None)):
            raise TypeError("latest_bar_provider must have a latest_bars(ts_codes, trade_date) method")
        self.reader = reader.select(list(options.factor_tables) if options.factor_tables is not None else None)
        self.provider = latest_bar_provider
        self.options = options
        self.start = start
        self.universe = frozenset(universe) if universe is not None else None
        self.snapshot_id = snapshot_id
        self._conn: adbc.Connection | None = None  # reused across calls: a connect is several round trips
        self._lock = threading.Lock()  # one read at a time on that connection

    def close(self) -> None:
        """Close the adapter's database connection (the next call opens a new one)."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> "LiveDataAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._drop_connection()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except adbc.Error:
                pass

    @classmethod
    def for_snapshot(cls, snapshot_id: str, engine_or_url: Engine | str, snapshots_file: Path | str | None = None,
                     latest_bar_provider: LatestBarProvider | None = None) -> "LiveDataAdapter":
        """The adapter for a snapshot declared in the snapshots YAML (default: ``AISTOCK_SNAPSHOTS_FILE``):
        same mapping, factor tables, options, start and universe — the live frame follows the declaration
        the snapshot is built from, not a copy of it."""
        from aistock_pipelines.settings import Settings
        from aistock_pipelines.snapshot_config import load_snapshots_file

        path = Path(snapshots_file) if snapshots_file is not None else Settings.from_env().snapshots_file
        declared = load_snapshots_file(path)
        decl = declared.get(snapshot_id)
        if isinstance(engine_or_url, str):
            reader = DBReader(create_db_engine(engine_or_url), declared.export_mapping(), engine_or_url)
        else:
            reader = DBReader(engine_or_url, declared.export_mapping())
        return cls(reader, latest_bar_provider, options=decl.options(), start=decl.start, universe=decl.ts_codes,
                   snapshot_id=snapshot_id)

    @property
    def resolved(self) -> ResolvedMapping:
        return self.reader.resolved

    @property
    def columns(self) -> list[str]:
        """The frame's column names, in order (the snapshot's)."""
        prefix = "$" if self.options.columns == "dollar" else ""
        return [prefix + c for c in self.resolved.logical_columns]

    # ------------------------------------------------------------------------------------------ public

    def get_feature_df(self, symbols: Iterable[str] | str, now: date | datetime | pd.Timestamp | str, window: int,
                       freq: str = "1d", *, partial: bool = False) -> pd.DataFrame:
        """The last ``window`` trading days up to ``now`` for ``symbols``, shaped like the snapshot.

        The window is counted on the trade calendar and ends at the last trading day on or before
        ``now``'s (Asia/Shanghai) date. If that day has no bars in the database yet, the latest-bar provider
        supplies it; without a provider the window ends the trading day before when that day is today (not
        loaded yet), and a *past* day without bars raises ``DataNotReady``. Rows follow the snapshot as it
        would be exported up to the window's last day: no row before an instrument's first bar or after its
        last; a day it did not trade in between (suspension) is a NaN row under ``suspended_days: nan_rows``
        and no row under ``omit``.

        Raises :class:`UnknownSymbolError` (names them), :class:`NoDataError`, :class:`InsufficientHistoryError`
        (unless ``partial=True``: then the shorter window is returned and ``attrs["partial"]`` is True),
        ``DataNotReady``, ``DataGateError`` (data the exporter would refuse too), ``LatestBarError``.
        ``attrs``: ``snapshot_id, as_of, window (first, last), trading_days, partial, live_date, live_rows,
        live_missing, ex_date_rescaled, absent`` (dates ISO strings, instruments in the frame's naming).
        """
        if freq not in ("1d", "day"):
            raise LiveDataError(f"freq {freq!r} is not supported: snapshots are daily ('1d')")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise LiveDataError(f"window must be a positive number of trading days, got {window!r}")
        given = normalize_symbols(symbols)
        codes = sorted(given)
        if self.universe is not None:
            outside = [given[c] for c in codes if c not in self.universe]
            if outside:
                raise UnknownSymbolError(f"symbol(s) {outside[:10]} are not in snapshot {self.snapshot_id!r}'s "
                                         "declared universe", outside)
        db = self._read(codes, to_trade_day(now), int(window), partial)
        live, pre_close = db.live, db.pre_close
        never = db.never
        if live is not None:
            never = [c for c in never if c not in set(live.index.unique(level="instrument"))]
        if never:
            unknown = [given[c] for c in never]
            raise UnknownSymbolError(
                f"unknown symbol(s) {unknown[:10]}{' …' if len(unknown) > 10 else ''}: no bar in "
                f"{self.resolved.mapping.bars_table} since {db.hist_start}"
                f"{f' (the start of snapshot {self.snapshot_id!r})' if self.snapshot_id else ''}", unknown)

        window_rows = pd.concat([p for p in (db.frame, live) if p is not None])
        check_gates(window_rows, set(db.days), self.resolved.mapping.required_raw_table)
        prev_rows = self._previous_rows(db.prev)
        rescaled: list[str] = []
        if pre_close:
            window_rows, prev_rows, rescaled = self._restate_for_ex_dates(window_rows, prev_rows, pre_close, db.live_day)
        # The exporter's own finalisation, then drop the previous bars again: only their closes were needed.
        out = finalize(pd.concat([prev_rows, window_rows]), self.options.dtype)
        out = out[out.index.get_level_values("datetime") >= pd.Timestamp(db.days[0])]
        if self.options.suspended_days == "nan_rows":  # an instrument with a bar before the window is in its span
            out = with_suspension_rows(out, db.days, open_at_start=set(db.prev["ts_code"]))
        result = read_view(out, self.options)
        result.attrs.update(self._attrs(db, window, live, codes, window_rows, rescaled))
        return result

    # -------------------------------------------------------------------------------------- internals

    def _read(self, codes: list[str], today: date, window: int, partial: bool) -> "_DatabaseRead":
        """Everything the database contributes, in one REPEATABLE READ view on the adapter's connection."""
        with self._lock:
            if self._conn is None:
                self._conn = self.reader.connect()
            try:
                with self.reader.session(self._conn) as s:
                    days, live_day, hist_start, last_bar = self._window(s, today, window, partial)
                    live, pre_close = self._latest_rows(codes, live_day) if live_day is not None else (None, None)
                    if live is not None and live.empty:
                        # No quote at all (before the open, feed down): today is not in the window, as
                        # without a provider — never a window with an empty last day.
                        live = pre_close = live_day = None
                        days = self._days(s, last_bar, window, partial, hist_start)
                    db_days = [d for d in days if d != live_day]
                    frame = s.load_daily(codes, db_days[0], db_days[-1]) if db_days else None
                    prev = s.previous_close(codes, days[0], hist_start)
                    seen = set(prev["ts_code"])
                    if frame is not None:
                        seen |= set(frame.index.unique(level="instrument"))
                    unseen = [c for c in codes if c not in seen]
                    never = sorted(set(unseen) - set(s.codes_with_bars(unseen, hist_start))) if unseen else []
            except adbc.Error:
                self._drop_connection()  # a broken connection (server restart): the next call reconnects
                raise
        return _DatabaseRead(days, live_day, hist_start, last_bar, frame, prev, never, live, pre_close)

    def _window(self, s: ReadSession, today: date, window: int,
                partial: bool) -> tuple[list[date], date | None, date, date]:
        """The window's trading days, the day the provider must supply (or None), the history's start and
        the last day with bars in the database."""
        hist_start = self.start
        if hist_start is None:
            hist_start = s.bar_date_range(date(1900, 1, 1), today)[0] or today
        if today < hist_start:
            raise NoDataError(f"now ({today}) is before the start of snapshot {self.snapshot_id!r} ({hist_start})")
        first_bar, last_bar = s.bar_date_range(hist_start, today)
        if last_bar is None:
            raise NoDataError(f"no data on or before {today}: no bar in {self.resolved.mapping.bars_table} "
                              f"between {hist_start} and {today}")
        calendar = s.trading_days_back(today, 1, hist_start)
        if not calendar or calendar[-1] < last_bar:
            raise DataGateError(f"{self.resolved.mapping.calendar_table} marks {last_bar} (which has bars) closed")
        last_day = calendar[-1]
        live_day = None
        end = last_day
        if last_day > last_bar:
            unloaded = s.trading_days(last_bar + timedelta(days=1), last_day)
            if len(unloaded) > 1:
                raise DataNotReady(f"trading day(s) {unloaded[0]}…{unloaded[-2]} have no bars yet "
                                   f"(latest bar: {last_bar}); load them first")
            if self.provider is not None:
                live_day = last_day
            elif last_day == today:
                end = last_bar  # today is not loaded yet: the window ends at the last complete day
            else:
                raise DataNotReady(f"trading day {last_day} has no bars yet (latest bar: {last_bar}); load it, "
                                   "or give the adapter a latest-bar provider")
        return self._days(s, end, window, partial, hist_start), live_day, hist_start, last_bar

    @staticmethod
    def _days(s: ReadSession, end: date, window: int, partial: bool, hist_start: date) -> list[date]:
        days = s.trading_days_back(end, window, hist_start)
        if len(days) < window and not partial:
            raise InsufficientHistoryError(
                f"window={window} needs {window} trading days up to {end}, but the history starts {hist_start} "
                f"and holds {len(days)}; ask for a shorter window or pass partial=True")
        return days

    def _latest_rows(self, codes: list[str], day: date) -> tuple[pd.DataFrame, dict[str, float] | None]:
        """The provider's bars for ``day`` → logical rows, through the same scaling and derivations as a
        database row (:func:`logical_frame`). qfq assumption: prices are anchored at the latest day, so
        today's qfq bar *is* the raw bar (factor 1) — exact unless today is an ex-date (see
        :meth:`_restate_for_ex_dates`). Factor-table columns are NaN: those tables have no row for today yet.
        Returns the rows and, when the provider gives it, ``pre_close`` per code (scaled like ``close``)."""
        r = self.resolved
        m = r.mapping
        columns = [spec.column for spec in m.fields.values()]
        bars = validate_latest_bars(self.provider.latest_bars(list(codes), day), columns, codes, day)
        select = pd.DataFrame({"trade_date": pd.Series([pd.Timestamp(day)] * len(bars), dtype="datetime64[ns]"),
                               "ts_code": bars["ts_code"]})
        for name, spec in m.fields.items():
            select[name] = spec.apply(bars[spec.column])
        if m.has_factor:
            # Mirrors `qfq.close::float8 / NULLIF(raw.close, 0)::float8` with qfq == raw on the anchor day.
            close = bars[m.fields["close"].column].to_numpy(dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                select["factor"] = np.where(close != 0, close / np.where(close != 0, close, 1.0), np.nan)
        for name in r.factor_fields:
            select[name] = np.nan
        pre_close = None
        if PRE_CLOSE in bars.columns:
            pre_close = dict(zip(bars["ts_code"], m.fields["close"].apply(bars[PRE_CLOSE]).tolist()))
        return logical_frame(select, r), pre_close

    def _previous_rows(self, prev: pd.DataFrame) -> pd.DataFrame:
        """Each code's last bar before the window as a frame row holding only ``close`` (all ``change``
        needs); dropped again after :func:`finalize`."""
        index = pd.MultiIndex.from_arrays(
            [pd.DatetimeIndex(pd.to_datetime(prev["trade_date"])).as_unit("ns"),
             pd.Index(prev["ts_code"].to_numpy(dtype=object), dtype=object)], names=INDEX_NAMES)
        rows = pd.DataFrame(np.nan, index=index, columns=self.resolved.logical_columns)
        rows["close"] = prev["close"].to_numpy(dtype=np.float64)
        return rows

    def _restate_for_ex_dates(self, window_rows: pd.DataFrame, prev_rows: pd.DataFrame, pre_close: dict[str, float],
                              live_day: date) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        """An ex-date today moves the qfq anchor: the vendor will rewrite the whole history by
        ``ratio = pre_close / last close`` (qfq prices are anchored at the latest day). The window's history is rescaled the same way
        in memory — prices, ``factor`` and ``vwap`` × ratio, adjusted ``volume`` ÷ ratio — so today's bar
        and the history share one anchor. Agrees with tomorrow's snapshot up to the vendor's 1-厘 rounding."""
        history = pd.concat([prev_rows[["close"]], window_rows.loc[
            window_rows.index.get_level_values("datetime") < pd.Timestamp(live_day), ["close"]]]).sort_index()
        last_close = history["close"].groupby(level="instrument").last()
        ratios = {c: pre_close[c] / last_close[c] for c in pre_close
                  if c in last_close.index and np.isfinite(pre_close[c]) and pre_close[c] != last_close[c]}
        if not ratios:
            return window_rows, prev_rows, []
        has_factor = self.resolved.mapping.has_factor
        scaled = [*PRICE_FIELDS, *(f for f in self.resolved.derived_fields if f != "change")]  # price-like

        def apply(frame: pd.DataFrame, only_before: bool) -> pd.DataFrame:
            frame = frame.copy()
            inst = frame.index.get_level_values("instrument")
            ratio = pd.Series(inst.map(ratios), index=frame.index, dtype="float64")
            mask = ratio.notna().to_numpy()
            if only_before:
                mask = mask & (frame.index.get_level_values("datetime") < pd.Timestamp(live_day))
            r = ratio.to_numpy()[mask]
            for col in scaled:
                frame.loc[mask, col] = frame.loc[mask, col].to_numpy() * r
            if has_factor:
                frame.loc[mask, "volume"] = frame.loc[mask, "volume"].to_numpy() / r
            return frame

        return apply(window_rows, True), apply(prev_rows, False), sorted(ratios)

    def _attrs(self, db: "_DatabaseRead", window: int, live: pd.DataFrame | None, codes: list[str],
               window_rows: pd.DataFrame, rescaled: list[str]) -> dict:
        def names(ts_codes: Iterable[str]) -> list[str]:
            return sorted(qlib_format.instrument_names(sorted(ts_codes), self.options.instruments).tolist())

        live_codes = set(live.index.unique(level="instrument")) if live is not None else set()
        if db.last_bar >= db.days[0]:
            on_last = window_rows.index.get_level_values("datetime") == pd.Timestamp(db.last_bar)
            traded_last = set(window_rows.index[on_last].unique(level="instrument"))
        else:
            traded_last = set(db.prev.loc[pd.to_datetime(db.prev["trade_date"]) == pd.Timestamp(db.last_bar), "ts_code"])
        return {
            "snapshot_id": self.snapshot_id,
            "as_of": db.days[-1].isoformat(),
            "window": [db.days[0].isoformat(), db.days[-1].isoformat()],
            "trading_days": len(db.days),
            "partial": len(db.days) < window,
            "live_date": db.live_day.isoformat() if db.live_day else None,
            "live_rows": names(live_codes),
            # traded on the last loaded day but no bar from the provider: suspended today, or a feed gap
            "live_missing": names(traded_last - live_codes) if db.live_day else [],
            "ex_date_rescaled": names(rescaled),
            "absent": names(set(codes) - set(window_rows.index.unique(level="instrument"))),
        }


@dataclass
class _DatabaseRead:
    days: list[date]  # the window's trading days, ascending (the live day included)
    live_day: date | None  # the day the provider supplies, or None
    hist_start: date  # the snapshot's start (or the first bar): nothing before it exists for the snapshot
    last_bar: date  # the last day with bars in the database
    frame: pd.DataFrame | None  # logical rows of the window's loaded days
    prev: pd.DataFrame  # per code: the last bar before the window (ts_code, trade_date, close)
    never: list[str]  # requested codes without any bar since hist_start
    live: pd.DataFrame | None  # the provider's rows for live_day (logical), or None
    pre_close: dict[str, float] | None  # the provider's pre_close per code (scaled like close), if given

"""Consumer-facing validation of a written snapshot directory (what the Dagster asset checks run).

The exporter's data gates stop bad *source* rows before anything is written; these checks look at the
*result* the way Qlib and RD-Agent will: the file's index, prices, calendar, bins and folders, and whether
the snapshot still holds as many rows as the database does for its range. Each check returns a
:class:`CheckOutcome` with numeric metadata and, on failure, a description naming examples, so a red check
in the UI says what to look at. Plain Python: no Dagster here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from aistock_pipelines.export import qlib_bins, qlib_format
from aistock_pipelines.export.mapping import ExportMapping
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.suspension import with_suspension_rows, without_suspension_frame

H5_NAME = "daily_pv.h5"
RDAGENT_FOLDERS = ("rdagent", "rdagent_debug")
#: Instruments whose bins are decoded and compared with ``daily_pv.h5`` per check (spread over the index).
BIN_SAMPLE = 25
_EXAMPLES = 5


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_frame(snapshot_dir: Path) -> pd.DataFrame:
    return pd.read_hdf(snapshot_dir / H5_NAME, key="data")


def _plain(column: str) -> str:
    return column.lstrip("$")


def check_index(frame: pd.DataFrame) -> CheckOutcome:
    """Unique and sorted ``(datetime, instrument)``: Qlib's loaders and ``.loc`` slicing assume both."""
    duplicated = frame.index[frame.index.duplicated()]
    ordered = frame.index.is_monotonic_increasing
    names_ok = list(frame.index.names) == ["datetime", "instrument"]
    problems = []
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicate index entries, e.g. {list(duplicated[:_EXAMPLES])}")
    if not ordered:
        problems.append("index is not sorted by (datetime, instrument)")
    if not names_ok:
        problems.append(f"index levels are {list(frame.index.names)}, expected ['datetime', 'instrument']")
    return CheckOutcome("index_unique_sorted", not problems, "; ".join(problems) or "unique and sorted",
                        {"rows": len(frame), "duplicates": len(duplicated), "sorted": bool(ordered)})


def check_ohlc(frame: pd.DataFrame) -> CheckOutcome:
    """Prices positive and consistent: low ≤ open, close ≤ high. qfq rounding is monotonic, so a violation
    here means a wrong mapping (a swapped column, a unit mistake) or bad source rows, never float noise."""
    cols = {_plain(c): c for c in frame.columns}
    o, h, low, c = (frame[cols[f]].to_numpy(dtype=np.float64) for f in ("open", "high", "low", "close"))
    rules = {
        "nonpositive_or_missing_close": ~(c > 0),
        "high_below_low": h < low,
        "open_outside_range": (o > h) | (o < low),
        "close_outside_range": (c > h) | (c < low),
    }
    counts = {name: int(mask.sum()) for name, mask in rules.items()}
    problems = []
    for name, mask in rules.items():
        if counts[name]:
            problems.append(f"{counts[name]} rows {name.replace('_', ' ')}, e.g. {list(frame.index[mask][:_EXAMPLES])}")
    return CheckOutcome("ohlc_sane", not problems, "; ".join(problems) or "all OHLC rows consistent", counts)


def trade_days(engine: Engine, mapping: ExportMapping, start: date, end: date) -> list[date]:
    schema, table = mapping.calendar_table.split(".")
    query = sa.text(f'SELECT cal_date FROM "{schema}"."{table}" WHERE is_trading AND cal_date BETWEEN :s AND :e '
                    "ORDER BY cal_date")
    with engine.connect() as conn:
        return list(conn.execute(query, {"s": start, "e": end}).scalars())


def check_calendar(snapshot_dir: Path, expected: list[date]) -> CheckOutcome:
    """``calendars/day.txt`` is exactly the trade calendar's open days over the snapshot's span: Qlib
    places every bin value by its position in this file."""
    written = qlib_format.read_calendar(snapshot_dir / "calendars" / "day.txt")
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} trading days missing, e.g. {[str(d) for d in missing[:_EXAMPLES]]}")
    if extra:
        problems.append(f"{len(extra)} days that are not trading days, e.g. {[str(d) for d in extra[:_EXAMPLES]]}")
    if not problems and written != sorted(written):
        problems.append("calendar is not in ascending order")
    return CheckOutcome("calendar_matches_trade_calendar", not problems, "; ".join(problems) or "equal",
                        {"calendar_days": len(written), "expected_days": len(expected),
                         "missing_days": len(missing), "extra_days": len(extra)})


def database_rows_per_day(engine: Engine, mapping: ExportMapping, start: date, end: date,
                          ts_codes: list[str] | None) -> pd.Series:
    schema, table = mapping.bars_table.split(".")
    query = f'SELECT trade_date, count(*) AS n FROM "{schema}"."{table}" WHERE trade_date BETWEEN :s AND :e'
    params: dict[str, Any] = {"s": start, "e": end}
    if ts_codes is not None:
        query += " AND ts_code = ANY(:codes)"
        params["codes"] = list(ts_codes)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(query + " GROUP BY trade_date"), params).all()
    return pd.Series({pd.Timestamp(d): int(n) for d, n in rows}, dtype="int64")


def check_row_parity(frame: pd.DataFrame, db_rows: pd.Series, calendar: list[date],
                     suspended_days: str = "omit") -> CheckOutcome:
    """One snapshot row per database bar over the exported range, day by day, and the suspension rows the
    declaration asks for: exactly a NaN row per trading day inside each instrument's span without a bar
    (``nan_rows``), none at all (``omit``)."""
    bars = without_suspension_frame(frame)
    try:
        expected = with_suspension_rows(bars, calendar) if suspended_days == "nan_rows" and len(calendar) else bars
        layout = _suspension_layout(frame, bars, expected)
    except ValueError as e:  # rows on days calendars/day.txt lacks (the calendar check names them too)
        expected, layout = bars, f"suspension rows not checkable: {e}"
    snap = bars.groupby(level="datetime").size().astype("int64")
    snap.index = pd.DatetimeIndex(snap.index).as_unit("ns")
    db = db_rows.copy()
    db.index = pd.DatetimeIndex(db.index).as_unit("ns")
    both = pd.concat([snap.rename("snapshot"), db.rename("database")], axis=1).fillna(0).astype("int64")
    diff = both[both["snapshot"] != both["database"]]
    meta = {"snapshot_rows": int(snap.sum()), "database_rows": int(db.sum()), "days_differing": len(diff),
            "suspension_rows": len(frame) - len(bars), "suspension_rows_expected": len(expected) - len(bars)}
    problems = [layout] if layout else []
    if not diff.empty:
        examples = [f"{d:%Y-%m-%d}: snapshot {r.snapshot}, database {r.database}" for d, r in diff.head(_EXAMPLES).iterrows()]
        problems.insert(0, f"{len(diff)} days differ ({'; '.join(examples)})")
    if not problems:
        return CheckOutcome("row_parity_with_database", True, f"equal on every day ({suspended_days})", meta)
    return CheckOutcome("row_parity_with_database", False, "; ".join(problems) + ": re-export the snapshot", meta)


def _suspension_layout(frame: pd.DataFrame, bars: pd.DataFrame, expected: pd.DataFrame) -> str:
    """What is wrong with the rows that are not bars, or ''."""
    extra = frame.index.difference(expected.index)
    missing = expected.index.difference(frame.index)
    not_nan = int(frame.drop(bars.index).notna().any(axis=1).sum()) if len(frame) > len(bars) else 0
    problems = []
    if len(extra):
        problems.append(f"{len(extra)} rows without a bar outside the declared layout, e.g. {list(extra[:_EXAMPLES])}")
    if len(missing):
        problems.append(f"{len(missing)} suspension rows missing, e.g. {list(missing[:_EXAMPLES])}")
    if not_nan:
        problems.append(f"{not_nan} suspension rows hold values")
    return "; ".join(problems)


def check_bins(snapshot_dir: Path, frame: pd.DataFrame, sample: int = BIN_SAMPLE) -> CheckOutcome:
    """Decode the bins of a sample of instruments and compare every field with ``daily_pv.h5`` (as float32,
    placed by calendar position): the two halves of a snapshot must never tell different stories."""
    features = snapshot_dir / "features"
    if not features.exists():
        return CheckOutcome("bins_match_h5", True, "snapshot has no Qlib bins (qlib_bins: false)", {"instruments_checked": 0})
    calendar = pd.DatetimeIndex(pd.to_datetime(qlib_format.read_calendar(snapshot_dir / "calendars" / "day.txt")))
    position = pd.Series(np.arange(len(calendar)), index=calendar.as_unit("ns"))
    instruments = frame.index.get_level_values("instrument").unique().sort_values()
    picks = instruments[np.unique(np.linspace(0, len(instruments) - 1, min(sample, len(instruments))).astype(int))]
    mismatches: list[str] = []
    compared = 0
    for name in picks:
        rows = frame.xs(name, level="instrument")
        pos = position.reindex(pd.DatetimeIndex(rows.index).as_unit("ns")).to_numpy()
        if np.isnan(pos).any():
            mismatches.append(f"{name}: {int(np.isnan(pos).sum())} rows on days missing from calendars/day.txt")
            continue
        for column in frame.columns:
            path = features / str(name).lower() / f"{_plain(column).lower()}.day.bin"
            if not path.exists():
                mismatches.append(f"{path.relative_to(snapshot_dir)} missing")
                continue
            start, values = qlib_bins.read_bin(path)
            offsets = pos - start
            if (offsets < 0).any() or (offsets >= len(values)).any():
                mismatches.append(f"{name}/{_plain(column)}: rows outside the bin's span")
                continue
            got = values[offsets.astype(int)]
            want = rows[column].to_numpy(dtype=np.float32)
            if not np.array_equal(got, want, equal_nan=True):
                bad = int((~((got == want) | (np.isnan(got) & np.isnan(want)))).sum())
                mismatches.append(f"{name}/{_plain(column)}: {bad} values differ")
            compared += len(want)
    return CheckOutcome("bins_match_h5", not mismatches,
                        "; ".join(mismatches[:_EXAMPLES]) or f"{len(picks)} instruments agree",
                        {"instruments_checked": len(picks), "values_compared": compared, "mismatches": len(mismatches)})


def check_rdagent_folders(snapshot_dir: Path) -> CheckOutcome:
    """RD-Agent refuses a data folder holding anything but ``.h5`` and ``.md`` files."""
    problems, seen = [], 0
    for folder in RDAGENT_FOLDERS:
        path = snapshot_dir / folder
        if not path.is_dir():
            problems.append(f"{folder}/ missing")
            continue
        for entry in path.iterdir():
            seen += 1
            if not entry.is_file() or entry.suffix not in (".h5", ".md"):
                problems.append(f"{folder}/{entry.name} is not an .h5 or .md file")
        if not (path / H5_NAME).is_file():
            problems.append(f"{folder}/{H5_NAME} missing")
    return CheckOutcome("rdagent_folders_clean", not problems, "; ".join(problems) or "only .h5/.md files",
                        {"files": seen, "problems": len(problems)})


def validate_snapshot(snapshot_dir: Path, engine: Engine, mapping: ExportMapping) -> list[CheckOutcome]:
    """Every check over one snapshot directory (reads ``daily_pv.h5`` once)."""
    meta = json.loads((snapshot_dir / "meta.json").read_text())
    start, end = date.fromisoformat(meta["start"]), date.fromisoformat(meta["end"])
    frame = load_frame(snapshot_dir)
    db_rows = database_rows_per_day(engine, mapping, start, end, meta.get("universe"))
    calendar = qlib_format.read_calendar(snapshot_dir / "calendars" / "day.txt")
    suspended_days = SnapshotOptions.from_json(meta.get("options", {})).suspended_days
    return [
        check_index(frame),
        check_ohlc(without_suspension_frame(frame)),
        check_calendar(snapshot_dir, trade_days(engine, mapping, start, end)),
        check_row_parity(frame, db_rows, calendar, suspended_days),
        check_bins(snapshot_dir, frame),
        check_rdagent_folders(snapshot_dir),
    ]

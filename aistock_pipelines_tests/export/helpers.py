"""Helpers shared by the export tests: the demo mapping, an exporter on a test database, file readers."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export import frames
from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.mapping import ExportMapping, FactorTable, FieldSpec
from aistock_pipelines.export.market_files import MarketFilesDecl
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.snapshot_writer import SnapshotWriter

START = date(2021, 1, 4)
DEMO_MAPPING = ExportMapping(factor_tables=(
    FactorTable("daily_basic", "market.daily_basic", prefix="db_"),
    FactorTable("moneyflow", "market.moneyflow", columns={
        "mf_net_amount": FieldSpec("net_mf_amount", 10000.0, "yuan"),
        "mf_net_vol": FieldSpec("net_mf_vol", 100.0, "shares")}),
))

#: The two demo layouts: the AIstock fork's (plain, ts_code, float64, every factor table) and upstream's.
VARIANTS = {
    "allA": dict(columns="plain", instruments="ts_code", dtype="float64", factor_tables=None),
    "qlib": dict(columns="dollar", instruments="qlib", dtype="float32", factor_tables=()),
}


def options_for(variant: str) -> SnapshotOptions:
    return SnapshotOptions(**VARIANTS[variant])


def make_exporter(url: str, root: Path, mapping: ExportMapping = DEMO_MAPPING,
                  market_files: MarketFilesDecl = MarketFilesDecl()) -> QlibDailyExporter:
    engine = create_db_engine(url)
    return QlibDailyExporter(DBReader(engine, mapping, url), SnapshotWriter(root), MetaRepo(engine), market_files)


def read_h5(path: Path) -> pd.DataFrame:
    return pd.read_hdf(path / "daily_pv.h5", key="data")


def read_bars(path: Path) -> pd.DataFrame:
    """The snapshot's bars: ``daily_pv.h5`` without the NaN rows of suspended days (``suspended_days``)."""
    frame = read_h5(path)
    return frame[frame[[c for c in frame.columns if c.lstrip("$") == "close"][0]].notna().to_numpy()]


def read_bins(path: Path) -> dict[Path, bytes]:
    """Every bin of a snapshot folder: path relative to the folder → bytes."""
    return {p.relative_to(path): p.read_bytes() for p in (path / "features").rglob("*.bin")}


def panel(calendar: list[date], names: list[str], skip: set[tuple[int, str]]) -> pd.DataFrame:
    """Rows for every (day, name) except ``skip`` (suspensions), values that differ per cell."""
    keys = [(d, n) for d, day in enumerate(calendar) for n in names if (d, n) not in skip]
    dates = np.array(calendar, dtype="datetime64[D]").astype("datetime64[ns]")
    c0 = np.array([d for d, _ in keys])
    c1 = np.array([names.index(n) for _, n in keys])
    values = np.column_stack([c0 * 1.5 + c1, -(c0 + 0.25) * (c1 + 1)]).astype(np.float64)
    return pd.DataFrame(values, index=frames.make_index(dates, c0, np.array(names, dtype=object), c1),
                        columns=["close", "volume"])

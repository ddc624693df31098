"""Helpers shared by the export tests: the demo mapping, an exporter on a test database, file readers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.export.exporter import QlibDailyExporter
from aistock_pipelines.export.mapping import ExportMapping, FactorTable, FieldSpec
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.snapshot_writer import SnapshotWriter

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


def make_exporter(url: str, root: Path, mapping: ExportMapping = DEMO_MAPPING) -> QlibDailyExporter:
    engine = create_db_engine(url)
    return QlibDailyExporter(DBReader(engine, mapping, url), SnapshotWriter(root), MetaRepo(engine))


def read_h5(path: Path) -> pd.DataFrame:
    return pd.read_hdf(path / "daily_pv.h5", key="data")


def read_bins(path: Path) -> dict[Path, bytes]:
    """Every bin of a snapshot folder: path relative to the folder → bytes."""
    return {p.relative_to(path): p.read_bytes() for p in (path / "features").rglob("*.bin")}

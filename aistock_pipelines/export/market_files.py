"""What Qlib's standard workflow needs beside the stocks: universe files (``instruments/csi300.txt``) and
benchmark index bins (``features/sh000300/``), resolved from the database each time a version is written,
so they equal the database after full and incremental exports alike (both are small)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Mapping

import pandas as pd
from sqlalchemy.engine import Engine

from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.benchmarks import BenchmarksDecl, read_index_bars, write_benchmark_bins
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.universes import UniverseDecl, resolve_universe

Span = tuple[str, date, date]


@dataclass(frozen=True)
class MarketFilesDecl:
    """The declared universes (name → source) and benchmark indices, written into every snapshot."""

    universes: Mapping[str, UniverseDecl] = field(default_factory=dict)
    benchmarks: BenchmarksDecl | None = None


@dataclass(frozen=True)
class MarketFiles:
    """A version's universe lines (name → ``all.txt``-style spans) and benchmark bars (snapshot-shaped)."""

    universes: dict[str, list[Span]] = field(default_factory=dict)
    benchmark_bars: pd.DataFrame | None = None


def resolve_market_files(engine: Engine, decl: MarketFilesDecl, calendar: list[date], options: SnapshotOptions,
                         bar_spans: list[Span]) -> MarketFiles:
    """Read what ``decl`` names for a version with ``calendar`` and these ``all.txt`` lines; a bad
    declaration (unknown table or code, an empty universe) raises before anything is written."""
    if not decl.universes and decl.benchmarks is None:
        return MarketFiles()
    with engine.connect() as conn:
        universes = {name: resolve_universe(conn, name, u, calendar, instruments=options.instruments,
                                            bar_spans=bar_spans) for name, u in decl.universes.items()}
        bars = (read_index_bars(conn, decl.benchmarks, calendar, dtype=options.dtype)
                if decl.benchmarks is not None and options.qlib_bins else None)
    return MarketFiles(universes, bars)


def write_universes(instruments_dir: Path, files: MarketFiles) -> None:
    for name, spans in files.universes.items():
        qlib_format.write_instruments(instruments_dir / f"{name}.txt", spans)


def write_benchmarks(features_dir: Path, files: MarketFiles, calendar: list[date], options: SnapshotOptions) -> int:
    """The benchmark bins; after the stocks' (a recycled features folder drops folders of no stock)."""
    if files.benchmark_bars is None or files.benchmark_bars.empty:
        return 0
    return write_benchmark_bins(features_dir, files.benchmark_bars, calendar, instruments=options.instruments)

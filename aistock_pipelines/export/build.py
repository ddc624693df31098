"""One export of one snapshot as an owned object: :class:`SnapshotBuild` carries what is being built — the
snapshot, its declaration, the reader of its mapping, the version folder and the bins writer — through the
stages of a full export (:mod:`full_export`) or an incremental one (:mod:`incremental_export`), and
:func:`commit` ends both: the version written and swapped in, then the meta rows replaced."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd

from aistock_pipelines.export import frames, qlib_format
from aistock_pipelines.export.bins_writer import BinsWriter
from aistock_pipelines.export.fingerprints import Fingerprints
from aistock_pipelines.export.mapping import ResolvedMapping
from aistock_pipelines.export.market_files import MarketFilesDecl, resolve_market_files
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader
from aistock_pipelines.export.snapshot_shape import SnapshotError, SnapshotOptions, by_field
from aistock_pipelines.export.snapshot_writer import PendingBins, SnapshotWriter, VersionContent
from aistock_pipelines.export.suspension import with_suspension_rows
from aistock_pipelines.export.timing import PhaseTimer
from aistock_pipelines.export.versions import NewVersion


@dataclass
class ExportResult:
    snapshot_id: str
    mode: str  # full | incremental | rebuild | unchanged
    start: date
    end: date
    path: Path
    instruments: int = 0
    rows: int = 0
    per_instrument: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    restated: list[str] = field(default_factory=list)
    rows_added: int = 0
    rows_rewritten: int = 0
    rows_read: int = 0
    applied: str = ""  # incremental: "in place" (the stored block patched) or "merge" (a new block)
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sha256: str = ""
    export_id: str = ""

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_instrument"} | {"path": str(self.path)}


def declaration_hash(start: date, universe: list[str] | None, options: SnapshotOptions, mapping_fingerprint: str) -> str:
    doc = {"start": start.isoformat(), "universe": universe or "all", "options": options.to_json(),
           "mapping": mapping_fingerprint}
    doc["options"].pop("debug_years"), doc["options"].pop("debug_instruments")
    if doc["options"]["suspended_days"] == "omit":  # the layout before the option: those versions stay valid
        doc["options"].pop("suspended_days")
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SnapshotBuild:
    """What one export builds, and where. The caller holds the writer's lock for ``snapshot_id``."""

    snapshot_id: str
    mode: str  # full | rebuild | incremental
    start: date
    universe: list[str] | None
    options: SnapshotOptions
    reader: DBReader  # over the mapping the options select
    writer: SnapshotWriter
    meta: MetaRepo
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    market_files: MarketFilesDecl = MarketFilesDecl()
    version: NewVersion | None = None
    bins: BinsWriter | None = None

    @property
    def resolved(self) -> ResolvedMapping:
        return self.reader.resolved

    def begin(self) -> NewVersion:
        """The new version's folder (made once)."""
        if self.version is None:
            self.version = self.writer.begin(self.snapshot_id)
        return self.version

    def abandon(self) -> None:
        """The export failed: stop the bins writer and delete the version folder it was building."""
        if self.bins is not None:
            self.bins.close()
        if self.version is not None:
            self.writer.discard(self.snapshot_id, self.version)


@dataclass(frozen=True)
class RowStats:
    """What an export did to the rows, for its result and ``meta.json``."""

    rows_read: int
    rows_added: int
    rows_rewritten: int = 0
    restated: list[str] = field(default_factory=list)
    applied: str = ""


@dataclass(frozen=True)
class Built:
    """The commit stage's input: the file's frame (column style, naming, dtype; sorted, row-major), its
    calendar and last day, the fingerprints of its rows, what the export did."""

    frame: pd.DataFrame
    days: list[date]
    end: date
    fingerprints: Fingerprints
    stats: RowStats


def commit(build: SnapshotBuild, built: Built, bins: PendingBins) -> ExportResult:
    """Write ``built`` as the snapshot's new version, swap it in, then replace its meta rows."""
    export_id = uuid.uuid4().hex
    ext, options = built.frame, build.options
    ts_code = (lambda name: name) if options.instruments == "ts_code" else qlib_format.from_qlib_symbol
    counts = {ts_code(name): n for name, n in frames.instrument_row_counts(ext.index).items()}
    if counts != built.fingerprints.row_counts():
        raise SnapshotError("internal consistency: rows per instrument differ from the database's counts; "
                            "the source changed in an unexpected way — run a full export")
    states = built.fingerprints.states(list(counts), export_id)
    column_info = build.resolved.describe()
    spans = qlib_format.instrument_spans(by_field(ext), built.days)
    with build.timer.phase("read_market_files"):
        market_files = resolve_market_files(build.reader.engine, build.market_files, built.days, options, spans)
    with build.timer.phase("suspension_rows"):
        h5_frame = with_suspension_rows(ext, built.days) if options.suspended_days == "nan_rows" else ext
    meta = _meta(build, built, export_id, column_info, len(counts)) | {"row_count": len(h5_frame), "bar_count": len(ext)}
    content = VersionContent(ext, h5_frame, built.days, options, meta, column_info, spans, market_files)
    path, meta = build.writer.write(build.snapshot_id, build.begin(), content, bins, build.timer)
    with build.timer.phase("write_meta_repo"):
        build.meta.replace(build.snapshot_id, states)
    stats = built.stats
    return ExportResult(build.snapshot_id, build.mode, build.start, built.end, path, instruments=len(counts),
                        rows=len(h5_frame), per_instrument={st.ts_code: (str(st.first_datetime), str(st.last_datetime),
                                                                    st.rows) for st in states},
                        restated=stats.restated, rows_added=stats.rows_added, rows_rewritten=stats.rows_rewritten,
                        rows_read=stats.rows_read, applied=stats.applied, timings=build.timer.total(),
                        sha256=meta["daily_pv_sha256"], export_id=export_id)


def _meta(build: SnapshotBuild, built: Built, export_id: str, column_info: dict[str, dict], instruments: int) -> dict:
    """``meta.json`` of the new version, but for what the writer adds (files, sha256)."""
    resolved, stats = build.resolved, built.stats
    return {
        "start": build.start.isoformat(), "end": built.end.isoformat(),
        "as_of": datetime.now(timezone.utc).isoformat(timespec="seconds"), "export_id": export_id,
        "instrument_count": int(instruments),
        "calendar_days": len(built.days),
        "columns": [{"name": c, **column_info.get(c.lstrip("$"), {})} for c in built.frame.columns],
        "mapping": {"fingerprint": resolved.fingerprint(), "bars_table": resolved.mapping.bars_table,
                    "raw_table": resolved.mapping.raw_table, "factor_tables": list(resolved.factor_columns)},
        "options": build.options.to_json(), "universe": build.universe,
        "declaration_hash": declaration_hash(build.start, build.universe, build.options, resolved.fingerprint()),
        "last_export": {"mode": build.mode, "restated": stats.restated, "rows_added": stats.rows_added,
                        "rows_rewritten": stats.rows_rewritten, "rows_read": stats.rows_read, "applied": stats.applied},
    }

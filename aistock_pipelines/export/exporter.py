"""QlibDailyExporter: full and incremental exports of a snapshot, restatement-safe and atomic.

Each export is a :class:`SnapshotBuild` under the snapshot's locks (the cross-host advisory lock of
:mod:`snapshot_lock`, then the local ``flock``): a full export runs the stages of
:mod:`full_export`, an incremental one those of :mod:`incremental_export`; a changed declaration (mapping,
options, universe, start) rebuilds in full instead of mixing rows.
"""

from __future__ import annotations

import logging
from datetime import date

from aistock_pipelines.export.build import ExportResult, SnapshotBuild, declaration_hash
from aistock_pipelines.export.full_export import run_full
from aistock_pipelines.export.gates import DataGateError, DataNotReady, check_gates, finalize
from aistock_pipelines.export.incremental_export import run_incremental
from aistock_pipelines.export.market_files import MarketFilesDecl
from aistock_pipelines.export.meta_repo import MetaRepo
from aistock_pipelines.export.reader import DBReader, check_codes
from aistock_pipelines.export.snapshot_lock import writer_locks
from aistock_pipelines.export.snapshot_shape import SnapshotError, SnapshotOptions, check_snapshot_id
from aistock_pipelines.export.snapshot_writer import SnapshotWriter
from aistock_pipelines.export.stored_snapshot import StoredSnapshotMismatch
from aistock_pipelines.export.timing import PhaseTimer

__all__ = ["DataGateError", "DataNotReady", "ExportResult", "QlibDailyExporter", "check_gates", "declaration_hash",
           "finalize"]
log = logging.getLogger(__name__)


class QlibDailyExporter:
    def __init__(self, reader: DBReader, writer: SnapshotWriter, meta: MetaRepo,
                 market_files: MarketFilesDecl = MarketFilesDecl()):
        self.reader = reader
        self.writer = writer
        self.meta = meta
        self.market_files = market_files
        self._readers: dict[tuple[str, ...], DBReader] = {}

    def export_full(self, snapshot_id: str, start: date, end: date | None = None, ts_codes: list[str] | None = None,
                    *, options: SnapshotOptions = SnapshotOptions(), if_exists: str = "overwrite") -> ExportResult:
        """Write the whole snapshot for [start, end] (end None = the last day with bars)."""
        check_snapshot_id(snapshot_id)
        if if_exists not in ("overwrite", "refuse"):
            raise ValueError("if_exists must be 'overwrite' or 'refuse'")
        with writer_locks(self.reader.engine, self.writer, snapshot_id):
            if self.writer.exists(snapshot_id) and if_exists == "refuse":
                raise SnapshotError(f"snapshot {snapshot_id} exists; pass if_exists='overwrite' to replace it")
            return run_full(self._build(snapshot_id, "full", start, ts_codes, options), end)

    def export_incremental(self, snapshot_id: str, end: date | None = None, ts_codes: list[str] | None = None,
                           *, options: SnapshotOptions | None = None, start: date | None = None) -> ExportResult:
        """Bring the snapshot up to ``end``: new trading days appended, restated instruments rewritten.
        ``ts_codes``/``options``/``start`` default to the snapshot's declaration; differing values rebuild it."""
        check_snapshot_id(snapshot_id)
        with writer_locks(self.reader.engine, self.writer, snapshot_id):
            meta = self.writer.read_meta(snapshot_id)
            if meta is None:
                if start is None:
                    raise SnapshotError(f"snapshot {snapshot_id} does not exist yet: run a full export first")
                return run_full(self._build(snapshot_id, "full", start, ts_codes, options or SnapshotOptions()), end)
            options = options or SnapshotOptions.from_json(meta["options"])
            universe = ts_codes if ts_codes is not None else meta["universe"]
            snap_start = start or date.fromisoformat(meta["start"])
            mapping = self.reader_for(options).resolved
            rebuild = self._build(snapshot_id, "rebuild", snap_start, universe, options)
            until = max(end or date.fromisoformat(meta["end"]), date.fromisoformat(meta["end"]))
            if declaration_hash(snap_start, universe, options, mapping.fingerprint()) != meta.get("declaration_hash"):
                return run_full(rebuild, until)
            try:
                return run_incremental(self._build(snapshot_id, "incremental", snap_start, universe, options), meta, end)
            except StoredSnapshotMismatch as e:  # nothing stored is reused: the snapshot is made anew
                log.warning("%s", e)
                result = run_full(rebuild, end and until)
                result.errors.append(str(e))
                return result

    def reader_for(self, options: SnapshotOptions) -> DBReader:
        """The reader over the mapping the options' ``factor_tables`` select (one per selection)."""
        if options.factor_tables is None:
            return self.reader
        key = options.factor_tables
        if key not in self._readers:
            self._readers[key] = self.reader.select(list(key))
        return self._readers[key]

    def _build(self, snapshot_id: str, mode: str, start: date, ts_codes: list[str] | None,
               options: SnapshotOptions) -> SnapshotBuild:
        universe = check_codes(ts_codes) if ts_codes is not None and mode != "incremental" else ts_codes
        return SnapshotBuild(snapshot_id, mode, start, universe, options, self.reader_for(options), self.writer,
                             self.meta, PhaseTimer(), self.market_files)

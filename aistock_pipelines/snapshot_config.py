"""Snapshot declarations (``AISTOCK_SNAPSHOTS_FILE``): which snapshots exist and how they are built.

One YAML file holds the export mapping (bars table, field overrides, factor tables) and the snapshots.
It is validated with pydantic when definitions load, so a typo fails fast with the snapshot and key named.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aistock_pipelines.export.mapping import FIELD_MAPPING_DB_DAILY, ExportMapping, FactorTable, FieldSpec, MappingError
from aistock_pipelines.export.snapshot_shape import SnapshotOptions


class SnapshotConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldDecl(_Strict):
    column: str
    scale: float = 1.0
    unit: str = ""


class FactorTableDecl(_Strict):
    name: str
    table: str
    prefix: str | None = None
    columns: dict[str, FieldDecl] = Field(default_factory=dict)


#: The real AIstock layout, as the export mapping defines it (the YAML's defaults are the same tables).
_DEFAULT_MAPPING = ExportMapping()


class MappingDecl(_Strict):
    bars_table: str = _DEFAULT_MAPPING.bars_table
    raw_table: str | None = _DEFAULT_MAPPING.raw_table
    calendar_table: str = _DEFAULT_MAPPING.calendar_table
    fields: dict[str, FieldDecl] = Field(default_factory=dict)  # overrides of FIELD_MAPPING_DB_DAILY


class SnapshotLayout(_Strict):
    """A snapshot's layout options, as declared (YAML) or requested (the ad-hoc job's run config)."""

    columns: Literal["plain", "dollar"] = Field("plain", description="plain: open, close, …; dollar: $open, $close, …")
    instruments: Literal["ts_code", "qlib"] = Field("ts_code", description="ts_code: 000001.SZ; qlib: SZ000001")
    dtype: Literal["float32", "float64"] = "float64"
    factor_tables: list[str] | None = Field(None, description="null = every configured factor table")
    qlib_bins: bool = Field(True, description="also write Qlib's features/*.day.bin")
    debug_years: int = Field(2, ge=1, description="years of history in the RD-Agent debug frame")
    debug_instruments: int = Field(100, ge=1, description="instruments in the RD-Agent debug frame")

    def options(self) -> SnapshotOptions:
        """The exporter's form of these options."""
        return SnapshotOptions(columns=self.columns, instruments=self.instruments, dtype=self.dtype,
                               factor_tables=tuple(self.factor_tables) if self.factor_tables is not None else None,
                               qlib_bins=self.qlib_bins, debug_years=self.debug_years,
                               debug_instruments=self.debug_instruments)


class _SnapshotIdentity(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    start: date
    end: date | None = None
    universe: Literal["all"] | list[str] = "all"


class ReleaseDecl(_Strict):
    """A snapshot's release policy: a scheduled release after the close of the last trading day of each
    period, and retention (the newest ``keep_last`` releases and those marked keep stay)."""

    schedule: Literal["daily", "weekly", "monthly"] | None = Field(
        None, description="release after the close of the period's last trading day; null = on demand only")
    keep_last: int | None = Field(None, ge=1, description="retention after each release; null = keep all")


class SnapshotDecl(SnapshotLayout, _SnapshotIdentity):
    """One declared snapshot: identity and range first, then the layout (field order is the stored JSON's).
    ``release`` is left out of the dumped declaration (and so of the asset's code version): a release policy
    changes no data."""

    release: ReleaseDecl | None = Field(None, exclude=True)

    @field_validator("end")
    @classmethod
    def _end_after_start(cls, v: date | None, info) -> date | None:
        if v is not None and "start" in info.data and v < info.data["start"]:
            raise ValueError("end is before start")
        return v

    @property
    def open_ended(self) -> bool:
        return self.end is None

    @property
    def ts_codes(self) -> list[str] | None:
        return None if self.universe == "all" else list(self.universe)


class SnapshotsFile(_Strict):
    mapping: MappingDecl = Field(default_factory=MappingDecl)
    factor_tables: list[FactorTableDecl] = Field(default_factory=list)
    snapshots: list[SnapshotDecl]

    def export_mapping(self) -> ExportMapping:
        fields = dict(FIELD_MAPPING_DB_DAILY)
        fields.update({k: FieldSpec(v.column, v.scale, v.unit) for k, v in self.mapping.fields.items()})
        return ExportMapping(
            bars_table=self.mapping.bars_table, raw_table=self.mapping.raw_table,
            calendar_table=self.mapping.calendar_table, fields=fields,
            factor_tables=tuple(FactorTable(t.name, t.table, {k: FieldSpec(v.column, v.scale, v.unit)
                                                             for k, v in t.columns.items()}, t.prefix)
                                for t in self.factor_tables))

    def get(self, snapshot_id: str) -> SnapshotDecl:
        for s in self.snapshots:
            if s.id == snapshot_id:
                return s
        raise KeyError(f"no snapshot {snapshot_id!r} declared; declared: {[s.id for s in self.snapshots]}")


def _describe(err: ValidationError, doc: dict) -> str:
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        where = ".".join(str(x) for x in loc)
        if len(loc) >= 2 and loc[0] == "snapshots" and isinstance(loc[1], int):
            try:
                sid = doc["snapshots"][loc[1]].get("id", f"#{loc[1]}")
            except Exception:  # noqa: BLE001 - best effort naming only
                sid = f"#{loc[1]}"
            where = f"snapshot {sid!r}, key {'.'.join(str(x) for x in loc[2:]) or '(entry)'}"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def load_snapshots_file(path: Path) -> SnapshotsFile:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SnapshotConfigError(f"snapshots file {path} not found (AISTOCK_SNAPSHOTS_FILE)") from None
    except yaml.YAMLError as e:
        raise SnapshotConfigError(f"snapshots file {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise SnapshotConfigError(f"snapshots file {path}: expected a mapping with a 'snapshots' list")
    try:
        parsed = SnapshotsFile.model_validate(doc)
    except ValidationError as e:
        raise SnapshotConfigError(f"snapshots file {path}: {_describe(e, doc)}") from None
    ids = [s.id for s in parsed.snapshots]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SnapshotConfigError(f"snapshots file {path}: snapshot id(s) {dup} declared twice")
    try:
        mapping = parsed.export_mapping()
        for s in parsed.snapshots:
            mapping.select(s.factor_tables)
    except MappingError as e:
        raise SnapshotConfigError(f"snapshots file {path}: {e}") from None
    return parsed

"""Snapshot declarations (``AISTOCK_SNAPSHOTS_FILE``): which snapshots exist and how they are built.

One YAML file holds the export mapping (bars table, field overrides, factor tables) and the snapshots.
It is validated with pydantic when definitions load, so a typo fails fast with the snapshot and key named.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aistock_pipelines.conventions import TS_CODE
from aistock_pipelines.export.benchmarks import BenchmarksDecl
from aistock_pipelines.export.mapping import FIELD_MAPPING_DB_DAILY, ExportMapping, FactorTable, FieldSpec, MappingError
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.export.market_files import MarketFilesDecl
from aistock_pipelines.export.universes import UniverseDecl, check_universe_name


class SnapshotConfigError(ValueError):
    pass


class _TextDatesLoader(yaml.SafeLoader):
    """YAML without implicit timestamps: dates stay text for pydantic, whose errors name the key.

    PyYAML's own date constructor raises a bare ``ValueError`` (``2023-02-30``) naming no key at all.
    """


_TextDatesLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def snapshot_name(snapshot_id: str) -> str:
    """The id as it appears in Dagster names (jobs, schedules, checks): ``-`` becomes ``_``."""
    return snapshot_id.replace("-", "_")


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
    missing_raw: Literal["refuse", "nan"] = _DEFAULT_MAPPING.missing_raw


class SnapshotLayout(_Strict):
    """A snapshot's layout options, as declared (YAML) or requested (the ad-hoc job's run config)."""

    columns: Literal["plain", "dollar"] = Field("plain", description="plain: open, close, …; dollar: $open, $close, …")
    instruments: Literal["ts_code", "qlib"] = Field("ts_code", description="ts_code: 000001.SZ; qlib: SZ000001")
    dtype: Literal["float32", "float64"] = "float64"
    factor_tables: list[str] | None = Field(None, description="null = every configured factor table")
    qlib_bins: bool = Field(True, description="also write Qlib's features/*.day.bin")
    debug_years: int = Field(2, ge=1, description="years of history in the RD-Agent debug frame")
    debug_instruments: int = Field(100, ge=1, description="instruments in the RD-Agent debug frame")
    suspended_days: Literal["nan_rows", "omit"] = Field(
        "nan_rows", description="nan_rows: a NaN row per trading day an instrument did not trade inside its "
                                "span (RD-Agent's layout); omit: rows only for bars")

    def options(self) -> SnapshotOptions:
        """The exporter's form of these options."""
        return SnapshotOptions(columns=self.columns, instruments=self.instruments, dtype=self.dtype,
                               factor_tables=tuple(self.factor_tables) if self.factor_tables is not None else None,
                               qlib_bins=self.qlib_bins, debug_years=self.debug_years,
                               debug_instruments=self.debug_instruments, suspended_days=self.suspended_days)


class _SnapshotIdentity(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    start: date
    end: date | None = None
    universe: Literal["all"] | list[str] = "all"
    universes: list[str] | None = Field(None, description="the declared universe files this snapshot holds "
                                                          "(null: every one)")

    @field_validator("universe")
    @classmethod
    def _codes_well_formed(cls, v: Literal["all"] | list[str]) -> Literal["all"] | list[str]:
        bad = [code for code in v if not TS_CODE.match(code)] if isinstance(v, list) else []
        if bad:
            raise ValueError(f"malformed ts_code(s) {bad[:5]}: expected e.g. 000001.SZ, 600000.SH, 430047.BJ")
        return v


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
    universes: dict[str, UniverseDecl] = Field(default_factory=dict)  # instruments/<name>.txt (export/universes.py)
    benchmarks: BenchmarksDecl | None = None  # index bins (export/benchmarks.py)

    @field_validator("universes")
    @classmethod
    def _universe_names(cls, v: dict[str, UniverseDecl]) -> dict[str, UniverseDecl]:
        for name in v:
            check_universe_name(name)
        return v

    @model_validator(mode="after")
    def _snapshot_universes_declared(self) -> "SnapshotsFile":
        for s in self.snapshots:
            unknown = sorted(set(s.universes or ()) - set(self.universes))
            if unknown:
                raise ValueError(f"snapshot {s.id}: universes {unknown} are not declared under the top-level "
                                 f"`universes:` (declared: {sorted(self.universes) or 'none'}); declare them there "
                                 "or remove them from the snapshot's list")
        return self

    def market_files(self, only: list[str] | None = None) -> MarketFilesDecl:
        """The universe files (those named in ``only``; None: every one) and benchmark bins a snapshot holds."""
        universes = {k: v for k, v in self.universes.items() if only is None or k in only}
        return MarketFilesDecl(universes, self.benchmarks)

    def export_mapping(self) -> ExportMapping:
        fields = dict(FIELD_MAPPING_DB_DAILY)
        fields.update({k: FieldSpec(v.column, v.scale, v.unit) for k, v in self.mapping.fields.items()})
        return ExportMapping(
            bars_table=self.mapping.bars_table, raw_table=self.mapping.raw_table,
            calendar_table=self.mapping.calendar_table, fields=fields, missing_raw=self.mapping.missing_raw,
            factor_tables=tuple(FactorTable(t.name, t.table, {k: FieldSpec(v.column, v.scale, v.unit)
                                                             for k, v in t.columns.items()}, t.prefix)
                                for t in self.factor_tables))

    def get(self, snapshot_id: str) -> SnapshotDecl:
        for s in self.snapshots:
            if s.id == snapshot_id:
                return s
        raise KeyError(f"no snapshot {snapshot_id!r} declared; declared: {[s.id for s in self.snapshots]}")

    def declaration_doc(self, snapshot_id: str) -> dict | None:
        """A snapshot's declaration as a document, with the universes and benchmarks every snapshot holds
        (what a release records); None when ``snapshot_id`` is not declared (an ad-hoc snapshot)."""
        decl = next((s for s in self.snapshots if s.id == snapshot_id), None)
        if decl is None:
            return None
        return {**decl.model_dump(mode="json"),
                "universes": {name: u.model_dump(mode="json") for name, u in self.universes.items()},
                "benchmarks": self.benchmarks.model_dump(mode="json") if self.benchmarks is not None else None}


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
        got = f" (got {e['input']!r})" if isinstance(e.get("input"), (str, int, float)) else ""
        parts.append(f"{where}: {e['msg']}{got}")
    return "; ".join(parts)


def load_snapshots_file(path: Path) -> SnapshotsFile:
    try:
        doc = yaml.load(Path(path).read_text(), Loader=_TextDatesLoader)  # noqa: S506 - a SafeLoader
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
    _check_ids(parsed, path)
    try:
        mapping = parsed.export_mapping()
    except MappingError as e:
        raise SnapshotConfigError(f"snapshots file {path}, key mapping/factor_tables: {e}") from None
    for s in parsed.snapshots:
        try:
            mapping.select(s.factor_tables)
        except MappingError as e:
            raise SnapshotConfigError(f"snapshots file {path}: snapshot {s.id!r}, key factor_tables: {e}") from None
    return parsed


def _check_ids(parsed: SnapshotsFile, path: Path) -> None:
    """Refuse ids declared twice, or equal once normalised (Dagster names, case-insensitive file systems)."""
    seen: dict[str, str] = {}
    for s in parsed.snapshots:
        key = snapshot_name(s.id).lower()
        other = seen.get(key)
        if other is not None:
            if other == s.id:
                how = "is declared twice"
            elif snapshot_name(other) == snapshot_name(s.id):
                how = f"collide: both become {snapshot_name(s.id)!r} in Dagster's job, schedule and check names"
            else:
                how = "differ only in case: one folder on a case-insensitive file system"
            ids = f"id {s.id!r}" if other == s.id else f"ids {other!r} and {s.id!r}"
            raise SnapshotConfigError(f"snapshots file {path}: snapshot {ids} {how}; rename one of them")
        seen[key] = s.id

"""Field mapping: logical field → database column with its unit scale (``FIELD_MAPPING_DB_DAILY``).

A pure rename is not enough: the real AIstock columns need unit conversion too (厘 → yuan,
手 → shares). Defaults match the real schema, so a user with that database needs no mapping file. Factor
tables keyed ``(ts_code, trade_date)`` join in with a column prefix or an explicit mapping; two sources
producing one logical name is rejected when the mapping is built, not when a file is half written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Engine

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOGICAL = re.compile(r"^[a-z][a-z0-9_]*$")

#: Fields the exporter derives itself when the raw (unadjusted) table is configured.
DERIVED_FIELDS = ("factor", "vwap", "change")
PRICE_FIELDS = ("open", "high", "low", "close")


class MappingError(ValueError):
    """The mapping or a table/column it names is wrong; the message names it."""


@dataclass(frozen=True)
class FieldSpec:
    """One logical field: ``value = column × scale`` in ``unit``."""

    column: str
    scale: float = 1.0
    unit: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and np.isfinite(self.scale) and self.scale != 0):
            raise MappingError(f"column {self.column!r}: scale must be a finite non-zero number, got {self.scale!r}")

    def divisor(self) -> int | None:
        """A scale like 0.001 is applied as ``/ 1000``: one correctly rounded division, so the value equals
        ``column / 1000`` bit for bit (``× 0.001`` would not)."""
        inverse = Fraction(1 / self.scale).limit_denominator(1)
        if self.scale < 1 and float(inverse) * self.scale == 1.0:
            return int(inverse)
        return None

    def sql(self, alias: str) -> str:
        """Scaled float8 expression (see :meth:`divisor`)."""
        col = f'{alias}."{self.column}"::float8'
        if self.scale == 1:
            return col
        divisor = self.divisor()
        return f"{col} / {divisor}" if divisor is not None else f"{col} * {self.scale!r}"

    def apply(self, values: npt.ArrayLike) -> np.ndarray:
        """The same IEEE float64 operation as :meth:`sql`, in numpy: rows that do not come from the database
        (a live bar before the close) get exactly the value the database path would give them."""
        col = np.asarray(values, dtype=np.float64)
        if self.scale == 1:
            return col
        divisor = self.divisor()
        return col / divisor if divisor is not None else col * self.scale


#: The real AIstock qfq layout: prices in 厘 (yuan × 1000), volume in 手 (100 shares), amount in 厘.
FIELD_MAPPING_DB_DAILY: dict[str, FieldSpec] = {
    "open": FieldSpec("open_li", 0.001, "yuan (qfq)"),
    "high": FieldSpec("high_li", 0.001, "yuan (qfq)"),
    "low": FieldSpec("low_li", 0.001, "yuan (qfq)"),
    "close": FieldSpec("close_li", 0.001, "yuan (qfq)"),
    "volume": FieldSpec("volume_hand", 100.0, "shares"),
    "amount": FieldSpec("amount_li", 0.001, "yuan"),
}


@dataclass(frozen=True)
class FactorTable:
    """A daily factor table keyed (ts_code, trade_date): ``columns`` maps logical name → FieldSpec;
    with ``prefix`` instead, every non-key column joins as ``<prefix><column>`` (scale 1)."""

    name: str  # short name snapshots refer to
    table: str  # schema.table
    columns: dict[str, FieldSpec] = field(default_factory=dict)
    prefix: str | None = None

    def __post_init__(self) -> None:
        _check_table_name(self.table)
        if not self.columns and self.prefix is None:
            raise MappingError(f"factor table {self.name!r}: give either 'columns' or 'prefix'")
        if self.columns and self.prefix is not None:
            raise MappingError(f"factor table {self.name!r}: 'columns' and 'prefix' are exclusive")


def _claim(taken: dict[str, str], names, source: str) -> None:
    """Record ``names`` as coming from ``source``; a name already taken is an error naming both sources."""
    for name in names:
        if name in taken:
            raise MappingError(f"logical field {name!r} comes from both {taken[name]} and {source}: "
                               "rename one (explicit 'columns' mapping or another 'prefix')")
        taken[name] = source


def _check_table_name(table: str) -> None:
    parts = table.split(".")
    if len(parts) != 2 or not all(_IDENT.match(p) for p in parts):
        raise MappingError(f"table name {table!r} must be schema.table (letters, digits, underscores)")


def _quote_table(table: str) -> str:
    schema, name = table.split(".")
    return f'"{schema}"."{name}"'


@dataclass(frozen=True)
class ExportMapping:
    """Everything that defines the exported columns (the snapshot's and the live adapter's)."""

    bars_table: str = "market.kline_daily_qfq"
    raw_table: str | None = "market.kline_daily_raw"
    calendar_table: str = "market.trading_calendar"
    fields: dict[str, FieldSpec] = field(default_factory=lambda: dict(FIELD_MAPPING_DB_DAILY))
    factor_tables: tuple[FactorTable, ...] = ()
    #: A bar without a usable raw close (no raw row, NULL or 0): refused by the data gates ("refuse"), or
    #: exported with NaN factor, volume and vwap ("nan"). Not part of the fingerprint: complete data gives
    #: the same snapshot either way.
    missing_raw: str = "refuse"

    def __post_init__(self) -> None:
        for table in (self.bars_table, self.calendar_table, *([self.raw_table] if self.raw_table else [])):
            _check_table_name(table)
        if self.missing_raw not in ("refuse", "nan"):
            raise MappingError(f"missing_raw must be 'refuse' or 'nan', got {self.missing_raw!r}")
        missing = [f for f in PRICE_FIELDS if f not in self.fields]
        if missing:
            raise MappingError(f"the bar mapping needs fields {missing} (logical name → column)")
        names = {t.name for t in self.factor_tables}
        if len(names) != len(self.factor_tables):
            raise MappingError("factor table names must be unique")
        taken = self._base_names(DERIVED_FIELDS)
        for name, spec in self.fields.items():
            _check_field(name, spec.column, "bars")
        for t in self.factor_tables:
            for name, spec in t.columns.items():
                _check_field(name, spec.column, t.name)
            _claim(taken, t.columns, t.name)

    def _base_names(self, derived) -> dict[str, str]:
        """Logical name → where it comes from, for the bars' fields and ``derived``."""
        return {name: "bars" for name in self.fields} | {name: "derived" for name in derived}

    def select(self, factor_tables: list[str] | None) -> "ExportMapping":
        """The mapping restricted to the named factor tables (None = all)."""
        if factor_tables is None:
            return self
        known = {t.name: t for t in self.factor_tables}
        unknown = sorted(set(factor_tables) - set(known))
        if unknown:
            raise MappingError(f"unknown factor tables {unknown}; configured: {sorted(known)}")
        return ExportMapping(self.bars_table, self.raw_table, self.calendar_table, dict(self.fields),
                             tuple(known[n] for n in factor_tables))

    @property
    def has_factor(self) -> bool:
        return self.raw_table is not None

    @property
    def required_raw_table(self) -> str | None:
        """The raw table whose row every bar must have (None: none, or NaN allowed by ``missing_raw``)."""
        return self.raw_table if self.missing_raw == "refuse" else None

    @property
    def derived_fields(self) -> list[str]:
        """The columns computed rather than read: ``factor`` and ``vwap`` need the raw table, ``change`` not."""
        return list(DERIVED_FIELDS) if self.has_factor else ["change"]

    def fingerprint(self, resolved_factor_columns: dict[str, dict[str, FieldSpec]] | None = None) -> str:
        doc = {
            "bars": self.bars_table, "raw": self.raw_table, "calendar": self.calendar_table,
            "fields": {k: [v.column, v.scale] for k, v in sorted(self.fields.items())},
            "factor_tables": [
                {"name": t.name, "table": t.table, "prefix": t.prefix,
                 "columns": {k: [v.column, v.scale] for k, v in sorted(
                     (resolved_factor_columns or {}).get(t.name, t.columns).items())}}
                for t in self.factor_tables
            ],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _check_field(name: str, column: str, source: str) -> None:
    if not _LOGICAL.match(name):
        raise MappingError(f"{source}: logical field {name!r} must be lower-case letters, digits, underscores")
    if not _IDENT.match(column):
        raise MappingError(f"{source}: column {column!r} of field {name!r} is not a plain identifier")


@dataclass(frozen=True)
class ResolvedMapping:
    """A mapping checked against the database catalogue, with prefix tables expanded to columns."""

    mapping: ExportMapping
    factor_columns: dict[str, dict[str, FieldSpec]]  # factor table name → logical → spec

    @property
    def base_fields(self) -> list[str]:
        return list(self.mapping.fields)

    @property
    def factor_fields(self) -> list[str]:
        return [name for cols in self.factor_columns.values() for name in cols]

    @property
    def derived_fields(self) -> list[str]:
        return self.mapping.derived_fields

    @property
    def logical_columns(self) -> list[str]:
        """Column order of every frame the project produces (snapshot and live)."""
        return self.base_fields + self.derived_fields + self.factor_fields

    def fingerprint(self) -> str:
        return self.mapping.fingerprint(self.factor_columns)

    def describe(self) -> dict[str, dict]:
        """Per logical column: source and unit, for meta.json and the RD-Agent README."""
        out: dict[str, dict] = {}
        m = self.mapping
        for name, spec in m.fields.items():
            out[name] = {"source": f"{m.bars_table}.{spec.column}", "scale": spec.scale, "unit": spec.unit}
        if m.has_factor:
            out["volume"]["unit"] = "shares, adjusted (raw shares / factor, Qlib convention)"
            out["factor"] = {"source": f"{m.bars_table}.close / {m.raw_table}.close", "unit": "qfq price / raw price"}
            out["vwap"] = {"source": "amount / raw shares × factor", "unit": "yuan (qfq)"}
        out["change"] = {"source": "close / previous close - 1 (per instrument)", "unit": "ratio"}
        for tname, cols in self.factor_columns.items():
            table = next(t.table for t in m.factor_tables if t.name == tname)
            for name, spec in cols.items():
                out[name] = {"source": f"{table}.{spec.column}", "scale": spec.scale, "unit": spec.unit}
        return out


def resolve_mapping(engine: Engine, mapping: ExportMapping) -> ResolvedMapping:
    """Check every table and column against the catalogue and expand prefix tables.

    Runs before any read, so a typo is a clear error naming the table or column, never a half export.
    """
    with engine.connect() as conn:
        def columns_of(table: str) -> dict[str, str]:
            schema, name = table.split(".")
            rows = conn.execute(sa.text(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = :s AND table_name = :t"), {"s": schema, "t": name}).all()
            if not rows:
                raise MappingError(f"table {table} does not exist (or is not visible to this database user)")
            return dict(rows)

        def require(table: str, cols: dict[str, str], needed: list[str], what: str) -> None:
            missing = [c for c in needed if c not in cols]
            if missing:
                raise MappingError(f"{what}: table {table} has no column(s) {missing}; it has {sorted(cols)}")

        key = ["ts_code", "trade_date"]
        bars = columns_of(mapping.bars_table)
        require(mapping.bars_table, bars, key + [s.column for s in mapping.fields.values()], "bars")
        if mapping.raw_table:
            raw = columns_of(mapping.raw_table)
            require(mapping.raw_table, raw, key + [mapping.fields["close"].column], "raw table")
        cal = columns_of(mapping.calendar_table)
        require(mapping.calendar_table, cal, ["cal_date", "is_trading"], "trade calendar")

        taken = mapping._base_names(mapping.derived_fields)
        resolved: dict[str, dict[str, FieldSpec]] = {}
        for t in mapping.factor_tables:
            cols = columns_of(t.table)
            require(t.table, cols, key, f"factor table {t.name}")
            if t.prefix is not None:
                numeric_types = ("double precision", "real", "numeric", "integer", "bigint", "smallint")
                spec = {f"{t.prefix}{c}": FieldSpec(c) for c, typ in cols.items()
                        if c not in key and typ in numeric_types}
                for name, s in spec.items():
                    _check_field(name, s.column, t.name)
            else:
                require(t.table, cols, [s.column for s in t.columns.values()], f"factor table {t.name}")
                spec = dict(t.columns)
            _claim(taken, spec, t.name)
            resolved[t.name] = spec
    return ResolvedMapping(mapping, resolved)


def quote_table(table: str) -> str:
    return _quote_table(table)

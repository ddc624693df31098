"""The fingerprints of :mod:`fingerprints`, counted by the client from the rows a full export reads."""

from __future__ import annotations

import time
from datetime import date

import numpy as np
import pandas as pd

from aistock_pipelines.export.daily_features import source_selects
from aistock_pipelines.export.fingerprints import PRIMES, RAW_WEIGHT, EPOCH, INTEGER_TYPES, Fingerprints, field_order
from aistock_pipelines.export.mapping import ExportMapping, FieldSpec

_EPOCH_DAYS = (EPOCH - date(1970, 1, 1)).days  # days since 1970 → since 1990 (+1: the definition's day)

#: Recovered integers must stay below this: a scaled float then determines its integer (see
#: :meth:`RowFingerprints._integers`), and a row's weighted sum (Σ weights ≤ 1002 < 2¹⁰) stays below 2⁶⁰.
_MAX_INT = 2.0 ** 50
#: A row's weighted sum is added up as three 20-bit limbs (the top one signed, |·| < 2²⁰), each × the day
#: (|day| < 2¹⁶) summed per instrument in float64 by ``bincount`` — exact while a sum stays below 2⁵³: at
#: most 2¹⁷ rows per instrument and batch (a batch is cut into chunks of that many rows).
_LIMBS, _LIMB_BITS, _CHUNK, _MAX_DAY = 3, 20, 1 << 17, 1 << 16


class RowFingerprints:
    """The fingerprints of :mod:`fingerprints`, added up from the
    rows of a bulk read as they arrive: the bars' batches (values as read: the mapping's scaled float8s,
    NULL as NaN) and the raw table's (raw close as float8, 0 and NULL as NaN — both count 0), before any
    row is joined or dropped. Raw rows without a bar count, as on the server.

    Exactness: each value's integer is recovered from its scaled float and accepted only when the
    mapping's scaling of that integer gives the float back bit for bit (below 2⁵⁰ in magnitude, distinct
    integers have distinct scaled floats for any scale: their distance, |scale|, is more than the floats'
    rounding). A value that is not (a numeric column, a scale that lost digits, an amount above 2⁵⁰) stops
    the count: :meth:`result` then returns None and the server computes the fingerprints instead."""

    def __init__(self, mapping: ExportMapping, bar_names: list[str], raw: bool) -> None:
        order = field_order(mapping)
        weight = dict(zip(order, PRIMES))
        #: per column of the bars' values: (column number, weight, scaling); the other columns are not summed
        self._terms = [(j, weight[n], mapping.fields[n]) for j, n in enumerate(bar_names) if n in weight]
        #: the raw close, unscaled (None: no raw table)
        self._raw = FieldSpec(f"{mapping.raw_table}.{mapping.fields['close'].column}") if raw else None
        self.failure: str | None = None
        self.seconds = 0.0
        self._parts: dict[str, list[tuple[list[str], np.ndarray]]] = {"bars": [], "raw": []}

    # ----------------------------------------------------------------------------------------- rows

    def add_bars(self, days: np.ndarray, codes: np.ndarray, dictionary: list[str], values: np.ndarray) -> None:
        """One batch of bars: ``days`` since 1970, ``codes`` into ``dictionary``, ``values`` (rows, columns)."""
        self._add("bars", days, codes, dictionary, lambda rows: self._row_sums(values[rows]))

    def add_raw(self, days: np.ndarray, codes: np.ndarray, dictionary: list[str], close: np.ndarray) -> None:
        """One batch of the raw table: its close, unscaled."""
        if self._raw is not None:
            self._add("raw", days, codes, dictionary, lambda rows: self._integers(close[rows], self._raw))

    def _add(self, part: str, days: np.ndarray, codes: np.ndarray, dictionary: list[str], row_sums) -> None:
        if self.failure is not None or not len(days):
            return
        t = time.perf_counter()
        try:
            for lo in range(0, len(days), _CHUNK):
                rows = slice(lo, lo + _CHUNK)
                sums = row_sums(rows)
                if sums is None:
                    return
                day = days[rows].astype(np.int64) - (_EPOCH_DAYS - 1)
                if len(day) and (day.min() <= -_MAX_DAY or day.max() >= _MAX_DAY):
                    self.failure = "a trade_date outside 1810–2169"
                    return
                self._parts[part].append((dictionary, _per_code(codes[rows], len(dictionary), day, sums)))
        finally:
            self.seconds += time.perf_counter() - t

    def _row_sums(self, values: np.ndarray) -> np.ndarray | None:
        """Per row Σ weight × integer (int64, |·| < 2⁶⁰), or None (and :attr:`failure` set)."""
        total = np.zeros(len(values), dtype=np.int64)
        for j, weight, spec in self._terms:
            x = self._integers(values[:, j], spec)
            if x is None:
                return None
            total += weight * x
        return total

    def _integers(self, v: np.ndarray, spec: FieldSpec) -> np.ndarray | None:
        """The integers whose scaling (``spec``) gives ``v``, NaN → 0; None where that is not exact."""
        v = v.astype(np.float64, copy=False)  # native, contiguous: read once per operation below
        divisor = spec.divisor()
        x = np.rint(v * divisor) if divisor is not None else np.rint(v / spec.scale)
        exact = spec.apply(x) == v  # False where v is NaN
        if not exact.all():
            nan = np.isnan(v)
            x[nan] = 0.0
            exact |= nan
        if not exact.all() or (len(x) and max(x.max(), -x.min()) >= _MAX_INT):
            self.failure = f"{spec.column}: a value that is not an integer below 2^50 after undoing its scale {spec.scale!r}"
            return None
        return x.astype(np.int64)

    # ---------------------------------------------------------------------------------------- result

    def result(self) -> Fingerprints | None:
        """Per instrument with bars, as :func:`fingerprints.server_fingerprints` computes them for a full
        range (no old part). None if a value could not be counted (:attr:`failure` says which)."""
        if self.failure is not None:
            return None
        t = time.perf_counter()
        bars = _by_code(self._parts["bars"])
        raw = _by_code(self._parts["raw"]).reindex(bars.index, fill_value=0)
        sums = [_limb_total(row_limbs) + RAW_WEIGHT * _limb_total(raw_limbs) for row_limbs, raw_limbs in
                zip(bars[list(range(_LIMBS))].to_numpy().tolist(), raw[list(range(_LIMBS))].to_numpy().tolist())]
        table = pd.DataFrame({
            "rows_old": np.zeros(len(bars), dtype=np.int64), "sum_old": "0",
            "rows_all": bars["rows"].to_numpy(dtype=np.int64), "sum_all": [str(s) for s in sums],
            "first_date": _dates(bars["first"]), "last_date": _dates(bars["last"]),
        }, index=pd.Index(bars.index, name="ts_code"))
        self.seconds += time.perf_counter() - t
        return Fingerprints(table, self.seconds)


def client_fingerprints(s, ts_codes: list[str] | None) -> RowFingerprints | None:
    """A :class:`RowFingerprints` for a bulk read in session ``s`` (pass it to ``load_daily_block``), or
    None where the client cannot count them: a read of listed codes (its raw close arrives divided into
    ``factor``) or a bar field or raw close stored in a column that is not an integer type."""
    m = s.resolved.mapping
    if ts_codes is not None:
        return None
    integer = (*INTEGER_TYPES, "bigint")
    types = s.column_types(m.bars_table)
    if any(types.get(spec.column) not in integer for spec in m.fields.values()):
        return None
    if m.has_factor and s.column_types(m.raw_table).get(m.fields["close"].column) not in integer:
        return None
    return RowFingerprints(m, source_selects(s.resolved)[0].names, raw=m.has_factor)


def _per_code(codes: np.ndarray, n: int, day: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Per dictionary entry: limb sums × day (``_LIMBS`` columns), rows, first and last day (int64)."""
    out = np.zeros((n, _LIMBS + 3), dtype=np.int64)
    day_f8 = day.astype(np.float64)
    for k in range(_LIMBS):
        limb = sums >> (_LIMB_BITS * k)
        if k < _LIMBS - 1:
            limb = limb & ((1 << _LIMB_BITS) - 1)
        out[:, k] = np.bincount(codes, weights=limb * day_f8, minlength=n)
    out[:, _LIMBS] = np.bincount(codes, minlength=n)
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(first, codes, day)
    np.maximum.at(last, codes, day)
    out[:, _LIMBS + 1], out[:, _LIMBS + 2] = first, last
    return out


def _by_code(parts: list[tuple[list[str], np.ndarray]]) -> pd.DataFrame:
    """The batches' per-code arrays added up per code (limbs and rows summed, first/last the extremes)."""
    columns = [*range(_LIMBS), "rows", "first", "last"]
    if not parts:
        return pd.DataFrame(np.zeros((0, len(columns)), dtype=np.int64), columns=columns)
    names = [c for dictionary, _ in parts for c in dictionary]
    frame = pd.DataFrame(np.concatenate([a for _, a in parts]), index=names, columns=columns)
    frame = frame[frame["rows"] > 0]
    grouped = frame.groupby(level=0, sort=True)
    return grouped.sum().assign(first=grouped["first"].min(), last=grouped["last"].max())


def _limb_total(limbs: list[int]) -> int:
    return sum(int(s) << (_LIMB_BITS * k) for k, s in enumerate(limbs))


def _dates(day: pd.Series) -> np.ndarray:
    """The definition's day numbers → ``datetime.date`` objects (as the server's frame has them)."""
    return (day.to_numpy(dtype=np.int64) + (_EPOCH_DAYS - 1)).astype("datetime64[D]").astype(object)

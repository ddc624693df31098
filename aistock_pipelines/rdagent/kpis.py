"""KPIs of loop results and factors, normalised from the shapes RD-Agent exports them in."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

from aistock_pipelines.rdagent.record_values import as_float

KPI_COLUMNS = ("annualized_return", "max_drawdown", "sharpe", "ic", "icir", "win_rate", "rank_ic", "information_ratio")
#: What ``annualized_return_basis`` says about ``annualized_return``.
BASIS_WITH_COST = "excess_return_with_cost"
BASIS_WITHOUT_COST = "excess_return_without_cost"
BASIS_UNSPECIFIED = "unspecified"

#: Normalised metric leaf name (lower case, alphanumerics only) -> KPI column.
_KPI_ALIASES: dict[str, str] = {
    **dict.fromkeys(("annualizedreturn", "annualisedreturn", "annualreturn", "annret", "annualizedret", "annreturn"),
                    "annualized_return"),
    **dict.fromkeys(("maxdrawdown", "mdd", "maxdd"), "max_drawdown"),
    **dict.fromkeys(("sharpe", "sharperatio"), "sharpe"),
    **dict.fromkeys(("ic", "icmean"), "ic"),
    "icir": "icir",
    **dict.fromkeys(("winrate", "winratio"), "win_rate"),
    **dict.fromkeys(("rankic", "rankicmean"), "rank_ic"),
    **dict.fromkeys(("informationratio", "ir"), "information_ratio"),
}
#: Top-level record fields of newer servers, per KPI.
_KPI_FIELDS: dict[str, tuple[str, ...]] = {
    "annualized_return": ("annualized_return",),
    "max_drawdown": ("max_drawdown",),
    "sharpe": ("sharpe",),
    "ic": ("ic",),
    "icir": ("icir", "ic_ir"),
    "win_rate": ("win_rate",),
    "rank_ic": ("rank_ic",),
    "information_ratio": ("information_ratio",),
}
_ARTEFACT_NAME = "Unnamed: 0"
#: Preference ranks, lower wins: a figure whose cost basis is stated first (with cost, then without),
#: then a top-level field, then an unprefixed metric name, then any other prefix.
_WITH_COST, _WITHOUT_COST, _TOP_LEVEL, _UNPREFIXED, _OTHER_PREFIX = range(5)
_BASIS = {_WITH_COST: BASIS_WITH_COST, _WITHOUT_COST: BASIS_WITHOUT_COST}


def _metric_kpi(name: str) -> tuple[str, int] | None:
    """KPI column and preference rank for a metric name; lower rank wins.

    Qlib reports ``1day.excess_return_with_cost.*`` and ``1day.excess_return_without_cost.*`` side by
    side; RD-Agent judges on the with-cost figures, so they rank first, without cost next, unprefixed
    names after a top-level field, any other prefix last. The leaf is matched (``Rank IC`` is not ``IC``),
    else the whole name without punctuation (``Ann.Ret`` of the catalogs' text summaries).
    """
    parts = name.strip().lower().split(".")
    kpi = _KPI_ALIASES.get(re.sub(r"[^a-z0-9]", "", parts[-1]))
    if kpi is None:
        whole = _KPI_ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))
        return None if whole is None else (whole, _UNPREFIXED)
    prefix = ".".join(parts[:-1])
    if not prefix:
        rank = _UNPREFIXED
    elif "with_cost" in prefix and "without" not in prefix:
        rank = _WITH_COST
    elif "without_cost" in prefix:
        rank = _WITHOUT_COST
    else:
        rank = _OTHER_PREFIX
    return kpi, rank


def _metric_pairs(metrics: Any) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` pairs from the shapes RD-Agent exports ``metrics`` in.

    * a plain mapping ``{"ic": 0.03, ...}``;
    * the pandas artefact of ``qlib_res.csv`` read without an index: one record
      ``{"Unnamed: 0": "IC", "0": 0.03}``, a list of such records, or the column-oriented
      ``{"Unnamed: 0": {"0": "IC", ...}, "0": {"0": 0.03, ...}}`` (lists instead of dicts too).
    """
    if isinstance(metrics, list):
        for item in metrics:
            yield from _metric_pairs(item)
        return
    if not isinstance(metrics, dict):
        return
    if _ARTEFACT_NAME not in metrics:
        for name, value in metrics.items():
            if isinstance(name, str):
                yield name, value
        return
    names = metrics[_ARTEFACT_NAME]
    value_keys = [k for k in metrics if k != _ARTEFACT_NAME]
    value_key = "0" if "0" in metrics else (value_keys[0] if len(value_keys) == 1 else None)
    if value_key is None:
        return
    values = metrics[value_key]
    if isinstance(names, str):
        yield names, values
    elif isinstance(names, dict) and isinstance(values, dict):
        for index, name in names.items():
            if isinstance(name, str):
                yield name, values.get(index)
    elif isinstance(names, list) and isinstance(values, list):
        for name, value in zip(names, values):
            if isinstance(name, str):
                yield name, value


_TEXT_METRIC = re.compile(
    r"(?P<name>[A-Za-z][\w .\-/]*?)\s*[:=：]\s*(?P<value>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(?P<pct>%?)")


def _text_metric_pairs(summary: str) -> Iterator[tuple[str, float]]:
    """Pairs from a text summary such as ``"Sharpe: 0.61, Ann.Ret: 4.02%"`` (a percentage is divided by
    100 in decimal, so ``4.02%`` is exactly the float ``0.0402``)."""
    for match in _TEXT_METRIC.finditer(summary):
        number = Decimal(match["value"])
        yield match["name"], float(number / 100 if match["pct"] else number)


def _best_kpis(record: dict[str, Any], pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Every KPI column from metric pairs and top-level fields by preference rank, plus the basis."""
    found: dict[str, tuple[int, float]] = {}

    def offer(kpi: str, rank: int, number: float | None) -> None:
        if number is not None and (kpi not in found or rank < found[kpi][0]):
            found[kpi] = (rank, number)

    for name, value in pairs:
        matched = _metric_kpi(name)
        if matched is not None:
            offer(*matched, as_float(value))
    for kpi, fields in _KPI_FIELDS.items():
        offer(kpi, _TOP_LEVEL, next((v for v in (as_float(record.get(f)) for f in fields) if v is not None), None))
    result: dict[str, Any] = {kpi: found[kpi][1] if kpi in found else None for kpi in KPI_COLUMNS}
    rank = found["annualized_return"][0] if "annualized_return" in found else None
    result["annualized_return_basis"] = None if rank is None else _BASIS.get(rank, BASIS_UNSPECIFIED)
    return result


def normalise_kpis(record: dict[str, Any]) -> dict[str, Any]:
    """The KPI columns of a loop record (and ``annualized_return_basis``): the best-ranked figure of each
    among ``metrics`` and the top-level fields."""
    return _best_kpis(record, _metric_pairs(record.get("metrics")))


FACTOR_KPI_COLUMNS = ("ic", "icir", "rank_ic", "annualized_return", "max_drawdown", "sharpe")


def factor_performance(record: dict[str, Any]) -> dict[str, float | None]:
    """A factor's ``best_performance`` flattened: a mapping (or the pandas artefact) like ``metrics``, a text
    summary like ``"Sharpe: 0.61, Ann.Ret: 4.02%"``, plus top-level fields; anything else gives NULLs."""
    performance = record.get("best_performance")
    pairs = _text_metric_pairs(performance) if isinstance(performance, str) else _metric_pairs(performance)
    kpis = _best_kpis(record, pairs)
    return {column: kpis[column] for column in FACTOR_KPI_COLUMNS}

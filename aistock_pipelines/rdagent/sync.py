"""Sync RD-Agent's published results into the AIstock registry tables (plain Python, no Dagster).

The rules, and why:

* **Fetch first, then one short transaction per catalog.** Everything is downloaded and validated
  before ``BEGIN``; a bad or unreachable server therefore never leaves a half-written catalog, and no
  transaction stays open while waiting on the network. Any error inside the transaction rolls it back,
  so the previous rows stay exactly as they were (:class:`SyncError` says so).
* **Duplicates inside one response: the last occurrence wins, whole record.** RD-Agent's exporters
  append in registry order, so a later record with the same key is the newer evolution (the demo's two
  ``Price_Volume_Divergence_5D`` records are 2025-12-15 and 2025-12-18). Field-wise merging was rejected:
  it would store a record that never existed upstream (an expression from one run, a description from
  another). Note that ``GET /factors/{name}`` upstream returns the *first* match; the registry keeps the
  last. The number of dropped records is reported as ``duplicates_merged``.
* **Change detection compares the stored row with the incoming one** (``raw`` plus every derived
  column, so a new derivation rule also rewrites old rows). Unchanged rows are not rewritten; only their
  ``last_seen_at`` (and ``catalog_generated_at_utc``) move, because "seen" means "present upstream".
* **Rows missing upstream are deactivated, never deleted, and reactivated when they return.**
* **Not published (404) is not "empty".** RD-Agent answers 404 for a missing *or* half-written file,
  and most installations publish no model catalog: the registry rows are left untouched and the state
  is recorded as not published.
* **Concurrent syncs of one catalog are serialised** by a transaction-scoped advisory lock, so the
  inserted/updated/unchanged/deactivated counts are exact.
* Bodies are never logged; database errors are reported by their driver message only (SQLAlchemy's own
  message would include the bound parameters, i.e. catalog contents).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar, get_args

from sqlalchemy import ColumnElement, Table, false, func, select, true, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.catalog_models import (
    Alpha158Meta,
    CatalogResponse,
    RunRegistryEndpoint,
    RunRegistryResponse,
)
from aistock_pipelines.rdagent.json_values import sanitize_json
from aistock_pipelines.rdagent.results_client import (
    RDAgentResultsClient,
    ResultsApiBadResponse,
    ResultsApiError,
    ResultsApiUnavailable,
)

log = logging.getLogger(__name__)

CatalogName = Literal["factors", "strategies", "loops", "models", "alpha158"]
CATALOGS: tuple[CatalogName, ...] = get_args(CatalogName)
LOOP_ARTIFACTS = "loop_artifacts"
#: The Phase 2 registry listings, sync kind -> endpoint (``run_loops`` is ``GET /loops``, named apart from
#: the loop catalog). Synced when a server offers them; the real API does not (404: "not offered").
RUN_REGISTRY_ENDPOINTS: dict[str, RunRegistryEndpoint] = {
    "task_runs": "task_runs", "run_loops": "loops", "workspaces": "workspaces"}
RUN_REGISTRY_KINDS: tuple[str, ...] = tuple(RUN_REGISTRY_ENDPOINTS)
#: Everything :func:`sync_all` can sync, in dependency order (artifacts follow the loops).
SYNC_KINDS: tuple[str, ...] = (*CATALOGS, LOOP_ARTIFACTS, *RUN_REGISTRY_KINDS)

#: Fingerprint of a catalog the server does not publish (404); a value of its own so that a later
#: publication is a change.
NOT_PUBLISHED = "not-published"
#: Fingerprint of a registry listing the server does not offer (404).
NOT_OFFERED = "not-offered"
#: What the results sensor fingerprints, in this order (the artifacts need the loop catalog's loops).
POLL_KINDS: tuple[str, ...] = (*CATALOGS, *RUN_REGISTRY_KINDS, LOOP_ARTIFACTS)

_DETAIL_CHARS = 300
_KEYS_PER_STATEMENT = 5000
T = TypeVar("T")


class SyncError(Exception):
    """A sync failed; nothing of it was committed (the message says why and what to check)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SyncAllError(SyncError):
    """Some kinds of :func:`sync_all` failed; ``results`` holds the ones that were committed."""

    def __init__(self, results: dict[str, SyncStats], errors: dict[str, SyncError]) -> None:
        detail = "; ".join(f"{kind}: {err}" for kind, err in errors.items())
        super().__init__(",".join(errors), f"{len(errors)} of {len(results) + len(errors)} syncs failed: {detail}")
        self.results = results
        self.errors = errors


@dataclass(frozen=True)
class SyncStats:
    """What one sync did. ``records`` counts records received, before duplicates were merged;
    ``reactivated`` rows are also counted in ``updated``."""

    kind: str
    published: bool
    fingerprint: str
    generated_at_utc: str | None = None
    records: int = 0
    duplicates_merged: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deactivated: int = 0
    reactivated: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.updated or self.deactivated)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------- fingerprints
def catalog_fingerprint(response: CatalogResponse | Alpha158Meta | None) -> str:
    """``<generated_at_utc>|sha256:<hex of the body>``, or :data:`NOT_PUBLISHED` for ``None``.

    The sha256 alone would do (the body contains ``generated_at_utc``); the timestamp is kept in front
    so a cursor or a metadata entry is readable at a glance.
    """
    if response is None:
        return NOT_PUBLISHED
    return f"{response.generated_at_utc}|sha256:{response.sha256}"


def artifacts_digest(task_run_id: str, loop_id: int, body_sha256: str) -> str:
    """One loop's part of :func:`artifacts_fingerprint`."""
    return f"{task_run_id}/{loop_id}:{body_sha256}"


def artifacts_fingerprint(digests: Iterable[str]) -> str:
    """The loop artifacts' fingerprint: over every loop's answer, in any order. The sync stores it in
    ``sync_state`` and the sensor computes the same one to notice an artifact-only change."""
    return "sha256:" + hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass(frozen=True)
class PollResult:
    """Fingerprints of the catalogs that answered; per-catalog errors for bodies that were unusable;
    kinds left for the next poll because the time budget ran out; the loops the loop catalog lists
    (``(task_run_id, loop_id)``, sorted; None when it was not read)."""

    fingerprints: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    not_polled: tuple[str, ...] = ()
    loops: tuple[tuple[str, int], ...] | None = None


def poll_fingerprints(
    client: RDAgentResultsClient,
    kinds: Sequence[str] = CATALOGS,
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] | None = None,
) -> PollResult:
    """Fetch each kind once and fingerprint it (there is no ETag/HEAD upstream: a poll is a GET).

    ``kinds`` are catalogs, registry listings and :data:`LOOP_ARTIFACTS` (see :data:`POLL_KINDS`); the
    artifacts are fingerprinted over the loops of the loop catalog read earlier in the same poll (one
    GET per loop; skipped when the loop catalog was not read). A server that cannot be reached raises
    :class:`ResultsApiUnavailable` at the first request (no point trying the others); an unusable body
    only marks its own kind. With ``budget_s``, no new request is started once the budget is spent (the
    remaining kinds are returned in ``not_polled``).
    """
    now = clock or time.monotonic
    started = now()

    def out_of_time() -> bool:
        return budget_s is not None and now() - started > budget_s

    fingerprints: dict[str, str] = {}
    errors: dict[str, str] = {}
    loops: tuple[tuple[str, int], ...] | None = None
    for index, kind in enumerate(kinds):
        if out_of_time():
            return PollResult(fingerprints, errors, tuple(kinds[index:]), loops)
        try:
            if kind == LOOP_ARTIFACTS:
                if loops is None:
                    continue
                fingerprint = _poll_artifacts(client, loops, out_of_time)
                if fingerprint is None:
                    return PollResult(fingerprints, errors, tuple(kinds[index:]), loops)
                fingerprints[kind] = fingerprint
            elif kind in RUN_REGISTRY_ENDPOINTS:
                fingerprints[kind] = run_registry_fingerprint(client.fetch_run_registry(RUN_REGISTRY_ENDPOINTS[kind]))
            else:
                response = _fetch_envelope(client, kind)  # type: ignore[arg-type]
                if kind == "loops" and isinstance(response, CatalogResponse):
                    loops = tuple(sorted({(r["task_run_id"], r["loop_id"]) for r in response.records}))
                fingerprints[kind] = catalog_fingerprint(response)
        except ResultsApiBadResponse as exc:
            errors[kind] = str(exc)[:_DETAIL_CHARS]
    return PollResult(fingerprints, errors, (), loops)


def _poll_artifacts(client: RDAgentResultsClient, loops: Iterable[tuple[str, int]],
                    out_of_time: Callable[[], bool]) -> str | None:
    """:func:`artifacts_fingerprint` of the loops' artifact answers; None when time ran out first."""
    digests = []
    for task_run_id, loop_id in loops:
        if out_of_time():
            return None
        digests.append(artifacts_digest(task_run_id, loop_id, client.fetch_loop_artifacts(task_run_id, loop_id).sha256))
    return artifacts_fingerprint(digests)


def _fetch_envelope(client: RDAgentResultsClient, kind: CatalogName) -> CatalogResponse | Alpha158Meta | None:
    if kind == "alpha158":
        return client.fetch_alpha158_meta()
    return client.fetch_catalog(kind)


# ---------------------------------------------------------------------------------- value coercions
def _text(value: Any) -> str | None:
    """Strings as is; numbers as text (``impl_version`` 20260114 written as a JSON number); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:$|[ T])")


def _date(value: Any) -> date | None:
    """Qlib segment bounds: ``"2010-01-07"``, ``"2010-01-07 00:00:00"`` or ``"20100107"``."""
    if not isinstance(value, str):
        return None
    match = _DATE.match(value.strip())
    if not match:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def _first(record: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` whose value is not None."""
    for name in names:
        value = record.get(name)
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------------ loop metrics
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
            offer(*matched, _float(value))
    for kpi, fields in _KPI_FIELDS.items():
        offer(kpi, _TOP_LEVEL, next((v for v in (_float(record.get(f)) for f in fields) if v is not None), None))
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


# ------------------------------------------------------------------------------ record -> row rules
def _factor_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"],
        "source": r["source"],
        "expression": _text(r.get("expression")),
        "formula_hint": _text(r.get("formula_hint")),
        "description_cn": _text(r.get("description_cn")),
        "tags": r.get("tags"),
        "region": _text(r.get("region")),
        "impl_module": _text(r.get("impl_module")),
        "impl_func": _text(r.get("impl_func")),
        "impl_version": _text(r.get("impl_version")),
        **factor_performance(r),
    }


_SEGMENT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}


def strategy_segments(dataset_config: Any) -> dict[str, date | None]:
    """``train/valid/test`` start and end from a Qlib ``DatasetH`` config; absent parts are None.

    Qlib nests them as ``dataset.kwargs.segments`` (``{"train": [start, end], ...}``); a flattened
    ``dataset.segments`` is accepted as well.
    """
    out: dict[str, date | None] = {f"{seg}_{edge}": None for seg in _SEGMENT_NAMES for edge in ("start", "end")}
    if not isinstance(dataset_config, dict):
        return out
    kwargs = dataset_config.get("kwargs")
    segments = kwargs.get("segments") if isinstance(kwargs, dict) else None
    if not isinstance(segments, dict):
        segments = dataset_config.get("segments")
    if not isinstance(segments, dict):
        return out
    for seg, aliases in _SEGMENT_NAMES.items():
        bounds = _first(segments, *aliases)
        if isinstance(bounds, list) and len(bounds) == 2:
            out[f"{seg}_start"], out[f"{seg}_end"] = _date(bounds[0]), _date(bounds[1])
    return out


def _path(value: Any, *keys: str) -> Any:
    """``value[k1][k2]…`` through nested mappings; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _string_list(value: Any) -> list[str] | None:
    """A list's string items (anything else in it dropped); None unless ``value`` is a list."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else None


def _market(r: dict[str, Any]) -> str | None:
    """The instrument universe (``csi300``): the record's own field, else the Qlib configs' ``instruments``."""
    return next((text for text in (_text(v) for v in (
        r.get("market"), r.get("instruments"), _path(r, "data_config", "instruments"),
        _path(r, "dataset_config", "kwargs", "handler", "kwargs", "instruments"))) if text is not None), None)


def _strategy_row(r: dict[str, Any]) -> dict[str, Any]:
    model_config = r.get("model_config")
    model_class = model_config.get("class") if isinstance(model_config, dict) else None
    return {
        "strategy_id": r["strategy_id"],
        "step_name": _text(r.get("step_name")),
        "action": _text(r.get("action")),
        "workspace_example": r.get("workspace_example"),
        "template_files": r.get("template_files"),
        "data_config": r.get("data_config"),
        "dataset_config": r.get("dataset_config"),
        "portfolio_config": r.get("portfolio_config"),
        "backtest_config": r.get("backtest_config"),
        "model_config": model_config,
        "model_type": _text(model_class),
        **strategy_segments(r.get("dataset_config")),
        "market": _market(r),
        "benchmark": _text(_path(r, "backtest_config", "benchmark")) or _text(r.get("benchmark")),
        "features": _string_list(r.get("feature_list")),
    }


def _loop_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_run_id": r["task_run_id"],
        "loop_id": r["loop_id"],
        "workspace_id": r["workspace_id"],
        "status": _text(r.get("status")),
        "has_result": _bool(r.get("has_result")),
        "decision": _bool(r.get("decision")),
        "factor_names": r.get("factor_names"),
        "strategy_id": _text(r.get("strategy_id")),
        "metrics": r.get("metrics"),
        **normalise_kpis(r),
        "model_run_id": _text(_first(r, "model_run_id", "mlflow_run_id")),
        "factor_impl_version": _text(_first(r, "factor_impl_version", "impl_version")),
        "summary_texts": r.get("summary_texts"),
        "paths": r.get("paths"),
    }


def _model_row(r: dict[str, Any]) -> dict[str, Any]:
    model_config = r.get("model_config")
    model_class = model_config.get("class") if isinstance(model_config, dict) else None
    return {
        "model_id": r["model_id"],
        "task_run_id": _text(r.get("task_run_id")),
        "loop_id": _int(r.get("loop_id")),
        "workspace_id": _text(r.get("workspace_id")),
        "model_type": _text(_first(r, "model_type") or model_class),
        "model_config": model_config,
        "dataset_config": r.get("dataset_config"),
        "feature_schema": r.get("feature_schema"),
        "model_artifacts": r.get("model_artifacts"),
        **strategy_segments(r.get("dataset_config")),
        "market": _market(r),
        "features": _string_list(r.get("flattened_feature_list")) or _string_list(_path(r, "feature_schema", "feature")),
    }


def _alpha158_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"],
        "expression": _text(r.get("expression")),
        "source": _text(r.get("source")),
        "region": _text(r.get("region")),
        "tags": r.get("tags"),
    }


def _artifact_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "artifact_id": r["artifact_id"],
        "task_run_id": r["task_run_id"],
        "loop_id": r["loop_id"],
        "workspace_id": _text(r.get("workspace_id")),
        "type": _text(r.get("artifact_type")),
        "name": _text(r.get("name")),
        "status": _text(r.get("status")),
        "primary_flag": _bool(r.get("primary_flag")),
        "entry_path": _text(r.get("entry_path")),
        "summary": r.get("summary"),
        "files": r.get("files"),
    }


def _task_run_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_run_id": r["task_run_id"], "scenario": _text(r.get("scenario")), "status": _text(r.get("status")),
            "created_at_utc": _text(r.get("created_at_utc")), "updated_at_utc": _text(r.get("updated_at_utc"))}


def _run_loop_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_run_id": r["task_run_id"], "loop_id": r["loop_id"], "action": _text(r.get("action")),
            "status": _text(r.get("status")), "has_result": _bool(r.get("has_result")),
            "best_workspace_id": _text(r.get("best_workspace_id")),
            "started_at_utc": _text(r.get("started_at_utc")), "ended_at_utc": _text(r.get("ended_at_utc"))}


def _workspace_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"workspace_id": r["workspace_id"], "task_run_id": _text(r.get("task_run_id")),
            "loop_id": _int(r.get("loop_id")), "workspace_role": _text(r.get("workspace_role")),
            "experiment_type": _text(r.get("experiment_type")), "step_name": _text(r.get("step_name")),
            "status": _text(r.get("status")), "workspace_path": _text(r.get("workspace_path"))}


@dataclass(frozen=True)
class _Spec:
    table: Table
    key: tuple[str, ...]
    derive: Callable[[dict[str, Any]], dict[str, Any]]
    lock_id: int


_SPECS: dict[str, _Spec] = {
    "factors": _Spec(rs.factor_registry, ("name", "source"), _factor_row, 1),
    "strategies": _Spec(rs.strategy_registry, ("strategy_id",), _strategy_row, 2),
    "loops": _Spec(rs.loop_result, ("task_run_id", "loop_id", "workspace_id"), _loop_row, 3),
    "models": _Spec(rs.model_registry, ("model_id",), _model_row, 4),
    "alpha158": _Spec(rs.alpha158_meta, ("name",), _alpha158_row, 5),
    LOOP_ARTIFACTS: _Spec(rs.loop_artifacts, ("artifact_id",), _artifact_row, 6),
    "task_runs": _Spec(rs.task_run_registry, ("task_run_id",), _task_run_row, 7),
    "run_loops": _Spec(rs.loop_registry, ("task_run_id", "loop_id"), _run_loop_row, 8),
    "workspaces": _Spec(rs.workspace_registry, ("workspace_id",), _workspace_row, 9),
}


def registry_table(kind: str) -> Table:
    """The table a sync kind writes (``"factors"`` -> ``rdagent.factor_registry``, ...)."""
    return _SPECS[kind].table


# ------------------------------------------------------------------------------------- the upsert
Key = tuple[Any, ...]


@dataclass
class _Counts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deactivated: int = 0
    reactivated: int = 0


def merge_duplicates(spec_kind: str, records: Iterable[dict[str, Any]]) -> tuple[dict[Key, dict[str, Any]], int]:
    """Rows keyed by the table key; for a repeated key the last record wins (see module docstring).

    Returns the rows (in order of each key's first appearance) and how many records were dropped.
    """
    spec = _SPECS[spec_kind]
    rows: dict[Key, dict[str, Any]] = {}
    received = 0
    for record in records:
        received += 1
        raw = sanitize_json(record)
        row = {column: sanitize_json(value) for column, value in spec.derive(raw).items()}
        row["raw"] = raw
        rows[tuple(row[k] for k in spec.key)] = row
    return rows, received - len(rows)


def _apply(
    conn: Connection,
    spec: _Spec,
    rows: dict[Key, dict[str, Any]],
    *,
    now: datetime,
    generated_at_utc: str | None,
    scope: ColumnElement[bool],
) -> _Counts:
    """Upsert ``rows`` and deactivate the active rows within ``scope`` that are not among them.

    The whole table is read (registries hold thousands of rows, not millions) so that a received row
    stored outside ``scope`` — an artifact now reported under another loop — counts as an update.
    """
    table = spec.table
    key_cols = [table.c[k] for k in spec.key]
    content = [c.name for c in table.columns if c.name not in rs.TRACKING_COLUMNS]
    has_generated = "catalog_generated_at_utc" in table.c

    stored: dict[Key, tuple[dict[str, Any], bool, bool]] = {}
    query = select(*(table.c[c] for c in content), table.c.active, scope.label("in_scope"))
    for row in conn.execute(query).mappings():
        stored[tuple(row[k] for k in spec.key)] = ({c: row[c] for c in content}, row["active"], row["in_scope"])

    counts = _Counts()
    writes: list[dict[str, Any]] = []
    for key, row in rows.items():
        previous = stored.get(key)
        if previous is None:
            counts.inserted += 1
        elif previous[0] == row and previous[1]:
            counts.unchanged += 1
            continue
        else:
            counts.updated += 1
            counts.reactivated += not previous[1]
        tracking = {"active": True, "first_seen_at": now, "changed_at": now, "last_seen_at": now,
                    "deactivated_at": None}
        if has_generated:
            tracking["catalog_generated_at_utc"] = generated_at_utc
        writes.append({**row, **tracking})

    if writes:
        stmt = pg_insert(table)
        refreshed = {c: stmt.excluded[c] for c in writes[0] if c not in spec.key and c != "first_seen_at"}
        conn.execute(stmt.on_conflict_do_update(index_elements=key_cols, set_=refreshed), writes)

    absent = [key for key, (_, active, in_scope) in stored.items() if active and in_scope and key not in rows]
    for start in range(0, len(absent), _KEYS_PER_STATEMENT):  # stay far below PostgreSQL's 65535 binds
        conn.execute(
            update(table)
            .where(table.c.active, tuple_(*key_cols).in_(absent[start:start + _KEYS_PER_STATEMENT]))
            .values(active=False, deactivated_at=now)
        )
    counts.deactivated = len(absent)

    # After the deactivation the active rows in scope are exactly the ones just received.
    seen: dict[str, Any] = {"last_seen_at": now}
    if has_generated:
        seen["catalog_generated_at_utc"] = generated_at_utc
    conn.execute(update(table).where(scope, table.c.active, table.c.last_seen_at < now).values(**seen))
    return counts


def _write_state(conn: Connection, stats: SyncStats, *, now: datetime, envelope: dict[str, Any] | None) -> None:
    values = {
        "kind": stats.kind,
        "published": stats.published,
        "fingerprint": stats.fingerprint,
        "generated_at_utc": stats.generated_at_utc,
        "record_count": stats.records,
        "envelope": sanitize_json(envelope) if envelope is not None else None,
        "stats": stats.as_dict(),
        "last_synced_at": now,
        "last_published_at": now if stats.published else None,
    }
    stmt = pg_insert(rs.sync_state).values(**values)
    refreshed = {c: stmt.excluded[c] for c in values if c not in ("kind", "last_published_at")}
    if stats.published:
        refreshed["last_published_at"] = stmt.excluded.last_published_at
    else:  # keep what was last published, and when
        for column in ("generated_at_utc", "envelope", "record_count"):
            refreshed.pop(column)
    conn.execute(stmt.on_conflict_do_update(index_elements=[rs.sync_state.c.kind], set_=refreshed))


def _db_detail(exc: SQLAlchemyError) -> str:
    """The driver's message (first line), never SQLAlchemy's rendering with bound parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else type(exc).__name__).strip().splitlines()
    return f"{type(orig or exc).__name__}: {text[0] if text else ''}"[:_DETAIL_CHARS]


def _transaction(engine: Engine, kind: str, work: Callable[[Connection, datetime], T]) -> T:
    """Run ``work`` in one transaction holding the kind's advisory lock; errors roll everything back."""
    try:
        rs.ensure_registry_schema(engine)
        with engine.begin() as conn:
            conn.execute(select(func.pg_advisory_xact_lock(rs.ADVISORY_LOCK_CLASS, _SPECS[kind].lock_id)))
            now = conn.execute(select(func.now())).scalar_one()  # one timestamp for the whole sync
            return work(conn, now)
    except SQLAlchemyError as exc:
        raise SyncError(
            kind,
            f"sync of {kind} failed in the database ({_db_detail(exc)}); the transaction was rolled back "
            f"and {registry_table(kind).fullname} keeps its previous rows",
        ) from exc


def _fetch_failed(kind: str, exc: ResultsApiError) -> SyncError:
    return SyncError(
        kind,
        f"sync of {kind} failed while fetching ({exc}); nothing was written, "
        f"{registry_table(kind).fullname} keeps its previous rows",
    )


# ------------------------------------------------------------------------------------- public API
def sync_catalog(engine: Engine, client: RDAgentResultsClient, kind: CatalogName) -> SyncStats:
    """Fetch one catalog and mirror it into its registry table in a single transaction."""
    if kind not in CATALOGS:
        raise ValueError(f"unknown catalog {kind!r}; expected one of {', '.join(CATALOGS)}")
    spec = _SPECS[kind]
    try:
        response = _fetch_envelope(client, kind)
    except ResultsApiError as exc:
        raise _fetch_failed(kind, exc) from exc

    if response is None:
        stats = SyncStats(kind=kind, published=False, fingerprint=NOT_PUBLISHED)

        def record_absence(conn: Connection, now: datetime) -> SyncStats:
            _write_state(conn, stats, now=now, envelope=None)
            return stats

        log.warning("RD-Agent %s catalog is not published (404); registry rows left as they were", kind)
        return _transaction(engine, kind, record_absence)

    if isinstance(response, Alpha158Meta):
        records = [factor.model_dump() for factor in response.factors]
        envelope = response.model_dump(exclude={"factors", "sha256", "generated_at_utc"})
    else:
        records = response.records
        envelope = {"version": response.version, "source": response.source, **response.envelope_extra}
    rows, duplicates = merge_duplicates(kind, records)

    def write(conn: Connection, now: datetime) -> SyncStats:
        counts = _apply(conn, spec, rows, now=now, generated_at_utc=response.generated_at_utc, scope=true())
        stats = SyncStats(
            kind=kind,
            published=True,
            fingerprint=catalog_fingerprint(response),
            generated_at_utc=response.generated_at_utc,
            records=len(records),
            duplicates_merged=duplicates,
            **asdict(counts),
        )
        _write_state(conn, stats, now=now, envelope=envelope)
        return stats

    stats = _transaction(engine, kind, write)
    log.info("RD-Agent %s synced: %s", kind, {k: v for k, v in stats.as_dict().items() if isinstance(v, int)})
    return stats


def active_loops(engine: Engine) -> list[tuple[str, int]]:
    """Distinct ``(task_run_id, loop_id)`` of the active ``loop_result`` rows, sorted."""
    rs.ensure_registry_schema(engine)
    t = rs.loop_result
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.c.task_run_id, t.c.loop_id).where(t.c.active).distinct().order_by(t.c.task_run_id, t.c.loop_id)
        ).all()
    return [(row.task_run_id, row.loop_id) for row in rows]


def sync_loop_artifacts(
    engine: Engine,
    client: RDAgentResultsClient,
    loops: Sequence[tuple[str, int]] | None = None,
) -> SyncStats:
    """Fetch ``/loops/{task_run_id}/{loop_id}/artifacts`` per loop and mirror them into ``loop_artifacts``.

    ``loops=None`` means every active loop of ``loop_result`` (a full sync: artifacts of loops that are
    no longer active are deactivated too); an explicit list only touches those loops' artifacts. All
    loops are fetched before the single transaction starts; one failing loop fails the whole sync.
    """
    full = loops is None
    try:
        wanted = active_loops(engine) if loops is None else list(dict.fromkeys(loops))
    except SQLAlchemyError as exc:
        raise SyncError(LOOP_ARTIFACTS, f"could not read the active loops ({_db_detail(exc)}); nothing was "
                                        "fetched or written") from exc
    for task_run_id, loop_id in wanted:
        if not isinstance(task_run_id, str) or isinstance(loop_id, bool) or not isinstance(loop_id, int):
            raise SyncError(
                LOOP_ARTIFACTS,
                f"loop ids must be (str task_run_id, int loop_id), got ({task_run_id!r}, {loop_id!r}); "
                "nothing was fetched or written",
            )

    records: list[dict[str, Any]] = []
    digests: list[str] = []
    for task_run_id, loop_id in wanted:
        try:
            answer = client.fetch_loop_artifacts(task_run_id, loop_id)
        except ResultsApiError as exc:
            raise _fetch_failed(LOOP_ARTIFACTS, exc) from exc
        if (answer.task_run_id, answer.loop_id) != (task_run_id, loop_id):
            raise SyncError(
                LOOP_ARTIFACTS,
                f"artifacts asked for loop ({task_run_id}, {loop_id}) came back labelled "
                f"({answer.task_run_id}, {answer.loop_id}); nothing was written — check the results API",
            )
        digests.append(artifacts_digest(task_run_id, loop_id, answer.sha256))
        for artifact in answer.artifacts:
            records.append({**artifact.model_dump(), "task_run_id": task_run_id, "loop_id": loop_id})

    rows, duplicates = merge_duplicates(LOOP_ARTIFACTS, records)
    fingerprint = artifacts_fingerprint(digests)
    t = rs.loop_artifacts
    if full:
        scope: ColumnElement[bool] = true()
    elif wanted:
        scope = tuple_(t.c.task_run_id, t.c.loop_id).in_(wanted)
    else:
        scope = false()

    def write(conn: Connection, now: datetime) -> SyncStats:
        counts = _apply(conn, _SPECS[LOOP_ARTIFACTS], rows, now=now, generated_at_utc=None, scope=scope)
        stats = SyncStats(
            kind=LOOP_ARTIFACTS,
            published=True,
            fingerprint=fingerprint,
            records=len(records),
            duplicates_merged=duplicates,
            **asdict(counts),
        )
        _write_state(conn, stats, now=now, envelope={"loops": len(wanted), "full": full})
        return stats

    return _transaction(engine, LOOP_ARTIFACTS, write)


def run_registry_fingerprint(response: RunRegistryResponse | None) -> str:
    """``sha256:<hex of the body>``, or :data:`NOT_OFFERED` for ``None``."""
    return NOT_OFFERED if response is None else f"sha256:{response.sha256}"


def sync_run_registry(engine: Engine, client: RDAgentResultsClient, kind: str) -> SyncStats:
    """Mirror one registry listing (``task_runs``, ``run_loops``, ``workspaces``) into its table.

    A server that does not offer the endpoint (404) is normal: the state says ``published = false``
    (fingerprint ``not-offered``), the table is left as it was, nothing fails.
    """
    if kind not in RUN_REGISTRY_ENDPOINTS:
        raise ValueError(f"unknown registry listing {kind!r}; expected one of {', '.join(RUN_REGISTRY_KINDS)}")
    endpoint = RUN_REGISTRY_ENDPOINTS[kind]
    try:
        response = client.fetch_run_registry(endpoint)
    except ResultsApiError as exc:
        raise _fetch_failed(kind, exc) from exc
    if response is None:
        log.info("RD-Agent results API does not offer /%s (404); %s left as it was", endpoint, kind)
    rows, duplicates = merge_duplicates(kind, response.records if response is not None else [])

    def write(conn: Connection, now: datetime) -> SyncStats:
        counts = _Counts() if response is None else _apply(
            conn, _SPECS[kind], rows, now=now, generated_at_utc=None, scope=true())
        stats = SyncStats(kind=kind, published=response is not None, fingerprint=run_registry_fingerprint(response),
                          records=0 if response is None else len(response.records), duplicates_merged=duplicates,
                          **asdict(counts))
        _write_state(conn, stats, now=now, envelope=None if response is None else {"endpoint": f"/{endpoint}"})
        return stats

    return _transaction(engine, kind, write)


def sync_all(engine: Engine, client: RDAgentResultsClient, kinds: Iterable[str] | None = None) -> dict[str, SyncStats]:
    """Sync several kinds (default: every catalog, then loop artifacts), each in its own transaction.

    A failing kind does not stop the others (their commits stand), except that once the server is
    unreachable the remaining kinds are not attempted; the committed results and every error are then
    raised together as :class:`SyncAllError`.
    """
    selected = set(SYNC_KINDS if kinds is None else kinds)
    unknown = selected - set(SYNC_KINDS)
    if unknown:
        raise ValueError(f"unknown sync kinds {sorted(unknown)}; expected some of {', '.join(SYNC_KINDS)}")
    results: dict[str, SyncStats] = {}
    errors: dict[str, SyncError] = {}
    unreachable: SyncError | None = None
    for kind in SYNC_KINDS:
        if kind not in selected:
            continue
        if unreachable is not None:
            errors[kind] = SyncError(kind, f"sync of {kind} not attempted: the results API was unreachable "
                                           f"during the {unreachable.kind} sync")
            continue
        try:
            if kind == LOOP_ARTIFACTS:
                results[kind] = sync_loop_artifacts(engine, client)
            elif kind in RUN_REGISTRY_ENDPOINTS:
                results[kind] = sync_run_registry(engine, client, kind)
            else:
                results[kind] = sync_catalog(engine, client, kind)  # type: ignore[arg-type]
        except SyncError as exc:
            log.error("RD-Agent sync of %s failed: %s", kind, exc)
            errors[kind] = exc
            if isinstance(exc.__cause__, ResultsApiUnavailable):
                unreachable = exc
    if errors:
        raise SyncAllError(results, errors)
    return results

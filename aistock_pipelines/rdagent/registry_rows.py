"""Catalog records to registry rows: the derived columns of each kind, its table, key and lock id."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Table

from aistock_pipelines.rdagent import registry_schema as rs
from aistock_pipelines.rdagent.json_values import JsonTooDeep, sanitize_json
from aistock_pipelines.rdagent.kpis import factor_performance, normalise_kpis
from aistock_pipelines.rdagent.record_values import (
    as_bool,
    as_date,
    as_int,
    as_text,
    at_path,
    first_present,
    string_list,
)
from aistock_pipelines.rdagent.sync_types import LOOP_ARTIFACTS

#: A row's key: the values of its table's key columns, in order.
Key = tuple[Any, ...]


def _factor_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"],
        "source": r["source"],
        "expression": as_text(r.get("expression")),
        "formula_hint": as_text(r.get("formula_hint")),
        "description_cn": as_text(r.get("description_cn")),
        "tags": r.get("tags"),
        "region": as_text(r.get("region")),
        "impl_module": as_text(r.get("impl_module")),
        "impl_func": as_text(r.get("impl_func")),
        "impl_version": as_text(r.get("impl_version")),
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
        bounds = first_present(segments, *aliases)
        if isinstance(bounds, list) and len(bounds) == 2:
            out[f"{seg}_start"], out[f"{seg}_end"] = as_date(bounds[0]), as_date(bounds[1])
    return out


def _market(r: dict[str, Any]) -> str | None:
    """The instrument universe (``csi300``): the record's own field, else the Qlib configs' ``instruments``."""
    return next((text for text in (as_text(v) for v in (
        r.get("market"), r.get("instruments"), at_path(r, "data_config", "instruments"),
        at_path(r, "dataset_config", "kwargs", "handler", "kwargs", "instruments"))) if text is not None), None)


def _strategy_row(r: dict[str, Any]) -> dict[str, Any]:
    model_config = r.get("model_config")
    model_class = model_config.get("class") if isinstance(model_config, dict) else None
    return {
        "strategy_id": r["strategy_id"],
        "step_name": as_text(r.get("step_name")),
        "action": as_text(r.get("action")),
        "workspace_example": r.get("workspace_example"),
        "template_files": r.get("template_files"),
        "data_config": r.get("data_config"),
        "dataset_config": r.get("dataset_config"),
        "portfolio_config": r.get("portfolio_config"),
        "backtest_config": r.get("backtest_config"),
        "model_config": model_config,
        "model_type": as_text(model_class),
        **strategy_segments(r.get("dataset_config")),
        "market": _market(r),
        "benchmark": as_text(at_path(r, "backtest_config", "benchmark")) or as_text(r.get("benchmark")),
        "features": string_list(r.get("feature_list")),
    }


def _loop_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_run_id": r["task_run_id"],
        "loop_id": r["loop_id"],
        "workspace_id": r["workspace_id"],
        "status": as_text(r.get("status")),
        "has_result": as_bool(r.get("has_result")),
        "decision": as_bool(r.get("decision")),
        "factor_names": r.get("factor_names"),
        "strategy_id": as_text(r.get("strategy_id")),
        "metrics": r.get("metrics"),
        **normalise_kpis(r),
        "model_run_id": as_text(first_present(r, "model_run_id", "mlflow_run_id")),
        "factor_impl_version": as_text(first_present(r, "factor_impl_version", "impl_version")),
        "summary_texts": r.get("summary_texts"),
        "paths": r.get("paths"),
    }


def _model_row(r: dict[str, Any]) -> dict[str, Any]:
    model_config = r.get("model_config")
    model_class = model_config.get("class") if isinstance(model_config, dict) else None
    return {
        "model_id": r["model_id"],
        "task_run_id": as_text(r.get("task_run_id")),
        "loop_id": as_int(r.get("loop_id")),
        "workspace_id": as_text(r.get("workspace_id")),
        "model_type": as_text(first_present(r, "model_type") or model_class),
        "model_config": model_config,
        "dataset_config": r.get("dataset_config"),
        "feature_schema": r.get("feature_schema"),
        "model_artifacts": r.get("model_artifacts"),
        **strategy_segments(r.get("dataset_config")),
        "market": _market(r),
        "features": string_list(r.get("flattened_feature_list")) or string_list(at_path(r, "feature_schema", "feature")),
    }


def _alpha158_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"],
        "expression": as_text(r.get("expression")),
        "source": as_text(r.get("source")),
        "region": as_text(r.get("region")),
        "tags": r.get("tags"),
    }


def _artifact_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "artifact_id": r["artifact_id"],
        "task_run_id": r["task_run_id"],
        "loop_id": r["loop_id"],
        "workspace_id": as_text(r.get("workspace_id")),
        "type": as_text(r.get("artifact_type")),
        "name": as_text(r.get("name")),
        "status": as_text(r.get("status")),
        "primary_flag": as_bool(r.get("primary_flag")),
        "entry_path": as_text(r.get("entry_path")),
        "summary": r.get("summary"),
        "files": r.get("files"),
    }


def _task_run_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_run_id": r["task_run_id"], "scenario": as_text(r.get("scenario")),
            "status": as_text(r.get("status")),
            "created_at_utc": as_text(r.get("created_at_utc")), "updated_at_utc": as_text(r.get("updated_at_utc"))}


def _run_loop_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_run_id": r["task_run_id"], "loop_id": r["loop_id"], "action": as_text(r.get("action")),
            "status": as_text(r.get("status")), "has_result": as_bool(r.get("has_result")),
            "best_workspace_id": as_text(r.get("best_workspace_id")),
            "started_at_utc": as_text(r.get("started_at_utc")), "ended_at_utc": as_text(r.get("ended_at_utc"))}


def _workspace_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"workspace_id": r["workspace_id"], "task_run_id": as_text(r.get("task_run_id")),
            "loop_id": as_int(r.get("loop_id")), "workspace_role": as_text(r.get("workspace_role")),
            "experiment_type": as_text(r.get("experiment_type")), "step_name": as_text(r.get("step_name")),
            "status": as_text(r.get("status")), "workspace_path": as_text(r.get("workspace_path"))}


@dataclass(frozen=True)
class RowSpec:
    """How one sync kind's records become rows: its table, key columns, derivation and advisory lock id."""

    table: Table
    key: tuple[str, ...]
    derive: Callable[[dict[str, Any]], dict[str, Any]]
    lock_id: int


ROW_SPECS: dict[str, RowSpec] = {
    "factors": RowSpec(rs.factor_registry, ("name", "source"), _factor_row, 1),
    "strategies": RowSpec(rs.strategy_registry, ("strategy_id",), _strategy_row, 2),
    "loops": RowSpec(rs.loop_result, ("task_run_id", "loop_id", "workspace_id"), _loop_row, 3),
    "models": RowSpec(rs.model_registry, ("model_id",), _model_row, 4),
    "alpha158": RowSpec(rs.alpha158_meta, ("name",), _alpha158_row, 5),
    LOOP_ARTIFACTS: RowSpec(rs.loop_artifacts, ("artifact_id",), _artifact_row, 6),
    "task_runs": RowSpec(rs.task_run_registry, ("task_run_id",), _task_run_row, 7),
    "run_loops": RowSpec(rs.loop_registry, ("task_run_id", "loop_id"), _run_loop_row, 8),
    "workspaces": RowSpec(rs.workspace_registry, ("workspace_id",), _workspace_row, 9),
}


def registry_table(kind: str) -> Table:
    """The table a sync kind writes (``"factors"`` -> ``rdagent.factor_registry``, ...)."""
    return ROW_SPECS[kind].table


def merge_duplicates(spec_kind: str, records: Iterable[dict[str, Any]]) -> tuple[dict[Key, dict[str, Any]], int]:
    """Rows keyed by the table key; for a repeated key the last record wins (the rule and why:
    :mod:`aistock_pipelines.rdagent.sync`).

    Returns the rows (in order of each key's first appearance) and how many records were dropped.
    """
    spec = ROW_SPECS[spec_kind]
    rows: dict[Key, dict[str, Any]] = {}
    received = 0
    for record in records:
        received += 1
        key, row = keyed_row(spec, record, received)
        rows[key] = row
    return rows, received - len(rows)


def keyed_row(spec: RowSpec, record: dict[str, Any], number: int) -> tuple[Key, dict[str, Any]]:
    """The table row of one received record (sanitised, derived columns added) and its key.

    Raises :class:`JsonTooDeep` naming the record's position when it is nested beyond the limit.
    """
    try:
        raw = sanitize_json(record)
    except JsonTooDeep as exc:
        raise JsonTooDeep(f"record {number} is {exc}") from None
    row = spec.derive(raw)  # parts of the sanitised record, or finite scalars derived from it
    row["raw"] = raw
    return tuple(row[k] for k in spec.key), row

"""Pydantic models for what the RD-Agent results API returns.

Validation is deliberately minimal: only what the sync relies on to key and route a record is checked,
everything else is kept as is (``extra="allow"``), because RD-Agent adds fields between versions and a
new optional field must never break the sync. What *is* checked is strict enough that a record we
store can always be keyed (factor ``name``+``source``, ``strategy_id``, loop
``(task_run_id, loop_id, workspace_id)``, ``model_id``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

CatalogKind = Literal["factors", "strategies", "loops", "models"]
CATALOG_KINDS: tuple[CatalogKind, ...] = ("factors", "strategies", "loops", "models")


def _task_run_id_to_str(value: Any) -> Any:
    """Run ids are uuid hex or timestamps; an all-digit one may have been written as a JSON number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _reject_bool(value: Any) -> Any:
    """Pydantic's lax int accepts ``true`` as 1; a boolean loop id is a broken record, not loop 1."""
    if isinstance(value, bool):
        raise ValueError("loop_id must be an integer, not a boolean")
    return value


TaskRunId = Annotated[StrictStr, BeforeValidator(_task_run_id_to_str)]
LoopId = Annotated[int, BeforeValidator(_reject_bool)]


class _Open(BaseModel):
    """Base: unknown fields are kept, values are not mutated."""

    model_config = ConfigDict(extra="allow")


class FactorRecord(_Open):
    name: StrictStr = Field(min_length=1)
    source: StrictStr = Field(min_length=1)


class StrategyRecord(_Open):
    strategy_id: StrictStr = Field(min_length=1)


class LoopRecord(_Open):
    task_run_id: TaskRunId = Field(min_length=1)
    loop_id: LoopId
    workspace_id: StrictStr = Field(min_length=1)


class ModelRecord(_Open):
    model_id: StrictStr = Field(min_length=1)


class _Envelope(_Open):
    """``{"version", "generated_at_utc", "source", <list key>: [...]}`` as RD-Agent's exporters write it.

    ``source`` is optional: the sync does not need it, and failing a whole catalog over it would be
    out of proportion.
    """

    version: StrictStr
    generated_at_utc: StrictStr
    source: StrictStr | None = None


class FactorCatalog(_Envelope):
    factors: list[FactorRecord]


class StrategyCatalog(_Envelope):
    strategies: list[StrategyRecord]


class LoopCatalog(_Envelope):
    loops: list[LoopRecord]


class ModelCatalog(_Envelope):
    models: list[ModelRecord]


#: kind -> (envelope model, name of its list key)
ENVELOPES: dict[CatalogKind, tuple[type[_Envelope], str]] = {
    "factors": (FactorCatalog, "factors"),
    "strategies": (StrategyCatalog, "strategies"),
    "loops": (LoopCatalog, "loops"),
    "models": (ModelCatalog, "models"),
}


class CatalogResponse(BaseModel):
    """One fetched catalog: envelope fields, validated records as plain dicts, and a fingerprint.

    ``sha256`` is over the exact response body bytes, so two fetches of an unchanged catalog compare
    equal; ``generated_at_utc`` changes on every RD-Agent re-export even when the content does not.
    """

    model_config = ConfigDict(frozen=True)

    kind: CatalogKind
    url: str
    version: str
    generated_at_utc: str
    source: str | None
    records: list[dict[str, Any]]
    sha256: str
    size_bytes: int
    envelope_extra: dict[str, Any] = Field(default_factory=dict)


class Alpha158Factor(_Open):
    name: StrictStr = Field(min_length=1)
    expression: StrictStr


class Alpha158Meta(_Open):
    """``/alpha158/meta``; ``sha256`` is filled in by the client from the body bytes."""

    version: StrictStr
    generated_at_utc: StrictStr
    source: StrictStr | None = None
    config_path: StrictStr | None = None
    factors: list[Alpha158Factor]
    sha256: str = ""


class ArtifactFile(_Open):
    file_id: StrictStr
    path: StrictStr
    sha256: str | None = None
    size_bytes: int | None = None
    mtime_utc: str | None = None
    kind: str | None = None


class LoopArtifact(_Open):
    artifact_id: StrictStr
    artifact_type: str | None = None
    name: str | None = None
    status: str | None = None
    primary_flag: bool = False
    entry_path: str | None = None
    summary: Any = Field(default_factory=dict)
    files: list[ArtifactFile] = Field(default_factory=list)


class LoopArtifacts(_Open):
    """``/loops/{task_run_id}/{loop_id}/artifacts``; ``sha256`` is filled in by the client."""

    task_run_id: TaskRunId
    loop_id: LoopId
    artifacts: list[LoopArtifact]
    sha256: str = ""


# ---------------------------------------------------------------- /task_runs, /loops, /workspaces
#: The Phase 2 design's registry listings (registry.sqlite's own tables). Not served by the real API today;
#: their body shape is not fixed either: a list of records, or an object holding it under the endpoint's
#: name or ``items``.
RunRegistryEndpoint = Literal["task_runs", "loops", "workspaces"]


class TaskRunRecord(_Open):
    task_run_id: TaskRunId = Field(min_length=1)


class RunLoopRecord(_Open):
    task_run_id: TaskRunId = Field(min_length=1)
    loop_id: LoopId


class WorkspaceRecord(_Open):
    workspace_id: StrictStr = Field(min_length=1)


RUN_REGISTRY_RECORDS: dict[str, type[_Open]] = {
    "task_runs": TaskRunRecord,
    "loops": RunLoopRecord,
    "workspaces": WorkspaceRecord,
}


class RunRegistryResponse(BaseModel):
    """One fetched registry listing: validated records as plain dicts and the body's sha256."""

    model_config = ConfigDict(frozen=True)

    endpoint: RunRegistryEndpoint
    url: str
    records: list[dict[str, Any]]
    sha256: str

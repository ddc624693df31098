"""The sync's vocabulary: what can be synced, what a sync reports, how it fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from aistock_pipelines.rdagent.catalog_models import RunRegistryEndpoint

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

#: How much of an error's text a sync message or a poll error may quote.
DETAIL_CHARS = 300


class SyncError(Exception):
    """A sync failed; nothing of it was committed (the message says why and what to check)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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

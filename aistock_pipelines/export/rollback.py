"""Rollback: make a snapshot's live version equal to one of its releases, so that exports continue from it.

Under the snapshot's writer locks (as an export holds them), after the release's bytes are verified
against its manifest:

1. a new version folder (:meth:`SnapshotVersions.begin`) of hard links to the release's files — the
   release's ``meta.json`` rewritten as a new file: ``replaces`` names the version it replaces and
   ``last_export`` says ``rollback``, so the next export recycles no older version's bins (it writes them
   anew); the export after it recycles this version's folder, whose files the release also holds (two
   links each), so it writes those anew too (an incremental export extends only one-link files);
2. swapped in with the writer's own atomic swap: a reader that resolved the old path keeps complete files,
   as after an export (the replaced version stays until the next export deletes it);
3. ``market.qlib_export_meta`` set to the rows the release recorded (the same export id as its
   ``meta.json``), so the next incremental export trusts them and re-reads exactly the instruments whose
   history changed since the release (restatements, corrections) besides the new days.

A crash before the swap leaves the live version as it was (the half-made folder has no ``meta.json`` and
is deleted by the next writer); a crash between the swap and the meta rows leaves rows whose export id
differs from ``meta.json``'s, which the next export trusts for nothing: it re-reads every instrument.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from aistock_pipelines.export.release_document import OWN_FILES
from aistock_pipelines.export.release_files import link_tree
from aistock_pipelines.export.releases import Release, ReleaseError, ReleaseStore
from aistock_pipelines.export.snapshot_lock import DEFAULT_WAIT_S
from aistock_pipelines.export.versions import remove_tree


@dataclass(frozen=True)
class RollbackResult:
    """The live path, the version folder made, the one it replaced, the release and the meta rows restored
    (None: the release recorded none, so the next export re-reads every instrument)."""

    path: Path
    version: Path
    replaced: str | None
    release: Release
    meta_rows: int | None
    seconds: float


def rollback(store: ReleaseStore, snapshot_id: str, name: str, lock_wait: float = DEFAULT_WAIT_S) -> RollbackResult:
    """Make the live version of ``snapshot_id`` equal to release ``name`` (module docstring)."""
    started = time.perf_counter()
    versions = store.versions
    with store.locked(snapshot_id, lock_wait) as meta_repo:
        release = _verified(store, snapshot_id, name)
        begun = versions.begin(snapshot_id)
        replaced = versions.current_name(snapshot_id)
        try:
            link_tree(release.path, begun.path, exclude=OWN_FILES | {"meta.json"}, hash_files=False)
            _write_meta(begun.path, _rolled_back_meta(release, replaced))
        except BaseException:
            versions.discard(snapshot_id, begun)
            raise
        versions.swap(snapshot_id, begun.path)
        states = release.meta_states()
        if states is None:
            meta_repo.delete(snapshot_id)
        else:
            meta_repo.replace(snapshot_id, states)
        for stale in begun.stale:  # as an export does: the versions before the one just replaced
            remove_tree(stale, workers=2)
    return RollbackResult(versions.path(snapshot_id), begun.path, replaced, release,
                          None if states is None else len(states), time.perf_counter() - started)


def _verified(store: ReleaseStore, snapshot_id: str, name: str) -> Release:
    """The release, its bytes checked against its manifest: a release that differs is not rolled back to."""
    release = store.get(snapshot_id, name)
    checked = store.verify(snapshot_id, name)
    if not checked.ok:
        more = f" (and {len(checked.problems) - 5} more)" if len(checked.problems) > 5 else ""
        raise ReleaseError(f"release {name} of {snapshot_id} differs from its manifest, so it is not rolled back "
                           f"to: {'; '.join(checked.problems[:5])}{more}; `aistock-pipelines snapshots verify "
                           f"{snapshot_id} {name}` lists every difference")
    return release


def _write_meta(version: Path, meta: dict) -> None:
    """The version's ``meta.json``, complete or absent (a version without one is a killed run's leftover)."""
    partial = version / "meta.json.partial"
    partial.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(partial, version / "meta.json")


def _rolled_back_meta(release: Release, replaced: str | None) -> dict:
    """The release's ``meta.json`` as the new version's: the same export (id, rows, sha256), with its
    lineage — what it replaces and that it is a rollback."""
    meta = json.loads((release.path / "meta.json").read_text())
    meta["replaces"] = replaced
    meta["last_export"] = {"mode": "rollback", "release": release.name, "restated": [], "rows_added": 0,
                           "rows_rewritten": 0, "rows_read": 0, "applied": "",
                           "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "exported_as": meta.get("last_export")}
    return meta

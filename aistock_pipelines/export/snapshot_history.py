"""A snapshot's history: its version folders on disk (the live one, the one it replaced) and its releases,
each with its date range, rows, instruments, restated instruments, sha256 and when it was made."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from aistock_pipelines.export.releases import ReleaseStore


@dataclass(frozen=True)
class HistoryEntry:
    """One version or release. ``kind``: ``live``, ``version`` (a complete folder under ``.versions``, not
    live) or ``release``; ``made``: when the export (or rollback, or release) made it; ``mode``: how the
    version was made (full, incremental, rebuild, rollback)."""

    kind: str
    name: str
    start: str
    end: str
    rows: int
    instruments: int
    restated: list[str]
    sha256: str
    made: str
    mode: str
    export_id: str
    version: str
    keep: bool = False
    path: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def history(store: ReleaseStore, snapshot_id: str) -> list[HistoryEntry]:
    """Every version folder and release of ``snapshot_id``, oldest first."""
    live = store.versions.current_name(snapshot_id)
    entries = []
    for folder in store.versions.version_folders(snapshot_id):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # being written, or a killed run's leftover
        entries.append(_entry("live" if folder.name == live else "version", folder.name, meta, str(folder),
                              made=_made(meta)))
    for r in store.list(snapshot_id):
        meta = {"start": r.doc["database"]["start"], "end": r.doc["database"]["end"],
                "row_count": r.doc["database"]["rows"], "instrument_count": r.doc["database"]["instruments"],
                "daily_pv_sha256": r.doc["daily_pv_sha256"], "export_id": r.export_id,
                "last_export": r.doc.get("last_export") or {}}
        notes = [] if r.doc.get("meta_rows") else ["no meta rows recorded: after a rollback the next export re-reads "
                                                   "every instrument"]
        entries.append(_entry("release", r.name, meta, str(r.path), made=r.created_at, version=r.doc["version"],
                              keep=r.keep, notes=notes))
    return sorted(entries, key=lambda e: (e.made, e.kind != "release"))


def _made(meta: dict) -> str:
    rollback = meta.get("last_export", {})
    return rollback.get("at") or meta.get("as_of", "")


def _entry(kind: str, name: str, meta: dict, path: str, *, made: str, version: str | None = None,
           keep: bool = False, notes: list[str] | None = None) -> HistoryEntry:
    last = meta.get("last_export") or {}
    mode = last.get("mode", "")
    if mode == "rollback":
        mode = f"rollback to {last.get('release')}"
    return HistoryEntry(kind, name, meta.get("start", ""), meta.get("end", ""), int(meta.get("row_count") or 0),
                        int(meta.get("instrument_count") or 0), list(last.get("restated") or []),
                        meta.get("daily_pv_sha256", ""), made, mode, meta.get("export_id", ""),
                        version or name, keep, path, notes or [])

"""What a release records about itself: ``MANIFEST`` (sha256 and size of every file) and ``release.json``
(the snapshot, the version and export that made it, the declaration, the database range and as-of time,
what it holds beside the stocks, the code version, the version's ``market.qlib_export_meta`` rows for a
rollback, the bytes the release added on disk, and the sha256 of ``MANIFEST``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path

from aistock_pipelines.export.meta_repo import InstrumentState, MetaRepo
from aistock_pipelines.export.qlib_bins import folder_name
from aistock_pipelines.export.release_files import LinkedTree, manifest_text

DOCUMENT = "release.json"
MANIFEST = "MANIFEST"
#: A release's own files, beside the version's.
OWN_FILES = frozenset({DOCUMENT, MANIFEST})
#: The meta repo's columns a release keeps per instrument (with the snapshot id and freq, a row).
META_COLUMNS = ["ts_code", "first_datetime", "last_datetime", "rows", "checksum", "export_id"]


def meta_rows(meta_repo: MetaRepo, snapshot_id: str, meta: dict) -> dict | None:
    """The version's rows of ``market.qlib_export_meta``, if they are that version's (the same export id);
    a rollback restores them so the next incremental export trusts them."""
    states = meta_repo.load(snapshot_id)
    if not states or any(s.export_id != meta["export_id"] for s in states.values()):
        return None
    rows = [[s.ts_code, s.first_datetime.isoformat(), s.last_datetime.isoformat(), s.rows, s.checksum, s.export_id]
            for s in sorted(states.values(), key=lambda s: s.ts_code)]
    return {"table": "market.qlib_export_meta", "freq": "1d", "columns": META_COLUMNS, "rows": rows}


def meta_states(doc: dict) -> list[InstrumentState] | None:
    """The meta rows a ``release.json`` recorded (None: none recorded)."""
    rows = doc.get("meta_rows")
    if rows is None:
        return None
    return [InstrumentState(code, date.fromisoformat(first), date.fromisoformat(last), int(n), checksum, export_id)
            for code, first, last, n, checksum, export_id in rows["rows"]]


def contents(version: Path, files: dict) -> dict:
    """What the version holds beside the stocks' data: its universe files (``instruments/<name>.txt``) and
    benchmark bins (the feature folders of no instrument in ``all.txt``)."""
    universes = sorted(rel.removeprefix("instruments/").removesuffix(".txt") for rel in files
                       if rel.startswith("instruments/") and rel.endswith(".txt") and rel != "instruments/all.txt")
    lines = (version / "instruments" / "all.txt").read_text().splitlines()
    stocks = {folder_name(line.split("\t", 1)[0]) for line in lines if line}
    folders = {rel.split("/", 2)[1] for rel in files if rel.startswith("features/")}
    return {"instruments": len(stocks), "universes": universes, "benchmarks": sorted(folders - stocks)}


def document(snapshot_id: str, name: str, version: Path, meta: dict, rows: dict | None,
             declaration: dict | None, held: dict) -> dict:
    """``release.json`` but for what :func:`write_release_files` adds (the manifest's summary, bytes)."""
    return {
        "format": 1, "snapshot_id": snapshot_id, "release": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "version": version.name, "export_id": meta["export_id"], "daily_pv_sha256": meta["daily_pv_sha256"],
        "database": {"start": meta["start"], "end": meta["end"], "as_of": meta.get("as_of"),
                     "calendar_days": meta.get("calendar_days"), "rows": meta.get("row_count"),
                     "instruments": meta.get("instrument_count")},
        "declaration": {"declaration_hash": meta.get("declaration_hash"), "start": meta["start"],
                        "universe": meta.get("universe"), "options": meta.get("options"),
                        "mapping": meta.get("mapping"), "declared": declaration},
        "contents": held, "last_export": meta.get("last_export"), "replaces": meta.get("replaces"),
        "code_version": code_version(), "meta_rows": rows,
    }


def write_release_files(folder: Path, doc: dict, linked: LinkedTree, started: float) -> None:
    """Write ``MANIFEST``, then ``release.json`` with the manifest's summary and the bytes the release adds:
    its folders and copies, plus these two files (their blocks, from their lengths: the numbers' few digits
    never move a file by a block)."""
    text = manifest_text(linked.files)
    block = os.statvfs(folder).f_frsize
    blocks = lambda n: -(-n // block) * block  # noqa: E731 - the size on disk of n bytes
    doc["manifest"] = {"file": MANIFEST, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "files": len(linked.files), "bytes": sum(e.size for e in linked.files.values())}
    doc["copied"] = linked.copied
    doc["bytes_added"] = 0
    doc["seconds"] = round(time.perf_counter() - started, 3)
    doc["bytes_added"] = linked.bytes_added + blocks(len(text)) + blocks(len(json.dumps(doc, indent=1)) + 16)
    for name, content in ((MANIFEST, text), (DOCUMENT, json.dumps(doc, indent=1))):
        with open(folder / name, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The code that made a release: the package version and, in a git checkout, its commit."""
    from aistock_pipelines import __version__

    commit = None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
        commit = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": __version__, "git_commit": commit, "python": sys.version.split()[0]}

"""Releases: named, immutable versions of a snapshot that a study can cite.

Layout under ``AISTOCK_SNAPSHOT_ROOT``::

    releases/<id>/<release>/                a version's files, hard-linked, plus MANIFEST and release.json
    releases/<id>/.keep/<release>           marks a release retention keeps
    releases/<id>/.partial-<release>-<pid>/ a release being made; a killed run leaves it, the next one deletes it

A release is made under the snapshot's writer locks, as an export holds them (:func:`snapshot_lock.writer_locks`:
no export swaps or recycles the version meanwhile, on any host), in a folder of its own that is renamed into
place only once it is complete: a crash never leaves a half-made release under a release's name, and never
touches the live snapshot or another release. It holds every file of the version — ``daily_pv.h5``, bins,
calendars, ``all.txt`` and the universe files, the benchmark bins, the RD-Agent folders, ``meta.json`` — and
its bytes never change afterwards (:mod:`release_files`); :meth:`ReleaseStore.verify` recomputes them.
``MANIFEST`` and ``release.json``: :mod:`release_document`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sqlalchemy.engine import Engine

from aistock_pipelines.export.meta_repo import InstrumentState, MetaRepo
from aistock_pipelines.export.release_document import (DOCUMENT, MANIFEST, OWN_FILES, contents, document, meta_rows,
                                                       meta_states, write_release_files)
from aistock_pipelines.export.release_files import (LARGE, FileEntry, compare_manifests, link_tree, manifest_of,
                                                    parse_manifest)
from aistock_pipelines.export.snapshot_lock import DEFAULT_WAIT_S, writer_locks
from aistock_pipelines.export.snapshot_shape import SnapshotError, check_snapshot_id
from aistock_pipelines.export.versions import SnapshotVersions, remove_tree

RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LIVE = "live"


class ReleaseError(SnapshotError):
    """A release cannot be made, found, verified or rolled back to; the message says why and what to do."""


def check_release_name(name: str) -> str:
    """A release name is a folder name: refuse anything else (a path, '..', 'live', a version's '@')."""
    if not RELEASE_NAME.match(name or "") or name == LIVE or name.endswith("."):
        raise ReleaseError(f"release name {name!r} is not allowed: use 1–100 letters, digits, '.', '_' or '-', "
                           f"starting with a letter or digit (not {LIVE!r}); it becomes a folder name")
    return name


@dataclass(frozen=True)
class Release:
    """A release on disk: its folder and its manifest document (``release.json``)."""

    snapshot_id: str
    name: str
    path: Path
    doc: dict
    keep: bool

    @property
    def created_at(self) -> str:
        return self.doc["created_at"]

    @property
    def export_id(self) -> str:
        return self.doc["export_id"]

    def manifest(self) -> dict[str, FileEntry]:
        """The files of the version as the release recorded them (``MANIFEST``)."""
        return parse_manifest((self.path / MANIFEST).read_text())

    def meta_states(self) -> list[InstrumentState] | None:
        """The ``market.qlib_export_meta`` rows of the released version (None: not recorded)."""
        return meta_states(self.doc)


@dataclass(frozen=True)
class ReleaseResult:
    """What :meth:`ReleaseStore.create` did: the release, whether it was made now (False: the live version
    had been released under that name already), the releases retention deleted, and its seconds."""

    release: Release
    created: bool
    deleted: list[str]
    seconds: float


@dataclass(frozen=True)
class Verification:
    """A release's files recomputed against its manifest: every difference, one line each."""

    release: Release
    problems: list[str]
    files: int
    bytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


class ReleaseStore:
    """The releases of the snapshots under ``snapshot_root``. Reading them needs only the folder; making,
    pruning and rolling back take the writer locks and the meta rows in the AIstock database ``engine``."""

    def __init__(self, snapshot_root: Path, engine: Engine | None = None):
        self.versions = SnapshotVersions(snapshot_root)
        self.root = Path(snapshot_root) / "releases"
        self.engine = engine
        self.meta = MetaRepo(engine) if engine is not None else None

    @contextmanager
    def locked(self, snapshot_id: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[MetaRepo]:
        """Hold the snapshot's writer locks (waiting up to ``wait_s`` for an export); yields the meta repo."""
        if self.meta is None:
            raise ReleaseError("making, pruning or rolling back releases takes the snapshot's writer lock in the "
                               "AIstock database: open the ReleaseStore with the database engine")
        with writer_locks(self.engine, self.versions, snapshot_id, wait_s=wait_s):
            yield self.meta

    def folder(self, snapshot_id: str) -> Path:
        return self.root / check_snapshot_id(snapshot_id)

    def path(self, snapshot_id: str, name: str) -> Path:
        return self.folder(snapshot_id) / check_release_name(name)

    def list(self, snapshot_id: str) -> list[Release]:
        """The snapshot's releases, oldest first."""
        folder = self.folder(snapshot_id)
        if not folder.is_dir():
            return []
        found = [self._load(snapshot_id, p) for p in folder.iterdir()
                 if RELEASE_NAME.match(p.name) and (p / DOCUMENT).is_file()]
        return sorted(found, key=lambda r: (r.created_at, r.name))

    def get(self, snapshot_id: str, name: str) -> Release:
        path = self.path(snapshot_id, name)
        if not (path / DOCUMENT).is_file():
            names = [r.name for r in self.list(snapshot_id)]
            raise ReleaseError(f"snapshot {snapshot_id} has no release {name!r}; its releases: {names or 'none'} "
                               f"(see `aistock-pipelines snapshots history {snapshot_id}`)")
        return self._load(snapshot_id, path)

    def _load(self, snapshot_id: str, path: Path) -> Release:
        doc = json.loads((path / DOCUMENT).read_text())
        return Release(snapshot_id, path.name, path, doc, (path.parent / ".keep" / path.name).exists())

    def create(self, snapshot_id: str, *, label: str | None = None, keep: bool = False, keep_last: int | None = None,
               declaration: dict | None = None, lock_wait: float = DEFAULT_WAIT_S) -> ReleaseResult:
        """Release the live version of ``snapshot_id`` as ``label`` (default: its last day), mark it ``keep``,
        then apply retention (``keep_last``). ``declaration``: the snapshot's declaration as the snapshots
        file states it (:meth:`SnapshotsFile.declaration_doc`), recorded as is."""
        started = time.perf_counter()
        with self.locked(snapshot_id, lock_wait) as meta_repo:
            version, meta = self._live(snapshot_id)
            folder = self.folder(snapshot_id)
            folder.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(folder)
            name, existing = self._name_for(snapshot_id, meta, version, label)
            if existing is None:
                self._make(snapshot_id, name, version, meta, meta_repo, declaration, started)
            if keep:
                self._mark(snapshot_id, name, True)
            deleted = self._prune(snapshot_id, keep_last) if keep_last else []
        return ReleaseResult(self.get(snapshot_id, name), existing is None, deleted, time.perf_counter() - started)

    def _live(self, snapshot_id: str) -> tuple[Path, dict]:
        """The live version's folder and its ``meta.json`` (read under the lock: no swap in between)."""
        meta = self.versions.read_meta(snapshot_id)
        if meta is None:
            raise ReleaseError(f"snapshot {snapshot_id} has no exported version under {self.versions.root}; "
                               "export it first")
        return self.versions.path(snapshot_id).resolve(), meta

    def _name_for(self, snapshot_id: str, meta: dict, version: Path, label: str | None) -> tuple[str, Release | None]:
        """The new release's name, or an existing release of this very version under that name."""
        candidates = [check_release_name(label)] if label else [meta["end"]] + [f"{meta['end']}.{n}" for n in range(2, 1000)]
        for name in candidates:
            if not (self.folder(snapshot_id) / name).exists():
                return name, None
            existing = self.get(snapshot_id, name)
            if existing.export_id == meta["export_id"] and existing.doc["version"] == version.name:
                return name, existing
        raise ReleaseError(f"release {candidates[-1]!r} of snapshot {snapshot_id} exists and holds another version "
                           f"(export {self.get(snapshot_id, candidates[-1]).export_id}); choose another label")

    def _make(self, snapshot_id: str, name: str, version: Path, meta: dict, meta_repo: MetaRepo,
              declaration: dict | None, started: float) -> Release:
        """Link and hash the version into a partial folder, write the manifest, rename it into place."""
        partial = self.folder(snapshot_id) / f".partial-{name}-{os.getpid()}"
        try:
            linked = link_tree(version, partial, known=self._known(snapshot_id, version))
            h5 = linked.files.get("daily_pv.h5")
            if h5 is None or h5.sha256 != meta["daily_pv_sha256"]:
                raise ReleaseError(f"the live daily_pv.h5 of {snapshot_id} does not match the sha256 its export "
                                   "recorded in meta.json: it was changed after the export; re-export the snapshot "
                                   "(a full export) and release again")
            doc = document(snapshot_id, name, version, meta, meta_rows(meta_repo, snapshot_id, meta), declaration,
                           contents(version, linked.files))
            write_release_files(partial, doc, linked, started)
            os.rename(partial, self.folder(snapshot_id) / name)
        except BaseException:
            remove_tree(partial, workers=2)
            raise
        return self.get(snapshot_id, name)

    def _known(self, snapshot_id: str, version: Path) -> dict[str, tuple[int, FileEntry]]:
        """The large files (inode, entry) of the newest release of this version: one still linked to the
        same inode needs no second hashing (small ones cost a read either way)."""
        same = [r for r in self.list(snapshot_id) if r.doc.get("version") == version.name]
        if not same:
            return {}
        release, known = same[-1], {}
        base = str(release.path)
        for rel, entry in release.manifest().items():
            if entry.size < LARGE:
                continue
            try:
                known[rel] = (os.stat(os.path.join(base, rel)).st_ino, entry)
            except OSError:
                pass
        return known

    def verify(self, snapshot_id: str, name: str) -> Verification:
        """Recompute the release's manifest from its bytes and compare it with the recorded one."""
        started = time.perf_counter()
        release = self.get(snapshot_id, name)
        actual = manifest_of(release.path, OWN_FILES)
        problems = compare_manifests(release.manifest(), actual)
        recorded = release.doc["manifest"]["sha256"]
        if hashlib.sha256((release.path / MANIFEST).read_bytes()).hexdigest() != recorded:
            problems.append(f"{MANIFEST} differs from the sha256 release.json recorded ({recorded[:12]}…)")
        return Verification(release, problems, len(actual), sum(e.size for e in actual.values()),
                            time.perf_counter() - started)

    def set_keep(self, snapshot_id: str, name: str, keep: bool = True) -> Release:
        """Mark (or unmark) a release retention keeps; the release's own files are not touched."""
        self.get(snapshot_id, name)
        self._mark(snapshot_id, name, keep)
        return self.get(snapshot_id, name)

    def _mark(self, snapshot_id: str, name: str, keep: bool) -> None:
        mark = self.folder(snapshot_id) / ".keep" / name
        if keep:
            mark.parent.mkdir(exist_ok=True)
            mark.touch()
        else:
            mark.unlink(missing_ok=True)

    def prune(self, snapshot_id: str, keep_last: int, lock_wait: float = DEFAULT_WAIT_S) -> list[str]:
        """Retention: delete the releases older than the newest ``keep_last`` that are not marked keep."""
        with self.locked(snapshot_id, lock_wait):
            return self._prune(snapshot_id, keep_last)

    def _prune(self, snapshot_id: str, keep_last: int) -> list[str]:
        if keep_last < 1:
            raise ReleaseError(f"keep_last must be at least 1, got {keep_last}")
        releases = self.list(snapshot_id)
        doomed = [r for r in releases[:max(len(releases) - keep_last, 0)] if not r.keep]
        for r in doomed:
            self.delete(r)
        return [r.name for r in doomed]

    def delete(self, release: Release) -> None:
        """Delete one release: its name disappears in one rename, then its links (the inodes stay wherever
        another name holds them: the live snapshot, another release)."""
        doomed = release.path.parent / f".deleting-{release.name}-{os.getpid()}"
        os.rename(release.path, doomed)
        (release.path.parent / ".keep" / release.name).unlink(missing_ok=True)
        remove_tree(doomed, workers=2)


def _clear_leftovers(folder: Path) -> None:
    """Delete what killed runs left: partial releases and half-deleted ones (never a release: their names
    cannot start with a dot)."""
    for p in folder.iterdir():
        if p.name.startswith((".partial-", ".deleting-")):
            remove_tree(p, workers=2)

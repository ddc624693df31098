"""Version folders of a snapshot: where they live, the writer's lock, the atomic swap and the clean-up.

Layout under ``AISTOCK_SNAPSHOT_ROOT``::

    <id>            -> symlink to .versions/<id>@<stamp>   (what Qlib / RD-Agent are pointed at)
    .versions/<id>@<stamp>/   a complete version (see snapshot_writer)
    .locks/<id>.lock

A new version is built completely beside the current one, then the symlink is replaced with
``os.replace`` (atomic on POSIX): a crash at any point leaves the previous version in place and readable.
The version a swap replaces stays until the next export of the snapshot writes, which deletes it (and any
crash leftovers) beside its own writing: a reader that resolved the old path keeps reading complete files
for a whole cycle. An exclusive ``flock`` keeps two writers off one snapshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Iterator

from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.qlib_bins import BinReuse, recycle
from aistock_pipelines.export.snapshot_shape import SNAPSHOT_ID, SnapshotError, check_snapshot_id


class SnapshotLocked(SnapshotError):
    pass


_STAMP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a UTC stamp, or legacy-<stamp>


@dataclass(frozen=True)
class NewVersion:
    """A version folder being built and the versions it supersedes (listed before it existed)."""

    path: Path
    stale: list[Path]



class SnapshotVersions:
    """The version folders of the snapshots under ``root``."""

    def __init__(self, snapshot_root: Path):
        self.root = Path(snapshot_root)

    def path(self, snapshot_id: str) -> Path:
        return self.root / check_snapshot_id(snapshot_id)

    def exists(self, snapshot_id: str) -> bool:
        return (self.path(snapshot_id) / "meta.json").exists()

    def read_meta(self, snapshot_id: str) -> dict | None:
        meta = self.path(snapshot_id) / "meta.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def list_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if SNAPSHOT_ID.match(p.name) and (p / "meta.json").exists())

    @contextmanager
    def lock(self, snapshot_id: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{check_snapshot_id(snapshot_id)}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SnapshotLocked(f"snapshot {snapshot_id} is being written by another process; retry later") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def version(self, name: str) -> Path:
        """The folder of the version named ``name`` (``<id>@<stamp>``, as ``meta.json``'s ``replaces``)."""
        snapshot_id, at, stamp = name.partition("@")
        if not at or not SNAPSHOT_ID.match(snapshot_id) or not _STAMP.match(stamp):
            raise SnapshotError(f"{name!r} is not a version name (<snapshot id>@<stamp>)")
        return self.root / ".versions" / name

    def version_folders(self, snapshot_id: str) -> list[Path]:
        """Every version folder of ``snapshot_id``, complete or not, oldest first."""
        versions = self.root / ".versions"
        if not versions.exists():
            return []
        return sorted(versions.glob(f"{check_snapshot_id(snapshot_id)}@*"))

    def stale_versions(self, snapshot_id: str) -> list[Path]:
        """Versions of ``snapshot_id`` the current symlink does not point to: the one the last swap replaced
        and a crashed run's leftovers."""
        link = self.path(snapshot_id)
        current = link.resolve() if link.is_symlink() else None
        return [p for p in self.version_folders(snapshot_id) if p.resolve() != current]

    def begin(self, snapshot_id: str) -> NewVersion:
        """The folder of a new version, made now, for files written while the export still reads; a crashed
        run's leftovers (versions never completed: no ``meta.json``) are deleted first. Caller holds
        :meth:`lock`; a failed export deletes its version (:meth:`discard`)."""
        stale = []
        for p in self.stale_versions(snapshot_id):  # listed before the new version exists
            if (p / "meta.json").is_file():
                stale.append(p)
            else:  # a crashed run's leftover: gone before this run writes anything
                remove_tree(p, workers=1)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        version = self.root / ".versions" / f"{snapshot_id}@{stamp}"
        version.mkdir(parents=True)
        return NewVersion(version, stale)

    def discard(self, snapshot_id: str, begun: NewVersion) -> None:
        """Delete a version from :meth:`begin` whose export failed (never the current one)."""
        if self.path(snapshot_id).resolve() != begun.path.resolve():
            remove_tree(begun.path, workers=1)

    def current_name(self, snapshot_id: str) -> str | None:
        """The folder name of the version the snapshot's symlink points at (None: no version yet)."""
        link = self.path(snapshot_id)
        return link.resolve().name if link.is_symlink() else None

    def swap(self, snapshot_id: str, version: Path) -> None:
        """Point the snapshot's symlink at ``version``, atomically."""
        link = self.path(snapshot_id)
        if link.exists() and not link.is_symlink():  # a plain directory from elsewhere: keep it aside
            link.rename(self.root / ".versions" / f"{snapshot_id}@legacy-{version.name.split('@')[1]}")
        tmp = self.root / f".{snapshot_id}.link-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(version.relative_to(self.root))
        os.replace(tmp, link)

    def bin_reuse(self, snapshot_id: str, calendar: list[date], rewrite: set[str], version: NewVersion) -> BinReuse | None:
        """The bins the new ``version`` may extend instead of writing anew: those of the version the current
        one replaced (its predecessor, never the current version's own files, which a reader may hold), when
        the current version was made from it by an incremental export and its calendar is a prefix of
        ``calendar``. Its ``features`` folder is moved into ``version`` now; ``rewrite`` (file names) and the
        instruments the current version restated are written anew."""
        current = self.path(snapshot_id)
        meta = self.read_meta(snapshot_id) if current.is_symlink() else None
        if meta is None or meta.get("last_export", {}).get("mode") != "incremental" or not meta.get("replaces"):
            return None
        previous = self.root / ".versions" / meta["replaces"]
        if previous not in version.stale or not (previous / "meta.json").is_file() or not (previous / "features").is_dir():
            return None
        try:
            old_calendar = qlib_format.read_calendar(previous / "calendars" / "day.txt")
            lines = (previous / "instruments" / "all.txt").read_text().splitlines()
            trusted_before = (previous / "meta.json").stat().st_mtime
        except OSError:
            return None
        if calendar[:len(old_calendar)] != old_calendar:
            return None
        position = {d: i for i, d in enumerate(old_calendar)}
        spans = {}
        for line in lines:
            name, first, last = line.split("\t")
            a, b = position.get(date.fromisoformat(first)), position.get(date.fromisoformat(last))
            if a is not None and b is not None:
                spans[name] = (a, b)
        since = qlib_format.instrument_names(meta["last_export"].get("restated", []), meta["options"]["instruments"])
        recycled = recycle(previous / "features", version.path / "features")
        return BinReuse(spans, recycled, trusted_before, frozenset(rewrite) | frozenset(str(n) for n in since))


def remove_tree(path: Path, workers: int = 4) -> None:
    """``rm -r`` of a version: the per-instrument folders of ``features/`` in a few threads (unlinking is a
    system call per file; the GIL is released meanwhile)."""
    features = path / "features"
    if features.is_dir() and not features.is_symlink():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda d: shutil.rmtree(d, ignore_errors=True), list(os.scandir(features))))
    shutil.rmtree(path, ignore_errors=True)

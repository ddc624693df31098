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
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Iterator

from aistock_pipelines.export import qlib_format
from aistock_pipelines.export.qlib_bins import BinReuse
from aistock_pipelines.export.snapshot_shape import SNAPSHOT_ID, SnapshotError, check_snapshot_id


class SnapshotLocked(SnapshotError):
    pass


@dataclass(frozen=True)
class NewVersion:
    """A version folder being built and the versions it supersedes (listed before it existed)."""

    path: Path
    stale: list[Path]

    def recyclable(self) -> Path | None:
        """The stale version whose ``features`` folder the new version recycles: the newest that has one."""
        return max((p for p in self.stale if (p / "features").is_dir()), default=None)


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

    def stale_versions(self, snapshot_id: str) -> list[Path]:
        """Versions of ``snapshot_id`` the current symlink does not point to: the one the last swap replaced
        and a crashed run's leftovers."""
        versions = self.root / ".versions"
        if not versions.exists():
            return []
        link = self.path(snapshot_id)
        current = link.resolve() if link.is_symlink() else None
        return sorted(p for p in versions.glob(f"{snapshot_id}@*") if p.resolve() != current)

    def begin(self, snapshot_id: str) -> NewVersion:
        """The folder of a new version, made now, for files written while the export still reads. Caller
        holds :meth:`lock`; a version that is never swapped in is a crash leftover, deleted by the next
        writing export."""
        stale = self.stale_versions(snapshot_id)  # listed before the new version exists
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        version = self.root / ".versions" / f"{snapshot_id}@{stamp}"
        version.mkdir(parents=True)
        return NewVersion(version, stale)

    def discard(self, snapshot_id: str, begun: NewVersion) -> None:
        """Delete a version from :meth:`begin` whose export failed (never the current one)."""
        if self.path(snapshot_id).resolve() != begun.path.resolve():
            remove_tree(begun.path, workers=1)

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

    def bin_reuse(self, snapshot_id: str, calendar: list[date], rewrite: set[str],
                  recycle: Path | None) -> BinReuse | None:
        """What the current version offers the next one: its bins and each instrument's calendar span, if
        its calendar is a prefix of the new one (positions then mean the same days); and the folders of
        ``recycle``, a stale version."""
        current = self.path(snapshot_id)
        if not (current.is_symlink() and (current / "features").is_dir()):
            return None
        current = current.resolve()
        try:
            old_calendar = qlib_format.read_calendar(current / "calendars" / "day.txt")
            lines = (current / "instruments" / "all.txt").read_text().splitlines()
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
        return BinReuse(current / "features", spans, rewrite, recycle / "features" if recycle is not None else None)


def remove_tree(path: Path, workers: int = 4) -> None:
    """``rm -r`` of a version: the per-instrument folders of ``features/`` in a few threads (unlinking is a
    system call per file; the GIL is released meanwhile)."""
    features = path / "features"
    if features.is_dir() and not features.is_symlink():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda d: shutil.rmtree(d, ignore_errors=True), list(os.scandir(features))))
    shutil.rmtree(path, ignore_errors=True)

"""The files of a release: a version's folder tree hard-linked (copied where a link is impossible) and
hashed, and the manifest — sha256 and size of every file — recomputed and compared.

A hard link is safe because the snapshot writer never writes into a file another name holds: it extends
only bins with one link (:func:`qlib_bins._extend`) and writes everything else as new files. A release's
links raise every linked inode's link count, so its bytes stay as they were.

Work is per folder (an instrument's bins) in a few threads: linking, reading and hashing are system calls
and ``hashlib`` work on buffers, all without the GIL; large files are hashed in chunks by a thread of their
own, once per inode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from aistock_pipelines.export.stored_snapshot import sha256_file

#: Files at least this large are hashed in chunks by a thread of their own; smaller ones from one read.
LARGE = 1 << 20
#: The first read of a file: a bin's whole content (one value per trading day, 4 bytes each).
_FIRST_READ = 1 << 16
#: A hard link impossible here (another file system, no links, too many links): the file is copied.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest."""

    sha256: str
    size: int

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


@dataclass
class LinkedTree:
    """What :func:`link_tree` made: every file (relative path → entry; empty sha256 when not hashed), the
    files copied instead of linked, and the bytes the new folders and copies take on disk."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    bytes_added: int = 0


def tree_files(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Regular files under ``folder`` by relative folder ('' for the top), ``exclude`` (relative paths) left
    out. Anything but folders and regular files (a symlink, a socket) is refused: a version holds none."""
    found: dict[str, list[str]] = {}
    pending = [""]
    base = str(folder) + os.sep
    while pending:
        rel_dir = pending.pop()
        names = found.setdefault(rel_dir, [])
        prefix = rel_dir + os.sep if rel_dir else ""
        with os.scandir(base + rel_dir) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    pending.append(prefix + e.name)
                elif not e.is_file(follow_symlinks=False):
                    raise OSError(f"{e.path} is not a regular file; a snapshot version holds only folders and files")
                elif not exclude or prefix + e.name not in exclude:
                    names.append(e.name)
        names.sort()
    return found


def link_tree(source: Path, target: Path, *, exclude: frozenset[str] = frozenset(), hash_files: bool = True,
              known: dict[str, tuple[int, FileEntry]] | None = None, workers: int = 3) -> LinkedTree:
    """Make ``target`` (new, or an empty folder) a tree of hard links to every file of ``source`` but
    ``exclude``, and hash each file through its new name. ``known``: relative path → (inode, entry) of
    large files already hashed (an earlier release of the same version); a file linked to that very inode
    takes the entry unread."""
    listing = tree_files(source, exclude)
    out = LinkedTree()
    parents = {os.path.dirname(d) for d in listing if d} | {""}
    for rel_dir in sorted(parents, key=lambda d: (d.count(os.sep), d)):  # parents before children
        made = target / rel_dir if rel_dir else target
        made.mkdir(parents=not rel_dir, exist_ok=not rel_dir)  # the top may exist, empty
        out.bytes_added += os.stat(made).st_blocks * 512
    leaves = frozenset(listing) - parents  # made by their own task (thousands of instrument folders)
    for rel, entry, copied, blocks in _per_folder(listing, str(source), str(target), hash_files, known, workers,
                                                  leaves):
        if rel is None:  # a folder the task made
            out.bytes_added += blocks
            continue
        out.files[rel] = entry
        if copied:
            out.copied.append(rel)
            out.bytes_added += blocks
    out.files = dict(sorted(out.files.items()))
    return out


def manifest_of(folder: Path, exclude: frozenset[str] = frozenset(), workers: int = 3) -> dict[str, FileEntry]:
    """sha256 and size of every file under ``folder`` but ``exclude``, recomputed from the bytes."""
    listing = tree_files(folder, exclude)
    return dict(sorted((rel, entry) for rel, entry, _, _ in _per_folder(listing, None, str(folder), True, None, workers)))


def _per_folder(listing: dict[str, list[str]], source: str | None, target: str, hash_files: bool,
                known: dict[str, tuple[int, FileEntry]] | None, workers: int,
                make: frozenset[str] = frozenset()) -> Iterator[tuple[str | None, FileEntry | None, bool, int]]:
    """(relative path, entry, copied, blocks) of every listed file, by :func:`_folder` — which first makes
    its folder when it is in ``make`` (then also (None, None, False, its blocks)) — in a few large tasks:
    one per folder would hand the GIL between a worker and the collecting thread thousands of times."""
    folders = [(d, names) for d, names in listing.items() if names or d in make]
    tasks = max(1, min(len(folders), workers * 4))
    with _Hasher(hash_files, known or {}) as hasher, ThreadPoolExecutor(workers, thread_name_prefix="release") as pool:
        jobs = [pool.submit(_folders, source, target, folders[i::tasks], hasher, make) for i in range(tasks)]
        for job in jobs:
            for rel, entry, copied, blocks in job.result():
                yield rel, (None if rel is None else hasher.resolve(entry)), copied, blocks


def _folders(source: str | None, target: str, folders: list[tuple[str, list[str]]], hasher: "_Hasher",
             make: frozenset[str]) -> list[tuple[str | None, FileEntry | Future | None, bool, int]]:
    """:func:`_folder` for each of ``folders``, in order."""
    out: list = []
    for rel_dir, names in folders:
        out += _folder(source, target, rel_dir, names, hasher, rel_dir in make)
    return out


class _Hasher:
    """Hashes files for :func:`_folder`: small ones at once, in its thread, from one read; large ones in a
    thread of their own, once per inode (``rdagent/daily_pv.h5`` is the top-level file's second name)."""

    def __init__(self, enabled: bool, known: dict[str, tuple[int, FileEntry]]):
        self.enabled, self.known = enabled, known
        self.large = ThreadPoolExecutor(1, thread_name_prefix="release-large")
        self.by_inode: dict[int, Future] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> "_Hasher":
        return self

    def __exit__(self, *exc) -> None:
        self.large.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def entry(self, rel: str, fd: int, target: str) -> FileEntry | Future:
        """The entry of the file open as ``fd`` (``rel`` under ``target``), or a Future of it. A large file
        still linked to the inode an earlier release hashed (``known``) is not read again."""
        data = _read_small(fd)
        if data is not None:
            return FileEntry(hashlib.sha256(data).hexdigest(), len(data))
        st = os.fstat(fd)
        prior = self.known.get(rel)
        if prior is not None and prior[0] == st.st_ino and prior[1].size == st.st_size:
            return prior[1]
        with self.lock:
            if st.st_ino not in self.by_inode:
                path = os.path.join(target, rel)
                self.by_inode[st.st_ino] = self.large.submit(lambda: FileEntry(sha256_file(path), st.st_size))
            return self.by_inode[st.st_ino]

    @staticmethod
    def resolve(entry: FileEntry | Future) -> FileEntry:
        return entry.result() if isinstance(entry, Future) else entry


def _folder(source: str | None, target: str, rel_dir: str, names: list[str], hasher: _Hasher,
            make: bool) -> list[tuple[str | None, FileEntry | Future | None, bool, int]]:
    """Link (or copy) ``names`` of one folder of ``source`` into ``target`` (no source: only hash) and hash
    them through their names in ``target``; ``make``: make the folder first. Per file: link, open, read,
    close — the system calls are the cost at tens of thousands of bins."""
    out: list = []
    if make:
        os.mkdir(os.path.join(target, rel_dir))
        out.append((None, None, False, os.stat(os.path.join(target, rel_dir)).st_blocks * 512))
    src = os.open(os.path.join(source, rel_dir), os.O_RDONLY | os.O_DIRECTORY) if source is not None else None
    dst = os.open(os.path.join(target, rel_dir), os.O_RDONLY | os.O_DIRECTORY)
    prefix = rel_dir + os.sep if rel_dir else ""
    try:
        for name in names:
            rel = prefix + name
            copied = src is not None and _link_or_copy(src, dst, name, source, target, rel)
            blocks = os.stat(name, dir_fd=dst).st_blocks * 512 if copied else 0
            if not hasher.enabled:
                out.append((rel, FileEntry("", 0), copied, blocks))
                continue
            fd = os.open(name, os.O_RDONLY, dir_fd=dst)
            try:
                out.append((rel, hasher.entry(rel, fd, target), copied, blocks))
            finally:
                os.close(fd)
    finally:
        if src is not None:
            os.close(src)
        os.close(dst)
    return out


def _link_or_copy(src_dir: int, dst_dir: int, name: str, source: str, target: str, rel: str) -> bool:
    """Hard-link ``name``; copy it where this file system cannot link it. True when copied."""
    try:
        os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return False
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    shutil.copyfile(os.path.join(source, rel), os.path.join(target, rel))
    return True


def _read_small(fd: int) -> bytes | None:
    """The whole file open as ``fd`` if it is smaller than :data:`LARGE`, else None. Reads stop at an
    empty read (the end of the file: checked, not assumed)."""
    data = os.read(fd, _FIRST_READ)
    while True:
        more = os.read(fd, _FIRST_READ)
        if not more:
            return data
        data += more
        if len(data) >= LARGE:
            return None


def manifest_text(files: dict[str, FileEntry]) -> str:
    """A manifest as text: one ``<sha256> <size> <path>`` line per file, sorted by path."""
    return "".join(f"{e.sha256} {e.size} {rel}\n" for rel, e in sorted(files.items()))


def parse_manifest(text: str) -> dict[str, FileEntry]:
    files = {}
    for line in text.splitlines():
        digest, size, rel = line.split(" ", 2)
        files[rel] = FileEntry(digest, int(size))
    return files


def compare_manifests(expected: dict[str, FileEntry], actual: dict[str, FileEntry]) -> list[str]:
    """Every difference between a recorded manifest and a recomputed one, one line each."""
    problems = [f"missing: {rel}" for rel in sorted(set(expected) - set(actual))]
    problems += [f"not in the manifest: {rel}" for rel in sorted(set(actual) - set(expected))]
    for rel in sorted(set(expected) & set(actual)):
        want, got = expected[rel], actual[rel]
        if want.size != got.size:
            problems.append(f"size differs: {rel} ({got.size} bytes, {want.size} recorded)")
        elif want.sha256 != got.sha256:
            problems.append(f"sha256 differs: {rel} ({got.sha256[:12]}…, {want.sha256[:12]}… recorded)")
    return problems

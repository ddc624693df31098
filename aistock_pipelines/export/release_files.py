"""The files of a release: a version's folder tree hard-linked (copied where a link is impossible) and
hashed, and the manifest — sha256 and size of every file — recomputed and compared.

A hard link is safe because the snapshot writer never writes into a file another name holds: it extends
only bins with one link (:func:`qlib_bins._extend`) and writes everything else as new files. A release's
links raise every linked inode's link count, so its bytes stay as they were.

The tree is split into shares of folders, one per core: the calling process walks the first
(:func:`release_walk.walk`), worker processes the others, so the per-file system calls and small hashes of
tens of thousands of bins run in parallel without a GIL between them. Large files are hashed in chunks by a
thread of the calling process, once per inode, from the moment they are linked.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from aistock_pipelines.export import release_walk
from aistock_pipelines.export.release_walk import LARGE, UNHASHED, Record, Share
from aistock_pipelines.export.stored_snapshot import sha256_file

__all__ = ["LARGE", "FileEntry", "LinkedTree", "compare_manifests", "link_tree", "manifest_of", "manifest_text",
           "parse_manifest", "tree_files"]

#: Shares (the calling process and worker processes) at most, one per core.
MAX_SHARES = 4
#: Files per share below which a worker process is not worth its start.
MIN_SHARE_FILES = 2000


class FileEntry(NamedTuple):
    """One file of a manifest (a named tuple: tens of thousands are made per release)."""

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
              known: dict[str, tuple[int, FileEntry]] | None = None, shares: int | None = None) -> LinkedTree:
    """Make ``target`` (new, or an empty folder) a tree of hard links to every file of ``source`` but
    ``exclude``, and hash each file through its new name. ``known``: relative path → (inode, entry) of
    large files already hashed (an earlier release of the same version); a file linked to that very inode
    takes the entry unread. ``shares``: processes at most (default: one per core, up to :data:`MAX_SHARES`)."""
    listing = tree_files(source, exclude)
    out = LinkedTree()
    parents = {os.path.dirname(d) for d in listing if d} | {""}
    for rel_dir in sorted(parents, key=lambda d: (d.count(os.sep), d)):  # parents before children
        made = target / rel_dir if rel_dir else target
        made.mkdir(parents=not rel_dir, exist_ok=not rel_dir)  # the top may exist, empty
        out.bytes_added += os.stat(made).st_blocks * 512
    leaves = frozenset(listing) - parents  # made by the share that walks them (thousands of instrument folders)
    records, made = _walk(listing, str(source), str(target), leaves, hash_files, known or {}, shares)
    out.bytes_added += made
    for rel, entry, added in records:
        out.files[rel] = entry
        if added is not None:
            out.copied.append(rel)
            out.bytes_added += added
    return out


def manifest_of(folder: Path, exclude: frozenset[str] = frozenset(), shares: int | None = None) -> dict[str, FileEntry]:
    """sha256 and size of every file under ``folder`` but ``exclude``, recomputed from the bytes."""
    records, _ = _walk(tree_files(folder, exclude), None, str(folder), frozenset(), True, {}, shares)
    return {rel: entry for rel, entry, _ in records}


def _walk(listing: dict[str, list[str]], source: str | None, target: str, make: frozenset[str], hash_files: bool,
          known: dict[str, tuple[int, FileEntry]], shares: int | None) -> tuple[list[tuple[str, FileEntry, int | None]], int]:
    """(relative path, entry, bytes of its copy or None) of every listed file, sorted by path, and the bytes of the
    folders made (``make``): the first share walked here, the others by worker processes meanwhile."""
    first, *others = [Share(source, target, part, make, hash_files) for part in _split(listing, make, shares)]
    workers: list[_Worker] = []
    with _LargeFiles(target, known) as large:
        try:
            for _ in others:
                workers.append(_Worker())
            for worker, share in zip(workers, others):  # every worker started before the first waits to read
                worker.send(share)
            records, made = release_walk.walk(first, large.start)
            for worker in workers:
                more, more_made = worker.result()
                records += more
                made += more_made
        finally:
            for worker in workers:
                worker.stop()
        records.sort()
        return [(rel, large.entry(rel, size, inode) if inode else FileEntry(digest, size), added)
                for rel, digest, size, inode, added in records], made


def _split(listing: dict[str, list[str]], make: frozenset[str], shares: int | None) -> list[list[tuple[str, list[str]]]]:
    """The folders in shares of about as many files each, the top folders first in the first share (the
    calling process's: a large file there starts its hashing at once)."""
    folders = sorted(((d, names) for d, names in listing.items() if names or d in make),
                     key=lambda f: (f[0].count(os.sep), f[0]))
    files = sum(len(names) for _, names in folders)
    most = shares or (min(os.cpu_count() or 1, MAX_SHARES) if sys.executable else 1)
    n = max(1, min(most, files // MIN_SHARE_FILES, len(folders)))
    return [folders[i::n] for i in range(n)]


class _LargeFiles:
    """Hashes large files in a thread of their own, once per inode (``rdagent/daily_pv.h5`` is the top
    file's second name); a file still linked to the inode an earlier release hashed (``known``) is not
    read again."""

    def __init__(self, root: str, known: dict[str, tuple[int, FileEntry]]):
        self.root, self.known = root, known
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="release-large")
        self.by_inode: dict[int, Future] = {}

    def __enter__(self) -> "_LargeFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def _prior(self, rel: str, size: int, inode: int) -> FileEntry | None:
        prior = self.known.get(rel)
        return prior[1] if prior is not None and prior[0] == inode and prior[1].size == size else None

    def start(self, rel: str, size: int, inode: int) -> None:
        """Start hashing ``rel`` unless its inode is hashed already or known."""
        if inode not in self.by_inode and self._prior(rel, size, inode) is None:
            self.by_inode[inode] = self.pool.submit(sha256_file, Path(self.root, rel))

    def entry(self, rel: str, size: int, inode: int) -> FileEntry:
        """The entry of a large file (waiting for its hash)."""
        prior = self._prior(rel, size, inode)
        if prior is not None:
            return prior
        self.start(rel, size, inode)
        return FileEntry(self.by_inode[inode].result(), size)


class _Worker:
    """A worker process walking one share (``python -I -S release_walk.py``: the standard library only)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-I", "-S", release_walk.__file__],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, share: Share) -> None:
        with self.process.stdin as job:
            job.write(pickle.dumps(tuple(share), pickle.HIGHEST_PROTOCOL))

    def result(self) -> tuple[list[Record], int]:
        """The share's records and the bytes of the folders it made; its error raised here."""
        try:
            status, *result = pickle.load(self.process.stdout)
        except EOFError:
            status = None
        code = self.process.wait()
        if status == "error":
            raise result[0]
        if status != "ok" or code != 0:
            raise RuntimeError(f"a worker process linking or hashing release files ended with exit code {code} "
                               "without its result (killed? out of memory?); nothing was released: try again")
        return result[0], result[1]

    def stop(self) -> None:
        """End the process if it still runs (the caller failed first)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        if not self.process.stdin.closed:
            self.process.stdin.close()


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

"""The files of a release: a version's folder tree hard-linked (copied where a link is impossible) and
hashed, and the manifest — sha256 and size of every file — recomputed and compared.

A hard link is safe because the snapshot writer never writes into a file another name holds: it extends
only bins with one link (:func:`qlib_bins._extend`) and writes everything else as new files. A release's
links raise every linked inode's link count, so its bytes stay as they were.

The tree is split into shares of folders, one per core: the calling process walks the first
(:func:`release_walk.walk`), worker processes the others, so the per-file system calls and small hashes of
tens of thousands of bins run in parallel without a GIL between them. Large files are hashed by a worker
process of their own, once per inode, from the moment the first is linked.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from aistock_pipelines.export import release_walk
from aistock_pipelines.export.release_walk import LARGE, Share, Walked

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
    files, copies, made = _walk(source, target, exclude, hash_files, known or {}, shares)
    return LinkedTree(files, sorted(copies), made + sum(copies.values()))


def manifest_of(folder: Path, exclude: frozenset[str] = frozenset(), shares: int | None = None) -> dict[str, FileEntry]:
    """sha256 and size of every file under ``folder`` but ``exclude``, recomputed from the bytes."""
    return _walk(None, folder, exclude, True, {}, shares)[0]


def _walk(source: Path | None, target: Path, exclude: frozenset[str], hash_files: bool,
          known: dict[str, tuple[int, FileEntry]], shares: int | None) -> tuple[dict[str, FileEntry], dict[str, int], int]:
    """The entry of every file (sorted by path), the bytes on disk of each file copied instead of linked, and
    those of the folders made: the tree of ``source`` (None: of ``target``, only hashed) split into shares,
    the first walked here, the others by worker processes meanwhile (started first: they boot while the
    tree is listed)."""
    workers: list[_Worker] = []
    large = _LargeFiles(str(target), known)
    try:
        for _ in range(_most_shares(shares) - 1):
            workers.append(_Worker())
        listing = tree_files(target if source is None else source, exclude)
        made, leaves = (0, frozenset()) if source is None else _make_parents(listing, target)
        first, *others = [Share(None if source is None else str(source), str(target), part, leaves, hash_files)
                          for part in _split(listing, leaves, len(workers) + 1)]
        for worker, share in zip(workers, others):
            worker.send(("walk", *share), last=True)
        for worker in workers[len(others):]:  # a small tree: fewer shares
            worker.stop()
        walked = release_walk.walk(first, large.start)
        files, copies = _entries(walked), dict(walked.copies)  # while the workers finish
        for worker in workers[:len(others)]:
            more = Walked(*worker.result())
            files |= _entries(more)
            copies |= more.copies
            made += more.made
            for rel, (size, inode) in more.large.items():  # the large files only worker processes met
                large.start(rel, size, inode)
        digests = large.finish()
        for rel, (size, inode) in large.found.items():
            files[rel] = large.entry(rel, size, inode, digests)
    finally:
        for worker in workers:
            worker.stop()
        large.stop()
    return {rel: files[rel] for rel in sorted(files)}, copies, made + walked.made  # by key: no tuple per file


def _make_parents(listing: dict[str, list[str]], target: Path) -> tuple[int, frozenset[str]]:
    """Make the folders of ``target`` that hold other folders (the top may exist, empty): their bytes on disk,
    and the other folders, made by the share that walks them (thousands of instrument folders)."""
    parents = {os.path.dirname(d) for d in listing if d} | {""}
    made = 0
    for rel_dir in sorted(parents, key=lambda d: (d.count(os.sep), d)):  # parents before children
        folder = target / rel_dir if rel_dir else target
        folder.mkdir(parents=not rel_dir, exist_ok=not rel_dir)
        made += os.stat(folder).st_blocks * 512
    return made, frozenset(listing) - parents


def _entries(walked: Walked) -> dict[str, FileEntry]:
    """A walk's entries (those of large files are placeholders until hashed)."""
    return {rel: FileEntry(digest, size) for rel, digest, size in zip(walked.rels, walked.digests, walked.sizes)}


def _most_shares(shares: int | None) -> int:
    """Shares at most: ``shares``, or one per core up to :data:`MAX_SHARES` (one without an interpreter to start)."""
    return max(1, shares or (min(os.cpu_count() or 1, MAX_SHARES) if sys.executable else 1))


def _split(listing: dict[str, list[str]], make: frozenset[str], most: int) -> list[list[tuple[str, list[str]]]]:
    """The folders in up to ``most`` shares of about as many files each (none under
    :data:`MIN_SHARE_FILES`), the top folders first in the first share (the calling process's: a large file
    there starts its hashing at once)."""
    folders = sorted(((d, names) for d, names in listing.items() if names or d in make),
                     key=lambda f: (f[0].count(os.sep), f[0]))
    files = sum(len(names) for _, names in folders)
    n = max(1, min(most, files // MIN_SHARE_FILES, len(folders)))
    return [folders[i::n] for i in range(n)]


class _LargeFiles:
    """The sha256 of large files, once per inode (``rdagent/daily_pv.h5`` is the top file's second name), by a
    worker process of their own from the first one linked (a thread here would wait for the GIL behind the
    walk's system calls); a file still linked to the inode an earlier release hashed (``known``) is not read
    again."""

    def __init__(self, root: str, known: dict[str, tuple[int, FileEntry]]):
        self.root, self.known = root, known
        self.found: dict[str, tuple[int, int]] = {}  # relative path → size, inode
        self.inodes: list[int] = []  # sent for hashing, in order
        self.worker: _Worker | None = None

    def _prior(self, rel: str, size: int, inode: int) -> FileEntry | None:
        prior = self.known.get(rel)
        return prior[1] if prior is not None and prior[0] == inode and prior[1].size == size else None

    def start(self, rel: str, size: int, inode: int) -> None:
        """Have ``rel`` hashed unless its inode is sent already or known."""
        self.found[rel] = (size, inode)
        if inode in self.inodes or self._prior(rel, size, inode) is not None:
            return
        if self.worker is None:
            self.worker = _Worker()
            self.worker.send(("hash",))
        self.worker.send(os.path.join(self.root, rel))
        self.inodes.append(inode)

    def finish(self) -> dict[int, str]:
        """The sha256 of every inode sent (waiting for the worker)."""
        return dict(zip(self.inodes, self.worker.result()[0])) if self.worker is not None else {}

    def entry(self, rel: str, size: int, inode: int, digests: dict[int, str]) -> FileEntry:
        """The entry of a large file: the earlier release's, or from ``digests`` (:meth:`finish`)."""
        return self._prior(rel, size, inode) or FileEntry(digests[inode], size)

    def stop(self) -> None:
        """End the worker if it still runs."""
        if self.worker is not None:
            self.worker.stop()


class _Worker:
    """A worker process, ``python -I -S release_walk.py`` (the standard library only): pickled job in
    (:func:`release_walk.main`), one pickled result out."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-I", "-S", release_walk.__file__],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, item: object, *, last: bool = False) -> None:
        """Pickle ``item`` to the worker; ``last``: the job is complete. A worker gone already is reported
        by :meth:`result`."""
        try:
            pickle.dump(item, self.process.stdin, pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        if last:
            self._close_input()

    def _close_input(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # closed all the same
            pass

    def result(self) -> tuple:
        """The job's result; the worker's error raised here."""
        self._close_input()
        try:
            status, *result = pickle.load(self.process.stdout)
        except EOFError:
            status = None
        code = self.process.wait()
        if status == "error":
            raise result[0]
        if status != "ok" or code != 0:
            raise RuntimeError(f"a worker process linking or hashing release files ({sys.executable} "
                               f"{release_walk.__file__}) ended with exit code {code} without its result (killed? "
                               "out of memory?); run the command again")
        return tuple(result)

    def stop(self) -> None:
        """End the process if it still runs (the caller failed first)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self._close_input()


def manifest_text(files: dict[str, FileEntry]) -> str:
    """A manifest as text: one ``<sha256> <size> <path>`` line per file, sorted by path (by key: sorting
    the items would make a tuple per file, and those make the garbage collector walk the whole heap)."""
    lines = []
    for rel in sorted(files):
        digest, size = files[rel]
        lines.append(f"{digest} {size} {rel}\n")
    return "".join(lines)


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

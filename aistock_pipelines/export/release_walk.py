"""One share of a release's files: each folder made, each file hard-linked (copied where this file system
cannot link it) and hashed through its new name — or only hashed, for a verify.

Standard library only, because it also runs as a worker process of its own (``python -I -S
release_walk.py``, :func:`main`: builtins pickled both ways, as the worker imports nothing of the package),
so that the link, open, read and close of tens of thousands of small files run on every core without
handing a GIL back and forth, and a large file is hashed beside them (:func:`hash_paths`).
:mod:`release_files` splits a tree into shares and collects the records.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import sys
from typing import BinaryIO, Callable, NamedTuple

#: Files at least this large are left to the caller (hashed once per inode by :func:`hash_paths`); smaller
#: ones are hashed here from one read.
LARGE = 1 << 20
#: The first read of a file: a bin's whole content (one value per trading day, 4 bytes each).
_FIRST_READ = 1 << 16
#: A hard link impossible here (another file system, no links, too many links): the file is copied.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
#: Reading must not stamp an access time on every inode (a metadata write per file); only the owner may ask.
_NOATIME = getattr(os, "O_NOATIME", 0)
#: The digest of a large file, left to the caller.
UNHASHED = ""


class Share(NamedTuple):
    """A share of a tree: ``folders`` (relative folder, its file names) of ``target``, linked from
    ``source`` (None: only hashed); ``make``: the folders to create first; ``hash_files``: read and hash."""

    source: str | None
    target: str
    folders: list[tuple[str, list[str]]]
    make: frozenset[str]
    hash_files: bool


class Walked(NamedTuple):
    """What a walk found, in columns (no object per file to pickle or to track): each file's relative
    path, sha256 (:data:`UNHASHED` for a large or unhashed file) and size (0 when unread); the large files
    (relative path → size, inode), the files copied instead of linked (relative path → bytes on disk), and
    the bytes on disk of the folders made."""

    rels: list[str]
    digests: list[str]
    sizes: list[int]
    large: dict[str, tuple[int, int]]
    copies: dict[str, int]
    made: int


def walk(share: Share, on_large: Callable[[str, int, int], None] | None = None) -> Walked:
    """Every file of ``share``; ``on_large`` (relative path, size, inode) is told of each large file as
    soon as it is linked."""
    out = Walked([], [], [], {}, {}, 0)
    made = 0
    flags = [os.O_RDONLY | _NOATIME]
    for rel_dir, names in share.folders:
        made += _folder(share, rel_dir, names, out, flags, on_large)
    return out._replace(made=made)


def _folder(share: Share, rel_dir: str, names: list[str], out: Walked, flags: list[int],
            on_large: Callable[[str, int, int], None] | None) -> int:
    """Link (or copy) and hash ``names`` of one folder into ``out``; the folder's bytes on disk if this
    call made it. Per file: link, open, read, read (to see the end), close."""
    target = os.path.join(share.target, rel_dir)
    made = rel_dir in share.make
    if made:
        os.mkdir(target)
    dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    src = os.open(os.path.join(share.source, rel_dir), os.O_RDONLY | os.O_DIRECTORY) if share.source else None
    prefix = rel_dir + os.sep if rel_dir else ""
    try:
        for name in names:
            rel = prefix + name
            if src is not None:
                added = _link_or_copy(src, dst, name, share.source, share.target, rel)
                if added is not None:
                    out.copies[rel] = added
            try:
                digest, size, inode = _hash(dst, name, flags) if share.hash_files else (UNHASHED, 0, 0)
            except OSError as e:
                e.filename = os.path.join(target, name)  # the whole path, not the name in its folder
                raise
            out.rels.append(rel)
            out.digests.append(digest)
            out.sizes.append(size)
            if inode:
                out.large[rel] = (size, inode)
                if on_large is not None:
                    on_large(rel, size, inode)
        return os.fstat(dst).st_blocks * 512 if made else 0
    finally:
        if src is not None:
            os.close(src)
        os.close(dst)


def _link_or_copy(src_dir: int, dst_dir: int, name: str, source: str, target: str, rel: str) -> int | None:
    """Hard-link ``name``; copy it where this file system cannot link it. The copy's bytes on disk (None:
    linked)."""
    try:
        os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return None
    except OSError as e:
        if e.errno not in _NO_LINK:
            e.filename, e.filename2 = os.path.join(source, rel), os.path.join(target, rel)  # whole paths
            raise
    shutil.copyfile(os.path.join(source, rel), os.path.join(target, rel))
    return os.stat(name, dir_fd=dst_dir).st_blocks * 512


def _hash(folder: int, name: str, flags: list[int]) -> tuple[str, int, int]:
    """(sha256, size, 0) of a small file; (:data:`UNHASHED`, size, inode) of a large one. Reads stop at an
    empty read (the end of the file: checked, not assumed). ``flags``: dropped to a plain read-only open
    for good once the no-access-time open is refused (a file of another owner)."""
    try:
        fd = os.open(name, flags[0], dir_fd=folder)
    except PermissionError:
        if flags[0] == os.O_RDONLY:
            raise
        flags[0] = os.O_RDONLY
        fd = os.open(name, flags[0], dir_fd=folder)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) == _FIRST_READ:
            st = os.fstat(fd)
            if st.st_size >= LARGE:
                return UNHASHED, st.st_size, st.st_ino
        while more := os.read(fd, _FIRST_READ):
            data += more
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest(), len(data), 0


def hash_paths(stream: BinaryIO) -> list[str]:
    """The sha256 of each file whose path comes pickled on ``stream``, in order, until the stream ends."""
    digests = []
    while True:
        try:
            path = pickle.load(stream)
        except EOFError:
            return digests
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())


def main() -> None:
    """Worker process: on stdin a pickled job — ``("walk", *share fields)``, or ``("hash",)`` followed by
    paths until the input ends; on stdout the pickled ``("ok", *result)``, or ``("error", exception)`` for
    the caller to raise."""
    stdin = sys.stdin.buffer
    try:
        kind, *fields = pickle.load(stdin)
    except EOFError:  # not needed after all (a small tree)
        return
    try:
        result = ("ok", *walk(Share(*fields))) if kind == "walk" else ("ok", hash_paths(stdin))
    except Exception as e:  # noqa: BLE001 - handed to the caller, which raises it
        result = ("error", e)
    try:
        out = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle: its text
        out = pickle.dumps(("error", RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({e})")))
    sys.stdout.buffer.write(out)


if __name__ == "__main__":
    main()

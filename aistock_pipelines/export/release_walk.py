"""One share of a release's files: each folder made, each file hard-linked (copied where this file system
cannot link it) and hashed through its new name — or only hashed, for a verify.

Standard library only, because it also runs as a worker process of its own (``python -I -S
release_walk.py``: the pickled :class:`Share` fields on stdin, pickled records on stdout: builtins only, as
the worker imports nothing of the package), so that the link, open, read and close of tens of thousands of
small files run on every core without handing a GIL back and forth.
:mod:`release_files` splits a tree into shares and collects the records.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import sys
from typing import Callable, NamedTuple

#: Files at least this large are left to the caller (hashed in chunks, once per inode); smaller ones are
#: hashed here from one read.
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


#: One file: relative path, sha256 (:data:`UNHASHED` for a large or unhashed file), size (0 when unread),
#: inode (of a large file, else 0), bytes on disk of its copy (None: linked).
Record = tuple[str, str, int, int, "int | None"]


def walk(share: Share, on_large: Callable[[str, int, int], None] | None = None) -> tuple[list[Record], int]:
    """The records of every file of ``share`` and the bytes on disk of the folders it made; ``on_large``
    (relative path, size, inode) is told of each large file as soon as it is linked."""
    records: list[Record] = []
    made = 0
    flags = [os.O_RDONLY | _NOATIME]
    for rel_dir, names in share.folders:
        made += _folder(share, rel_dir, names, records, flags, on_large)
    return records, made


def _folder(share: Share, rel_dir: str, names: list[str], records: list[Record], flags: list[int],
            on_large: Callable[[str, int, int], None] | None) -> int:
    """Link (or copy) and hash ``names`` of one folder, appending to ``records``; the folder's bytes on
    disk if this call made it. Per file: link, open, read, read (to see the end), close."""
    target = os.path.join(share.target, rel_dir)
    made = rel_dir in share.make
    if made:
        os.mkdir(target)
    dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    src = os.open(os.path.join(share.source, rel_dir), os.O_RDONLY | os.O_DIRECTORY) if share.source else None
    prefix = rel_dir + os.sep if rel_dir else ""
    try:
        for name in names:
            added = None if src is None else _link_or_copy(src, dst, name, share.source, share.target, prefix + name)
            try:
                digest, size, inode = _hash(dst, name, flags) if share.hash_files else (UNHASHED, 0, 0)
            except OSError as e:
                e.filename = os.path.join(target, name)  # the whole path, not the name in its folder
                raise
            records.append((prefix + name, digest, size, inode, added))
            if inode and on_large is not None:
                on_large(prefix + name, size, inode)
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


def main() -> None:
    """Worker process: the pickled fields of a :class:`Share` on stdin; on stdout the pickled
    ``("ok", records, made)``, or ``("error", exception)`` for the caller to raise."""
    share = Share(*pickle.load(sys.stdin.buffer))
    try:
        result = ("ok", *walk(share))
    except Exception as e:  # noqa: BLE001 - handed to the caller, which raises it
        result = ("error", e)
    try:
        out = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle: its text
        out = pickle.dumps(("error", RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({e})")))
    sys.stdout.buffer.write(out)


if __name__ == "__main__":
    main()

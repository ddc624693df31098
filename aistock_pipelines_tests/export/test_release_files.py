"""A release's files on real folders: linked and hashed by the calling process and worker processes alike,
large files once per inode, copies where a link is impossible, refusals and workers' errors named."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from aistock_pipelines.export import release_files
from aistock_pipelines.export.release_files import LARGE, MIN_SHARE_FILES, FileEntry, link_tree, manifest_of

#: Sizes around the reads' edges: empty, a bin, one first read exactly and one byte more, just small, large.
EDGE_SIZES = [0, 6004, 1 << 16, (1 << 16) + 1, LARGE - 1]


def make_tree(root: Path) -> dict[str, bytes]:
    """A version-like tree — a large file with a second name, edge sizes, enough bins for two shares, an
    empty folder — and every file's bytes by relative path."""
    rng = random.Random(7)
    content = {"daily_pv.h5": rng.randbytes(LARGE + 12345)}
    content |= {f"calendars/edge{size}.txt": rng.randbytes(size) for size in EDGE_SIZES}
    for i in range(2 * MIN_SHARE_FILES // 20 + 10):
        content |= {f"features/sh{600000 + i}/f{j}.day.bin": rng.randbytes(4 * (i % 50)) for j in range(20)}
    for rel, data in content.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "rdagent").mkdir()
    os.link(root / "daily_pv.h5", root / "rdagent" / "daily_pv.h5")
    content["rdagent/daily_pv.h5"] = content["daily_pv.h5"]
    (root / "empty").mkdir()
    return content


def expected(content: dict[str, bytes]) -> dict[str, FileEntry]:
    return {rel: FileEntry(hashlib.sha256(data).hexdigest(), len(data)) for rel, data in sorted(content.items())}


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, bytes]]:
    return tmp_path / "src", make_tree(tmp_path / "src")


def test_every_file_is_linked_and_hashed_through_the_shares(tree, tmp_path):
    """Two shares (this process and a worker process) make the same manifest as one, equal to hashlib's
    digest of every file's bytes, of hard links to the very inodes, without stamping their access times."""
    src, content = tree
    assert len(release_files._split(release_files.tree_files(src), frozenset(), 2)) == 2
    small = [rel for rel, data in content.items() if len(data) < LARGE]
    atimes = {rel: os.stat(src / rel).st_atime_ns for rel in small}
    linked = link_tree(src, tmp_path / "two", shares=2)
    assert list(linked.files) == sorted(content) and linked.files == expected(content)
    assert all(os.stat(tmp_path / "two" / rel).st_ino == os.stat(src / rel).st_ino for rel in content)
    assert linked.copied == [] and (tmp_path / "two" / "empty").is_dir()
    folders = {os.path.dirname(rel) for rel in content} | {"", "features", "empty"}
    assert linked.bytes_added == sum(os.stat(tmp_path / "two" / d).st_blocks * 512 for d in folders)
    assert {rel: os.stat(src / rel).st_atime_ns for rel in small} == atimes, "reads stamp no access time"
    one = link_tree(src, tmp_path / "one", shares=1)
    assert one.files == linked.files and one.bytes_added == linked.bytes_added
    assert manifest_of(tmp_path / "two", shares=2) == linked.files == manifest_of(tmp_path / "one", shares=1)
    only = link_tree(src, tmp_path / "links", hash_files=False, shares=2)
    assert only.files == {rel: FileEntry("", 0) for rel in sorted(content)}
    assert os.stat(tmp_path / "links" / "daily_pv.h5").st_nlink == 8, "two names in the source and each tree"


def test_a_large_file_known_by_inode_is_not_read_again(tree, tmp_path):
    """``known`` (an earlier release's entry) stands for a large file linked to that very inode — shown
    here by an entry no reading could give; its other name and a changed size are hashed."""
    src, content = tree
    inode, size = os.stat(src / "daily_pv.h5").st_ino, len(content["daily_pv.h5"])
    claimed = FileEntry("0" * 64, size)
    linked = link_tree(src, tmp_path / "a", known={"daily_pv.h5": (inode, claimed)}, shares=2)
    assert linked.files["daily_pv.h5"] == claimed
    assert linked.files["rdagent/daily_pv.h5"] == expected(content)["daily_pv.h5"]
    other = link_tree(src, tmp_path / "b", known={"daily_pv.h5": (inode, FileEntry("0" * 64, size - 1))})
    assert other.files["daily_pv.h5"] == expected(content)["daily_pv.h5"]


def test_files_are_copied_where_this_file_system_cannot_link_them(tree, tmp_path):
    """A target on another file system (/dev/shm): every file copied, its bytes counted as added."""
    src, content = tree
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    target = shm / f"aistock-release-test-{os.getpid()}"
    try:
        copied = link_tree(src, target, shares=2)
        assert copied.files == expected(content) and copied.copied == sorted(content)
        assert all(os.stat(target / rel).st_ino != os.stat(src / rel).st_ino for rel in content)
        assert copied.bytes_added >= sum(len(data) for data in content.values())
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_refusals_and_a_worker_process_error_name_the_path(tree, tmp_path, monkeypatch):
    """A file gone between the listing and its link (the listing is given one more name in a worker
    process's share: the race, staged), raised here from the worker, names both paths. A symlink in a
    version is refused."""
    src, _ = tree
    listing = release_files.tree_files(src)
    leaves = frozenset(listing) - {os.path.dirname(d) for d in listing if d} - {""}
    worker_folder = next(d for d, _ in release_files._split(listing, leaves, 2)[1] if d.startswith("features/"))
    listing[worker_folder].append("gone.day.bin")
    monkeypatch.setattr(release_files, "tree_files", lambda folder, exclude: listing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{src / worker_folder}/gone.day.bin' -> "
                                                          f"'{tmp_path / 'dst' / worker_folder}/gone.day.bin")):
        link_tree(src, tmp_path / "dst", shares=2)
    monkeypatch.undo()
    (src / "calendars" / "link.txt").symlink_to(src / "calendars" / "edge0.txt")
    with pytest.raises(OSError, match="link.txt is not a regular file"):
        link_tree(src, tmp_path / "other")


def test_a_worker_process_that_ends_without_its_result_fails_the_walk(tree, tmp_path, monkeypatch):
    """A worker process that ends without a result (here an interpreter that exits at once) fails the walk,
    naming what it ran — never a manifest short of that share."""
    src, _ = tree
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(RuntimeError, match=r"/false .*release_walk\.py\) ended with exit code 1 without its result"):
        link_tree(src, tmp_path / "dst", shares=2)

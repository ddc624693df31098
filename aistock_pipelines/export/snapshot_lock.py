"""One writer per snapshot across hosts: a PostgreSQL advisory lock keyed by the snapshot id.

``SnapshotWriter.lock`` (``flock``) keeps two processes of one host off a snapshot, but ``flock`` does not
hold across hosts and is unreliable on many network file systems, and Dagster's pools only order the runs
Dagster itself launches. Every writer of a snapshot reads the same AIstock database, so a session-level
advisory lock there serialises writers wherever they run. It is taken on a connection of its own (a
pooled connection would carry the lock into unrelated work), held for the whole export and released by
unlocking — or by the server when the connection closes, so a crashed or killed writer never leaves it
behind. A second writer waits (``wait_s``) and logs who holds the lock; past the wait it fails naming the
holder (host, pid, since when), which is also what ``pg_stat_activity`` shows an operator.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

from aistock_pipelines.db import libpq_url
from aistock_pipelines.export.snapshot_shape import check_snapshot_id
from aistock_pipelines.export.versions import SnapshotLocked, SnapshotVersions

log = logging.getLogger(__name__)

#: First int4 of the two-argument advisory lock ("SNAP" in ASCII); the second is :func:`lock_key`.
LOCK_CLASS = 0x534E4150
#: How long a second writer waits before giving up: longer than a full export of the whole A-share history.
DEFAULT_WAIT_S = 900.0
#: The holder's own description, shown to waiting writers and in ``pg_stat_activity.application_name``.
APPLICATION_PREFIX = "aistock writer"


class SnapshotWriteLockTimeout(SnapshotLocked):
    """Another writer held the snapshot for longer than the wait; the message names it."""


def lock_key(snapshot_id: str) -> int:
    """The lock's second int4: the first four bytes of the id's sha256 (stable across hosts and versions)."""
    return int.from_bytes(hashlib.sha256(snapshot_id.encode()).digest()[:4], "big", signed=True)


def writer_name(snapshot_id: str) -> str:
    """``aistock writer <host> pid <pid> <id>``, cut to PostgreSQL's 63-byte ``application_name``."""
    return f"{APPLICATION_PREFIX} {socket.gethostname()} pid {os.getpid()} {snapshot_id}"[:63]


def _connect_url(db: Engine | str) -> str:
    url = db.url.render_as_string(hide_password=False) if isinstance(db, Engine) else db
    return libpq_url(url)


def holder(conn: psycopg.Connection, snapshot_id: str) -> str | None:
    """Who holds the snapshot's lock in this database: application name, backend pid, client, since."""
    row = conn.execute(
        "SELECT a.application_name, a.pid, coalesce(host(a.client_addr), 'local socket'), "
        "       date_trunc('second', a.backend_start) "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
        "  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
        "  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (LOCK_CLASS, lock_key(snapshot_id) & 0xFFFFFFFF)).fetchone()
    if row is None:
        return None
    name, pid, client, since = row
    return f"'{name or 'an unnamed session'}' (server pid {pid}, from {client}, connected since {since})"


def _acquire(conn: psycopg.Connection, snapshot_id: str, wait_s: float) -> None:
    key = (LOCK_CLASS, lock_key(snapshot_id))
    if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]:
        return
    held_by = holder(conn, snapshot_id) or "another writer"
    log.info("snapshot %s is being written by %s; waiting up to %.0f s for it", snapshot_id, held_by, wait_s)
    started = time.monotonic()
    if wait_s > 0 and _wait(conn, key, wait_s):
        log.info("snapshot %s: write lock acquired after waiting %.1f s", snapshot_id, time.monotonic() - started)
        return
    held_by = holder(conn, snapshot_id) or held_by
    raise SnapshotWriteLockTimeout(
        f"snapshot {snapshot_id} is still being written by {held_by} after waiting {wait_s:.0f} s; "
        "retry when that export has finished (or end that session if its writer is gone)")


def _wait(conn: psycopg.Connection, key: tuple[int, int], wait_s: float) -> bool:
    """``pg_advisory_lock`` bounded by ``lock_timeout``; False when the wait ran out."""
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{max(1, round(wait_s * 1000))}ms")))
    try:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
        return False
    finally:
        conn.execute("RESET lock_timeout")
    return True


@contextmanager
def snapshot_write_lock(db: Engine | str, snapshot_id: str, *, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Hold the cross-host write lock of ``snapshot_id`` in the database ``db`` names (an engine or URL).

    Waits up to ``wait_s`` for another writer, then raises :class:`SnapshotWriteLockTimeout` naming it."""
    check_snapshot_id(snapshot_id)
    conn = psycopg.connect(_connect_url(db), autocommit=True, connect_timeout=30,
                           application_name=writer_name(snapshot_id))
    try:
        _acquire(conn, snapshot_id, wait_s)
        log.debug("snapshot %s: write lock held", snapshot_id)
        try:
            yield
        finally:
            _release(conn, snapshot_id)
    finally:
        conn.close()


def _release(conn: psycopg.Connection, snapshot_id: str) -> None:
    """Unlock; a connection lost meanwhile already released it on the server (nothing to mask an error with)."""
    try:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, lock_key(snapshot_id)))
        log.debug("snapshot %s: write lock released", snapshot_id)
    except psycopg.Error as e:
        log.warning("snapshot %s: the lock connection was lost (%s); the server released the lock", snapshot_id, e)


@contextmanager
def writer_locks(db: Engine | str, versions: SnapshotVersions, snapshot_id: str, *,
                 wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Both locks every writer of a snapshot holds (an export, a release, a rollback): the cross-host
    advisory lock, waited for, then the local ``flock`` of its folder."""
    with snapshot_write_lock(db, snapshot_id, wait_s=wait_s), versions.lock(snapshot_id):
        yield

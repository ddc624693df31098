"""``aistock-pipelines snapshots release | verify | history | rollback | diff | keep | prune``: releases of a
snapshot from the command line (the domain logic is in :mod:`aistock_pipelines.export.releases`)."""

from __future__ import annotations

import argparse
import json
import sys

from aistock_pipelines.settings import Settings


def _store(settings: Settings, *, database: bool = False):
    """The releases under the snapshot root; ``database``: with the AIstock database, which making, pruning
    and rolling back need (the writer locks, the meta rows)."""
    from aistock_pipelines.export.releases import ReleaseStore

    if not database:
        return ReleaseStore(settings.snapshot_root)
    from aistock_pipelines.db import create_db_engine
    from aistock_pipelines.embedded_db import resolve_db_url

    return ReleaseStore(settings.snapshot_root, create_db_engine(resolve_db_url(settings)))


def _snapshots_file(settings: Settings):
    from aistock_pipelines.snapshot_config import load_snapshots_file

    return load_snapshots_file(settings.snapshots_file)


def _release_policy(snapshots, snapshot_id: str):
    """The snapshot's declared release policy (None: not declared, or no policy)."""
    decl = next((d for d in snapshots.snapshots if d.id == snapshot_id), None)
    return decl.release if decl is not None else None


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def _guarded(command):
    """Run a command; a release or snapshot error is printed (its message names the cause and the fix)."""

    def run(args: argparse.Namespace) -> int:
        from aistock_pipelines.export.snapshot_shape import SnapshotError
        from aistock_pipelines.snapshot_config import SnapshotConfigError

        try:
            return command(args, Settings.from_env())
        except (SnapshotError, SnapshotConfigError) as e:
            return _fail(str(e))

    return run


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    snapshots = _snapshots_file(settings)
    policy = _release_policy(snapshots, args.snapshot_id)
    made = _store(settings, database=True).create(args.snapshot_id, label=args.label, keep=args.keep,
                                                  keep_last=policy.keep_last if policy else None,
                                                  declaration=snapshots.declaration_doc(args.snapshot_id))
    r = made.release
    held = r.doc.get("contents", {})
    doc = {"release": r.name, "path": str(r.path), "created": made.created, "files": r.doc["manifest"]["files"],
           "bytes": r.doc["manifest"]["bytes"], "bytes_added": r.doc["bytes_added"],
           "daily_pv_sha256": r.doc["daily_pv_sha256"], "universes": held.get("universes", []),
           "benchmarks": held.get("benchmarks", []), "keep": r.keep, "deleted_by_retention": made.deleted,
           "seconds": round(made.seconds, 3)}
    print(json.dumps(doc, indent=2) if args.json else "\n".join(f"{k:22} {v}" for k, v in doc.items()))
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    check = _store(settings).verify(args.snapshot_id, args.release)
    if args.json:
        print(json.dumps({"release": args.release, "ok": check.ok, "files": check.files, "bytes": check.bytes,
                          "problems": check.problems, "seconds": round(check.seconds, 3)}, indent=2))
    elif check.ok:
        print(f"OK: release {args.release} of {args.snapshot_id}: {check.files} files, {check.bytes:,} bytes "
              f"match its manifest ({check.seconds:.1f} s)")
    else:
        print(f"FAILED: release {args.release} of {args.snapshot_id} differs from its manifest "
              f"({len(check.problems)} problems):", file=sys.stderr)
        for line in check.problems:
            print(f"  {line}", file=sys.stderr)
    return 0 if check.ok else 1


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from aistock_pipelines.export.snapshot_history import history

    entries = history(_store(settings), args.snapshot_id)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    if not entries:
        return _fail(f"snapshot {args.snapshot_id} has no versions or releases under {settings.snapshot_root}")
    header = ["kind", "name", "range", "rows", "instruments", "restated", "sha256", "made", "mode", "keep"]
    table = [header] + [[e.kind, e.name, f"{e.start}..{e.end}", f"{e.rows:,}", str(e.instruments),
                         str(len(e.restated)), e.sha256[:12], e.made[:19].replace("T", " "), e.mode, "keep" if e.keep else ""]
                        for e in entries]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from aistock_pipelines.export.rollback import rollback

    done = rollback(_store(settings, database=True), args.snapshot_id, args.to)
    rows = (f"{done.meta_rows} meta rows restored" if done.meta_rows is not None
            else "no meta rows recorded: the next export re-reads every instrument")
    print(f"{args.snapshot_id} is release {args.to} again ({done.version.name}, replaced {done.replaced}); {rows}; "
          f"{done.seconds:.1f} s")
    return 0


def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    from aistock_pipelines.export.snapshot_diff import diff_snapshot

    d = diff_snapshot(_store(settings), args.snapshot_id, args.a, args.b)
    print(json.dumps(d.to_json(args.top), indent=2) if args.json else "\n".join(d.lines(args.top)))
    return 0


def cmd_keep(args: argparse.Namespace, settings: Settings) -> int:
    r = _store(settings).set_keep(args.snapshot_id, args.release, not args.off)
    print(f"release {r.name} of {args.snapshot_id}: {'kept by retention' if r.keep else 'subject to retention'}")
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    keep_last = args.keep_last
    if keep_last is None:
        policy = _release_policy(_snapshots_file(settings), args.snapshot_id)
        keep_last = policy.keep_last if policy is not None else None
    if keep_last is None:
        return _fail(f"snapshot {args.snapshot_id} declares no release keep_last; pass --keep-last N")
    deleted = _store(settings, database=True).prune(args.snapshot_id, keep_last)
    print(f"deleted {len(deleted)} release(s) of {args.snapshot_id}: {', '.join(deleted) or 'none'}")
    return 0


def add_release_commands(snapshots_sub) -> None:
    """Add the release commands to the ``snapshots`` sub-command parser."""
    p = snapshots_sub.add_parser("release", help="pin the live version as a named, immutable release")
    p.add_argument("snapshot_id")
    p.add_argument("--label", help="release name (default: the snapshot's last day, e.g. 2024-06-28)")
    p.add_argument("--keep", action="store_true", help="retention never deletes this release")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_release))
    p = snapshots_sub.add_parser("verify", help="recompute a release's sha256 manifest; exit 1 on any difference")
    p.add_argument("snapshot_id")
    p.add_argument("release")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_verify))
    p = snapshots_sub.add_parser("history", help="versions and releases: range, rows, restated, sha256, made")
    p.add_argument("snapshot_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_history))
    p = snapshots_sub.add_parser("rollback", help="make the live version equal to a release again")
    p.add_argument("snapshot_id")
    p.add_argument("--to", required=True, metavar="RELEASE")
    p.set_defaults(func=_guarded(cmd_rollback))
    p = snapshots_sub.add_parser("diff", help="rows, instruments, restated instruments, columns between A and B")
    p.add_argument("snapshot_id")
    p.add_argument("a", help="'live', a release name or a version folder name (<id>@<stamp>)")
    p.add_argument("b")
    p.add_argument("--top", type=int, default=20, help="restated instruments listed (largest change first)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_diff))
    p = snapshots_sub.add_parser("keep", help="mark a release retention keeps (--off: unmark)")
    p.add_argument("snapshot_id")
    p.add_argument("release")
    p.add_argument("--off", action="store_true")
    p.set_defaults(func=_guarded(cmd_keep))
    p = snapshots_sub.add_parser("prune", help="retention: delete releases beyond the newest N not marked keep")
    p.add_argument("snapshot_id")
    p.add_argument("--keep-last", type=int, help="default: the snapshot's declared release.keep_last")
    p.set_defaults(func=_guarded(cmd_prune))

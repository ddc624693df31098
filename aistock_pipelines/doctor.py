"""``aistock-pipelines doctor``: check a deployment and say what to fix, one line per check.

Each check prints ``OK``, ``WARN`` or ``FAIL`` with what it found and, when not OK, the fix; the command
exits non-zero when any check fails. It changes nothing beyond what every command of the project does on
first use (the embedded database starts, Dagster creates its tables, the snapshot root is created) and a
probe folder in the snapshot root that it removes again. Secrets never appear: URLs are redacted, and every
line is scrubbed of the passwords the environment holds, whatever an underlying error message contained.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Engine, make_url

from aistock_pipelines.db import redact, sqlalchemy_url
from aistock_pipelines.embedded_db import resolve_db_url
from aistock_pipelines.settings import Settings, SettingsError

if TYPE_CHECKING:
    from aistock_pipelines.export.mapping import ResolvedMapping
    from aistock_pipelines.snapshot_config import SnapshotsFile

Status = Literal["OK", "WARN", "FAIL"]

#: File system types on which the snapshot root's guarantees depend on the server and mount options.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "beegfs", "gpfs")
#: Free space below which the snapshot root gets a warning (a full A-share snapshot and the version it replaces).
MIN_FREE_BYTES = 5 * 1024**3
ROOT_FIX = ("put AISTOCK_SNAPSHOT_ROOT on a local POSIX file system (ext4, xfs) or a volume mounted with "
            "POSIX semantics (NFSv4 with locking); object-store mounts (s3fs, gcsfuse) lack atomic rename and "
            "hard links — see docs/scaling.md")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<16} {self.detail}"
        return text + (f" — fix: {self.fix}" if self.fix and self.status != "OK" else "")


def secrets_in(environ: Mapping[str, str]) -> list[str]:
    """Every password the environment holds: in URL settings and ``DAGSTER_PG_PASSWORD``."""
    found = [environ.get("DAGSTER_PG_PASSWORD", "")]
    for name in ("AISTOCK_DB_URL", "RDAGENT_RESULTS_URL", "AISTOCK_TEST_DB_URL"):
        try:
            found.append(make_url(environ.get(name, "").strip()).password or "")
        except Exception:  # noqa: BLE001 - not a URL: then it carries no password to hide
            pass
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _first_line(exc: BaseException) -> str:
    """The exception's type and first line: enough to act on, short enough for one report line."""
    lines = [part.strip() for part in str(exc).splitlines() if part.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ------------------------------------------------------------------------------------------ settings


def check_settings(environ: Mapping[str, str]) -> tuple[Check, Settings | None]:
    """The settings resolve (a production deployment names its database)."""
    try:
        settings = Settings.from_env(environ)
    except SettingsError as e:
        return Check("settings", "FAIL", str(e), "set the variables it names (aistock-pipelines settings)"), None
    db = "embedded PostgreSQL" if settings.uses_embedded_db else redact(settings.db_url or "")
    return Check("settings", "OK", f"deployment {settings.deployment}, database {db}"), settings


def check_snapshots_file(settings: Settings) -> tuple[Check, "SnapshotsFile | None"]:
    """The snapshot declarations load and validate."""
    from aistock_pipelines.snapshot_config import SnapshotConfigError, load_snapshots_file

    try:
        config = load_snapshots_file(settings.snapshots_file)
    except SnapshotConfigError as e:
        return Check("snapshots file", "FAIL", str(e), "correct the file (docs/operations.md#snapshots) or "
                     "point AISTOCK_SNAPSHOTS_FILE at the right one"), None
    ids = ", ".join(s.id for s in config.snapshots)
    return Check("snapshots file", "OK", f"{settings.snapshots_file}: {len(config.snapshots)} snapshots ({ids})"), config


# ------------------------------------------------------------------------------------------ database


def check_database(settings: Settings) -> tuple[Check, Engine | None]:
    """The AIstock database answers; returns an engine for the table checks."""
    try:
        url = resolve_db_url(settings)
    except Exception as e:  # noqa: BLE001 - the embedded server could not start: report, do not crash
        return Check("database", "FAIL", f"the embedded PostgreSQL did not start: {_first_line(e)}",
                     "aistock-pipelines db start shows the server's error; or set AISTOCK_DB_URL"), None
    engine = sa.create_engine(sqlalchemy_url(url), connect_args={"connect_timeout": 10}, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar()
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        return Check("database", "FAIL", f"cannot connect to {redact(url)}: {_first_line(e.orig or e)}",
                     "start the server or correct AISTOCK_DB_URL (host, port, database, user, password)"), None
    return Check("database", "OK", f"{redact(url)} answers (PostgreSQL {version})"), engine


#: Catalogue types per kind of column the export reads.
KINDS = {
    "code": ("text", "character varying", "character"),
    "date": ("date",),
    "boolean": ("boolean",),
    "number": ("smallint", "integer", "bigint", "numeric", "real", "double precision"),
}


def expected_columns(resolved: "ResolvedMapping") -> dict[str, dict[str, str]]:
    """table → column → kind, for every column the resolved mapping reads."""
    m = resolved.mapping
    key = {"ts_code": "code", "trade_date": "date"}
    out = {m.bars_table: {**key, **{s.column: "number" for s in m.fields.values()}},
           m.calendar_table: {"cal_date": "date", "is_trading": "boolean"}}
    if m.raw_table:
        out.setdefault(m.raw_table, {}).update({**key, m.fields["close"].column: "number"})
    for t in m.factor_tables:
        out.setdefault(t.table, {}).update({**key, **{s.column: "number" for s in resolved.factor_columns[t.name].values()}})
    return out


def wrong_types(engine: Engine, expected: dict[str, dict[str, str]]) -> list[str]:
    """Columns whose catalogue type is not of the expected kind, described."""
    problems = []
    with engine.connect() as conn:
        for table, columns in expected.items():
            schema, name = table.split(".")
            types = dict(conn.execute(sa.text(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = :s AND table_name = :t"), {"s": schema, "t": name}).all())
            problems += [f"{table}.{col} is {types[col]}, expected {kind} ({' / '.join(KINDS[kind][:3])})"
                         for col, kind in columns.items() if col in types and types[col] not in KINDS[kind]]
    return problems


def check_tables(engine: Engine | None, config: "SnapshotsFile | None") -> Check:
    """Every table and column the mapping reads exists (the export's own check) with a usable type."""
    from aistock_pipelines.export.mapping import MappingError, resolve_mapping

    if engine is None or config is None:
        return Check("tables", "WARN", "not checked (no database or no snapshots file)", "fix the checks above")
    try:
        resolved = resolve_mapping(engine, config.export_mapping())
    except MappingError as e:
        return Check("tables", "FAIL", str(e), "create the table/column, or map the field to the real column "
                     "in the snapshots file's mapping block")
    expected = expected_columns(resolved)
    problems = wrong_types(engine, expected)
    if problems:
        return Check("tables", "FAIL", "; ".join(problems), "alter the column type or map another column")
    columns = sum(len(c) for c in expected.values())
    return Check("tables", "OK", f"{len(expected)} tables, {columns} columns present with the expected types "
                 f"({', '.join(expected)})")


# ------------------------------------------------------------------------------------- snapshot root


def fs_type(path: Path) -> tuple[str, str]:
    """(file system type, mount point) of ``path`` from /proc/self/mountinfo; ('unknown', '') elsewhere."""
    best = ("unknown", "")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    target = str(path.resolve())
    for line in lines:
        left, _, right = line.partition(" - ")
        mount = left.split()[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (right.split()[0], mount)
    return best


def probe_posix(directory: Path) -> None:
    """What the writer relies on, tried in ``directory``; raises naming the first thing that fails."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("create a file", lambda: os.close(os.open(directory / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY))),
        ("hard-link a file", lambda: os.link(directory / "a", directory / "b")),
        ("create a symlink", lambda: os.symlink("v1", directory / "current")),
        ("replace a symlink atomically (os.replace)", lambda: _swap_symlink(directory)),
        ("rename a directory", lambda: (os.mkdir(directory / "d1"), os.rename(directory / "d1", directory / "d2"))),
        ("lock a file exclusively (flock)", lambda: _probe_flock(directory / "lock")),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OSError(f"cannot {what}: {e.strerror or e}") from e


def _swap_symlink(directory: Path) -> None:
    os.symlink("v2", directory / "current.new")
    os.replace(directory / "current.new", directory / "current")
    if os.readlink(directory / "current") != "v2":
        raise OSError("the replaced symlink still points at the old target")


def _probe_flock(path: Path) -> None:
    """An exclusive lock must exclude a second open file description (some mounts accept and ignore it)."""
    with open(path, "w") as first, open(path, "w") as second:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        raise OSError("a second exclusive flock was granted: locks are not enforced here")


def check_snapshot_root(settings: Settings) -> Check:
    """The snapshot root is writable and supports what the writer does (docs/scaling.md)."""
    root = settings.snapshot_root
    probe = root / f".doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
    except OSError as e:
        return Check("snapshot root", "FAIL", f"{root} is not writable: {e.strerror or e}",
                     "create it and give the pipelines' user write access, or set AISTOCK_SNAPSHOT_ROOT")
    try:
        probe_posix(probe)
    except OSError as e:
        return Check("snapshot root", "FAIL", f"{root}: {e}", ROOT_FIX)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    kind, mount = fs_type(root)
    free = shutil.disk_usage(root).free
    detail = (f"{root} ({kind} on {mount or '?'}): writable; atomic rename, symlink swap, hard links and flock "
              f"work; {free / 1024**3:.1f} GB free")
    if kind.startswith("fuse") or kind in NETWORK_FS:
        return Check("snapshot root", "WARN", detail + f"; {kind} is a network/FUSE file system",
                     "make sure every host mounts it with POSIX semantics (docs/scaling.md); writers on "
                     "different hosts are kept apart by the database lock, not by flock")
    if free < MIN_FREE_BYTES:
        return Check("snapshot root", "WARN", detail, "free space: a snapshot needs room for two versions")
    return Check("snapshot root", "OK", detail)


# -------------------------------------------------------------------------------------------- dagster


def _env_refs(node: object) -> Iterator[str]:
    """Names of the environment variables a Dagster config file reads (``{env: NAME}`` anywhere)."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield node["env"]
        for value in node.values():
            yield from _env_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_refs(value)


def check_dagster_home(environ: Mapping[str, str], settings: Settings | None) -> Check:
    """DAGSTER_HOME is set and holds a dagster.yaml whose environment variables are all set."""
    home = environ.get("DAGSTER_HOME", "").strip()
    if not home:
        return Check("DAGSTER_HOME", "FAIL", "DAGSTER_HOME is not set: the daemon refuses to start and the "
                     "Dagster CLI reads ./dagster.yaml from whatever directory it runs in",
                     "mkdir -p /srv/dagster && cp dagster.yaml /srv/dagster/ && export DAGSTER_HOME=/srv/dagster")
    if not Path(home).is_dir():
        return Check("DAGSTER_HOME", "FAIL", f"DAGSTER_HOME={home} is not a directory",
                     f"mkdir -p {home} and copy the repository's dagster.yaml into it")
    config = Path(home) / "dagster.yaml"
    if not config.is_file():
        status: Status = "FAIL" if settings is not None and settings.deployment == "production" else "WARN"
        return Check("DAGSTER_HOME", status, f"{config} does not exist: Dagster keeps runs in SQLite files there",
                     f"copy the repository's dagster.yaml into {home} (PostgreSQL storage, run queue, pools)")
    try:
        doc = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as e:
        return Check("DAGSTER_HOME", "FAIL", f"{config} is not valid YAML: {_first_line(e)}", "correct the file")
    missing = sorted({name for name in _env_refs(doc) if name not in environ})
    if missing:
        return Check("DAGSTER_HOME", "FAIL", f"{config} reads unset variables {', '.join(missing)}",
                     f"set {', '.join(missing)} (Dagster's own PostgreSQL database: docs/operations.md)")
    return Check("DAGSTER_HOME", "OK", f"{config} loads ({', '.join(sorted(doc)) or 'Dagster defaults'})")


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` for the block unless already set (libpq reads PGCONNECT_TIMEOUT)."""
    had = name in os.environ
    os.environ.setdefault(name, value)
    try:
        yield
    finally:
        if not had:
            os.environ.pop(name, None)


def check_dagster_storage(environ: Mapping[str, str], home_check: Check,
                          settings: Settings | None) -> tuple[Check, Check]:
    """Dagster's storage answers; and every pool the code location uses has its limit stored there."""
    if home_check.status == "FAIL":
        return (Check("Dagster storage", "WARN", "not checked (DAGSTER_HOME above)", "fix DAGSTER_HOME first"),
                Check("Dagster pools", "WARN", "not checked (DAGSTER_HOME above)", "fix DAGSTER_HOME first"))
    from dagster import DagsterInstance

    try:
        with warnings.catch_warnings(), _env_default("PGCONNECT_TIMEOUT", "10"):
            warnings.simplefilter("ignore")
            with DagsterInstance.from_config(environ["DAGSTER_HOME"].strip()) as instance:
                storage = type(instance.run_storage).__name__
                runs = instance.get_runs_count()
                stored_pools = instance.event_log_storage.get_concurrency_keys()
    except Exception as e:  # noqa: BLE001 - any failure to load or reach the storage is the finding
        failed = Check("Dagster storage", "FAIL", f"the instance in $DAGSTER_HOME cannot reach its storage: "
                       f"{_first_line(e)}", "check DAGSTER_PG_HOST/PORT/DB/USERNAME/PASSWORD and that the "
                       "database exists")
        return failed, Check("Dagster pools", "WARN", "not checked (Dagster storage above)", "fix the storage first")
    detail = f"{storage} answers ({runs} runs recorded)"
    if "Sqlite" in storage and settings is not None and settings.deployment == "production":
        storage_check = Check("Dagster storage", "WARN", detail + ": SQLite is single-host",
                              "use the repository's dagster.yaml (PostgreSQL storage) in production")
    else:
        storage_check = Check("Dagster storage", "OK", detail)
    return storage_check, check_pools(settings, stored_pools)


def code_location_pools(settings: Settings) -> set[str]:
    """The pools the code location's ops run in (one per snapshot, the ad-hoc export's), from its definitions."""
    from aistock_pipelines.definitions import build_definitions

    repo = build_definitions(settings).get_repository_def()
    return {op.pool for job in repo.get_all_jobs() for op in job.graph.iterate_op_defs() if op.pool}


def check_pools(settings: Settings | None, stored: set[str]) -> Check:
    """Dagster stores a pool's limit only when the queue first sees a run of it; runs queued together in
    that very pass are not held apart, so the limits should exist before the first runs."""
    if settings is None:
        return Check("Dagster pools", "WARN", "not checked (settings above)", "fix the settings first")
    try:
        pools = code_location_pools(settings)
    except Exception as e:  # noqa: BLE001 - a code location that does not load is reported, not raised
        return Check("Dagster pools", "FAIL", f"the code location does not load: {_first_line(e)}",
                     "dagster definitions validate -m aistock_pipelines.definitions shows the error")
    missing = sorted(pools - stored)
    if missing:
        commands = "; ".join(f"dagster instance concurrency set {pool} 1" for pool in missing)
        return Check("Dagster pools", "WARN", f"no stored limit for {', '.join(missing)}: the first runs of such "
                     "a pool queued together would run at once (the writer lock still keeps their writes apart)",
                     commands)
    return Check("Dagster pools", "OK", f"{len(pools)} pools with stored limits ({', '.join(sorted(pools))})")


# ---------------------------------------------------------------------------------- RD-Agent, factors


def check_results_api(settings: Settings) -> Check:
    """RD-Agent's results API answers its health check."""
    from aistock_pipelines.rdagent.results_client import RDAgentResultsClient

    url = redact(settings.rdagent_results_url)
    with RDAgentResultsClient(settings.rdagent_results_url, connect_timeout=3.0, read_timeout=5.0, retries=0) as client:
        if client.health():
            return Check("results API", "OK", f"{url}/health answers ok")
    return Check("results API", "FAIL", f"nothing answers {url}/health",
                 "start RD-Agent's results API (or: aistock-pipelines rdagent serve DIR) or set RDAGENT_RESULTS_URL")


def check_factor_packages(settings: Settings) -> list[Check]:
    """Each allowed factor package imports, with its version."""
    from aistock_pipelines.rdagent.factor_impl import FactorPackages, installed_version

    packages = FactorPackages.parse(settings.factor_packages)
    checks = []
    for prefix in packages.prefixes:
        source = packages.import_name(prefix)
        where = "" if source == prefix else f" (from {source})"
        try:
            version = installed_version(prefix, packages)
            __import__(source)
        except ImportError as e:
            checks.append(Check("factor package", "WARN", f"{prefix}{where} is not importable: {_first_line(e)}",
                                "pip install the shared factor package, or fix AISTOCK_FACTOR_PACKAGES"))
            continue
        status: Status = "OK" if version else "WARN"
        checks.append(Check("factor package", status, f"{prefix}{where} {version or 'has no version'}",
                            "give the package a __version__ or VERSION file (factor_package_aligned compares it)"))
    return checks


# ------------------------------------------------------------------------------------------- the run


def run_checks() -> list[Check]:
    """Every check of this process's environment, in order; a check whose input failed says so instead."""
    env = os.environ  # Dagster resolves its config's {env: …} from os.environ, so every check reads it too
    settings_check, settings = check_settings(env)
    checks = [settings_check]
    if settings is not None:
        file_check, config = check_snapshots_file(settings)
        db_check, engine = check_database(settings)
        checks += [file_check, db_check, check_tables(engine, config), check_snapshot_root(settings)]
        if engine is not None:
            engine.dispose()
    home_check = check_dagster_home(env, settings)
    checks += [home_check, *check_dagster_storage(env, home_check, settings)]
    if settings is not None:
        checks += [check_results_api(settings), *check_factor_packages(settings)]
    return checks


def report(checks: list[Check]) -> str:
    """The printed report: one line per check, then the counts; scrubbed of every secret the environment holds."""
    secrets = secrets_in(os.environ)
    counts = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL")}
    lines = [c.line() for c in checks] + [", ".join(f"{n} {s}" for s, n in counts.items())]
    return scrub("\n".join(lines), secrets)


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.status == "FAIL" for c in checks) else 0

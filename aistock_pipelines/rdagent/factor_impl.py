"""Resolve RD-Agent factor implementation pointers (``impl_module`` / ``impl_func``) safely.

The catalog is remote input: a record saying ``impl_module: "os", impl_func: "system"`` must never
lead to an import, let alone a call. So a pointer is checked *as text* before anything is imported:

* every dotted part must be a plain identifier (no relative ``.x``, no keywords, nothing starting with
  ``_`` — that rules out dunders like ``__builtins__`` and private helpers);
* the module must lie inside one of the configured package prefixes (``AISTOCK_FACTOR_PACKAGES``,
  default ``rd_factors_lib``), matched on whole dotted parts (``rd_factors_lib_evil`` is not inside
  ``rd_factors_lib``);
* after the import, the attribute must be a plain Python function *defined* inside an allowed package
  (a re-exported ``from os import system`` in an allowed module is refused too).

**Import roots.** An entry ``prefix=package`` (e.g. ``rd_factors_lib=aistock_pipelines.demo.rd_factors_lib``)
allows ``prefix`` in pointers but imports it from ``package``. This is how the demo copy of the shared
package answers ``rd_factors_lib.generated`` pointers without being installed as a top-level
``rd_factors_lib`` (which would shadow RD-Agent's real package when that one is installed) and without
touching ``sys.path`` or ``sys.modules``.

**Versions.** RD-Agent writes the shared package's ``VERSION`` into each factor's ``impl_version``
(a UTC date like ``20260114`` in practice, semver in the design). :func:`alignment_report` compares it
with the installed package: a *newer* package is normal (RD-Agent bumps the version for every new
factor, older factors keep their older ``impl_version``) and is reported but not a problem; an *older*
package, a missing function or a refused pointer is.
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import inspect
import keyword
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

#: The ``AISTOCK_FACTOR_PACKAGES`` entry that makes the demo copy answer ``rd_factors_lib`` pointers.
DEMO_FACTOR_PACKAGES: tuple[str, ...] = ("rd_factors_lib=aistock_pipelines.demo.rd_factors_lib",)
DEFAULT_FACTOR_PACKAGES: tuple[str, ...] = ("rd_factors_lib",)

FactorFunction = Callable[[pd.DataFrame], Any]


class FactorImplError(Exception):
    """A pointer could not be turned into a callable."""


class ImplNotAllowed(FactorImplError):
    """The pointer is malformed or outside the allowed packages; nothing was imported."""


class ImplMissing(FactorImplError):
    """The pointer is allowed but its package, module or function does not exist here."""


def _check_dotted(name: Any, what: str) -> list[str]:
    """The parts of a dotted name, or :class:`ImplNotAllowed` when any part is not a plain identifier."""
    if not isinstance(name, str) or not name:
        raise ImplNotAllowed(f"{what} must be a non-empty string, got {type(name).__name__}")
    if name.startswith("."):
        raise ImplNotAllowed(f"{what} {name!r} is a relative name; only absolute module names are allowed")
    parts = name.split(".")
    for part in parts:
        if not part.isidentifier() or keyword.iskeyword(part):
            raise ImplNotAllowed(f"{what} {name!r} has a part {part!r} that is not a plain identifier")
        if part.startswith("_"):
            raise ImplNotAllowed(f"{what} {name!r} has a private or dunder part {part!r}")
    return parts


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class FactorPackages:
    """The allowlist of pointer prefixes and the package each one is imported from."""

    prefixes: tuple[str, ...] = DEFAULT_FACTOR_PACKAGES
    import_roots: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for prefix in self.prefixes:
            _check_dotted(prefix, "allowed package prefix")
        for prefix, target in self.import_roots.items():
            if prefix not in self.prefixes:
                raise ValueError(f"import root given for {prefix!r}, which is not an allowed prefix")
            _check_dotted(target, f"import root of {prefix!r}")

    @classmethod
    def parse(cls, entries: Iterable[str]) -> FactorPackages:
        """From ``AISTOCK_FACTOR_PACKAGES`` entries: ``prefix`` or ``prefix=importable.package``."""
        prefixes: list[str] = []
        roots: dict[str, str] = {}
        for entry in entries:
            entry = entry.strip()
            if not entry:
                continue
            prefix, _, target = (part.strip() for part in entry.partition("="))
            prefixes.append(prefix)
            if target:
                roots[prefix] = target
        return cls(tuple(dict.fromkeys(prefixes)), roots)

    @classmethod
    def from_env(cls) -> FactorPackages:
        """From ``AISTOCK_FACTOR_PACKAGES`` (via :class:`Settings`), read when called."""
        from aistock_pipelines.settings import Settings

        return cls.parse(Settings.from_env().factor_packages)

    def import_name(self, module: Any) -> str:
        """The module to import for a pointer module, after the allowlist check (no import happens)."""
        _check_dotted(module, "impl_module")
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if _within(module, prefix):
                root = self.import_roots.get(prefix)
                return module if root is None else root + module[len(prefix):]
        raise ImplNotAllowed(
            f"impl_module {module!r} is outside the allowed factor packages "
            f"({', '.join(self.prefixes) or 'none configured'}); add its package to AISTOCK_FACTOR_PACKAGES "
            "if it is trusted"
        )

    def defines(self, module_name: str) -> bool:
        """Whether a function whose ``__module__`` is ``module_name`` lives in an allowed package."""
        real = [self.import_roots.get(p, p) for p in self.prefixes]
        return any(_within(module_name, p) for p in (*self.prefixes, *real))

    def package_of(self, module: str) -> str | None:
        """The allowed prefix a pointer module belongs to (the package whose version counts)."""
        matches = [p for p in self.prefixes if _within(module, p)]
        return max(matches, key=len) if matches else None


def check_pointer(module: Any, func: Any, packages: FactorPackages) -> str:
    """Validate a pointer as text; returns the module name to import. Imports nothing."""
    import_name = packages.import_name(module)
    parts = _check_dotted(func, "impl_func")
    if len(parts) != 1:
        raise ImplNotAllowed(f"impl_func {func!r} must be a single function name, not a dotted path")
    return import_name


def resolve_factor(module: Any, func: Any, packages: FactorPackages | None = None) -> FactorFunction:
    """The factor function a pointer names, imported only after :func:`check_pointer` accepted it."""
    packages = packages or FactorPackages.from_env()
    import_name = check_pointer(module, func, packages)
    try:
        loaded = importlib.import_module(import_name)
    except ModuleNotFoundError as exc:
        raise ImplMissing(
            f"impl_module {module!r} cannot be imported (module {exc.name!r} not found); install the "
            "shared factor package (pip install -e <rd-factors-lib>) or fix AISTOCK_FACTOR_PACKAGES"
        ) from exc
    obj = getattr(loaded, func, None)
    if obj is None:
        raise ImplMissing(f"{module}.{func} does not exist in the installed package (module {import_name})")
    if not inspect.isfunction(obj):
        raise ImplNotAllowed(f"{module}.{func} is a {type(obj).__name__}, not a plain Python function")
    if not packages.defines(obj.__module__):
        raise ImplNotAllowed(
            f"{module}.{func} is defined in {obj.__module__!r}, outside the allowed factor packages"
        )
    return obj


# --------------------------------------------------------------------------------------- versions
def installed_version(prefix: str, packages: FactorPackages) -> str | None:
    """Version of an allowed package: ``__version__``, else its ``VERSION`` file, else its
    distribution metadata; ``None`` when the package is not installed or carries no version."""
    import_name = packages.import_name(prefix)
    try:
        package = importlib.import_module(import_name)
    except ModuleNotFoundError:
        return None
    version = getattr(package, "__version__", None)
    if isinstance(version, str) and version.strip():
        return version.strip()
    location = getattr(package, "__file__", None)
    if location:
        version_file = Path(location).with_name("VERSION")
        if version_file.is_file():
            return version_file.read_text(encoding="utf-8").strip() or None
    top = import_name.split(".")[0]
    for distribution in (top, top.replace("_", "-")):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


_NUMERIC_VERSION = re.compile(r"^\d+(\.\d+)*$")


def compare_versions(installed: str, wanted: str) -> int | None:
    """-1/0/1 for installed older/equal/newer than wanted; None when they are not comparable.

    Handles what RD-Agent writes: date strings (``20260114``) and dotted numbers (``1.0.8``); a leading
    ``v`` is ignored. Anything else compares equal only when identical.
    """
    a, b = installed.strip().lstrip("vV"), wanted.strip().lstrip("vV")
    if a == b:
        return 0
    if not (_NUMERIC_VERSION.match(a) and _NUMERIC_VERSION.match(b)):
        return None
    left, right = [int(x) for x in a.split(".")], [int(x) for x in b.split(".")]
    width = max(len(left), len(right))
    left += [0] * (width - len(left))
    right += [0] * (width - len(right))
    return (left > right) - (left < right)


class ImplStatus(enum.StrEnum):
    ALIGNED = "aligned"
    PACKAGE_OLDER = "package_older"
    PACKAGE_NEWER = "package_newer"
    MISSING = "missing_implementation"
    NOT_ALLOWED = "not_allowed"
    VERSION_UNKNOWN = "version_unknown"


#: Statuses that make the package "misaligned" with the catalog.
PROBLEM_STATUSES = frozenset({ImplStatus.PACKAGE_OLDER, ImplStatus.MISSING, ImplStatus.NOT_ALLOWED})


@dataclass(frozen=True)
class FactorImplCheck:
    name: str
    source: str
    impl_module: str | None
    impl_func: str | None
    impl_version: str | None
    installed_version: str | None
    status: ImplStatus
    detail: str = ""


@dataclass(frozen=True)
class AlignmentReport:
    entries: tuple[FactorImplCheck, ...]
    installed_versions: dict[str, str | None]

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(entry.status for entry in self.entries)
        return {status.value: counted.get(status, 0) for status in ImplStatus}

    @property
    def problems(self) -> tuple[FactorImplCheck, ...]:
        return tuple(e for e in self.entries if e.status in PROBLEM_STATUSES)

    @property
    def aligned(self) -> bool:
        return not self.problems


def _check_one(record: Mapping[str, Any], packages: FactorPackages, versions: dict[str, str | None]) -> FactorImplCheck:
    module, func, wanted = record.get("impl_module"), record.get("impl_func"), record.get("impl_version")
    wanted = None if wanted is None else str(wanted)

    def result(status: ImplStatus, detail: str = "", installed: str | None = None) -> FactorImplCheck:
        return FactorImplCheck(str(record.get("name")), str(record.get("source")), module, func, wanted,
                               installed, status, detail)

    def version_of(prefix: str) -> str | None:
        if prefix not in versions:
            versions[prefix] = installed_version(prefix, packages)
        return versions[prefix]

    if not module or not func:
        return result(ImplStatus.MISSING, "incomplete pointer: impl_module and impl_func are both needed")
    try:
        resolve_factor(module, func, packages)
    except ImplNotAllowed as exc:
        return result(ImplStatus.NOT_ALLOWED, str(exc))
    except ImplMissing as exc:
        prefix = packages.package_of(module)
        return result(ImplStatus.MISSING, str(exc), version_of(prefix) if prefix else None)
    prefix = packages.package_of(module)
    assert prefix is not None  # resolve_factor accepted it
    installed = version_of(prefix)
    if wanted is None or installed is None:
        return result(ImplStatus.VERSION_UNKNOWN, "no impl_version" if wanted is None else "package has no version",
                      installed)
    order = compare_versions(installed, wanted)
    if order is None:
        return result(ImplStatus.VERSION_UNKNOWN, "versions are not comparable", installed)
    status = {0: ImplStatus.ALIGNED, -1: ImplStatus.PACKAGE_OLDER, 1: ImplStatus.PACKAGE_NEWER}[order]
    return result(status, "", installed)


def alignment_report(records: Iterable[Mapping[str, Any]], packages: FactorPackages | None = None) -> AlignmentReport:
    """Check every record that carries an implementation pointer (others — Alpha158 expressions — are
    skipped): does it resolve, and how does its ``impl_version`` compare to the installed package?"""
    packages = packages or FactorPackages.from_env()
    versions: dict[str, str | None] = {}
    entries = tuple(
        _check_one(record, packages, versions)
        for record in records
        if record.get("impl_module") is not None or record.get("impl_func") is not None
    )
    return AlignmentReport(entries, versions)


def registry_pointers(engine: Engine) -> list[dict[str, Any]]:
    """Pointer fields of the active ``rdagent.factor_registry`` rows, in key order."""
    from aistock_pipelines.rdagent.registry_schema import ensure_registry_schema, factor_registry as t

    ensure_registry_schema(engine)
    query = (
        select(t.c.name, t.c.source, t.c.impl_module, t.c.impl_func, t.c.impl_version)
        .where(t.c.active, (t.c.impl_module.is_not(None)) | (t.c.impl_func.is_not(None)))
        .order_by(t.c.name, t.c.source)
    )
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


# ------------------------------------------------------------------------------------ computation
SNAPSHOT_INDEX = ("datetime", "instrument")


def compute_factor(
    record: Mapping[str, Any], frame: pd.DataFrame, packages: FactorPackages | None = None
) -> pd.Series:
    """Run a factor's implementation over a snapshot-shaped frame; a float64 Series on ``frame.index``.

    ``frame`` is indexed by ``(datetime, instrument)``. Its columns are passed through untouched, so
    both RD-Agent's ``$close`` names and plain snapshot names work as far as the factor function
    supports them (the shared package's contract is ``$``-names; the demo functions accept both). The
    function sees the rows sorted by datetime then instrument (sorted here if needed); the result is
    aligned back to ``frame``'s own row order, rows the function left out become NaN. pandas'
    copy-on-write means the function cannot modify the caller's frame.
    """
    function = resolve_factor(record.get("impl_module"), record.get("impl_func"), packages)
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    if tuple(frame.index.names) != SNAPSHOT_INDEX:
        raise ValueError(f"frame must be indexed by {SNAPSHOT_INDEX}, got {tuple(frame.index.names)}")
    if not frame.index.is_unique:
        raise ValueError("frame has duplicate (datetime, instrument) rows")
    ordered = frame if frame.index.is_monotonic_increasing else frame.sort_index()
    result = function(ordered)
    if isinstance(result, pd.DataFrame):
        if result.shape[1] != 1:
            raise ValueError(f"{record.get('impl_func')} returned {result.shape[1]} columns; expected one")
        result = result.iloc[:, 0]
    if not isinstance(result, pd.Series):
        raise TypeError(f"{record.get('impl_func')} returned {type(result).__name__}; expected a Series")
    if not result.index.is_unique or tuple(result.index.names) != SNAPSHOT_INDEX:
        raise ValueError(f"{record.get('impl_func')} returned a Series not indexed by unique {SNAPSHOT_INDEX}")
    if len(result.index.difference(frame.index)):
        raise ValueError(f"{record.get('impl_func')} returned rows that are not in the input frame")
    return result.reindex(frame.index).astype("float64").rename(record.get("name"))


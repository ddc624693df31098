"""Implementation pointers: the allowlist (checked before any import), versions, and factor values."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.demo.rdagent_results_builder import load_demo_catalog
from aistock_pipelines.rdagent import factor_impl
from aistock_pipelines.rdagent.factor_impl import (
    DEMO_FACTOR_PACKAGES,
    FactorPackages,
    ImplMissing,
    ImplNotAllowed,
    ImplStatus,
    alignment_report,
    check_pointer,
    compare_versions,
    compute_factor,
    installed_version,
    resolve_factor,
)

DEMO = FactorPackages.parse(DEMO_FACTOR_PACKAGES)
NAN = float("nan")
DEMO_DIR = Path(factor_impl.__file__).resolve().parents[1] / "demo" / "rd_factors_lib"


@pytest.fixture
def no_imports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every importlib.import_module call made by factor_impl."""
    calls: list[str] = []
    real = importlib.import_module

    def spy(name: str, package: str | None = None):
        calls.append(name)
        return real(name, package)

    monkeypatch.setattr(factor_impl.importlib, "import_module", spy)
    return calls


@pytest.mark.parametrize(
    ("module", "func", "message"),
    [
        ("os", "system", "outside the allowed factor packages"),
        ("this", "main", "outside the allowed factor packages"),  # importing it would print the Zen
        ("subprocess", "run", "outside the allowed factor packages"),
        ("rd_factors_lib_evil.generated", "factor_mom_20d", "outside the allowed factor packages"),
        ("rdfactors_lib", "factor_mom_20d", "outside the allowed factor packages"),
        (".generated", "factor_mom_20d", "relative name"),
        ("rd_factors_lib..generated", "factor_mom_20d", "not a plain identifier"),
        ("rd_factors_lib.generated ", "factor_mom_20d", "not a plain identifier"),
        ("rd_factors_lib.__init__", "factor_mom_20d", "private or dunder"),
        ("rd_factors_lib._private", "factor_mom_20d", "private or dunder"),
        ("rd_factors_lib.import", "factor_mom_20d", "not a plain identifier"),
        ("rd_factors_lib.generated", "__builtins__", "private or dunder"),
        ("rd_factors_lib.generated", "_column", "private or dunder"),
        ("rd_factors_lib.generated", "os.system", "single function name, not a dotted path"),
        ("rd_factors_lib.generated", "factor_mom_20d()", "not a plain identifier"),
        ("", "factor_mom_20d", "non-empty string"),
        (None, "factor_mom_20d", "non-empty string"),
        (["rd_factors_lib"], "factor_mom_20d", "non-empty string"),
        ("rd_factors_lib.generated", 5, "non-empty string"),
    ],
)
def test_refused_pointers_import_nothing(no_imports: list[str], module, func, message: str) -> None:
    was_loaded = "this" in sys.modules
    with pytest.raises(ImplNotAllowed, match=message):
        resolve_factor(module, func, DEMO)
    assert no_imports == []
    assert ("this" in sys.modules) == was_loaded


def test_allowed_pointer_maps_onto_the_demo_package(no_imports: list[str]) -> None:
    assert check_pointer("rd_factors_lib.generated", "factor_mom_20d", DEMO) == (
        "aistock_pipelines.demo.rd_factors_lib.generated"
    )
    assert no_imports == []  # checking is text only
    function = resolve_factor("rd_factors_lib.generated", "factor_mom_20d", DEMO)
    assert function.__name__ == "factor_mom_20d"
    assert function.__module__ == "aistock_pipelines.demo.rd_factors_lib.generated"
    assert no_imports == ["aistock_pipelines.demo.rd_factors_lib.generated"]
    assert "rd_factors_lib" not in sys.modules  # no top-level alias was planted


def test_non_functions_and_foreign_functions_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImplNotAllowed, match="is a module, not a plain Python function"):
        resolve_factor("rd_factors_lib.generated", "pd", DEMO)
    package = tmp_path / "trusted_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "gen.py").write_text(textwrap.dedent("""
        from json import dumps as factor_dumps          # a Python function defined elsewhere
        from os import system as factor_system          # a builtin
        factor_lambda = lambda df: df
        def factor_ok(df):
            return df["close"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    packages = FactorPackages(prefixes=("trusted_pkg",))
    assert resolve_factor("trusted_pkg.gen", "factor_ok", packages).__name__ == "factor_ok"
    with pytest.raises(ImplNotAllowed, match="defined in 'json', outside the allowed"):
        resolve_factor("trusted_pkg.gen", "factor_dumps", packages)
    with pytest.raises(ImplNotAllowed, match="not a plain Python function"):
        resolve_factor("trusted_pkg.gen", "factor_system", packages)
    assert resolve_factor("trusted_pkg.gen", "factor_lambda", packages)(7) == 7  # a function all the same


def test_missing_implementations() -> None:
    with pytest.raises(ImplMissing, match="factor_not_generated_yet does not exist"):
        resolve_factor("rd_factors_lib.generated", "factor_not_generated_yet", DEMO)
    with pytest.raises(ImplMissing, match="'aistock_pipelines.demo.rd_factors_lib.momentum' not found"):
        resolve_factor("rd_factors_lib.momentum", "factor_mom_20d", DEMO)
    # without the demo mapping the real shared package is needed, and it is not installed here
    with pytest.raises(ImplMissing, match="module 'rd_factors_lib' not found.*pip install -e"):
        resolve_factor("rd_factors_lib.generated", "factor_mom_20d", FactorPackages())


def test_package_configuration() -> None:
    assert FactorPackages.parse(["rd_factors_lib", " my_lib.factors ", "", "rd_factors_lib"]).prefixes == (
        "rd_factors_lib", "my_lib.factors",
    )
    assert DEMO.import_roots == {"rd_factors_lib": "aistock_pipelines.demo.rd_factors_lib"}
    with pytest.raises(ImplNotAllowed, match="allowed package prefix '.x'"):
        FactorPackages.parse([".x"])
    with pytest.raises(ValueError, match="not an allowed prefix"):
        FactorPackages(prefixes=("a",), import_roots={"b": "c"})
    assert FactorPackages(prefixes=()).prefixes == ()
    with pytest.raises(ImplNotAllowed, match="none configured"):
        check_pointer("rd_factors_lib.generated", "f", FactorPackages(prefixes=()))


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AISTOCK_FACTOR_PACKAGES", "rd_factors_lib=aistock_pipelines.demo.rd_factors_lib, extra_lib")
    assert FactorPackages.from_env() == FactorPackages(
        ("rd_factors_lib", "extra_lib"), {"rd_factors_lib": "aistock_pipelines.demo.rd_factors_lib"}
    )
    monkeypatch.delenv("AISTOCK_FACTOR_PACKAGES")
    assert FactorPackages.from_env() == FactorPackages(("rd_factors_lib",), {})


# ------------------------------------------------------------------------------------ versions
def test_demo_version_matches_the_catalog() -> None:
    from aistock_pipelines.demo import rd_factors_lib

    assert (DEMO_DIR / "VERSION").read_text(encoding="utf-8").strip() == "20260114"
    assert rd_factors_lib.__version__ == "20260114"
    assert installed_version("rd_factors_lib", DEMO) == "20260114"
    assert installed_version("rd_factors_lib", FactorPackages()) is None  # not installed
    pointers = {r["impl_version"] for r in load_demo_catalog("factor_catalog.json")["factors"] if "impl_version" in r}
    assert pointers == {"20260114"}


@pytest.mark.parametrize(
    ("installed", "wanted", "expected"),
    [
        ("20260114", "20260114", 0), ("20260115", "20260114", 1), ("20251231", "20260114", -1),
        ("1.0.8", "1.0.7", 1), ("1.0", "1.0.0", 0), ("v1.2.0", "1.10.0", -1), ("1.0.8rc1", "1.0.8", None),
        ("abc", "abc", 0), ("abc", "abd", None),
    ],
)
def test_compare_versions(installed: str, wanted: str, expected: int | None) -> None:
    assert compare_versions(installed, wanted) == expected


def test_alignment_report_on_the_demo_catalog() -> None:
    records = load_demo_catalog("factor_catalog.json")["factors"]
    extra = [
        {"name": "older", "source": "x", "impl_module": "rd_factors_lib.generated", "impl_func": "factor_hl_range",
         "impl_version": "20260201"},
        {"name": "newer", "source": "x", "impl_module": "rd_factors_lib.generated", "impl_func": "factor_hl_range",
         "impl_version": 20251201},
        {"name": "shell", "source": "x", "impl_module": "os", "impl_func": "system", "impl_version": "1"},
        {"name": "half", "source": "x", "impl_module": "rd_factors_lib.generated"},
        {"name": "unversioned", "source": "x", "impl_module": "rd_factors_lib.generated",
         "impl_func": "factor_vol_ratio_5d"},
        # a pointer to a function the package does not have (yet): the case the check exists for
        {"name": "gone", "source": "x", "impl_module": "rd_factors_lib.generated", "impl_func": "factor_gone",
         "impl_version": "20260114"},
    ]
    report = alignment_report([*records, *extra], DEMO)
    status = {(e.name, e.source): e.status for e in report.entries}
    assert status == {
        ("factor_hl_range", "rdagent_generated"): ImplStatus.ALIGNED,
        ("factor_mom_20d", "rdagent_generated"): ImplStatus.ALIGNED,
        ("factor_mom_20d", "sota"): ImplStatus.ALIGNED,
        ("factor_turnover_adj_mom_10d", "rdagent_generated"): ImplStatus.ALIGNED,
        ("gone", "x"): ImplStatus.MISSING,
        ("factor_vol_ratio_5d", "rdagent_generated"): ImplStatus.ALIGNED,
        ("older", "x"): ImplStatus.PACKAGE_OLDER,
        ("newer", "x"): ImplStatus.PACKAGE_NEWER,
        ("shell", "x"): ImplStatus.NOT_ALLOWED,
        ("half", "x"): ImplStatus.MISSING,
        ("unversioned", "x"): ImplStatus.VERSION_UNKNOWN,
    }
    assert report.counts == {"aligned": 5, "package_older": 1, "package_newer": 1, "missing_implementation": 2,
                             "not_allowed": 1, "version_unknown": 1}
    assert report.installed_versions == {"rd_factors_lib": "20260114"}
    assert not report.aligned
    assert {e.name for e in report.problems} == {"gone", "older", "shell", "half"}
    assert alignment_report(records, DEMO).aligned  # the demo catalog alone: every pointer resolves


# --------------------------------------------------------------------------------- computation
def snapshot_frame(dollar: bool) -> pd.DataFrame:
    """Two instruments × 26 days, sorted by (datetime, instrument), values known row by row."""
    days = pd.bdate_range("2025-01-02", periods=26)
    instruments = ["SH600000", "SZ000001"]
    index = pd.MultiIndex.from_product([days, instruments], names=["datetime", "instrument"])
    n = len(index)
    rng = np.random.default_rng(7)
    close = 10 + rng.random(n).cumsum()
    data = {"open": close * 0.99, "high": close * 1.02, "low": close * 0.97, "close": close,
            "volume": rng.integers(1_000, 9_000, n).astype("float64")}
    frame = pd.DataFrame(data, index=index)
    return frame.rename(columns=lambda c: f"${c}") if dollar else frame


def hand_values(frame: pd.DataFrame, column: str, fn) -> dict[tuple, float]:
    """Per instrument, in date order, with plain Python lists (no pandas groupby)."""
    out = {}
    prefix = "$" if "$close" in frame.columns else ""
    for instrument in frame.index.get_level_values("instrument").unique():
        part = frame.xs(instrument, level="instrument")
        series = [float(v) for v in part[prefix + column]]
        for i, day in enumerate(part.index):
            out[(day, instrument)] = fn(series, i)
    return out


def record(func: str) -> dict:
    return {"name": func, "source": "rdagent_generated", "impl_module": "rd_factors_lib.generated", "impl_func": func}


@pytest.mark.parametrize("dollar", [True, False], ids=["$-columns", "plain-columns"])
def test_compute_factor_matches_hand_computation(dollar: bool) -> None:
    frame = snapshot_frame(dollar)
    mom = compute_factor(record("factor_mom_20d"), frame, DEMO)
    expected_mom = hand_values(frame, "close", lambda s, i: s[i] / s[i - 20] - 1 if i >= 20 else NAN)
    vol = compute_factor(record("factor_vol_ratio_5d"), frame, DEMO)
    expected_vol = hand_values(frame, "volume", lambda s, i: s[i] / (sum(s[i - 4:i + 1]) / 5) if i >= 4 else NAN)
    rng = compute_factor(record("factor_hl_range"), frame, DEMO)
    p = "$" if dollar else ""
    for series, expected in ((mom, expected_mom), (vol, expected_vol)):
        assert series.index.equals(frame.index) and series.dtype == "float64"
        got = series.to_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if np.isnan(value):
                assert np.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-12), key
    assert mom.name == "factor_mom_20d" and int(mom.notna().sum()) == 2 * 6  # 26 days - 20 per instrument
    assert int(vol.notna().sum()) == 2 * 22
    np.testing.assert_allclose(rng.to_numpy(), (frame[p + "high"] / frame[p + "low"] - 1).to_numpy(), rtol=1e-15)
    assert rng.iloc[0] == pytest.approx(1.02 / 0.97 - 1)
    turnover = frame.assign(**{p + "turnover_rate": (frame[p + "volume"] / 1000)})
    adj = compute_factor(record("factor_turnover_adj_mom_10d"), turnover, DEMO)
    expected_adj = hand_values(turnover, "close", lambda s, i: s[i] / s[i - 10] - 1 if i >= 10 else NAN)
    mean_turnover = hand_values(turnover, "turnover_rate", lambda s, i: sum(s[i - 9:i + 1]) / 10 if i >= 9 else NAN)
    got = adj.to_dict()
    for key, value in expected_adj.items():
        want = value / mean_turnover[key]
        assert np.isnan(got[key]) if np.isnan(want) else got[key] == pytest.approx(want, rel=1e-12), key
    assert int(adj.notna().sum()) == 2 * 16


def test_compute_factor_on_unsorted_frame_keeps_caller_order() -> None:
    frame = snapshot_frame(dollar=True)
    shuffled = frame.sample(frac=1.0, random_state=3)
    expected = compute_factor(record("factor_mom_20d"), frame, DEMO)
    got = compute_factor(record("factor_mom_20d"), shuffled, DEMO)
    assert got.index.equals(shuffled.index)
    pd.testing.assert_series_equal(got.sort_index(), expected)
    assert list(shuffled.columns) == ["$open", "$high", "$low", "$close", "$volume"]  # caller's frame untouched


def test_compute_factor_rejects_bad_frames_and_pointers() -> None:
    frame = snapshot_frame(dollar=False)
    with pytest.raises(ValueError, match=r"indexed by \('datetime', 'instrument'\)"):
        compute_factor(record("factor_hl_range"), frame.reset_index(), DEMO)
    with pytest.raises(ValueError, match=r"indexed by"):
        compute_factor(record("factor_hl_range"), frame.swaplevel().sort_index(), DEMO)
    with pytest.raises(KeyError, match=r"needs a \$close or close column"):
        compute_factor(record("factor_mom_20d"), frame[["volume"]], DEMO)
    with pytest.raises(ImplNotAllowed):
        compute_factor({"name": "x", "impl_module": "os", "impl_func": "system"}, frame, DEMO)
    with pytest.raises(ValueError, match="duplicate"):
        compute_factor(record("factor_hl_range"), pd.concat([frame.iloc[:2], frame.iloc[:1]]), DEMO)

"""A generated RD-Agent results directory with hundreds of factors and loops, and what the library views
must show for it.

Every record is written in one of the shapes RD-Agent is seen to export — plain metric mappings, the pandas
``{"Unnamed: 0": name, "0": value}`` artefact (records and columns), text summaries with percentages — or an
odd one (NaN tokens, numbers as strings, booleans, integers beyond float range, lists where a string is due,
missing fields). The expected view columns are written down *while generating*, from the values drawn, not
by running the sync's rules: a test compares the views with them.
"""

from __future__ import annotations

import json
import random
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from aistock_pipelines.demo.rdagent_results_builder import SCHEMA

NAN = float("nan")
WITH, WITHOUT = "1day.excess_return_with_cost.", "1day.excess_return_without_cost."
SEGMENTS = {"train": ["2010-01-07", "2018-12-31"], "valid": ["2019-01-02", "2020-12-31"],
            "test": ["2021-01-04", "2025-06-30"]}
SEGMENT_DATES = (date(2010, 1, 7), date(2018, 12, 31), date(2019, 1, 2), date(2020, 12, 31), date(2021, 1, 4),
                 date(2025, 6, 30))
SEGMENT_COLUMNS = ("train_start", "train_end", "valid_start", "valid_end", "test_start", "test_end")
FACTOR_SOURCES = ("rdagent_generated", "sota", "qlib_alpha158", "qlib_alpha360")


def _hex(*parts: Any) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, "/".join(map(str, parts))).hex


@dataclass
class Generated:
    """The directory and, per view key, the expected columns."""

    path: Path
    factors: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    alpha_only: dict[str, dict[str, Any]] = field(default_factory=dict)
    loops: dict[tuple[str, int, str], dict[str, Any]] = field(default_factory=dict)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)  # catalog -> records written (duplicates included)


class _Draw:
    """Metric values with four decimals, and their text forms."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, low: float = -0.2, high: float = 0.3) -> float:
        return round(self.rng.uniform(low, high), 4)

    def percent(self) -> tuple[str, float]:
        text = f"{self.rng.uniform(-30, 30):.2f}"
        return text, float(Decimal(text) / 100)


# ------------------------------------------------------------------------------------------ factors
def _factor_performance(variant: int, d: _Draw) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(best_performance, extra top-level fields, expected ic/ic_ir/rank_ic/annualized_return/max_drawdown/sharpe)."""
    ic, icir, ric, ar, mdd, sh, other = (d.value() for _ in range(7))
    none = dict.fromkeys(("ic", "ic_ir", "rank_ic", "annualized_return", "max_drawdown", "sharpe"))
    if variant == 0:
        return ({"ic": ic, "icir": icir, "rank_ic": ric, "ann_ret": ar, "mdd": mdd, "sharpe": sh}, {},
                {"ic": ic, "ic_ir": icir, "rank_ic": ric, "annualized_return": ar, "max_drawdown": mdd, "sharpe": sh})
    if variant == 1:
        return ({"IC": str(ic), "ICIR": NAN, "Rank IC": True, "annualized_return": ar, "max_drawdown": mdd}, {},
                {**none, "ic": ic, "annualized_return": ar, "max_drawdown": mdd})
    if variant == 2:
        return ([{"Unnamed: 0": "IC", "0": ic}, {"Unnamed: 0": "Rank IC", "0": ric},
                 {"Unnamed: 0": WITHOUT + "annualized_return", "0": other},
                 {"Unnamed: 0": WITH + "annualized_return", "0": ar}, {"Unnamed: 0": WITH + "max_drawdown", "0": mdd}],
                {}, {**none, "ic": ic, "rank_ic": ric, "annualized_return": ar, "max_drawdown": mdd})
    if variant == 3:
        return ({"Unnamed: 0": {"0": "IC", "1": "ICIR", "2": WITHOUT + "annualized_return"},
                 "0": {"0": ic, "1": icir, "2": ar}}, {}, {**none, "ic": ic, "ic_ir": icir, "annualized_return": ar})
    if variant == 4:
        (ar_text, ar_value), (mdd_text, mdd_value) = d.percent(), d.percent()
        return (f"IC: {ic}, Rank IC: {ric}, Ann.Ret: {ar_text}%, MDD: {mdd_text}%, Sharpe: {sh}", {},
                {**none, "ic": ic, "rank_ic": ric, "annualized_return": ar_value, "max_drawdown": mdd_value,
                 "sharpe": sh})
    if variant == 5:
        return "无回测记录", {}, none
    if variant == 6:
        return None, {}, none  # the field is left out
    return [1, 2], {"ic": str(ic), "ic_ir": NAN}, {**none, "ic": ic}  # odd shape; a top-level IC as text


#: (impl_func, impl_version, resolves, status) with the demo package (version 20260114).
_POINTERS = (
    ("factor_mom_20d", "20260114", True, "aligned"),
    ("factor_hl_range", "20251201", True, "package_newer"),
    ("factor_vol_ratio_5d", "20270101", False, "package_older"),
    ("missing_function", "20260114", False, "missing_implementation"),
    ("system", "1", False, "not_allowed"),  # impl_module "os"
    ("factor_mom_20d", None, None, "version_unknown"),
)


def _factor(i: int, d: _Draw, *, duplicate: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    source = FACTOR_SOURCES[i % 4]
    record: dict[str, Any] = {"name": f"gen_{i:04d}", "source": source}
    expression = [f"Mean($close, {i})", None, ["list"], 42, "absent"][i % 5]
    if expression != "absent":
        record["expression"] = expression
    if i % 3 == 0:
        record["description_cn"] = "重复" if duplicate else f"因子{i}"
    if i % 4 != 3:
        record["tags"] = ["gen", source] if i % 2 else "not-a-list"
    performance, top, expected = _factor_performance((i + duplicate) % 8, d)
    if performance is not None:
        record["best_performance"] = performance
    record.update(top)
    stored = None if expression == "absent" else {str: expression, int: "42"}.get(type(expression))
    expected = {**expected, "expression": stored,
                "description": record.get("description_cn"), "tags": record.get("tags"),
                "impl_module": None, "impl_func": None, "impl_version": None, "impl_resolves": None,
                "impl_status": None}
    if source in ("rdagent_generated", "sota"):
        func, version, resolves, status = _POINTERS[(i // 4) % len(_POINTERS)]
        module = "os" if status == "not_allowed" else "rd_factors_lib.generated"
        record.update(impl_module=module, impl_func=func)
        if version is not None:  # an integer version is stored as its text
            record["impl_version"] = int(version) if i % 8 == 0 else version
        expected.update(impl_module=module, impl_func=func, impl_version=version, impl_resolves=resolves,
                        impl_status=status)
    return record, expected


# ------------------------------------------------------------------------------------------- loops
def _loop_kpis(variant: int, d: _Draw) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields of the loop record, expected KPI columns)."""
    v = {k: d.value() for k in ("ic", "icir", "ric", "ar", "mdd", "ir", "ar2", "mdd2", "ir2", "sh")}
    kpis = ("annualized_return", "annualized_return_basis", "max_drawdown", "information_ratio", "ic", "ic_ir",
            "rank_ic", "sharpe")
    none = dict.fromkeys(kpis)
    if variant == 0:
        return ({"metrics": {"IC": v["ic"], "ICIR": v["icir"], "Rank IC": v["ric"], "annualized_return": v["ar"],
                             "max_drawdown": v["mdd"], "information_ratio": v["ir"]}},
                {**none, "annualized_return": v["ar"], "annualized_return_basis": "unspecified",
                 "max_drawdown": v["mdd"], "information_ratio": v["ir"], "ic": v["ic"], "ic_ir": v["icir"],
                 "rank_ic": v["ric"]})
    if variant == 1:
        names = ["IC", "ICIR", "Rank IC", WITHOUT + "annualized_return", WITH + "annualized_return",
                 WITHOUT + "max_drawdown", WITH + "max_drawdown", WITH + "information_ratio"]
        values = [v["ic"], v["icir"], v["ric"], v["ar2"], v["ar"], v["mdd2"], v["mdd"], v["ir"]]
        return ({"metrics": [{"Unnamed: 0": n, "0": x} for n, x in zip(names, values)]},
                {**none, "annualized_return": v["ar"], "annualized_return_basis": "excess_return_with_cost",
                 "max_drawdown": v["mdd"], "information_ratio": v["ir"], "ic": v["ic"], "ic_ir": v["icir"],
                 "rank_ic": v["ric"]})
    if variant == 2:
        names = [WITHOUT + "annualized_return", WITHOUT + "max_drawdown", WITHOUT + "information_ratio"]
        return ({"metrics": {"Unnamed: 0": {str(k): n for k, n in enumerate(names)},
                             "0": {"0": v["ar"], "1": v["mdd"], "2": v["ir"]}}},
                {**none, "annualized_return": v["ar"], "annualized_return_basis": "excess_return_without_cost",
                 "max_drawdown": v["mdd"], "information_ratio": v["ir"]})
    if variant == 3:
        return ({"annualized_return": v["ar2"], "ic": v["ic"], "ic_ir": v["icir"], "rank_ic": v["ric"],
                 "max_drawdown": v["mdd"], "metrics": {WITH + "annualized_return": v["ar"], "IC": v["ir"]}},
                {**none, "annualized_return": v["ar"], "annualized_return_basis": "excess_return_with_cost",
                 "max_drawdown": v["mdd"], "ic": v["ic"], "ic_ir": v["icir"], "rank_ic": v["ric"]})
    if variant == 4:
        return ({"metrics": {"IC": NAN, "ICIR": "n/a", "Rank IC": True, "annualized_return": 10 ** 400,
                             "max_drawdown": None, "information_ratio": str(v["ir"])}},
                {**none, "information_ratio": v["ir"]})
    if variant == 5:
        return {"sharpe": v["sh"]}, {**none, "sharpe": v["sh"]}
    return {"metrics": "see qlib_res.csv"}, none


_DECISIONS = ((True, True), (False, False), (None, None), ("true", None), (0, False))
_HAS_RESULT = ((True, True), (False, False), (1, True), ("yes", None))


def _loop(j: int, task_runs: list[str], strategies: list[str], d: _Draw) -> tuple[dict[str, Any], dict[str, Any]]:
    task_run_id, loop_id, workspace_id = task_runs[j % len(task_runs)], j // (2 * len(task_runs)), _hex("ws", j)
    decision, expected_decision = _DECISIONS[j % len(_DECISIONS)]
    has_result, expected_result = _HAS_RESULT[j % len(_HAS_RESULT)]
    record: dict[str, Any] = {"task_run_id": task_run_id, "loop_id": loop_id, "workspace_id": workspace_id,
                              "decision": decision, "has_result": has_result, "status": "success"}
    action = [("factor", "factor"), ("model", "model"), (7, None), ("absent", None)][j % 4]
    if action[0] != "absent":
        record["action"] = action[0]
    strategy = None if j % 17 == 0 else (12345 if j % 23 == 0 else strategies[j % len(strategies)])
    if strategy is not None:
        record["strategy_id"] = strategy
    factors = [[f"gen_{(j + k) % 400:04d}" for k in range(1 + j % 5)], "gen_0001", None][j % 3]
    if factors is not None:
        record["factor_names"] = factors
    fields, kpis = _loop_kpis(j % 7, d)
    record.update(fields)
    expected = {"strategy_id": None if strategy is None else str(strategy), "action": action[1],
                "decision": expected_decision, "has_result": expected_result, "factors": factors,
                "factor_count": len(factors) if isinstance(factors, list) else None, **kpis}
    return record, expected


# -------------------------------------------------------------------------------------- strategies
def _strategy(k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    strategy_id = _hex("strategy", k)
    none = {"model_type": None, "market": None, "benchmark": None, "features": None, "feature_count": None,
            **dict.fromkeys(SEGMENT_COLUMNS)}
    if k % 4 == 0:
        features = [f"gen_{k:04d}", "KMID", "ROC20"]
        return ({"strategy_id": strategy_id, "market": "csi300", "backtest_config": {"benchmark": "SH000300"},
                 "feature_list": features, "model_config": {"class": "LGBModel"},
                 "dataset_config": {"class": "DatasetH", "kwargs": {"segments": SEGMENTS}}},
                {**none, "model_type": "LGBModel", "market": "csi300", "benchmark": "SH000300", "features": features,
                 "feature_count": 3, **dict(zip(SEGMENT_COLUMNS, SEGMENT_DATES))})
    if k % 4 == 1:
        segments = {"train": SEGMENTS["train"], "validation": SEGMENTS["valid"]}
        return ({"strategy_id": strategy_id, "instruments": "csi500", "backtest_config": {"benchmark": 300},
                 "feature_list": ["a", 3, None, "b"], "dataset_config": {"segments": segments}},
                {**none, "market": "csi500", "benchmark": "300", "features": ["a", "b"], "feature_count": 2,
                 **dict(zip(SEGMENT_COLUMNS[:4], SEGMENT_DATES[:4]))})
    if k % 4 == 2:
        return {"strategy_id": strategy_id}, none
    return ({"strategy_id": strategy_id, "data_config": {"instruments": "all"}, "feature_list": "not-a-list",
             "dataset_config": {"kwargs": {"segments": {"train": ["20100107", "20181231 00:00:00"],
                                                        "test": ["2021-13-45", "x"]}}}},
            {**none, "market": "all", "train_start": date(2010, 1, 7), "train_end": date(2018, 12, 31)})


# ------------------------------------------------------------------------------------------ models
def _model(m: int, loop: dict[str, Any] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"model_id": _hex("model", m)}
    if loop is None:
        record.update(task_run_id="ghost-run", loop_id=m, workspace_id=_hex("ghost", m))
    else:
        record.update(task_run_id=loop["task_run_id"], loop_id=loop["loop_id"], workspace_id=loop["workspace_id"])
    if m % 3 == 0:
        record.update(model_type="LGBModel", flattened_feature_list=["KMID", f"gen_{m:04d}"], dataset_config={
            "kwargs": {"handler": {"kwargs": {"instruments": "csi800"}}, "segments": SEGMENTS}})
    elif m % 3 == 1:
        record.update(model_config={"class": "XGBModel"}, feature_schema={"feature": ["x", 1, "y"]})
    else:
        record.update(model_type=123, dataset_config="oops")
    return record


def _model_expected(record: dict[str, Any], loop: dict[str, Any] | None, strategy: dict[str, Any] | None) -> dict[str, Any]:
    own = record.get("dataset_config") if isinstance(record.get("dataset_config"), dict) else None
    features = {"LGBModel": record.get("flattened_feature_list")}.get(record.get("model_type"), ["x", "y"]
                                                                      if "feature_schema" in record else None)
    return {
        "model_type": {123: "123"}.get(record.get("model_type"), record.get("model_type") or "XGBModel"),
        "task_run_id": record["task_run_id"], "loop_id": record["loop_id"], "workspace_id": record["workspace_id"],
        **dict(zip(SEGMENT_COLUMNS, SEGMENT_DATES if own else (None,) * 6)),
        "market": "csi800" if own else (strategy or {}).get("market"),
        "benchmark": (strategy or {}).get("benchmark"), "features": features,
        "feature_count": len(features) if features is not None else None,
        "strategy_id": None if loop is None else loop["strategy_id"], "loop_in_leaderboard": loop is not None,
        "decision": None if loop is None else loop["decision"],
        "annualized_return": None if loop is None else loop["annualized_return"],
    }


# --------------------------------------------------------------------------------------- artifacts
_SUMMARIES = (json.dumps({"ic": 0.0312, "note": "月度"}, ensure_ascii=False), json.dumps({"sharpe": NAN}), "",
              "{broken", json.dumps({"text": "x" * 600}))


def _artifacts(loops: list[tuple[str, int, str]]) -> tuple[list[tuple], list[tuple], dict[tuple[str, int], int]]:
    """registry.sqlite rows (0-3 artifacts per loop, 0-3 files each) and the artifact count per loop."""
    artifacts, files, counts = [], [], {}
    for n, (task_run_id, loop_id, workspace_id) in enumerate(loops):
        counts[(task_run_id, loop_id)] = n % 4
        for a in range(n % 4):
            artifact_id = f"art-{n}-{a}"
            artifacts.append((artifact_id, task_run_id, loop_id, workspace_id, ("report", "model", "feedback")[a],
                              f"artifact {a}", "present", int(a == 0), "ret.pkl", _SUMMARIES[(n + a) % 5]))
            for f in range((n + a) % 4):
                files.append((f"file-{n}-{a}-{f}", artifact_id, workspace_id, f"out/{a}/{f}.bin",
                              _hex("sha", n, a, f), 1000 * (f + 1) + n, "2026-01-14T08:00:00+00:00", "binary"))
    return artifacts, files, counts


def _write(path: Path, key: str, records: list[dict[str, Any]]) -> None:
    payload = {"version": "v1", "generated_at_utc": "2026-02-01T00:00:00+00:00", "source": "generated", key: records}
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")  # NaN written as the bare token


def _aggregate_strategies(out: Generated, strategy_expected: dict[str, dict[str, Any]]) -> None:
    """Each strategy's expected row with its loops' aggregates (count, accepted, best return, keys)."""
    for sid, expected in strategy_expected.items():
        used = sorted((k, v) for k, v in out.loops.items() if v["strategy_id"] == sid)
        returns = [v["annualized_return"] for _, v in used if v["annualized_return"] is not None]
        out.strategies[sid] = {**expected, "loop_count": len(used),
                               "positive_decisions": sum(v["decision"] is True for _, v in used),
                               "best_annualized_return": max(returns, default=None),
                               "loops": [{"task_run_id": t, "loop_id": lo, "workspace_id": w} for (t, lo, w), _ in used]
                               or None}


def _write_alpha158(target: Path, out: Generated) -> int:
    """60 Alpha158 factors, the first 15 also in the factor catalog (source qlib_alpha158); returns the count."""
    alpha = []
    for k in range(60):
        name = f"gen_{4 * k + 2:04d}" if k < 15 else f"A158_{k:02d}"
        record = {"name": name, "expression": f"Ref($close, {k})/$close"}
        if k % 5:
            record["source"] = "qlib_alpha158"
        if k % 2:
            record["tags"] = ["alpha158", "rolling"]
        alpha.append(record)
        if k >= 15:
            out.alpha_only[name] = {"source": "qlib_alpha158", "expression": record["expression"],
                                    "tags": record.get("tags")}
    (target / "aistock" / "alpha158_meta.json").write_text(json.dumps(
        {"version": "v1", "generated_at_utc": "2026-02-01T00:00:00+00:00", "source": "qlib_alpha158",
         "factors": alpha}), encoding="utf-8")
    return len(alpha)


def generate_results_dir(target: Path, *, factors: int = 400, loops: int = 300, strategies: int = 40,
                         models: int = 150, seed: int = 20260214) -> Generated:
    """Write ``target/aistock/*.json`` and ``target/registry.sqlite``; return what the views must show."""
    d = _Draw(random.Random(seed))
    out = Generated(path=target)
    (target / "aistock").mkdir(parents=True, exist_ok=True)

    factor_records = []
    for i in [*range(factors), *range(0, factors, 40)]:  # every 40th appears again later: the later one wins
        record, expected = _factor(i, d, duplicate=len(factor_records) >= factors)
        factor_records.append(record)
        out.factors[(record["name"], record["source"])] = expected
    _write(target / "aistock" / "factor_catalog.json", "factors", factor_records)

    strategy_records, strategy_expected = [], {}
    for k in range(strategies):
        record, expected = _strategy(k)
        strategy_records.append(record)
        strategy_expected[record["strategy_id"]] = expected
    _write(target / "aistock" / "strategy_catalog.json", "strategies", strategy_records)

    task_runs = [_hex("run", r) if r % 2 else f"2026-01-{r + 1:02d}_10-00-00-000000" for r in range(12)]
    loop_records = []
    for j in range(loops):
        record, expected = _loop(j, task_runs, list(strategy_expected), d)
        loop_records.append(record)
        out.loops[(record["task_run_id"], record["loop_id"], record["workspace_id"])] = expected
    _write(target / "aistock" / "loop_catalog.json", "loops", loop_records)

    keys = list(out.loops)
    model_records = []
    for m in range(models):
        loop_key = None if m % 10 == 9 else keys[(2 * m) % len(keys)]
        loop = None if loop_key is None else {"task_run_id": loop_key[0], "loop_id": loop_key[1],
                                              "workspace_id": loop_key[2], **out.loops[loop_key]}
        record = _model(m, loop)
        model_records.append(record)
        strategy = strategy_expected.get(loop["strategy_id"]) if loop is not None else None
        out.models[record["model_id"]] = _model_expected(record, loop, strategy)
    _write(target / "aistock" / "model_catalog.json", "models", model_records)

    _aggregate_strategies(out, strategy_expected)
    out.records["alpha158"] = _write_alpha158(target, out)
    distinct = list({(t, lo): (t, lo, w) for t, lo, w in out.loops}.values())
    artifacts, files, counts = _artifacts(distinct)
    for key, expected in out.loops.items():
        expected["loop_artifacts"] = counts[key[:2]]
    write_registry(target / "registry.sqlite", artifacts, files)
    out.records.update(factors=len(factor_records), loops=len(loop_records), models=len(model_records),
                       strategies=len(strategy_records), loop_artifacts=len(artifacts))
    return out


def write_registry(db_path: Path, artifacts: list[tuple], files: list[tuple]) -> None:
    """``registry.sqlite`` with the demo's schema and these rows."""
    db_path.unlink(missing_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.executescript(SCHEMA)
            conn.executemany(f"INSERT INTO artifacts VALUES ({','.join('?' * 10)})", artifacts)
            conn.executemany(f"INSERT INTO artifact_files VALUES ({','.join('?' * 8)})", files)
    finally:
        conn.close()

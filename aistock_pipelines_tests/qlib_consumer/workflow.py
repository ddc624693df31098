"""Qlib's standard workflow on a snapshot, run by pyqlib itself in its own environment (``bin/qlib-env``).

Alpha158 on a market file, LightGBM fit, TopkDropoutStrategy backtest against a benchmark index — what
Qlib's examples and RD-Agent's Qlib scenario run. Imports nothing of aistock_pipelines: it sees the
snapshot folder only, as a researcher's Qlib does. Writes what the test asserts as JSON.

    python workflow.py PROVIDER_URI OUT.json MARKET BENCHMARK TRAIN_START TRAIN_END VALID_END TEST_END
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import numpy as np
import pandas as pd


def _next_day(day: str) -> str:
    return (pd.Timestamp(day) + pd.Timedelta(days=1)).strftime("%Y-%m-%d")


def main(provider_uri: str, out: str, market: str, benchmark: str, train_start: str, train_end: str,
         valid_end: str, test_end: str) -> None:
    import qlib
    from qlib.constant import REG_CN
    from qlib.contrib.data.handler import Alpha158
    from qlib.contrib.evaluate import backtest_daily
    from qlib.contrib.model.gbdt import LGBModel
    from qlib.contrib.strategy import TopkDropoutStrategy
    from qlib.data import D
    from qlib.data.dataset import DatasetH

    qlib.init(provider_uri=provider_uri, region=REG_CN, kernels=1)
    test_start = _next_day(valid_end)
    handler = Alpha158(instruments=market, start_time=train_start, end_time=test_end,
                       fit_start_time=train_start, fit_end_time=train_end)
    dataset = DatasetH(handler, segments={"train": (train_start, train_end), "valid": (_next_day(train_end), valid_end),
                                          "test": (test_start, test_end)})
    features = dataset.prepare("train", col_set="feature")
    model = LGBModel(loss="mse", num_boost_round=60, early_stopping_rounds=20, num_leaves=15, learning_rate=0.1,
                     num_threads=2, verbosity=-1)
    model.fit(dataset)
    pred = model.predict(dataset, segment="test")
    strategy = TopkDropoutStrategy(signal=pred, topk=10, n_drop=2)
    report, positions = backtest_daily(start_time=test_start, end_time=test_end, strategy=strategy,
                                       benchmark=benchmark, exchange_kwargs={"limit_threshold": 0.095,
                                                                           "deal_price": "close"})
    held = [sorted(p.get_stock_list()) for _, p in sorted(positions.items())]
    result = {
        "versions": {p: version(p) for p in ("pyqlib", "pandas", "numpy", "lightgbm", "mlflow")},
        "market_instruments": len(D.list_instruments(D.instruments(market), as_list=True)),
        "features": {"columns": len(features.columns), "rows": len(features),
                     "instruments": int(features.index.get_level_values("instrument").nunique()),
                     "all_nan": [str(c[-1]) for c in features.columns[features.isna().all().to_numpy()]]},
        "predictions": [[d.strftime("%Y-%m-%d"), str(i)] for d, i in pred.index],
        "report": {"dates": [d.strftime("%Y-%m-%d") for d in report.index],
                   **{c: [float(v) for v in report[c].to_numpy()] for c in ("bench", "return", "turnover", "account")}},
        "holdings": {"days_with_positions": sum(bool(h) for h in held),
                     "distinct_stocks": len({s for h in held for s in h}),
                     "changes": sum(a != b for a, b in zip(held, held[1:]))},
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The export engine's output pinned byte for byte on the demo market.

The digests below were computed by the engine before its restructuring into stages (commit 08454c8): a
full export, then incremental exports over days with qfq restatements, for both demo layouts — in the
layout of that engine, ``suspended_days: omit`` (``test_suspension`` proves the default layout equals it
plus the NaN rows). Any change to
what is written — values, index, column names, bins — changes a digest. A deliberate change of the output
updates these digests in the same commit and says why.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aistock_pipelines.db import create_db_engine
from aistock_pipelines.demo.market import advance_market
from aistock_pipelines_tests.export.helpers import START, make_exporter, options_for

pytestmark = pytest.mark.db


#: variant → (digest after the full export, after the first incremental, after the second)
PINNED = {
    "allA": ("7ca12f49d600506204379e352bfe68fab2ffb48d82964c9c8eb74a530f494eb6",
             "c6f43e8fee5628e8fc0a05672e5ef8c8c1c830c6d3e5d16a8a49df6fc0c21784",
             "f2fefc6b0b1aba05d1065523dd68dbef5945eb3b509e2e00c06f54aa3be5518f"),
    "qlib": ("ed02a74ff01439c5f3f37d73cd6c5f774f084c55ded8890686ba2df35b3e89ef",
             "5c08386a76d1b2d930b1a9d7bd5dcec2e6b653cc50e7ce4db6e89bbad253bb92",
             "9b6c2955971d3b0436b7a7c60aa7a5614d6861bc575200c6bb30c5c87f1f051e"),
}


def snapshot_digest(path: Path) -> str:
    """sha256 over the h5 frame (index levels, codes, columns, values as stored) and every bin's bytes."""
    frame = pd.read_hdf(path / "daily_pv.h5", key="data")
    h = hashlib.sha256()
    h.update(np.asarray(frame.index.get_level_values(0), dtype="datetime64[ns]").tobytes())
    h.update("\n".join(map(str, frame.index.get_level_values(1))).encode())
    h.update("\n".join(map(str, frame.columns)).encode())
    h.update(str([str(t) for t in frame.dtypes]).encode())
    h.update(np.ascontiguousarray(frame.to_numpy()).tobytes())
    for p in sorted((path / "features").rglob("*.bin")):
        h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes())
    h.update((path / "calendars" / "day.txt").read_bytes())
    h.update((path / "instruments" / "all.txt").read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_full_and_incremental_output_is_pinned(market_db, tmp_path, variant):
    ex = make_exporter(market_db, tmp_path)
    options = replace(options_for(variant), suspended_days="omit")
    ex.export_full(variant, START, options=options)
    digests = [snapshot_digest(tmp_path / variant)]
    engine = create_db_engine(market_db)
    try:
        for _ in range(2):
            advance_market(engine, events=6)
            assert ex.export_incremental(variant).mode == "incremental"
            digests.append(snapshot_digest(tmp_path / variant))
    finally:
        engine.dispose()
    assert tuple(digests) == PINNED[variant]

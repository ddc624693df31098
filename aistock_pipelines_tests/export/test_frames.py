"""frames.patch_sorted: the stored block updated in place, or left untouched when it cannot be."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aistock_pipelines.export import frames


def frame(days: list[str], names: list[str], skip: set[tuple[str, str]] = frozenset(), scale: float = 1.0) -> pd.DataFrame:
    keys = [(d, n) for d in days for n in names if (d, n) not in skip]
    dates = np.array(days, dtype="datetime64[ns]")
    c0 = np.array([days.index(d) for d, _ in keys])
    c1 = np.array([names.index(n) for _, n in keys])
    close = (10 + c0 + 0.5 * c1) * scale
    values = np.column_stack([close, np.full(len(keys), np.nan)])
    return pd.DataFrame(values, index=frames.make_index(dates, c0, np.array(names, dtype=object), c1),
                        columns=["close", "change"])


def test_patch_overwrites_restated_rows_appends_new_days_and_equals_a_merge():
    days, names = ["2024-01-02", "2024-01-03", "2024-01-04"], ["a", "b", "c"]
    # "c" is suspended on the last stored day: its new row divides by its close of the day before
    stored = frames.merge_sorted([(frame(days, names, {("2024-01-03", "b"), ("2024-01-04", "c")}), None)], change=True)
    new_day = frame(days + ["2024-01-05"], names + ["d"])
    new_day = new_day[new_day.index.get_level_values(0) == pd.Timestamp("2024-01-05")]
    history = frame(days + ["2024-01-05"], ["b"], {("2024-01-03", "b")}, scale=0.9)  # "b" restated
    delta = frames.merge_sorted([(new_day, new_day.index.get_level_values(1) != "b"), (history, None)])
    block = np.full((len(stored) + 4, 2), -1.0)
    block[:len(stored)] = stored.to_numpy()
    got = frames.patch_sorted(block, stored.index, ["close", "change"], delta, {"b"}, np.datetime64("2024-01-04", "ns"))
    want = frames.merge_sorted([(stored, stored.index.get_level_values(1) != "b"), (delta, None)], change=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert np.shares_memory(got.to_numpy(), block), "patched in place"
    assert got.loc[("2024-01-05", "c"), "change"] == (10 + 3 + 1.0) / (10 + 1 + 1.0) - 1
    assert np.isnan(got.loc[("2024-01-05", "d"), "change"]) and np.isnan(got.loc[("2024-01-02", "b"), "change"])


def test_patch_refuses_changed_days_and_leaves_the_block_untouched():
    days, names = ["2024-01-02", "2024-01-03", "2024-01-04"], ["a", "b"]
    stored = frames.merge_sorted([(frame(days, names), None)], change=True)
    history = frame(days, ["b"], {("2024-01-03", "b")}, scale=0.9)  # "b" lost a day
    block = np.zeros((len(stored) + 2, 2))
    block[:len(stored)] = stored.to_numpy()
    before = block.copy()
    assert frames.patch_sorted(block, stored.index, ["close", "change"], history, {"b"},
                               np.datetime64("2024-01-04", "ns")) is None
    np.testing.assert_array_equal(block, before)
    short = np.zeros((len(stored), 2))  # no spare row for a new day
    new_day = frame(days + ["2024-01-05"], names)
    new_day = new_day[new_day.index.get_level_values(0) == pd.Timestamp("2024-01-05")]
    assert frames.patch_sorted(short, stored.index, ["close", "change"], new_day, set(),
                               np.datetime64("2024-01-04", "ns")) is None


def test_new_days_then_restated_histories_in_two_patches_equal_one_merge():
    """The incremental export's order: every instrument's new day first (before the restatements are
    known), then the restated histories over the block that already holds the new day. A new instrument
    ("ab") sorts among the stored ones, so their codes are renumbered."""
    days, names = ["2024-01-02", "2024-01-03", "2024-01-04"], ["a", "b", "c"]
    stored = frames.merge_sorted([(frame(days, names, {("2024-01-03", "c")}), None)], change=True)
    everything = days + ["2024-01-05"]
    new_day = frame(everything, ["a", "ab", "b", "c"])
    new_day = new_day[new_day.index.get_level_values(0) == pd.Timestamp("2024-01-05")]
    history = frame(everything, ["b"], scale=0.9)  # "b" restated, its new day included
    block = np.full((len(stored) + len(new_day), 2), -1.0)
    block[:len(stored)] = stored.to_numpy()
    first = frames.patch_sorted(block, stored.index, ["close", "change"], new_day, set(), np.datetime64("2024-01-04", "ns"))
    assert list(first.index.levels[1]) == ["a", "ab", "b", "c"] and first.index.codes[1].dtype == np.int8
    got = frames.patch_sorted(block, first.index, ["close", "change"], history, {"b"}, np.datetime64("2024-01-05", "ns"))
    want = frames.merge_sorted([(stored, stored.index.get_level_values(1) != "b"),
                                (new_day, new_day.index.get_level_values(1) != "b"), (history, None)], change=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got.loc[("2024-01-05", "b"), "change"] == history["close"].iloc[-1] / history["close"].iloc[-2] - 1

"""JSON cleaning shared by the results server and the sync: non-finite floats become null, nothing else changes."""

import json
import math

import pytest

from aistock_pipelines.rdagent.json_values import MAX_JSON_DEPTH, JsonTooDeep, sanitize_json


def test_non_finite_floats_become_none_recursively():
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], 3: (True, "x", None, 7)}
    cleaned = sanitize_json(value)
    assert cleaned == {"a": None, "b": [1.5, None, {"c": None}], "3": [True, "x", None, 7]}
    assert json.dumps(cleaned, allow_nan=False)  # what Starlette and jsonb require
    assert value["a"] != value["a"]  # the input is left as it was


def test_depth_is_limited_and_costs_no_stack():
    def nested(depth: int) -> list:
        value: list = [1.0]
        for _ in range(depth - 1):
            value = [value]
        return value

    assert sanitize_json(nested(MAX_JSON_DEPTH)) == nested(MAX_JSON_DEPTH)
    with pytest.raises(JsonTooDeep, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        sanitize_json(nested(MAX_JSON_DEPTH + 1))
    deep = sanitize_json(nested(50_000), max_depth=60_000)  # far beyond Python's recursion limit
    for _ in range(49_999):
        deep = deep[0]
    assert deep == [1.0]
    assert list(sanitize_json({"b": 1, "a": {"d": 2, "c": [3, {"e": math.nan}]}})) == ["b", "a"]  # order kept

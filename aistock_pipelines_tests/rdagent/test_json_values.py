"""JSON cleaning shared by the results server and the sync: non-finite floats become null, nothing else changes."""

import json
import math

from aistock_pipelines.rdagent.json_values import sanitize_json


def test_non_finite_floats_become_none_recursively():
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], 3: (True, "x", None, 7)}
    cleaned = sanitize_json(value)
    assert cleaned == {"a": None, "b": [1.5, None, {"c": None}], "3": [True, "x", None, 7]}
    assert json.dumps(cleaned, allow_nan=False)  # what Starlette and jsonb require
    assert value["a"] != value["a"]  # the input is left as it was

"""JSON values every consumer accepts: the one cleaning step shared by the results server and the sync."""

from __future__ import annotations

import math
from typing import Any

#: Deepest nesting accepted (catalog records nest configs a dozen levels at most). Deeper documents are
#: refused before anything recursive (pydantic, json.dumps, psycopg) meets them.
MAX_JSON_DEPTH = 100


class JsonTooDeep(ValueError):
    """A JSON value nested deeper than the limit: a broken or hostile document."""


def sanitize_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A copy with non-finite floats as ``None`` and keys as text: JSON has no NaN (Starlette refuses it,
    jsonb too). Iterative, so depth costs no stack; deeper than ``max_depth`` raises :class:`JsonTooDeep`."""
    if not isinstance(value, (dict, list, tuple)):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    root: dict[str, Any] | list[Any] = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, dict[str, Any] | list[Any], int]] = [(value, root, 1)]
    isfinite = math.isfinite
    while stack:
        source, target, depth = stack.pop()
        if depth > max_depth:
            raise JsonTooDeep(f"nested deeper than {max_depth} levels")
        is_dict = isinstance(target, dict)
        for key, item in (source.items() if is_dict else enumerate(source)):
            if isinstance(item, (dict, list, tuple)):
                child: Any = {} if isinstance(item, dict) else []
                stack.append((item, child, depth + 1))
            elif isinstance(item, float) and not isfinite(item):
                child = None
            else:
                child = item
            if is_dict:
                target[str(key)] = child
            else:
                target.append(child)
    return root

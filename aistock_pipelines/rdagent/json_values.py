"""JSON values every consumer accepts: the one cleaning step shared by the results server and the sync."""

from __future__ import annotations

import math
from typing import Any


def sanitize_json(value: Any) -> Any:
    """Non-finite floats become ``None``, recursively: JSON has no NaN (Starlette refuses it, jsonb too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): sanitize_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize_json(v) for v in value]
    return value

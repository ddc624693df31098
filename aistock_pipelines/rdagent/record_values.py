"""Catalog values coerced to column types: anything unusable becomes None, never an error.

Catalog records have no fixed schema (a number may come as text, a date in three shapes), so every
derived column goes through one of these.
"""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Any


def as_text(value: Any) -> str | None:
    """Strings as is; numbers as text (``impl_version`` 20260114 written as a JSON number); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:$|[ T])")


def as_date(value: Any) -> date | None:
    """Qlib segment bounds: ``"2010-01-07"``, ``"2010-01-07 00:00:00"`` or ``"20100107"``."""
    if not isinstance(value, str):
        return None
    match = _DATE.match(value.strip())
    if not match:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def first_present(record: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` whose value is not None."""
    for name in names:
        value = record.get(name)
        if value is not None:
            return value
    return None


def at_path(value: Any, *keys: str) -> Any:
    """``value[k1][k2]…`` through nested mappings; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def string_list(value: Any) -> list[str] | None:
    """A list's string items (anything else in it dropped); None unless ``value`` is a list."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else None

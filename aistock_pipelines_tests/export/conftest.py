"""Fixtures of the export tests."""

from __future__ import annotations

import pytest

from aistock_pipelines_tests.export.helpers import START, make_exporter


@pytest.fixture
def exported(market_db, tmp_path):
    """A full export of the demo market into ``tmp_path/demo``: (exporter, result, snapshot path)."""
    ex = make_exporter(market_db, tmp_path)
    result = ex.export_full("demo", START)
    return ex, result, tmp_path / "demo"

"""The snapshots file: validation errors that name the snapshot and key, and one definition of the layout options."""

from datetime import date

import pytest
from pydantic import ValidationError

from aistock_pipelines.export.mapping import ExportMapping
from aistock_pipelines.export.snapshot_shape import SnapshotOptions
from aistock_pipelines.orchestration.adhoc_export import AdhocExportConfig
from aistock_pipelines.settings import DEMO_SNAPSHOTS_FILE
from aistock_pipelines.snapshot_config import (
    MappingDecl,
    SnapshotConfigError,
    SnapshotDecl,
    SnapshotLayout,
    load_snapshots_file,
)


def test_malformed_snapshots_file_names_snapshot_and_key(tmp_path):
    bad = tmp_path / "snapshots.yaml"
    bad.write_text("snapshots:\n  - id: good\n    start: 2021-01-04\n  - id: broken\n    start: 2021-01-04\n    columns: dollars\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'broken', key columns"):
        load_snapshots_file(bad)
    bad.write_text("snapshots:\n  - id: x\n    start: 2021-01-04\n    factor_tables: [nope]\n")
    with pytest.raises(SnapshotConfigError, match="unknown factor tables"):
        load_snapshots_file(bad)


def test_declaration_json_keeps_its_field_order_and_options_convert():
    # The declaration's JSON feeds each snapshot asset's code version: reordering fields would mark
    # every snapshot stale in the UI although nothing changed.
    decl = load_snapshots_file(DEMO_SNAPSHOTS_FILE).get("demo_qlib")
    assert decl.model_dump_json() == (
        '{"id":"demo_qlib","start":"2023-01-03","end":null,"universe":"all","columns":"dollar","instruments":"qlib",'
        '"dtype":"float32","factor_tables":[],"qlib_bins":true,"debug_years":2,"debug_instruments":100}')
    assert decl.options() == SnapshotOptions(columns="dollar", instruments="qlib", dtype="float32", factor_tables=())
    with pytest.raises(ValidationError, match="end is before start"):
        SnapshotDecl(id="x", start=date(2024, 1, 2), end=date(2024, 1, 1))


def test_adhoc_run_config_takes_the_declaration_layout():
    assert set(SnapshotLayout.model_fields) <= set(AdhocExportConfig.model_fields)
    config = AdhocExportConfig(snapshot_id="x", columns="dollar", factor_tables=["daily_basic"], debug_years=3)
    assert config.options() == SnapshotOptions(columns="dollar", factor_tables=("daily_basic",), debug_years=3)
    assert AdhocExportConfig(snapshot_id="x").options() == SnapshotOptions()  # the YAML's defaults
    with pytest.raises(ValidationError):
        AdhocExportConfig(snapshot_id="x", debug_instruments=0)


def test_mapping_defaults_are_the_export_mappings():
    defaults = MappingDecl()
    assert (defaults.bars_table, defaults.raw_table, defaults.calendar_table) == (
        "market.kline_daily_qfq", "market.kline_daily_raw", "market.trading_calendar")
    mapping = ExportMapping()
    assert (defaults.bars_table, defaults.raw_table, defaults.calendar_table) == (
        mapping.bars_table, mapping.raw_table, mapping.calendar_table)


def test_a_release_policy_is_validated_and_changes_no_code_version(tmp_path):
    decl = load_snapshots_file(DEMO_SNAPSHOTS_FILE).get("demo_allA")
    assert decl.release.schedule == "monthly" and decl.release.keep_last == 12
    assert "release" not in decl.model_dump_json(), "a release policy changes no data: no stale snapshot"
    bad = tmp_path / "snapshots.yaml"
    bad.write_text("snapshots:\n  - id: x\n    start: 2021-01-04\n    release: {schedule: yearly}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'x', key release.schedule"):
        load_snapshots_file(bad)
    bad.write_text("snapshots:\n  - id: x\n    start: 2021-01-04\n    release: {keep_last: 0}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'x', key release.keep_last"):
        load_snapshots_file(bad)

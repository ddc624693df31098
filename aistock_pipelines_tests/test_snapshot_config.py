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
        '{"id":"demo_qlib","start":"2023-01-03","end":null,"universe":"all","universes":null,"columns":"dollar",'
        '"instruments":"qlib","dtype":"float32","factor_tables":[],"qlib_bins":true,"debug_years":2,'
        '"debug_instruments":100,"suspended_days":"nan_rows"}')
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


def _snapshots_yaml(tmp_path, body: str):
    path = tmp_path / "snapshots.yaml"
    path.write_text("snapshots:\n" + body)
    return path


def test_bad_values_name_file_snapshot_and_key(tmp_path):
    path = _snapshots_yaml(tmp_path, "  - id: good\n    start: 2023-01-03\n  - id: leap\n    start: 2023-02-30\n")
    with pytest.raises(SnapshotConfigError) as err:
        load_snapshots_file(path)
    message = str(err.value)
    assert str(path) in message and "snapshot 'leap', key start" in message and "'2023-02-30'" in message
    assert "day value is outside expected range" in message
    path = _snapshots_yaml(tmp_path, "  - id: u\n    start: 2023-01-03\n    universe: [000001.SZ, ../../x]\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'u', key universe: .*malformed ts_code\(s\) \['../../x'\]"):
        load_snapshots_file(path)
    path = _snapshots_yaml(tmp_path, "  - id: f\n    start: 2023-01-03\n    factor_tables: [nope]\n")
    with pytest.raises(SnapshotConfigError, match=rf"{path}: snapshot 'f', key factor_tables: unknown factor tables"):
        load_snapshots_file(path)
    path.write_text("mapping:\n  fields:\n    open: {column: open_li, scale: 0}\nsnapshots:\n  - {id: m, start: 2023-01-03}\n")
    with pytest.raises(SnapshotConfigError, match=r"key mapping/factor_tables: column 'open_li': scale must be"):
        load_snapshots_file(path)
    # Valid dates still load as dates (they are text to YAML now, parsed by pydantic).
    path = _snapshots_yaml(tmp_path, "  - {id: ok, start: 2024-02-29, end: '2024-03-01'}\n")
    decl = load_snapshots_file(path).get("ok")
    assert (decl.start, decl.end) == (date(2024, 2, 29), date(2024, 3, 1))


def test_ids_that_collide_once_normalised_are_refused_with_both_names(tmp_path):
    path = _snapshots_yaml(tmp_path, "  - {id: q-1, start: 2023-01-03}\n  - {id: q_1, start: 2023-01-03}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot ids 'q-1' and 'q_1' collide: both become 'q_1'"):
        load_snapshots_file(path)
    path = _snapshots_yaml(tmp_path, "  - {id: Demo, start: 2023-01-03}\n  - {id: demo, start: 2023-01-03}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot ids 'Demo' and 'demo' differ only in case"):
        load_snapshots_file(path)
    path = _snapshots_yaml(tmp_path, "  - {id: q, start: 2023-01-03}\n  - {id: q, start: 2023-01-04}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot id 'q' is declared twice"):
        load_snapshots_file(path)


def test_a_snapshot_holds_the_universes_it_lists(tmp_path):
    """Universe files are declared once; a snapshot may list the subset it holds, and an unknown name is
    refused naming the snapshot, the name and the declared ones."""
    head = ("universes:\n  csi300: {index_weight: 000300.SH}\n  hs_liquid: {spans: hs_liquid}\n"
            "snapshots:\n  - id: every\n    start: 2021-01-04\n  - id: some\n    start: 2021-01-04\n")
    path = tmp_path / "snapshots.yaml"
    path.write_text(head + "    universes: [hs_liquid]\n    suspended_days: omit\n")
    declared = load_snapshots_file(path)
    assert sorted(declared.market_files(declared.get("every").universes).universes) == ["csi300", "hs_liquid"]
    assert list(declared.market_files(declared.get("some").universes).universes) == ["hs_liquid"]
    assert declared.get("some").options().suspended_days == "omit"
    assert declared.get("every").options().suspended_days == "nan_rows"
    path.write_text(head + "    universes: [csi500]\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot some: universes \['csi500'\] are not declared.*csi300"):
        load_snapshots_file(path)
    path.write_text(head + "    suspended_days: drop\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'some', key suspended_days"):
        load_snapshots_file(path)


def test_a_release_policy_is_validated_and_changes_no_code_version(tmp_path):
    decl = load_snapshots_file(DEMO_SNAPSHOTS_FILE).get("demo_allA")
    assert decl.release.schedule == "monthly" and decl.release.keep_last == 12
    assert "release" not in decl.model_dump_json(), "a release policy changes no data: no stale snapshot"
    path = _snapshots_yaml(tmp_path, "  - id: x\n    start: 2021-01-04\n    release: {schedule: yearly}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'x', key release.schedule"):
        load_snapshots_file(path)
    path = _snapshots_yaml(tmp_path, "  - id: x\n    start: 2021-01-04\n    release: {keep_last: 0}\n")
    with pytest.raises(SnapshotConfigError, match=r"snapshot 'x', key release.keep_last"):
        load_snapshots_file(path)

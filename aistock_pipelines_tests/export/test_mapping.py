"""The field mapping against the real catalogue: errors name the table and column."""

from __future__ import annotations


import pytest

from aistock_pipelines.export.mapping import ExportMapping, FactorTable, FieldSpec, MappingError
from aistock_pipelines_tests.export.helpers import START, make_exporter

pytestmark = pytest.mark.db



def test_mapping_errors_name_the_table_and_column(market_db, tmp_path):
    bad_column = ExportMapping(fields={**ExportMapping().fields, "close": FieldSpec("close_yuan", 1.0)})
    with pytest.raises(MappingError, match=r"market.kline_daily_qfq has no column\(s\) \['close_yuan'\]"):
        make_exporter(market_db, tmp_path, bad_column).export_full("x", START)
    missing = ExportMapping(factor_tables=(FactorTable("f", "market.no_such_table", prefix="f_"),))
    with pytest.raises(MappingError, match="market.no_such_table does not exist"):
        make_exporter(market_db, tmp_path, missing).export_full("x", START)
    with pytest.raises(MappingError, match="comes from both"):
        ExportMapping(factor_tables=(FactorTable("f", "market.moneyflow", columns={"close": FieldSpec("net_mf_vol")}),))
    clash = ExportMapping(factor_tables=(FactorTable("a", "market.daily_basic", prefix="x_"),
                                         FactorTable("b", "market.daily_basic", prefix="x_")))
    with pytest.raises(MappingError, match="x_turnover_rate"):
        make_exporter(market_db, tmp_path, clash).export_full("x", START)
    with pytest.raises(MappingError, match="scale must be a finite non-zero number"):
        FieldSpec("close_li", 0.0)
    wide = ExportMapping(fields={**ExportMapping().fields, **{f"x{i}": FieldSpec("open_li", 0.001) for i in range(17)}})
    with pytest.raises(MappingError, match="23 bar fields, at most 22 can be fingerprinted"):
        make_exporter(market_db, tmp_path, wide).export_full("x", START)
    assert not (tmp_path / "x").exists()

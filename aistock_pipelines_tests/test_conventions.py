"""The shared market and deployment facts: the values other modules and operators rely on."""

from aistock_pipelines.conventions import EXCHANGE_TIMEZONE, QLIB_SYMBOL, RESULTS_API_URL, TS_CODE


def test_exchange_timezone_and_results_api_default():
    assert EXCHANGE_TIMEZONE == "Asia/Shanghai"
    assert RESULTS_API_URL == "http://127.0.0.1:9000"


def test_instrument_code_patterns():
    assert all(TS_CODE.match(c) for c in ("000001.SZ", "600000.SH", "430047.BJ"))
    assert not any(TS_CODE.match(c) for c in ("000001.sz", "000001.HK", "SZ000001", "000001", ".SZ"))
    assert all(QLIB_SYMBOL.match(c) for c in ("SZ000001", "SH600000", "BJ430047"))
    assert not any(QLIB_SYMBOL.match(c) for c in ("000001.SZ", "HK000001", "SZ"))

"""Facts of the A-share market and of the RD-Agent deployment that several packages rely on, defined once.

A neutral module (standard library only) so domain packages and the Dagster wiring can share it.
"""

from __future__ import annotations

import re

#: The exchanges' wall time: trade days, partitions and schedules are days and hours in this zone.
EXCHANGE_TIMEZONE = "Asia/Shanghai"

#: The exchanges of A-share codes: Shanghai, Shenzhen, Beijing.
EXCHANGES = ("SH", "SZ", "BJ")
#: Tushare-style instrument code as AIstock stores it: digits/letters, a dot, the exchange (``000001.SZ``).
TS_CODE = re.compile(rf"^[0-9A-Z]{{1,12}}\.({'|'.join(EXCHANGES)})$")
#: Qlib's instrument naming of the same code: exchange first, no dot (``SZ000001``).
QLIB_SYMBOL = re.compile(rf"^({'|'.join(EXCHANGES)})[0-9A-Z]{{1,12}}$")

#: Where RD-Agent's read-only results API listens unless ``RDAGENT_RESULTS_URL`` says otherwise.
RESULTS_API_HOST = "127.0.0.1"
RESULTS_API_PORT = 9000
RESULTS_API_URL = f"http://{RESULTS_API_HOST}:{RESULTS_API_PORT}"

"""Live feature frames: the snapshot's rows for a window ending now, from the same definition, so that
training, backtest and live trading see the same features.

Plain Python, nothing here knows about Dagster: a trading process imports it directly.
"""

from aistock_pipelines.live.adapter import (
    InsufficientHistoryError,
    LiveDataAdapter,
    LiveDataError,
    NoDataError,
    UnknownSymbolError,
)
from aistock_pipelines.live.latest_bar import FrameLatestBarProvider, LatestBarError, LatestBarProvider

__all__ = [
    "FrameLatestBarProvider",
    "InsufficientHistoryError",
    "LatestBarError",
    "LatestBarProvider",
    "LiveDataAdapter",
    "LiveDataError",
    "NoDataError",
    "UnknownSymbolError",
]

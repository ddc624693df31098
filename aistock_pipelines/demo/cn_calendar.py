"""Chinese exchange holidays for the synthetic market.

Weekday closures follow the real pattern: New Year's Day, the Spring Festival week, Qingming, Labour Day,
Dragon Boat, Mid-Autumn and the National Day week. Lunar festivals are placed from the (real) Spring
Festival date of each year; the exact day may differ from a given year's official notice by a day or two,
which is irrelevant for a synthetic market but keeps holidays on weekdays, where they matter.
"""

from __future__ import annotations

from datetime import date, timedelta

SPRING_FESTIVAL = {
    2010: date(2010, 2, 14), 2011: date(2011, 2, 3), 2012: date(2012, 1, 23), 2013: date(2013, 2, 10),
    2014: date(2014, 1, 31), 2015: date(2015, 2, 19), 2016: date(2016, 2, 8), 2017: date(2017, 1, 28),
    2018: date(2018, 2, 16), 2019: date(2019, 2, 5), 2020: date(2020, 1, 25), 2021: date(2021, 2, 12),
    2022: date(2022, 2, 1), 2023: date(2023, 1, 22), 2024: date(2024, 2, 10), 2025: date(2025, 1, 29),
    2026: date(2026, 2, 17), 2027: date(2027, 2, 6), 2028: date(2028, 1, 26), 2029: date(2029, 2, 13),
    2030: date(2030, 2, 3), 2031: date(2031, 1, 23), 2032: date(2032, 2, 11),
}


def _span(first: date, days: int) -> set[date]:
    return {first + timedelta(days=i) for i in range(days)}


def holidays(year: int) -> set[date]:
    """Calendar days the exchanges are closed in ``year`` besides weekends (weekend dates may be included)."""
    out = {date(year, 1, 1)}
    out |= _span(date(year, 5, 1), 3)
    out |= _span(date(year, 10, 1), 7)
    out.add(date(year, 4, 4) if year % 4 else date(year, 4, 5))  # Qingming
    sf = SPRING_FESTIVAL.get(year)
    if sf is not None:
        out |= _span(sf - timedelta(days=1), 7)  # New Year's Eve through the 5th day
        out.add(sf + timedelta(days=118))  # Dragon Boat (5th day of the 5th lunar month), approximately
        mid_autumn = sf + timedelta(days=221)  # 15th day of the 8th lunar month, approximately
        if not (date(year, 10, 1) <= mid_autumn <= date(year, 10, 7)):
            out.add(mid_autumn)
    return out


def calendar_days(start: date, end: date) -> list[tuple[date, bool]]:
    """Every calendar day in [start, end] with its ``is_trading`` flag."""
    closed: set[date] = set()
    for y in range(start.year, end.year + 1):
        closed |= holidays(y)
    days = []
    d = start
    while d <= end:
        days.append((d, d.weekday() < 5 and d not in closed))
        d += timedelta(days=1)
    return days


def trading_days_from(start: date, count: int) -> list[date]:
    """The first ``count`` trading days on or after ``start``."""
    out: list[date] = []
    d = start
    while len(out) < count:
        chunk = calendar_days(d, d + timedelta(days=400))
        out.extend(day for day, trading in chunk if trading)
        d = chunk[-1][0] + timedelta(days=1)
    return out[:count]

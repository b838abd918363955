"""A generated translation-style task: dates written the many ways people write them,
each paired with its ISO 8601 form ("Tuesday, March 5th 1998" -> "1998-03-05").

Every format is unambiguous (no two-digit years, no numeric day/month order that could
be read both ways), so the ISO date is a function of the text. Seeded: the same seed
gives the same rows.
"""

from __future__ import annotations

import calendar
import datetime as dt

import numpy as np
import pandas as pd

#: Version of the generator; part of the built-in table's fingerprint.
DATES_GENERATOR_VERSION = 1
FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _formats(date: dt.date) -> list[str]:
    month, short = calendar.month_name[date.month], calendar.month_abbr[date.month]
    weekday = calendar.day_name[date.weekday()]
    d, y = date.day, date.year
    return [
        f"{d} {month} {y}",
        f"{month} {d}, {y}",
        f"{short} {d} {y}",
        f"{d} {short}. {y}",
        f"{weekday}, {month} {_ordinal(d)} {y}",
        f"{weekday} {d} {month} {y}",
        f"the {_ordinal(d)} of {month} {y}",
        f"{month} {_ordinal(d)}, {y}",
        f"{y}/{date.month:02d}/{d:02d}",
        f"{d:02d}.{date.month:02d}.{y}",
        f"{y}.{date.month}.{d}",
    ]


def generate_dates(rows: int, seed: int) -> pd.DataFrame:
    """``rows`` random dates from 1900 to 2099 as (text, iso), in random formats and case."""
    rng = np.random.default_rng(seed)
    days = rng.integers(0, (LAST - FIRST).days + 1, rows)
    texts, isos = [], []
    for offset in days:
        date = FIRST + dt.timedelta(days=int(offset))
        formats = _formats(date)
        text = formats[rng.integers(len(formats))]
        case = rng.random()
        texts.append(text.lower() if case < 0.3 else text.upper() if case < 0.4 else text)
        isos.append(date.isoformat())
    return pd.DataFrame({"text": texts, "iso": isos})

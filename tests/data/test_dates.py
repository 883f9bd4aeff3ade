"""The dates source: every format parses back to its date with datetime.strptime, the split is
disjoint by date, generation is deterministic, and the token encoding round-trips."""

import datetime
import re

import numpy as np
import pytest

from zoo.data import dates, load
from zoo.errors import DataError

# an independent reading of each format: strptime patterns (case-insensitive, C locale)
STRPTIME = {
    "d month yyyy": "%d %B %Y",
    "month d, yyyy": "%B %d, %Y",
    "month d yyyy": "%B %d %Y",
    "mm/dd/yy": "%m/%d/%y",
    "m/d/yyyy": "%m/%d/%Y",
    "dow, mon d yyyy": "%a, %b %d %Y",
    "yyyy.m.d": "%Y.%m.%d",
    "dth of month, yyyy": "%d of %B, %Y",
    "weekday, d month yyyy": "%A, %d %B %Y",
    "yyyy-mm-dd": "%Y-%m-%d",
    "dd.mm.yyyy": "%d.%m.%Y",
    "d mon yy": "%d %b %y",
    "mon dd, yyyy": "%b %d, %Y",
    "month dth, yyyy": "%B %d, %Y",
    "the dth of month yyyy": "the %d of %B %Y",
    "yyyymmdd": "%Y%m%d",
    "weekday, month dth, yyyy": "%A, %B %d, %Y",
    "d-mon-yyyy": "%d-%b-%Y",
    "yyyy/mm/dd": "%Y/%m/%d",
}
# 2000 is a leap year; its days cover every month, day number and weekday name
YEAR_2000 = [datetime.date(2000, 1, 1) + datetime.timedelta(i) for i in range(366)]
SPOT_DATES = [datetime.date(1950, 1, 1), datetime.date(1968, 12, 31), datetime.date(1999, 3, 3),
              datetime.date(2001, 11, 11), datetime.date(2012, 2, 29), datetime.date(2049, 12, 31)]


def _parse(text: str, fmt: str) -> datetime.date:
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text, flags=re.IGNORECASE)  # 3rd -> 3
    d = datetime.datetime.strptime(text, STRPTIME[fmt]).date()
    if "%y" in STRPTIME[fmt] and d.year > 2049:  # strptime puts 50-68 in the 2000s; the data's span
        d = d.replace(year=d.year - 100)        # is 1950-2049
    return d


def test_formats_are_many_and_named_here():
    assert set(dates.FORMATS) == set(STRPTIME) and len(dates.FORMATS) >= 15


@pytest.mark.parametrize("case", dates.CASES)
def test_every_format_parses_back(case):
    for fmt in dates.FORMATS:
        for d in YEAR_2000[::7] + SPOT_DATES:
            text = dates.render(d, fmt, case)
            assert _parse(text, fmt) == d, (fmt, text)
            if "%a" in STRPTIME[fmt] or "%A" in STRPTIME[fmt]:  # strptime ignores the weekday
                assert d.strftime("%a").lower() in text.lower(), text
            assert text == {"as_is": text, "lower": text.lower(), "upper": text.upper()}[case]


def test_examples_match_the_brief():
    d = datetime.date(1999, 3, 3)
    rendered = {dates.render(d, f) for f in dates.FORMATS}
    assert {"3 March 1999", "March 3, 1999", "03/03/99", "Wed, Mar 3 1999", "1999.3.3",
            "3rd of March, 1999", "1999-03-03"} <= rendered
    assert dates.render(datetime.date(2001, 11, 12), "month dth, yyyy", "upper") == "NOVEMBER 12TH, 2001"


def test_all_lengths_fit():
    longest = max(len(dates.render(d, f)) for f in dates.FORMATS for d in YEAR_2000)
    assert longest <= dates.INPUT_LEN


def test_source_arrays_and_info():
    train, test = load("dates"), load("dates", "test")
    assert (len(train), len(test)) == (dates.SIZES["train"], dates.SIZES["test"])
    info = train.info
    assert info["kind"] == "seq2seq" and info["shape"] == (dates.INPUT_LEN,) and info["dtype"] == "int32"
    assert info["vocab"][:3] == ["<pad>", "<bos>", "<eos>"] and info["vocab_size"] == len(info["vocab"])
    b = test[np.arange(len(test))]
    assert b["x"].dtype == np.int32 and b["y"].shape == (len(test), dates.TARGET_LEN)
    assert (b["y"][:, 0] == dates.BOS).all() and (b["y"][:, -1] == dates.EOS).all()
    assert b["x"].max() < info["vocab_size"] and (b["x"][:, 0] != dates.PAD).all()
    # each input, read independently, is its target date
    for x, y in zip(b["x"][:300], b["y"][:300]):
        text, iso = dates.decode(x), dates.decode(y)
        assert any(_try(text, f) == datetime.date.fromisoformat(iso) for f in STRPTIME), (text, iso)
    with pytest.raises(DataError, match="takes no"):
        load("dates:x")


def _try(text, fmt):
    try:
        return _parse(text, fmt)
    except ValueError:
        return None


def test_split_is_disjoint_by_date():
    train, test = dates.split_dates("train"), dates.split_dates("test")
    assert not set(train) & set(test)
    assert len(train) + len(test) == (dates.LAST - dates.FIRST).days + 1
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
    seen = {tuple(r) for r in load("dates")[np.arange(dates.SIZES["train"])]["y"]}
    held = {tuple(r) for r in load("dates", "test")[np.arange(dates.SIZES["test"])]["y"]}
    assert not seen & held and len(held) > 1000


def test_generation_is_deterministic():
    a = dates.examples("test", 500, 1)
    dates.split_dates.cache_clear()
    assert dates.examples("test", 500, 1) == a
    assert dates.examples("test", 500, 2) != a
    texts, picked = a
    assert len(set(texts)) > 450 and len({len(t) for t in texts}) > 8


def test_encode_decode_round_trip():
    for text in ["3rd of march, 1999", "WED, MAR 3 1999", "07/04/76", "1999.3.3", ""]:
        ids = dates.encode(text)
        assert ids.shape == (dates.INPUT_LEN,) and ids.dtype == np.int32
        assert dates.decode(ids) == text and (ids[len(text):] == dates.PAD).all()
    y = dates.encode_target("1999-03-03")
    assert y[0] == dates.BOS and y[-1] == dates.EOS and len(y) == dates.TARGET_LEN
    assert dates.decode(y) == "1999-03-03"
    assert dates.decode([dates.BOS, *dates.encode("12", 2), dates.EOS, 5, 6]) == "12"
    with pytest.raises(DataError, match="longer than 32"):
        dates.encode("x" * 33)
    with pytest.raises(DataError, match="not in the vocabulary"):
        dates.encode("3 März 1999")
    with pytest.raises(DataError, match="not in the vocabulary"):
        dates.encode("3 March 1999!")

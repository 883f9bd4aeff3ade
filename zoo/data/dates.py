"""Date normalisation, a seq2seq task generated from Python's `datetime`: "3rd of march, 1999" -> "1999-03-03".

Every date from 1950-01-01 to 2049-12-31 is written in one of `FORMATS` (19 human formats, English
names from this module's own tables so no locale is involved), then as-is, lower- or upper-cased.
Two-digit years mean 1950-2049 (50-99 -> 19xx, 00-49 -> 20xx). Slashed numbers are month first
(US: 03/04/99 is March 4), dotted day-first numbers are European (04.03.1999 is March 4), and
year-first numbers are year-month-day; no string is ambiguous.

The split is by date: a date is a test date when a stable hash of its ISO string falls in the last
`TEST_PERCENT` of 100 buckets (~10%), so held-out accuracy is on dates never seen in any format.
Train holds `SIZES["train"]` examples drawn with a fixed seed from the train dates, test
`SIZES["test"]` from the test dates (a date may repeat, in other formats).

Tokens: ids of `VOCAB` (pad 0, bos 1, eos 2, then characters). x is the input right-padded with
pad to `INPUT_LEN`; y is bos + the 10 ISO characters + eos (`TARGET_LEN` = 12).
Glossary: N examples, L a sequence length.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from typing import Callable

import numpy as np

from zoo.errors import DataError

PAD, BOS, EOS = 0, 1, 2
CHARS = " ,-./" + "0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["<pad>", "<bos>", "<eos>", *CHARS]
INPUT_LEN = 32               # the longest format ("Wednesday, September 23rd, 1999") is 31
TARGET_LEN = 12              # bos + YYYY-MM-DD + eos
FIRST, LAST = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)
TEST_PERCENT = 10
SIZES = {"train": 50_000, "test": 2_000}
SEEDS = {"train": 0, "test": 1}
CASES = ("as_is", "lower", "upper")
CASE_PROBS = (0.6, 0.2, 0.2)
# what `zoo sample seq2seq` translates when given no --prompt
EXAMPLES = ("3rd of march, 1999", "Wed, Mar 3 1999", "07/04/76", "the 29th of February 2000")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _th(day: int) -> str:
    """1 -> 1st, 2 -> 2nd, 11 -> 11th, 23 -> 23rd."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _parts(d: datetime.date) -> dict[str, str]:
    month, weekday = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
    return {"d": str(d.day), "dd": f"{d.day:02d}", "dth": _th(d.day), "m": str(d.month),
            "mm": f"{d.month:02d}", "month": month, "mon": month[:3], "yyyy": f"{d.year:04d}",
            "yy": f"{d.year % 100:02d}", "weekday": weekday, "dow": weekday[:3]}


_TEMPLATES = {  # name -> template over `_parts`; e.g. for 1999-03-03:
    "d month yyyy": "{d} {month} {yyyy}",                   # 3 March 1999
    "month d, yyyy": "{month} {d}, {yyyy}",                 # March 3, 1999
    "month d yyyy": "{month} {d} {yyyy}",                   # March 3 1999
    "mm/dd/yy": "{mm}/{dd}/{yy}",                           # 03/03/99
    "m/d/yyyy": "{m}/{d}/{yyyy}",                           # 3/3/1999
    "dow, mon d yyyy": "{dow}, {mon} {d} {yyyy}",           # Wed, Mar 3 1999
    "yyyy.m.d": "{yyyy}.{m}.{d}",                           # 1999.3.3
    "dth of month, yyyy": "{dth} of {month}, {yyyy}",       # 3rd of March, 1999
    "weekday, d month yyyy": "{weekday}, {d} {month} {yyyy}",  # Wednesday, 3 March 1999
    "yyyy-mm-dd": "{yyyy}-{mm}-{dd}",                       # 1999-03-03
    "dd.mm.yyyy": "{dd}.{mm}.{yyyy}",                       # 03.03.1999
    "d mon yy": "{d} {mon} {yy}",                           # 3 Mar 99
    "mon dd, yyyy": "{mon} {dd}, {yyyy}",                   # Mar 03, 1999
    "month dth, yyyy": "{month} {dth}, {yyyy}",             # March 3rd, 1999
    "the dth of month yyyy": "the {dth} of {month} {yyyy}",  # the 3rd of March 1999
    "yyyymmdd": "{yyyy}{mm}{dd}",                           # 19990303
    "weekday, month dth, yyyy": "{weekday}, {month} {dth}, {yyyy}",  # Wednesday, March 3rd, 1999
    "d-mon-yyyy": "{d}-{mon}-{yyyy}",                       # 3-Mar-1999
    "yyyy/mm/dd": "{yyyy}/{mm}/{dd}",                       # 1999/03/03
}
FORMATS: dict[str, Callable[[datetime.date], str]] = {
    name: (lambda d, t=t: t.format(**_parts(d))) for name, t in _TEMPLATES.items()}
_CASE_FNS = {"as_is": str, "lower": str.lower, "upper": str.upper}


def render(d: datetime.date, fmt: str, case: str = "as_is") -> str:
    """`d` written in format `fmt` (a key of FORMATS) and `case` (one of CASES)."""
    return _CASE_FNS[case](FORMATS[fmt](d))


def is_test_date(d: datetime.date) -> bool:
    """The fixed split: blake2b of the ISO date, in one of TEST_PERCENT buckets of 100."""
    h = hashlib.blake2b(d.isoformat().encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % 100 < TEST_PERCENT


@functools.lru_cache(maxsize=None)
def split_dates(split: str) -> tuple[datetime.date, ...]:
    """Every date of `split` in the data's range, in order."""
    days = (FIRST + datetime.timedelta(i) for i in range((LAST - FIRST).days + 1))
    want_test = split == "test"
    return tuple(d for d in days if is_test_date(d) == want_test)


# ids of bytes: a lookup table from byte value to token id (-1: not in the vocabulary)
_BYTE_IDS = np.full(256, -1, np.int64)
_BYTE_IDS[0] = PAD  # the NUL that np.bytes_ pads with
for _i, _c in enumerate(CHARS):
    _BYTE_IDS[ord(_c)] = 3 + _i


def encode_batch(texts, length: int) -> np.ndarray:
    """Texts -> ids [N, length] int32, right-padded with PAD; a character outside VOCAB or a text
    longer than `length` is a DataError."""
    texts = list(texts)
    too_long = [t for t in texts if len(t) > length]
    if too_long:
        raise DataError(f"text longer than {length} characters: {too_long[0]!r}")
    try:
        raw = np.array(texts, dtype=f"S{max(length, 1)}")  # NUL-padded bytes
    except UnicodeEncodeError as e:
        raise DataError(f"not in the vocabulary (ASCII {CHARS!r}): {e.object[e.start:e.end]!r}") from None
    ids = _BYTE_IDS[raw.view(np.uint8).reshape(len(texts), max(length, 1))][:, :length]
    if (ids < 0).any():
        bad = sorted({c for t in texts for c in t if c not in CHARS})
        raise DataError(f"characters not in the vocabulary: {''.join(bad)!r}; valid: {CHARS!r}")
    return ids.astype(np.int32)


def encode(text: str, length: int = INPUT_LEN) -> np.ndarray:
    """One text -> ids [length] int32 (no bos/eos; see encode_target for those)."""
    return encode_batch([text], length)[0]


def encode_target(iso: str) -> np.ndarray:
    """An ISO date -> [bos, 10 characters, eos] int32 [TARGET_LEN]."""
    return np.concatenate([[BOS], encode(iso, TARGET_LEN - 2), [EOS]]).astype(np.int32)


def decode(ids) -> str:
    """Ids -> text: characters up to the first eos; pad and bos are skipped."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


def examples(split: str, n: int, seed: int) -> tuple[list[str], list[datetime.date]]:
    """n (input text, date) pairs of `split`: date, format and case drawn with default_rng(seed)."""
    dates = split_dates(split)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(dates), n)
    fmt_names = list(FORMATS)
    fmts = rng.integers(0, len(fmt_names), n)
    cases = rng.choice(len(CASES), n, p=CASE_PROBS)
    picked = [dates[i] for i in which]
    texts = [render(d, fmt_names[f], CASES[c]) for d, f, c in zip(picked, fmts, cases)]
    return texts, picked


@functools.lru_cache(maxsize=None)
def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, INPUT_LEN], y [N, TARGET_LEN]) int32 of `split` ("train" | "test")."""
    if split not in SIZES:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SIZES)}")
    texts, picked = examples(split, SIZES[split], SEEDS[split])
    x = encode_batch(texts, INPUT_LEN)
    iso = encode_batch([d.isoformat() for d in picked], TARGET_LEN - 2)
    n = len(picked)
    y = np.concatenate([np.full((n, 1), BOS), iso, np.full((n, 1), EOS)], axis=1).astype(np.int32)
    return x, y


def info(name: str = "dates") -> dict:
    """The source's info: kind seq2seq, the vocabulary, lengths and example inputs."""
    return {"kind": "seq2seq", "name": name, "vocab": list(VOCAB), "vocab_size": len(VOCAB),
            "target_len": TARGET_LEN, "examples": list(EXAMPLES)}

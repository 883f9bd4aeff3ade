"""Bag-of-words documents: the `pydocs_bow` source (stdlib docstrings as word counts, for LDA).

Tokens: lowercase `[a-z]{3,}` runs minus scikit-learn's English stop words. Vocabulary: from the
TRAIN split only, words in >= 5 documents and <= 50% of them, the `vocab_size` most frequent
(ties alphabetical). Documents left with no in-vocabulary word are dropped.
"""

from __future__ import annotations

import collections
import functools
import re

import numpy as np

from zoo.data.pydocs import pydocs_documents
from zoo.data.source import ArraySource, check_split
from zoo.errors import DataError

TOKEN = re.compile(r"[a-z]{3,}")


def tokenize(doc: str) -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in TOKEN.findall(doc.lower()) if w not in ENGLISH_STOP_WORDS]


def build_vocab(docs: list[list[str]], vocab_size: int, *, min_df: int = 5, max_df: float = 0.5) -> list[str]:
    df = collections.Counter(w for d in docs for w in set(d))
    tf = collections.Counter(w for d in docs for w in d)
    keep = [w for w, n in df.items() if min_df <= n <= max_df * len(docs)]
    return sorted(keep, key=lambda w: (-tf[w], w))[:vocab_size]


def count_matrix(docs: list[list[str]], vocab: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(vocab)}
    x = np.zeros((len(docs), len(vocab)), np.float32)
    for d, words in enumerate(docs):
        for w in words:
            if w in index:
                x[d, index[w]] += 1
    return x[x.sum(1) > 0]


@functools.lru_cache(maxsize=4)
def pydocs_bow(split: str, vocab_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    check_split(split)
    if vocab_size < 1:
        raise DataError(f"vocab_size must be >= 1, got {vocab_size}")
    train = [tokenize(d) for d in pydocs_documents("train")]
    vocab = build_vocab(train, vocab_size)
    docs = train if split == "train" else [tokenize(d) for d in pydocs_documents("test")]
    return count_matrix(docs, vocab), tuple(vocab)


def load_pydocs_bow(spec, arg, split, seq_len, *, vocab_size: int = 2000, **options) -> ArraySource:
    """Options: vocab_size (2000)."""
    if arg or options:
        raise DataError(f"{spec}: pydocs_bow takes only the option vocab_size, got {arg or sorted(options)}")
    x, vocab = pydocs_bow(split, int(vocab_size))
    return ArraySource({"x": x}, {"kind": "bow", "name": spec, "vocab": list(vocab), "num_examples": len(x)})

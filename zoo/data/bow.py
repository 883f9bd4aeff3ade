"""Bag-of-words documents: the `pydocs_bow` source (stdlib docstrings as word counts, for LDA).

Tokens (`tokenize`): lowercase, `[a-z]{3,}` runs, minus scikit-learn's `ENGLISH_STOP_WORDS`.
Vocabulary (`build_vocab`): from the TRAIN split only: words in >= 5 documents and in <= 50% of
them, the `vocab_size` most frequent by total count (ties broken alphabetically); the test split
is counted with the train vocabulary. x is float32 [N, V] counts. A document with no
in-vocabulary word is dropped (it carries no information for a topic model and would be a 0/0 in
per-word metrics), so N is a little below the number of pydocs documents.

info: {"kind": "bow", "shape": (V,), "dtype": "float32", "vocab": [V words, column order],
"name", "num_examples": N}.
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
MIN_DF = 5          # a word must be in at least this many training documents
MAX_DF = 0.5        # and in at most this fraction of them


def tokenize(doc: str) -> list[str]:
    """Lowercase `[a-z]{3,}` words of `doc` minus English stop words, in order."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in TOKEN.findall(doc.lower()) if w not in ENGLISH_STOP_WORDS]


def build_vocab(docs: list[list[str]], vocab_size: int, *, min_df: int = MIN_DF,
                max_df: float = MAX_DF) -> list[str]:
    """The `vocab_size` most frequent words with min_df <= document frequency <= max_df * len(docs)."""
    df = collections.Counter(w for d in docs for w in set(d))
    tf = collections.Counter(w for d in docs for w in d)
    keep = [w for w, n in df.items() if min_df <= n <= max_df * len(docs)]
    return sorted(keep, key=lambda w: (-tf[w], w))[:vocab_size]


def count_matrix(docs: list[list[str]], vocab: list[str]) -> np.ndarray:
    """float32 [N, V] counts of the documents with at least one in-vocabulary word."""
    index = {w: i for i, w in enumerate(vocab)}
    x = np.zeros((len(docs), len(vocab)), np.float32)
    for d, words in enumerate(docs):
        ids = [index[w] for w in words if w in index]
        np.add.at(x[d], ids, 1.0)
    return x[x.sum(1) > 0]


@functools.lru_cache(maxsize=None)
def _tokens(split: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(tokenize(d)) for d in pydocs_documents(split))


@functools.lru_cache(maxsize=8)
def pydocs_vocab(vocab_size: int = 2000) -> tuple[str, ...]:
    """The pydocs_bow vocabulary: built from the train split only."""
    return tuple(build_vocab(_tokens("train"), vocab_size))


@functools.lru_cache(maxsize=8)
def pydocs_bow(split: str, vocab_size: int = 2000) -> tuple[np.ndarray, tuple[str, ...]]:
    """(x float32 [N, V] read-only, vocab) of `split` with the train vocabulary."""
    check_split(split)
    if vocab_size < 1:
        raise DataError(f"pydocs_bow: vocab_size must be >= 1, got {vocab_size}")
    vocab = pydocs_vocab(vocab_size)
    x = count_matrix(_tokens(split), vocab)
    x.setflags(write=False)  # cached and shared
    return x, vocab


def load_pydocs_bow(spec, arg, split, seq_len, *, vocab_size: int = 2000, **options) -> ArraySource:
    """Builder for sources.SOURCES["pydocs_bow"]; one option: vocab_size (2000)."""
    del seq_len  # byte-text option, meaningless here
    if arg or options:
        got = f":{arg}" if arg else ", ".join(sorted(options))
        raise DataError(f"{spec}: pydocs_bow takes only the option vocab_size; got {got}")
    x, vocab = pydocs_bow(split, int(vocab_size))
    return ArraySource({"x": x}, {"kind": "bow", "name": spec, "vocab": list(vocab), "num_examples": len(x)})

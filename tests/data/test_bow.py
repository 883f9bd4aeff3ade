"""pydocs_bow: tokenizer and vocabulary rules, train-only vocabulary, counts of a known document."""

import collections

import numpy as np

from zoo.data import load, pydocs_documents
from zoo.data.bow import build_vocab, count_matrix, pydocs_bow, tokenize


def test_tokenize_and_vocab_rules():
    assert tokenize("The Quick brown fox, an OK x2 jumped!") == ["quick", "brown", "fox", "jumped"]
    docs = [["apple", "pear"]] * 6 + [["apple", "fig"]] * 5 + [["kiwi"]] * 4 + [["plum"]] * 20
    # apple is in 11/35 docs, pear 6, fig 5, kiwi 4 (< min_df), plum 20 (> 50%)
    assert build_vocab(docs, 10) == ["apple", "pear", "fig"]
    assert build_vocab(docs, 2) == ["apple", "pear"]
    tie = [["b", "a"]] * 5 + [["c"]] * 6  # a, b: 5 each (a tie: alphabetical); c: in 6 of 11 docs > 50%
    assert build_vocab(tie, 3) == ["a", "b"] and build_vocab(tie, 1) == ["a"]
    x = count_matrix([["apple", "apple", "fig"], ["kiwi"]], ["apple", "pear", "fig"])
    np.testing.assert_array_equal(x, [[2, 0, 1]])  # the empty document is dropped


def test_pydocs_bow_uses_the_train_vocabulary():
    train, test = load("pydocs_bow", vocab_size=500), load("pydocs_bow", "test", vocab_size=500)
    vocab = train.info["vocab"]
    assert test.info["vocab"] == vocab and len(vocab) == 500
    assert train.info["shape"] == (500,) and train.info["dtype"] == "float32" and train.info["kind"] == "bow"
    assert len(train) > 3000 and 100 < len(test) < 300 and train.info["num_examples"] == len(train)
    x = train[np.arange(len(train))]["x"]
    assert (x.sum(1) > 0).all() and np.allclose(x, np.round(x))
    assert "return" in vocab and "the" not in vocab
    # the vocabulary is a function of the train documents only, and the same when rebuilt
    assert vocab == build_vocab([tokenize(d) for d in pydocs_documents("train")], 500)
    pydocs_bow.cache_clear()
    assert load("pydocs_bow", vocab_size=500).info["vocab"] == vocab


def test_counts_of_a_known_document():
    _, vocab = pydocs_bow("train", 2000)
    x_test, _ = pydocs_bow("test", 2000)
    index = {w: i for i, w in enumerate(vocab)}
    kept = [d for d in pydocs_documents("test") if any(w in index for w in tokenize(d))]
    assert len(kept) == len(x_test)  # documents with no vocabulary word are the only ones dropped
    doc = kept[3]
    want = np.zeros(len(vocab), np.float32)
    for w, n in collections.Counter(tokenize(doc)).items():
        if w in index:
            want[index[w]] = n
    np.testing.assert_array_equal(x_test[3], want)

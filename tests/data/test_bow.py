import numpy as np

from zoo.data import load
from zoo.data.bow import build_vocab, count_matrix, tokenize


def test_tokenize_and_vocab_rules():
    assert tokenize("The Quick brown fox, an OK x2 jumped!") == ["quick", "brown", "fox", "jumped"]
    docs = [["apple", "pear"]] * 6 + [["apple", "fig"]] * 5 + [["kiwi"]] * 4 + [["plum"]] * 20
    # apple is in 11/35 docs, pear 6, fig 5, kiwi 4 (< min_df), plum 20 (> 50%)
    assert build_vocab(docs, 10) == ["apple", "pear", "fig"]
    assert build_vocab(docs, 2) == ["apple", "pear"]
    x = count_matrix([["apple", "apple", "fig"], ["kiwi"]], ["apple", "pear", "fig"])
    np.testing.assert_array_equal(x, [[2, 0, 1]])  # the empty document is dropped


def test_pydocs_bow_uses_the_train_vocabulary():
    train, test = load("pydocs_bow", vocab_size=500), load("pydocs_bow", "test", vocab_size=500)
    assert train.info["vocab"] == test.info["vocab"] and len(train.info["vocab"]) == 500
    assert train.info["shape"] == (500,) and len(train) > 3000 and 100 < len(test) < 300
    x = train[np.arange(len(train))]["x"]
    assert (x.sum(1) > 0).all() and np.allclose(x, np.round(x))
    assert "return" in train.info["vocab"] and "the" not in train.info["vocab"]

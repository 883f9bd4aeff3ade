"""pydocs: the stdlib docstring corpus (parsed once per test session, ~4 s)."""

import ast
import inspect
import os
import sysconfig

import numpy as np
import pytest

from zoo.data import load, pydocs_documents
from zoo.data.pydocs import SEPARATOR, pydocs_bytes


@pytest.fixture(scope="module")
def docs():
    return pydocs_documents("train"), pydocs_documents("test")


def _json_docstring():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "json", "__init__.py")
    with open(path, "rb") as f:
        return inspect.cleandoc(ast.get_docstring(ast.parse(f.read())))


def test_corpus_size_and_split(docs):
    train, test = docs
    assert len(train) + len(test) > 1000
    assert len(SEPARATOR.join(train).encode()) > 500_000
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.09
    assert not set(train) & set(test)
    assert len(set(train)) == len(train)
    assert all(len(d.split()) >= 20 for d in train[:200])


def test_contains_json_module_docstring(docs):
    train, test = docs
    assert _json_docstring() in train + test
    joined = "\n".join(train + test)
    assert "JSON (JavaScript Object Notation)" in joined


def test_no_test_folder_docs(docs):
    """A docstring that only exists in Lib/test must be absent."""
    root = os.path.join(sysconfig.get_paths()["stdlib"], "test")
    path = os.path.join(root, "test_json", "__init__.py")
    if not os.path.exists(path):
        pytest.skip("no Lib/test in this Python")
    corpus = set(docs[0] + docs[1])
    found = []
    for name in ("test_json/test_decode.py", "test_doctest.py", "test_typing.py"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            with open(p, "rb") as f:
                tree = ast.parse(f.read())
            for n in ast.walk(tree):
                if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                    d = ast.get_docstring(n)
                    if d and len(d.split()) >= 20 and "test" in d.lower():
                        found.append(d in corpus)
    assert found and not any(found)


def test_byte_windows(docs):
    src = load("pydocs", seq_len=64)
    assert src.info["kind"] == "text" and src.info["vocab_size"] == 256
    assert src.info["shape"] == (65,)
    data = SEPARATOR.join(docs[0]).encode()
    assert pydocs_bytes("train").tobytes() == data
    x = src[np.array([0, 10, len(src) - 1])]["x"]
    assert x.dtype == np.int32
    for row, i in zip(x, (0, 10, len(src) - 1)):
        assert bytes(row.astype(np.uint8)) == data[i * 64 : i * 64 + 65]
    assert len(load("pydocs", "test", seq_len=64)) > 100


def test_heldout_subset_halves_the_test_documents(docs):
    tune, held = pydocs_documents("train", "heldout"), pydocs_documents("test", "heldout")
    test_docs = pydocs_documents("test")
    assert set(tune).isdisjoint(held) and set(tune) | set(held) == set(test_docs)
    assert set(tune).isdisjoint(pydocs_documents("train"))  # a pretrained model never saw them
    assert 0.3 < len(tune) / len(test_docs) < 0.7
    src = load("pydocs:heldout", "train", seq_len=32)
    assert len(src) == (len(SEPARATOR.join(tune).encode("utf-8")) - 1) // 32
    with pytest.raises(ValueError, match="subset"):
        pydocs_documents("train", "all-of-it")

"""`pydocs`: the docstrings of the running Python's standard library, a real English corpus.

The stdlib sources under `sysconfig.get_paths()["stdlib"]` are parsed with `ast` (never imported:
imports have side effects). Test folders (`test`, `tests`, `idle_test`) and `site-packages` are
skipped. Module, class and function docstrings (`ast.get_docstring`, cleaned) of at least 20
words are kept, in order of relative path then position in the file, first occurrence only.

Split: a document is held out for test when `zlib.crc32(doc) % 20 == 0` (~5%), so the split of a
document does not depend on what else is in the corpus. `pydocs:heldout` is a fine-tuning task made of
the held-out documents only, halved by the same hash (crc32 % 40 == 0 trains, == 20 tests), so a
model pretrained on `pydocs` has seen none of it. As bytes, documents are joined with
"\n\n"; see `WindowSource` for the windowing.
"""

from __future__ import annotations

import ast
import functools
import gc
import os
import sysconfig
import warnings
import zlib

import numpy as np

from zoo.data.source import check_split

MIN_WORDS = 20
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
SEPARATOR = "\n\n"


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _doc_nodes(stmts: list[ast.stmt]):
    """Class and function definitions among `stmts` and their nested blocks, in source order.

    Only statement blocks are visited (docstrings live nowhere else): much faster than ast.walk.
    """
    for s in stmts:
        if isinstance(s, _DEFS):
            yield s
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(s, field, None)
            if isinstance(block, list):
                yield from _doc_nodes(block)


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings in source order."""
    docs = (ast.get_docstring(n, clean=True) for n in [tree, *_doc_nodes(tree.body)])
    return [d for d in docs if d and len(d.split()) >= MIN_WORDS]


def _source_files(root: str) -> list[str]:
    """Relative paths of the stdlib's .py files outside test folders, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return sorted(out)


@functools.lru_cache(maxsize=None)
def _all_documents(root: str | None = None) -> tuple[str, ...]:
    root = root or sysconfig.get_paths()["stdlib"]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the cyclic GC rescans millions of fresh AST nodes: ~30% of the parse time
    try:
        return _parse_all(root)
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse_all(root: str) -> tuple[str, ...]:
    seen, docs = set(), []
    for rel in _source_files(root):
        try:
            with open(os.path.join(root, rel), "rb") as f:
                with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules
                    warnings.simplefilter("ignore")
                    tree = ast.parse(f.read(), filename=rel)
        except (SyntaxError, ValueError, OSError):  # e.g. lib2to3 test data, bad encodings
            continue
        for d in _docstrings(tree):
            if d not in seen:
                seen.add(d)
                docs.append(d)
    return tuple(docs)


def is_test(doc: str) -> bool:
    """Whether a document is held out (a stable hash of its text, ~1 in 20)."""
    return zlib.crc32(doc.encode("utf-8")) % 20 == 0


SUBSETS = ("all", "heldout")


def pydocs_documents(split: str = "train", subset: str = "all") -> list[str]:
    """The corpus documents of `split` ("train" | "test"), in corpus order.

    subset "heldout": the test documents only, halved by hash into a fine-tuning train and test.
    """
    check_split(split)
    if subset not in SUBSETS:
        raise ValueError(f"unknown pydocs subset {subset!r}; valid: {', '.join(SUBSETS)}")
    want_test = split == "test"
    if subset == "heldout":
        return [d for d in _all_documents() if is_test(d)
                and (zlib.crc32(d.encode("utf-8")) % 40 == 20) == want_test]
    return [d for d in _all_documents() if is_test(d) == want_test]


@functools.lru_cache(maxsize=None)
def pydocs_bytes(split: str = "train", subset: str = "all") -> np.ndarray:
    """The documents of `split` (and `subset`) joined by "\\n\\n", as uint8 UTF-8 bytes (read-only)."""
    data = np.frombuffer(SEPARATOR.join(pydocs_documents(split, subset)).encode("utf-8"), np.uint8)
    return data

"""Data: named sources -> deterministic, resumable, per-process-sharded numpy batches.

    src = load("digits", "train")          # a Source: len(src), src[idx], src.info
    loader = Loader(src, batch_size=128, seed=0, process_index=p, process_count=P)
    batch = loader.batch(step)             # {"x", "idx", ["label"]}: this process's slice
    for b in eval_batches(load("digits", "test"), 256): ...

Sources and their fixed splits: `zoo.data.sources`; the loader's stream: `zoo.data.source`.
"""

from zoo.data.pydocs import pydocs_documents
from zoo.data.source import ArraySource, Loader, Source, WindowSource, eval_batches
from zoo.data.sources import SOURCES, load

__all__ = [
    "SOURCES",
    "ArraySource",
    "Loader",
    "Source",
    "WindowSource",
    "eval_batches",
    "load",
    "pydocs_documents",
]

"""Reference figures for the byte-level text models on `pydocs` (held-out split).

For `gpt` (held-out bits/byte):
  * lzma (xz -9e) with the training text as context: 8 * (|xz(train + test)| - |xz(train)|) / |test|,
    a strong general-purpose compressor given the same data the model trains on.
  * an interpolated Kneser-Ney byte n-gram model (Chen & Goodman 1999, eq. 21, discount 0.75 at every
    order) trained on the train split, orders 1-6; the best order is reported.
For `bert` (masked-byte accuracy): predict a byte from its two neighbours on each side
(x[i-2:i], x[i+1:i+3]) by counts in the training text, backing off to one neighbour each side,
then to the most frequent byte; scored on the same 15% positions per window that `zoo eval bert`
uses the counts of (it sees the unmasked neighbours, which the model does not always: a generous
baseline).

    python experiments/text_baselines.py
"""

from __future__ import annotations

import collections
import json
import lzma
import math
import time

import numpy as np

from zoo.data.pydocs import pydocs_bytes


def lzma_bits_per_byte(train: bytes, test: bytes) -> float:
    c = lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))
    return 8.0 * (c(train + test) - c(train)) / len(test)


def kneser_ney_bits_per_byte(train: bytes, test: bytes, order: int, discount: float = 0.75) -> float:
    """Interpolated Kneser-Ney: the highest order uses counts, lower orders continuation counts."""
    counts = [collections.Counter() for _ in range(order + 1)]          # counts[n][ngram] for n-grams
    cont = [collections.Counter() for _ in range(order + 1)]            # distinct left extensions
    for n in range(1, order + 1):
        grams = collections.Counter(train[i:i + n] for i in range(len(train) - n + 1))
        counts[n] = grams
        for g in grams:
            if n >= 2:
                cont[n - 1][g[1:]] += 1
    # per-context totals and distinct followers, for raw counts (top order) and continuation counts
    def tables(table, n):
        tot, types = collections.Counter(), collections.Counter()
        for g, c in table.items():
            if len(g) == n:
                tot[g[:-1]] += c
                types[g[:-1]] += 1
        return tot, types

    raw_tot, raw_types = {}, {}
    cont_tot, cont_types = {}, {}
    for n in range(1, order + 1):
        raw_tot[n], raw_types[n] = tables(counts[n], n)
        cont_tot[n], cont_types[n] = tables(cont[n], n)

    def prob(ctx: bytes, b: int, n: int, top: bool) -> float:
        if n == 0:
            return 1.0 / 256
        table, tot, types = (counts[n], raw_tot[n], raw_types[n]) if top else (cont[n], cont_tot[n], cont_types[n])
        ctx = ctx[len(ctx) - (n - 1):] if n > 1 else b""
        total = tot.get(ctx, 0)
        lower = prob(ctx, b, n - 1, False)
        if total == 0:
            return lower
        c = table.get(ctx + bytes([b]), 0)
        return max(c - discount, 0.0) / total + discount * types[ctx] / total * lower

    bits = 0.0
    for i in range(len(test)):
        ctx = test[max(0, i - order + 1):i]
        n = min(order, len(ctx) + 1)
        bits -= math.log2(prob(ctx, test[i], n, True))
    return bits / len(test)


def bert_context_baseline(train: bytes, test: bytes, seq_len: int = 128, mask_rate: float = 0.15) -> float:
    wide, narrow = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for i in range(2, len(train) - 2):
        wide[train[i - 2:i] + train[i + 1:i + 3]][train[i]] += 1
        narrow[train[i - 1:i] + train[i + 1:i + 2]][train[i]] += 1
    top = collections.Counter(train).most_common(1)[0][0]
    rng = np.random.default_rng(0)
    M = max(1, round(mask_rate * seq_len))
    right = total = 0
    for start in range(0, len(test) - seq_len - 1, seq_len):
        w = test[start:start + seq_len]
        for i in rng.permutation(seq_len)[:M]:
            key_w, key_n = w[max(0, i - 2):i] + w[i + 1:i + 3], w[max(0, i - 1):i] + w[i + 1:i + 2]
            table = wide.get(key_w) if 2 <= i < seq_len - 2 else None
            table = table or narrow.get(key_n)
            guess = table.most_common(1)[0][0] if table else top
            right += guess == w[i]
            total += 1
    return right / total


def main():
    train, test = bytes(pydocs_bytes("train")), bytes(pydocs_bytes("test"))
    out = {"train_bytes": len(train), "test_bytes": len(test)}
    t = time.perf_counter()
    out["lzma_bits_per_byte"] = round(lzma_bits_per_byte(train, test), 4)
    out["kneser_ney_bits_per_byte"] = {}
    for order in (2, 3, 4, 5, 6):
        out["kneser_ney_bits_per_byte"][order] = round(kneser_ney_bits_per_byte(train, test, order), 4)
        print(order, out["kneser_ney_bits_per_byte"][order], flush=True)
    out["bert_context_baseline_masked_accuracy"] = round(bert_context_baseline(train, test), 4)
    out["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

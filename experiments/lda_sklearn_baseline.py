"""scikit-learn's online LatentDirichletAllocation on the same pydocs_bow corpus as `zoo train lda`.

Same vocabulary (train split, 2000 words), topics, priors (1/K), learning_offset/decay (10, 0.7),
batch size (256), passes (10: 130 batches), E-step limits (100 iterations, tol 1e-3); perplexity
by scikit-learn's own `perplexity` on the same 179 held-out documents, and its fit wall time.

    python experiments/lda_sklearn_baseline.py [SEED]
"""

import json
import sys
import time

from sklearn.decomposition import LatentDirichletAllocation

from zoo.data.bow import pydocs_bow


def main(num_topics=20, passes=10, batch_size=256, vocab_size=2000, seed=0):
    train, _ = pydocs_bow("train", vocab_size)
    test, _ = pydocs_bow("test", vocab_size)
    model = LatentDirichletAllocation(
        n_components=num_topics, learning_method="online", learning_offset=10.0, learning_decay=0.7,
        batch_size=batch_size, max_iter=passes, max_doc_update_iter=100, mean_change_tol=1e-3,
        total_samples=len(train), random_state=seed)
    t = time.perf_counter()
    model.fit(train)
    wall = time.perf_counter() - t
    print(json.dumps({"model": "sklearn.LatentDirichletAllocation", "topics": num_topics, "passes": passes,
                      "batch_size": batch_size, "train_docs": len(train), "test_docs": len(test),
                      "fit_seconds": round(wall, 2), "perplexity": float(model.perplexity(test))}))


if __name__ == "__main__":
    main(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0)

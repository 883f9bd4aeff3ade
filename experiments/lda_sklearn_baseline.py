"""scikit-learn's online LatentDirichletAllocation beside `zoo train lda` on the same pydocs_bow corpus.

Every setting comes from experiments/lda_pydocs.py: vocabulary (train split), topics, priors (1/K),
learning_offset/decay (tau0, kappa), batch size, passes (max_iter = steps / ceil(N / batch)), E-step
limits (max_doc_update_iter, mean_change_tol), the same float32 counts. Perplexity is scikit-learn's
own `perplexity` on the same held-out documents that `zoo eval lda` uses; time is `fit` alone.

    python experiments/lda_sklearn_baseline.py [SEED]
"""

import importlib.util
import json
import math
import os
import sys
import time

from sklearn.decomposition import LatentDirichletAllocation

from zoo.data.bow import pydocs_bow


def get_config():
    """experiments/lda_pydocs.py's config (loaded by path: this file also runs as a script)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lda_pydocs.py")
    spec = importlib.util.spec_from_file_location("lda_pydocs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(seed=0, top_words=8):
    c = get_config()
    train, vocab = pydocs_bow("train", int(c.data.vocab_size))
    test, _ = pydocs_bow("test", int(c.data.vocab_size))
    k, m = int(c.model.num_topics), c.model
    passes = int(c.steps) / math.ceil(len(train) / int(c.batch_size))
    assert passes == int(passes), "the zoo config's steps must be whole passes"
    model = LatentDirichletAllocation(
        n_components=k, doc_topic_prior=m.alpha or 1.0 / k, topic_word_prior=m.eta or 1.0 / k,
        learning_method="online", learning_offset=m.tau0, learning_decay=m.kappa,
        batch_size=int(c.batch_size), max_iter=int(passes), total_samples=len(train),
        max_doc_update_iter=m.e_step_iters, mean_change_tol=m.e_step_tol, random_state=seed)
    t = time.perf_counter()
    model.fit(train)
    wall = time.perf_counter() - t
    top = model.components_.argsort(1)[:, ::-1][:, :top_words]
    print(json.dumps({"model": "sklearn.LatentDirichletAllocation", "seed": seed, "topics": k,
                      "passes": int(passes), "batch_size": int(c.batch_size), "train_docs": len(train),
                      "test_docs": len(test), "fit_seconds": round(wall, 2),
                      "perplexity": float(model.perplexity(test)),
                      "topic_words": [" ".join(vocab[i] for i in row) for row in top]}))


if __name__ == "__main__":
    main(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0)

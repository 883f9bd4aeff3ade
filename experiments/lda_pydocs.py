"""LDA on the stdlib docstrings (`pydocs_bow`): the run recorded in experiments/results/lda_pydocs.md.

zoo train lda --config experiments/lda_pydocs.py --workdir runs/lda
zoo eval lda --workdir runs/lda            # held-out perplexity (scikit-learn's definition)
zoo sample lda --workdir runs/lda --n 8    # the top 8 words of each topic

Every setting matches experiments/lda_sklearn_baseline.py (scikit-learn's online
LatentDirichletAllocation): same corpus and vocabulary, K, priors, learning_offset/decay,
batch size, passes and E-step limits.
"""

import math

from zoo import registry

TRAIN_DOCS = 3313   # len(load("pydocs_bow", vocab_size=2000)) on Python 3.11.7; steps below follow it
PASSES = 10         # scikit-learn's max_iter (passes over the training set)


def get_config():
    config = registry.get("lda").config()
    config.data.name = "pydocs_bow"
    config.data.vocab_size = 2000        # V, train-split vocabulary
    config.data.shuffle = False          # scikit-learn's online fit walks the corpus in order each pass
    config.batch_size = 256              # scikit-learn's batch_size
    # scikit-learn's online fit makes ceil(N / batch_size) updates per pass (the last one short);
    # the zoo's stream crosses epoch boundaries with full batches: the same number of updates
    config.steps = PASSES * math.ceil(TRAIN_DOCS / config.batch_size)
    config.log_every = 13
    config.ckpt_every = config.steps     # one checkpoint, at the end
    config.model.num_topics = 20         # K (n_components)
    config.model.alpha = None            # 1/K: doc_topic_prior
    config.model.eta = None              # 1/K: topic_word_prior
    config.model.tau0 = 10.0             # learning_offset
    config.model.kappa = 0.7             # learning_decay
    config.model.e_step_iters = 100      # max_doc_update_iter
    config.model.e_step_tol = 1e-3       # mean_change_tol
    return config

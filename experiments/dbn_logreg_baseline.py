"""Reference for `dbn`: scikit-learn LogisticRegression on the raw binary pixels, same split.

    python experiments/dbn_logreg_baseline.py
"""

import json

import numpy as np
from sklearn.linear_model import LogisticRegression

from zoo.data import load

if __name__ == "__main__":
    tr, te = load("digits_binary"), load("digits_binary", "test")
    a, b = tr[np.arange(len(tr))], te[np.arange(len(te))]
    clf = LogisticRegression(max_iter=5000).fit(a["x"].reshape(len(tr), -1), a["label"])
    print(json.dumps({"model": "sklearn.LogisticRegression (raw binary pixels)",
                      "test_accuracy": float(clf.score(b["x"].reshape(len(te), -1), b["label"]))}))

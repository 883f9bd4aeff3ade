"""scikit-learn's SVC on exactly the zoo's digits split: the classical peer of `zoo train vit`.

The features are the zoo's `digits` pixels (values / 16, flattened to 64), the split is
`zoo.data.sources._digits_split` (1,437 train / 360 test). Two rows: SVC with scikit-learn's
defaults (RBF, C=1, gamma="scale"), and an RBF SVC whose C and gamma are picked by 5-fold
stratified cross-validation on the TRAIN split only; the test split is scored once, at the end.

    python experiments/svc_digits_baseline.py
"""

import json
import time

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

from zoo.data.sources import _digits_split

GRID = {"C": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "gamma": ["scale", 0.01, 0.03, 0.1, 0.3, 1.0]}


def features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Same scaling as the `digits` source (pixels / 16), flattened: [N, 64] and labels [N]."""
    images, labels = _digits_split(split)
    return images.reshape(len(images), -1) / 16.0, labels


def main():
    x_train, y_train = features("train")
    x_test, y_test = features("test")
    rows = []
    t = time.perf_counter()
    default = SVC().fit(x_train, y_train)
    rows.append({"model": "SVC() default (rbf, C=1, gamma=scale)", "fit_seconds": round(time.perf_counter() - t, 2),
                 "test_accuracy": round(float(default.score(x_test, y_test)), 4)})
    t = time.perf_counter()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    search = GridSearchCV(SVC(kernel="rbf"), GRID, cv=cv, n_jobs=1).fit(x_train, y_train)
    rows.append({"model": "SVC rbf, C/gamma by 5-fold CV on train", "best_params": search.best_params_,
                 "cv_accuracy": round(float(search.best_score_), 4),
                 "fit_seconds": round(time.perf_counter() - t, 2),
                 "test_accuracy": round(float(search.score(x_test, y_test)), 4)})
    for row in rows:
        print(json.dumps({"train": len(y_train), "test": len(y_test), **row}))


if __name__ == "__main__":
    main()

"""The fast path: a class-weighted linear head on frozen pooled embeddings.

scikit-learn's logistic regression on standardised embeddings; the standardisation is folded into
the weights so the result is one Keras ``Dense`` layer on the backbone's raw pooled features.
"""

from __future__ import annotations

import numpy as np


def fit_linear_head(features: np.ndarray, labels: np.ndarray, n_classes: int, c: float = 0.01,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dense kernel (d, n_classes) and bias (n_classes,) of a balanced logistic regression.

    Classes absent from ``labels`` get a zero kernel and a very negative bias: never predicted,
    rather than silently aliased to another class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError("the training split has fewer than two classes: nothing to learn")
    scaler = StandardScaler().fit(features)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
    clf.fit(scaler.transform(features), labels)
    coef = clf.coef_ if len(present) > 2 else np.vstack([-clf.coef_[0] / 2, clf.coef_[0] / 2])
    intercept = clf.intercept_ if len(present) > 2 else np.array([-clf.intercept_[0] / 2, clf.intercept_[0] / 2])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    kernel = np.zeros((features.shape[1], n_classes), np.float32)
    bias = np.full(n_classes, -30.0, np.float32)
    for row, cls in enumerate(clf.classes_):
        w = coef[row] / scale
        kernel[:, cls] = w
        bias[cls] = intercept[row] - float(np.dot(w, scaler.mean_))
    return kernel, bias

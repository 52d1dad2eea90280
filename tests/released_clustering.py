"""The released code's task clustering as it ran, an independent reference for the tests.

Written from the released code's behaviour (float32 torch tensors, scikit-learn 1.0.2, NumPy's
global RNG): the affinity is scaled by the in-place loop ``X[:, i] /= X[i, i]`` and symmetrised in
float32, then clustered by ``AffinityPropagation(preference, affinity="precomputed",
convergence_iter)`` with scikit-learn's other defaults; a fit without centres is retried with
``convergence_iter + 100`` (10 fits at most), and the previous groups are kept if none has centres.
Two scikit-learn 1.0.2 behaviours that later versions changed are restored from the fit's own
report: a fit that did not converge (``verbose`` prints "Did not converge") had no centres; and the
equal-similarities shortcut (no iteration) made every task an exemplar when the preference was
``>=`` the similarity.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import AffinityPropagation


def partition(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Groups as a canonical partition (the order of groups and of their tasks does not matter)."""
    return sorted(sorted(g) for g in groups)


def released_labels(x: np.ndarray, preference: float | None, convergence_iter: int) -> np.ndarray | None:
    """One fit as scikit-learn 1.0.2 reported it: labels, or None without centres."""
    model = AffinityPropagation(preference=preference, affinity="precomputed", convergence_iter=convergence_iter,
                                verbose=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x)  # random_state=None: NumPy's global RNG, as in the released environment
    n = len(x)
    if model.n_iter_ == 0:  # equal similarities: scikit-learn 1.0.2 compared with >=
        value = np.median(x) if preference is None else preference
        return np.arange(n) if n == 1 or value >= x[0, n - 1] else np.zeros(n, dtype=int)
    if "Did not converge" in printed.getvalue() or len(model.cluster_centers_indices_) == 0:
        return None
    return model.labels_


def released_groups(affinity: torch.Tensor, tasks: Sequence[str], previous: Sequence[Sequence[str]], seed: int,
                    preference: float | None = None) -> tuple[list[list[str]], int]:
    """(partition, number of fits) of the released clustering, NumPy's global RNG seeded with ``seed``."""
    np.random.seed(seed)
    x = affinity.to(torch.float32).clone()
    for i in range(len(x)):
        x[:, i] /= x[i, i]
    x = (x + x.T) / 2
    convergence_iter = 50
    for fit in range(1, 11):
        labels = released_labels(x.numpy(), preference, convergence_iter)
        if labels is not None:
            return partition([[t for t, label in zip(tasks, labels) if label == c] for c in set(labels)]), fit
        convergence_iter += 100
    return partition(previous), 10

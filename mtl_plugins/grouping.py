"""Task grouping from an inter-task affinity matrix by affinity propagation.

``A[s, t]`` is how much updating source task ``s`` lowered target task ``t``'s loss. Each column is
scaled by the target's self-affinity ``A[t, t]``, the result is symmetrised (diagonal 1) and
clustered with scikit-learn's :class:`~sklearn.cluster.AffinityPropagation` on the precomputed
similarities. A fit that did not converge found no exemplar (scikit-learn >= 1.3 still returns centres
then, with a ``ConvergenceWarning``; scikit-learn 1.0.2, the released code's environment, returned
none). The fit is then retried with ``convergence_iter`` raised by 100 and fresh tie-breaking noise
(the next draws of one seeded NumPy stream, where the released code drew from NumPy's global one), up
to ``tries`` fits; when every fit fails, or the scaling is invalid (a self-affinity that is zero,
negative or not finite), the caller keeps its previous groups.

Retries (``retry_rule``): ``"spec"`` raises ``max_iter`` with ``convergence_iter`` so that every
retry can converge; ``"released"`` keeps ``max_iter = 200`` as the released code did, so from the
third try on (``convergence_iter`` 250 > 200) no fit can converge and only two fits count.

Precision (``dtype``): ``"float64"`` (default) or ``"float32"``, the released code's precision for
the scaling and the clustering input. It matters: scikit-learn scales its tie-breaking noise by the
input's machine epsilon, and with an odd number of tasks the median preference equals an
off-diagonal similarity, a tie that the noise alone decides.

Given the same matrix and noise seed, ``column_scaling="released"``, ``dtype="float32"`` and
``retry_rule="released"`` give the released clustering's groups call for call (tested on recorded
and random matrices); what is left is the noise itself, which the released code drew from NumPy's
global RNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import Tensor

#: AffinityPropagation settings of the selective-update method (scikit-learn's defaults).
DAMPING = 0.5
MAX_ITER = 200
CONVERGENCE_ITER = 50
CONVERGENCE_STEP = 100
TRIES = 10


ColumnScaling = Literal["spec", "released"]
COLUMN_SCALINGS = ("spec", "released")
AffinityDtype = Literal["float64", "float32"]
AFFINITY_DTYPES = ("float64", "float32")
RetryRule = Literal["spec", "released"]
RETRY_RULES = ("spec", "released")


class InvalidAffinityError(ValueError):
    """The affinity matrix cannot be scaled by its self-affinities."""


@dataclass
class Grouping:
    """Outcome of :func:`choose_groups`: the groups to use and, if the previous ones were kept, why."""

    groups: list[list[str]]
    kept_previous: bool = False
    reason: str = ""


def check_option(name: str, value: str, accepted: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {tuple(accepted)}, got {value!r}")


def scaled_affinity(affinity: Tensor | np.ndarray, column_scaling: ColumnScaling = "spec",
                    dtype: AffinityDtype = "float64") -> np.ndarray:
    """``X[:, t] = A[:, t] / A[t, t]``, then ``(X + X.T) / 2`` (diagonal 1), computed in ``dtype``.

    ``column_scaling="released"`` reproduces the released code's in-place loop
    ``X[:, i] /= X[i, i]``: the divisor is an element of the column being divided, so once it has
    become 1 the rows below the diagonal are left unscaled (``X[s, t] = A[s, t]`` for ``s > t``).
    ``affinity`` is first rounded to ``dtype`` (a float32 matrix is exact in float64).
    """
    check_option("column_scaling", column_scaling, COLUMN_SCALINGS)
    check_option("dtype", dtype, AFFINITY_DTYPES)
    if isinstance(affinity, Tensor):
        affinity = affinity.detach().cpu().double().numpy()
    a = np.asarray(affinity, dtype=np.float64).astype(dtype)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be a square matrix, got shape {a.shape}")
    diagonal = np.diag(a)
    bad = np.flatnonzero(~np.isfinite(diagonal) | (diagonal <= 0))
    if bad.size:
        raise InvalidAffinityError(f"self-affinity A[i, i] must be positive and finite; invalid at rows "
                                   f"{bad.tolist()}: {diagonal[bad].tolist()}")
    x = a / diagonal[None, :]
    if column_scaling == "released":
        below = np.tril_indices_from(a, k=-1)
        x[below] = a[below]
    x = (x + x.T) / 2
    if not np.isfinite(x).all():
        raise InvalidAffinityError("the scaled affinity matrix has non-finite entries")
    return x


def equal_similarity_labels(similarity: np.ndarray, preference: float | None) -> np.ndarray | None:
    """Labels of the case scikit-learn does not iterate on (one task, or all off-diagonal similarities
    and the preference equal), with scikit-learn 1.0.2's rule: every task its own exemplar when the
    preference is ``>=`` the similarity (later versions need ``>``, so a tie gave one group); else ``None``."""
    n = similarity.shape[0]
    off_diagonal = similarity[~np.eye(n, dtype=bool)]
    if n > 1 and not (off_diagonal == off_diagonal[0]).all():
        return None
    value = np.median(similarity) if preference is None else preference
    return np.arange(n) if n == 1 or value >= off_diagonal[0] else np.zeros(n, dtype=int)


def affinity_propagation_labels(similarity: np.ndarray, *, preference: float | None, convergence_iter: int,
                                random_state: int | np.random.RandomState,
                                max_iter: int = MAX_ITER) -> np.ndarray | None:
    """Cluster labels from one AffinityPropagation fit, or ``None`` when it found no exemplar: no
    centre, or a fit that did not converge (scikit-learn's ``ConvergenceWarning``)."""
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    degenerate = equal_similarity_labels(similarity, preference)
    if degenerate is not None:
        return degenerate
    model = AffinityPropagation(affinity="precomputed", preference=preference, damping=DAMPING, max_iter=max_iter,
                                convergence_iter=convergence_iter, random_state=random_state)
    with warnings.catch_warnings(record=True) as caught:  # non-convergence is reported through the return value
        warnings.simplefilter("always")
        model.fit(similarity)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught) or len(model.cluster_centers_indices_) == 0:
        return None
    return np.asarray(model.labels_)


def groups_from_labels(labels: Sequence[int], tasks: Sequence[str]) -> list[list[str]]:
    """Tasks sharing a label form a group; groups ordered by their first task, tasks in task order."""
    if len(labels) != len(tasks):
        raise ValueError(f"{len(labels)} labels for {len(tasks)} tasks")
    groups: dict[int, list[str]] = {}
    for label, task in zip(labels, tasks):
        groups.setdefault(int(label), []).append(task)
    return list(groups.values())


def cluster_tasks(affinity: Tensor | np.ndarray, tasks: Sequence[str], *, preference: float | None = None,
                  random_state: int = 0, tries: int = TRIES, column_scaling: ColumnScaling = "spec",
                  dtype: AffinityDtype = "float64", retry_rule: RetryRule = "spec") -> list[list[str]] | None:
    """Groups from affinity propagation with the retry rule; ``None`` if no fit found an exemplar.

    Raises :class:`InvalidAffinityError` when the self-affinities cannot scale the columns.
    """
    check_option("retry_rule", retry_rule, RETRY_RULES)
    similarity = scaled_affinity(affinity, column_scaling, dtype)
    if similarity.shape[0] != len(tasks):
        raise ValueError(f"affinity is {similarity.shape[0]} x {similarity.shape[0]} but there are {len(tasks)} tasks")
    convergence_iter = CONVERGENCE_ITER
    noise = np.random.RandomState(random_state)  # one stream: every retry breaks ties with new draws
    for _ in range(tries):
        extra = convergence_iter - CONVERGENCE_ITER if retry_rule == "spec" else 0
        labels = affinity_propagation_labels(similarity, preference=preference, convergence_iter=convergence_iter,
                                             random_state=noise, max_iter=MAX_ITER + extra)
        if labels is not None:
            return groups_from_labels(labels, tasks)
        convergence_iter += CONVERGENCE_STEP
    return None


def choose_groups(affinity: Tensor | np.ndarray, tasks: Sequence[str], previous: Sequence[Sequence[str]], *,
                  preference: float | None = None, random_state: int = 0, column_scaling: ColumnScaling = "spec",
                  dtype: AffinityDtype = "float64", retry_rule: RetryRule = "spec") -> Grouping:
    """:func:`cluster_tasks`, keeping ``previous`` (with the reason) when it cannot produce groups."""
    kept = [list(g) for g in previous]
    try:
        groups = cluster_tasks(affinity, tasks, preference=preference, random_state=random_state,
                               column_scaling=column_scaling, dtype=dtype, retry_rule=retry_rule)
    except InvalidAffinityError as error:
        return Grouping(kept, True, f"invalid affinity ({error})")
    if groups is None:
        return Grouping(kept, True, f"affinity propagation found no exemplar in {TRIES} fits")
    return Grouping(groups)

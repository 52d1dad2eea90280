"""Task grouping from an inter-task affinity matrix by affinity propagation.

``A[s, t]`` is how much updating source task ``s`` lowered target task ``t``'s loss. Each column is
scaled by the target's self-affinity ``A[t, t]``, the result is symmetrised (diagonal 1) and
clustered with scikit-learn's :class:`~sklearn.cluster.AffinityPropagation` on the precomputed
similarities. When no exemplar is found the fit is retried with ``convergence_iter`` raised by 100
and fresh tie-breaking noise (the next draws of one seeded NumPy stream, where the released code
drew from NumPy's global one), up to ``tries`` fits; when every fit fails, or the scaling is invalid (a self-affinity that is zero,
negative or not finite), the caller keeps its previous groups.
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


class InvalidAffinityError(ValueError):
    """The affinity matrix cannot be scaled by its self-affinities."""


@dataclass
class Grouping:
    """Outcome of :func:`choose_groups`: the groups to use and, if the previous ones were kept, why."""

    groups: list[list[str]]
    kept_previous: bool = False
    reason: str = ""


def scaled_affinity(affinity: Tensor | np.ndarray, column_scaling: ColumnScaling = "spec") -> np.ndarray:
    """``X[:, t] = A[:, t] / A[t, t]``, then ``(X + X.T) / 2`` (float64, diagonal 1).

    ``column_scaling="released"`` reproduces the released code's in-place loop
    ``X[:, i] /= X[i, i]``: the divisor is an element of the column being divided, so once it has
    become 1 the rows below the diagonal are left unscaled (``X[s, t] = A[s, t]`` for ``s > t``).
    """
    if column_scaling not in COLUMN_SCALINGS:
        raise ValueError(f"column_scaling must be one of {COLUMN_SCALINGS}, got {column_scaling!r}")
    if isinstance(affinity, Tensor):
        affinity = affinity.detach().cpu().double().numpy()
    a = np.asarray(affinity, dtype=np.float64)
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


def affinity_propagation_labels(similarity: np.ndarray, *, preference: float | None, convergence_iter: int,
                                random_state: int | np.random.RandomState) -> np.ndarray | None:
    """Cluster labels from one AffinityPropagation fit, or ``None`` when it found no exemplar."""
    from sklearn.cluster import AffinityPropagation

    model = AffinityPropagation(affinity="precomputed", preference=preference, damping=DAMPING, max_iter=MAX_ITER,
                                convergence_iter=convergence_iter, random_state=random_state)
    with warnings.catch_warnings():  # non-convergence is reported through the return value
        warnings.simplefilter("ignore")
        model.fit(similarity)
    if len(model.cluster_centers_indices_) == 0:
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
                  random_state: int = 0, tries: int = TRIES,
                  column_scaling: ColumnScaling = "spec") -> list[list[str]] | None:
    """Groups from affinity propagation with the retry rule; ``None`` if no fit found an exemplar.

    Raises :class:`InvalidAffinityError` when the self-affinities cannot scale the columns.
    """
    similarity = scaled_affinity(affinity, column_scaling)
    if similarity.shape[0] != len(tasks):
        raise ValueError(f"affinity is {similarity.shape[0]} x {similarity.shape[0]} but there are {len(tasks)} tasks")
    convergence_iter = CONVERGENCE_ITER
    noise = np.random.RandomState(random_state)  # one stream: every retry breaks ties with new draws
    for _ in range(tries):
        labels = affinity_propagation_labels(similarity, preference=preference, convergence_iter=convergence_iter,
                                             random_state=noise)
        if labels is not None:
            return groups_from_labels(labels, tasks)
        convergence_iter += CONVERGENCE_STEP
    return None


def choose_groups(affinity: Tensor | np.ndarray, tasks: Sequence[str], previous: Sequence[Sequence[str]], *,
                  preference: float | None = None, random_state: int = 0,
                  column_scaling: ColumnScaling = "spec") -> Grouping:
    """:func:`cluster_tasks`, keeping ``previous`` (with the reason) when it cannot produce groups."""
    kept = [list(g) for g in previous]
    try:
        groups = cluster_tasks(affinity, tasks, preference=preference, random_state=random_state,
                               column_scaling=column_scaling)
    except InvalidAffinityError as error:
        return Grouping(kept, True, f"invalid affinity ({error})")
    if groups is None:
        return Grouping(kept, True, f"affinity propagation found no exemplar in {TRIES} fits")
    return Grouping(groups)

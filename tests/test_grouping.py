"""Affinity-propagation task grouping: column scaling, known clusters, retry and keep-previous rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_plugins import grouping
from mtl_plugins.grouping import InvalidAffinityError, choose_groups, cluster_tasks, groups_from_labels, scaled_affinity

TASKS = ["a", "b", "c", "d", "e", "f"]
SCALES = [1.0, 1000.0, 0.01, 30.0, 0.5, 2.0]


def block_affinity(blocks: list[list[int]], k: int, scales: list[float], across: float = 0.1) -> np.ndarray:
    """Affinity 0.8 inside blocks, `across` between them, diagonal 1; column t then scaled by scales[t]."""
    a = np.full((k, k), across)
    for block in blocks:
        for i in block:
            for j in block:
                a[i, j] = 1.0 if i == j else 0.8
    return a * np.asarray(scales)[None, :]


def test_scaled_affinity_matches_elementwise_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    a[np.diag_indices(4)] = rng.uniform(0.1, 2.0, size=4)
    x = scaled_affinity(torch.tensor(a))
    for s in range(4):
        for t in range(4):
            assert x[s, t] == pytest.approx((a[s, t] / a[t, t] + a[t, s] / a[s, s]) / 2, rel=1e-14)
    assert np.allclose(np.diag(x), 1.0)


@pytest.mark.parametrize(("blocks", "preference"), [
    ([[0, 1, 2], [3, 4, 5]], None),
    ([[0, 2], [1, 4], [3, 5]], None),
    ([[0, 4], [1, 3], [2, 5]], None),
    ([[0, 1], [2], [3, 4, 5]], 0.5),  # a lone task needs a preference above its cross-block similarity
])
def test_known_clusters_are_found_despite_column_scales(blocks, preference):
    # Column scales differ by up to 1e5: only the scaling by the self-affinity makes the blocks visible.
    a = block_affinity(blocks, len(TASKS), SCALES)
    groups = cluster_tasks(a, TASKS, preference=preference, random_state=0)
    expected = sorted(sorted(TASKS[i] for i in block) for block in blocks)
    assert sorted(sorted(g) for g in groups) == expected
    unscaled = grouping.affinity_propagation_labels((a + a.T) / 2, preference=preference, convergence_iter=50,
                                                    random_state=0)
    assert unscaled is None or sorted(map(sorted, groups_from_labels(unscaled, TASKS))) != expected


def test_groups_are_ordered_by_first_task_and_deterministic():
    a = block_affinity([[1, 4], [0, 2], [3, 5]], 6, SCALES)
    first = cluster_tasks(a, TASKS, random_state=3)
    assert first == [["a", "c"], ["b", "e"], ["d", "f"]]
    assert all(cluster_tasks(a, TASKS, random_state=3) == first for _ in range(3))
    assert groups_from_labels([2, 0, 2, 1], ["w", "x", "y", "z"]) == [["w", "y"], ["x"], ["z"]]


def test_preference_controls_the_number_of_groups():
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    assert len(cluster_tasks(a, TASKS, preference=None)) == 2
    assert cluster_tasks(a, TASKS, preference=10.0) == [[t] for t in TASKS]  # every task its own exemplar
    assert cluster_tasks(a, TASKS, preference=-10.0) == [TASKS]


def test_retry_raises_convergence_iter_by_100(monkeypatch):
    seen: list[int] = []
    real = grouping.affinity_propagation_labels

    def flaky(similarity, *, preference, convergence_iter, random_state):
        seen.append(convergence_iter)
        if len(seen) < 4:
            return None  # no exemplar
        return real(similarity, preference=preference, convergence_iter=convergence_iter, random_state=random_state)

    monkeypatch.setattr(grouping, "affinity_propagation_labels", flaky)
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    assert sorted(map(sorted, cluster_tasks(a, TASKS))) == [["a", "b", "c"], ["d", "e", "f"]]
    assert seen == [50, 150, 250, 350]


def test_each_retry_breaks_ties_with_fresh_noise(monkeypatch):
    # The released code drew the tie-breaking noise from NumPy's global stream, so a retry was a new
    # draw; here one seeded stream plays that role. The first fit equals a fit seeded with the int.
    states: list[tuple[bytes, int]] = []
    real = grouping.affinity_propagation_labels

    def failing_first(similarity, *, preference, convergence_iter, random_state):
        _, key, position, *_ = random_state.get_state()
        states.append((key.tobytes(), position))
        labels = real(similarity, preference=preference, convergence_iter=convergence_iter, random_state=random_state)
        return None if len(states) < 3 else labels

    monkeypatch.setattr(grouping, "affinity_propagation_labels", failing_first)
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    cluster_tasks(a, TASKS, random_state=7)
    assert len(states) == 3 and len(set(states)) == 3
    _, key, position, *_ = np.random.RandomState(7).get_state()
    assert states[0] == (key.tobytes(), position)


def test_ten_failed_fits_keep_the_previous_groups(monkeypatch):
    seen: list[int] = []

    def never(similarity, *, preference, convergence_iter, random_state):
        seen.append(convergence_iter)  # and no exemplar: returns None

    monkeypatch.setattr(grouping, "affinity_propagation_labels", never)
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    assert cluster_tasks(a, TASKS) is None
    assert seen == [50 + 100 * i for i in range(10)]
    previous = [["a", "e"], ["b", "c", "d", "f"]]
    result = choose_groups(a, TASKS, previous)
    assert result.kept_previous and result.groups == previous and "no exemplar" in result.reason


def test_a_real_failed_fit_is_recovered_by_the_retry():
    # A symmetric similarity (diagonal 1, so the scaling leaves it unchanged) on which scikit-learn's
    # affinity propagation, with seed 0's noise, oscillates and ends without an exemplar; the retry
    # (convergence_iter 150, the stream's next noise) finds the two pairs.
    x = np.array([
        [1.0, -0.03572769453089829, 0.01086884542566041, -0.01264819591991563],
        [-0.03572769453089829, 1.0, -0.04908625680731283, 0.2983803889345593],
        [0.01086884542566041, -0.04908625680731283, 1.0, -0.00249747296860642],
        [-0.01264819591991563, 0.2983803889345593, -0.00249747296860642, 1.0],
    ])
    assert grouping.affinity_propagation_labels(x, preference=None, convergence_iter=50, random_state=0) is None
    result = choose_groups(x, ["a", "b", "c", "d"], [["a", "b", "c", "d"]], random_state=0)
    assert not result.kept_previous and result.groups == [["a", "c"], ["b", "d"]]


def test_released_column_scaling_matches_the_in_place_loop():
    # The released code scales with ``X[:, i] /= X[i, i]`` on a torch tensor: the divisor is read
    # from the column while it is being divided, so rows below the diagonal stay unscaled.
    rng = np.random.default_rng(3)
    a = rng.uniform(-0.5, 0.5, size=(5, 5)) + np.diag(rng.uniform(0.5, 2.0, size=5))
    x = torch.tensor(a)
    for i in range(len(x)):
        x[:, i] /= x[i, i]
    released = ((x + x.T) / 2).numpy()
    np.testing.assert_allclose(scaled_affinity(a, "released"), released, rtol=1e-15)
    assert np.abs(scaled_affinity(a) - released).max() > 0.01
    with pytest.raises(ValueError, match="column_scaling"):
        scaled_affinity(a, "paper")


def test_released_column_scaling_changes_the_groups():
    # Unscaled entries below the diagonal carry the columns' scales (1000 for task b): the planted
    # blocks are no longer recovered.
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    assert cluster_tasks(a, TASKS, random_state=0) == [["a", "b", "c"], ["d", "e", "f"]]
    released = cluster_tasks(a, TASKS, random_state=0, column_scaling="released")
    assert released == cluster_tasks(scaled_affinity(a, "released"), TASKS, random_state=0)  # diagonal 1
    assert released != [["a", "b", "c"], ["d", "e", "f"]]


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_invalid_self_affinity_keeps_previous_groups(bad):
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    a[2, 2] = bad
    with pytest.raises(InvalidAffinityError, match=r"rows \[2\]"):
        scaled_affinity(a)
    previous = [[t] for t in TASKS]
    result = choose_groups(a, TASKS, previous)
    assert result.kept_previous and result.groups == previous and "self-affinity" in result.reason


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="square"):
        scaled_affinity(np.ones((2, 3)))
    with pytest.raises(ValueError, match="3 tasks"):
        cluster_tasks(np.eye(2), ["a", "b", "c"])

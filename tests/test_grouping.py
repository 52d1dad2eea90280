"""Affinity-propagation task grouping: column scaling, known clusters, retry and keep-previous rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from released_clustering import released_groups

from mtl_plugins import grouping
from mtl_plugins.grouping import (
    InvalidAffinityError,
    choose_groups,
    cluster_tasks,
    groups_from_labels,
    scaled_affinity,
)

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

    def flaky(similarity, *, preference, convergence_iter, random_state, max_iter):
        seen.append(convergence_iter)
        if len(seen) < 4:
            return None  # no exemplar
        return real(similarity, preference=preference, convergence_iter=convergence_iter, random_state=random_state,
                    max_iter=max_iter)

    monkeypatch.setattr(grouping, "affinity_propagation_labels", flaky)
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    assert sorted(map(sorted, cluster_tasks(a, TASKS))) == [["a", "b", "c"], ["d", "e", "f"]]
    assert seen == [50, 150, 250, 350]


def test_each_retry_breaks_ties_with_fresh_noise(monkeypatch):
    # The released code drew the tie-breaking noise from NumPy's global stream, so a retry was a new
    # draw; here one seeded stream plays that role. The first fit equals a fit seeded with the int.
    states: list[tuple[bytes, int]] = []
    real = grouping.affinity_propagation_labels

    def failing_first(similarity, *, preference, convergence_iter, random_state, max_iter):
        _, key, position, *_ = random_state.get_state()
        states.append((key.tobytes(), position))
        labels = real(similarity, preference=preference, convergence_iter=convergence_iter, random_state=random_state,
                      max_iter=max_iter)
        return None if len(states) < 3 else labels

    monkeypatch.setattr(grouping, "affinity_propagation_labels", failing_first)
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    cluster_tasks(a, TASKS, random_state=7)
    assert len(states) == 3 and len(set(states)) == 3
    _, key, position, *_ = np.random.RandomState(7).get_state()
    assert states[0] == (key.tobytes(), position)


def test_ten_failed_fits_keep_the_previous_groups(monkeypatch):
    seen: list[int] = []

    def never(similarity, *, preference, convergence_iter, random_state, max_iter):
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


# -- agreement with the released clustering ------------------------------------------------------
def random_affinity(rng: np.random.Generator, k: int) -> torch.Tensor:
    """An affinity like the recorded ones: small positive self-affinities, mixed-sign cross terms."""
    scale = rng.uniform(0.001, 0.05)
    a = rng.normal(0, rng.uniform(0.05, 1.0), size=(k, k)) * scale
    a[np.diag_indices(k)] = rng.uniform(0.2, 1.0, size=k) * scale
    return torch.tensor(a, dtype=torch.float32)


RELEASED = {"column_scaling": "released", "dtype": "float32", "retry_rule": "released"}


def test_groupings_agree_call_for_call_with_the_released_clustering():
    rng = np.random.default_rng(1)
    matrices = [random_affinity(rng, int(rng.integers(2, 7))) for _ in range(300)]
    matrices.append(torch.eye(5) * 0.01)  # equal similarities: scikit-learn 1.0.2's tie rule
    matrices.append(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    kept = differs_in_float64 = 0
    for i, a in enumerate(matrices):
        tasks = [f"t{j}" for j in range(len(a))]
        previous = [tasks[::2], tasks[1::2]]
        seed = int(rng.integers(0, 2**31 - 1))
        expected, fits = released_groups(a, tasks, previous, seed)
        result = choose_groups(a, tasks, previous, random_state=seed, **RELEASED)
        assert sorted(map(sorted, result.groups)) == expected, (i, a)
        assert result.kept_previous == (fits == 10 and expected == sorted(map(sorted, previous)))
        kept += result.kept_previous
        float64 = choose_groups(a, tasks, previous, random_state=seed, **{**RELEASED, "dtype": "float64"})
        differs_in_float64 += sorted(map(sorted, float64.groups)) != expected
    assert kept >= 1 and differs_in_float64 >= 1  # the cases that needed the fixes occur
    assert choose_groups(matrices[-2], [f"t{j}" for j in range(5)], [], **RELEASED).groups == [[f"t{j}"] for j in range(5)]


def two_blocks() -> np.ndarray:
    """Scaled two-block similarities without exact ties: affinity propagation converges in 54 iterations."""
    a = block_affinity([[0, 1, 2], [3, 4, 5]], 6, SCALES)
    return scaled_affinity(a + np.random.default_rng(0).uniform(0, 0.1, size=(6, 6)) * np.asarray(SCALES)[None, :])


def test_a_fit_that_did_not_converge_has_no_exemplar():
    # scikit-learn >= 1.3 returns centres from a fit stopped at max_iter, with a ConvergenceWarning;
    # scikit-learn 1.0.2 returned none, and so does the library.
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    x = two_blocks()
    with pytest.warns(ConvergenceWarning):
        model = AffinityPropagation(affinity="precomputed", max_iter=40, convergence_iter=50, random_state=0).fit(x)
    assert len(model.cluster_centers_indices_) > 0
    assert grouping.affinity_propagation_labels(x, preference=None, convergence_iter=50, random_state=0,
                                                max_iter=40) is None
    assert grouping.affinity_propagation_labels(x, preference=None, convergence_iter=50, random_state=0) is not None


@pytest.mark.parametrize("retry_rule", ["spec", "released"])
def test_released_retries_cannot_converge_from_the_third_fit(monkeypatch, retry_rule):
    # The released code raised convergence_iter by 100 per try but kept max_iter = 200: from the third
    # fit on (convergence_iter 250) the convergence check never runs, so no fit can converge.
    x = two_blocks()
    real = grouping.affinity_propagation_labels
    assert real(x, preference=None, convergence_iter=150, random_state=0) is not None
    assert real(x, preference=None, convergence_iter=250, random_state=0) is None
    assert real(x, preference=None, convergence_iter=250, random_state=0, max_iter=400) is not None
    seen: list[tuple[int, int]] = []

    def failing_twice(similarity, *, preference, convergence_iter, random_state, max_iter):
        seen.append((convergence_iter, max_iter))
        labels = real(similarity, preference=preference, convergence_iter=convergence_iter,
                      random_state=random_state, max_iter=max_iter)
        return None if len(seen) <= 2 else labels

    monkeypatch.setattr(grouping, "affinity_propagation_labels", failing_twice)
    groups = cluster_tasks(x, TASKS, retry_rule=retry_rule)
    if retry_rule == "released":
        assert groups is None and seen == [(50 + 100 * i, 200) for i in range(10)]
    else:
        assert sorted(map(sorted, groups)) == [["a", "b", "c"], ["d", "e", "f"]]
        assert seen == [(50, 200), (150, 300), (250, 400)]


def test_float32_scaling_is_the_released_float32_loop():
    rng = np.random.default_rng(5)
    a = torch.tensor(rng.uniform(-0.5, 0.5, size=(5, 5)) + np.diag(rng.uniform(0.5, 2.0, size=5)), dtype=torch.float32)
    x = a.clone()
    for i in range(len(x)):
        x[:, i] /= x[i, i]
    released = ((x + x.T) / 2).numpy()
    scaled = scaled_affinity(a, "released", "float32")
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, released)
    assert (scaled_affinity(a, "released") != released).any()  # float64 differs in the last bits
    with pytest.raises(ValueError, match="dtype"):
        scaled_affinity(a, "released", "float16")
    with pytest.raises(ValueError, match="retry_rule"):
        cluster_tasks(a, list("abcde"), retry_rule="paper")

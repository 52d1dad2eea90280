"""The Gramian solvers written here: MGDA's Frank-Wolfe (O(K) per iteration in Python floats, where
torchjd's runs O(K^2) torch operations), CAGrad's dual and Nash-MTL's bargaining equation
(torchjd's versions need cvxpy). Each takes the K x K Gramian ``J J^T`` and returns K weights
(float64)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def mgda_weights(gramian: Tensor, epsilon: float = 1e-5, max_iters: int = 250) -> Tensor:
    """MGDA's weights: the minimum-norm point of the task gradients' convex hull by Frank-Wolfe
    (Sener & Koltun 2018, Algorithm 2; the step and stopping rule of torchjd's ``MGDAWeighting``).

    From ``alpha = 1/K``: the vertex ``t = argmin G alpha``, the exact line search between
    ``alpha`` and ``e_t`` (``a = (G alpha)_t``, ``b = alpha^T G alpha``, ``c = G_tt``), and a stop
    when the step ``gamma`` is below ``epsilon``. ``G alpha`` and ``b`` are updated in O(K) per
    iteration (``G alpha' = (1 - gamma) G alpha + gamma G e_t``), in Python floats: the iterates
    equal the O(K^2) recomputation to rounding, which after 250 iterations reaches about 1e-8 in
    the weights (as between torchjd's torch and a numpy implementation). Exact ties in ``G alpha``
    (duplicate tasks) go to the first task, where torch's argmin follows its rounding: the weights
    then differ, the direction ``alpha^T J`` does not.
    """
    g = gramian.detach().cpu().double().tolist()
    k = len(g)
    alpha = [1.0 / k] * k
    g_alpha = [sum(row) / k for row in g]
    b = sum(g_alpha) / k
    for _ in range(max_iters):
        t = min(range(k), key=g_alpha.__getitem__)
        a, c = g_alpha[t], g[t][t]
        gamma = 1.0 if c <= a else 0.0 if b <= a else (b - a) / (b + c - 2 * a)
        keep = 1.0 - gamma
        alpha = [keep * x for x in alpha]
        alpha[t] += gamma
        g_alpha = [keep * x + gamma * y for x, y in zip(g_alpha, g[t])]
        b = keep * keep * b + 2.0 * gamma * keep * a + gamma * gamma * c
        if gamma < epsilon:
            break
    return torch.tensor(alpha, dtype=torch.float64)


def cagrad_weights(gramian: Tensor, c: float, rescale: int = 1) -> Tensor:
    """CAGrad's weights (Liu et al. 2021, the authors' dual with scipy SLSQP).

    Solves ``min_{w in simplex} w^T G g0_w + c ||g0|| sqrt(w^T G w)`` (``g0_w = 1/K``), then
    ``d = g0 + c ||g0|| / ||g_w|| * g_w``, divided by ``1 + c^2`` (rescale 1) or ``1 + c`` (2).
    """
    from scipy.optimize import minimize

    g = gramian.detach().cpu().double().numpy()
    k = g.shape[0]
    size = np.trace(g) / k
    base = np.full(k, 1.0 / k)
    if size <= 0:
        return torch.zeros(k, dtype=torch.float64)
    a = g / size  # weights are invariant to the Gramian's scale; this keeps the solver well scaled
    coef = c * math.sqrt(max(base @ a @ base, 0.0))
    eps = 1e-12

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        aw = a @ w
        norm = math.sqrt(max(w @ aw, 0.0) + eps)
        return float(aw @ base + coef * norm), a @ base + coef * aw / norm

    result = minimize(objective, base, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                      constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones(k)},),
                      options={"ftol": 1e-14, "maxiter": 500})
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum()
    gw_norm = math.sqrt(max(w @ a @ w, 0.0))
    weights = base + (coef / gw_norm) * w if gw_norm > 1e-12 else base
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return torch.from_numpy(weights / divisor)


def nash_weights(gramian: Tensor, max_iters: int = 100, tol: float = 1e-10) -> Tensor:
    """Nash-MTL's bargaining weights: the ``alpha > 0`` with ``G alpha = 1 / alpha`` (Navon et al. 2022).

    It is the minimiser of ``f(alpha) = alpha^T G alpha / 2 - sum log alpha`` on the
    Frobenius-normalised Gramian (a tiny ridge keeps zero-gradient tasks finite), by Newton steps
    until the gradient's norm is below ``tol``. ``f`` is self-concordant: while the Newton
    decrement ``lambda = sqrt(grad^T step)`` is at least 1/4 the step is damped by a backtracking
    line search (each step then lowers ``f`` by more than 0.02, far above rounding); below it the
    full step converges quadratically (Nesterov & Nemirovski), and the iteration also ends when
    the decrement stops halving (float64's rounding).
    """
    g = gramian.detach().cpu().double().numpy()
    norm = float(np.linalg.norm(g))
    k = g.shape[0]
    if norm == 0.0:
        return torch.zeros(k, dtype=torch.float64)
    m = g / norm + 1e-10 * np.eye(k)
    alpha = 1.0 / np.sqrt(np.diagonal(m))

    def objective(a: np.ndarray) -> float:
        return float(0.5 * a @ m @ a - np.log(a).sum())

    previous = math.inf  # the last full step's squared decrement
    for _ in range(max_iters):
        grad = m @ alpha - 1.0 / alpha
        if float(np.linalg.norm(grad)) < tol:
            break
        step = np.linalg.solve(m + np.diag(1.0 / alpha**2), grad)
        slope = max(float(grad @ step), 0.0)  # the squared Newton decrement
        if slope >= 1 / 16:
            t, current = 1.0, objective(alpha)
            while (alpha - t * step <= 0).any() or objective(alpha - t * step) > current - 0.25 * t * slope:
                t *= 0.5
            alpha, previous = alpha - t * step, math.inf
        elif slope > 0.5 * previous:  # no longer shrinking quadratically: float64's rounding
            break
        else:
            alpha, previous = alpha - step, slope
    return torch.from_numpy(alpha / math.sqrt(norm))


def pcgrad_weights(gramian: Tensor) -> Tensor:
    """PCGrad's weights (Yu et al. 2020, Algorithm 1) from the Gramian, as torchjd's
    ``PCGradWeighting`` computes them, in Python floats.

    Task i's projected gradient is ``sum_j c_j g_j`` (``c = e_i`` first); for each other task j in
    a random order (``torch.randperm(K)`` from torch's global RNG, i skipped, torchjd's draws), if
    ``c . G_j < 0`` then ``c_j -= c . G_j / G_jj``. The weights are the sum of the K vectors ``c``.
    """
    g = gramian.detach().cpu().double().tolist()
    k = len(g)
    weights = [0.0] * k
    for i in range(k):
        order = torch.randperm(k).tolist()
        c = [0.0] * k
        c[i] = 1.0
        for j in order:
            if j == i:
                continue
            inner = sum(x * y for x, y in zip(g[j], c))
            if inner < 0.0 and g[j][j] > 0.0:  # G_jj = 0 with G_ij < 0: float32 underflow of a tiny g_j
                c[j] -= inner / g[j][j]
        weights = [w + x for w, x in zip(weights, c)]
    return torch.tensor(weights, dtype=torch.float64)


def gradvac_weights(gramian: Tensor, targets: Tensor, beta: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """GradVac's weights (Wang et al. 2021) from the Gramian and the EMA targets ``phi_hat`` (K x K),
    as torchjd's ``GradVacWeighting`` computes them, in Python floats; returns (weights, new targets).

    Task i's corrected gradient is ``sum_k c_k g_k`` (``c = e_i`` first); for each other task j in a
    random order (``torch.randperm(K - 1)``, torchjd's draws) the cosine ``phi = c G_j / (|g_i^c| |g_j|)``;
    where ``phi < phi_hat_ij``, ``c_j += |g_i^c| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (|g_j| sqrt(1 - phi_hat^2))``; then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``.
    """
    g = gramian.detach().cpu().double().tolist()
    phi_hat = targets.detach().cpu().double().tolist()
    k = len(g)
    weights = [0.0] * k
    for i in range(k):
        c = [0.0] * k
        c[i] = 1.0
        c_g = list(g[i])  # c G: the corrected gradient's dot products with every g_j
        others = [j for j in range(k) if j != i]
        for j in (others[index] for index in torch.randperm(k - 1).tolist()):
            norm_i = math.sqrt(max(sum(x * y for x, y in zip(c_g, c)), 0.0))
            norm_j = math.sqrt(max(g[j][j], 0.0))
            phi, target = c_g[j] / (norm_i * norm_j + eps), phi_hat[i][j]
            if phi < target:
                root_phi, root_target = math.sqrt(max(1.0 - phi * phi, 0.0)), math.sqrt(max(1.0 - target * target, 0.0))
                w = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + eps)
                c[j] += w
                c_g = [x + w * y for x, y in zip(c_g, g[j])]
            phi_hat[i][j] = (1.0 - beta) * target + beta * phi
        weights = [w + x for w, x in zip(weights, c)]
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(phi_hat, dtype=torch.float64)

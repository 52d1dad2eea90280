"""Gradient-manipulation strategies: combine the per-task gradients of the shared parameters.

As in LibMTL with ``rep_grad=False``: each task's gradient w.r.t. ``model.get_share_params()`` is
one row of a K x n Jacobian ``J``; an aggregator turns ``J`` into one update direction for the
shared parameters. Task-specific parameters receive their own task's gradient (the plain sum).

One step per batch:

1. for each task ``t``: ``updater.zero_grad()``, a forward pass through ``t``'s path
   (``closure(task=t)``), ``updater.backward(w_t * L_t)``, and a copy of the gradients. K forward
   passes rather than one retained graph keep every backward an ordinary one for the updater
   (distributed hooks, loss scaling);
2. every process aggregates the same matrix and takes the same step: the Jacobian (and the
   task-specific gradients) are averaged across processes, by ``updater.reduce_`` unless the
   updater's backward already averaged each gradient (``updater.averages_gradients``, as the
   Trainer's updater does);
3. the gradients are divided by ``updater.loss_scale`` before aggregating (several aggregators are
   not scale-equivariant); the combined direction is multiplied back by the loss scale when written
   to ``p.grad``, because ``updater.step`` unscales what it finds there;
4. ``updater.step(final=True)``.

The strategies take the model (``model=``, filled in by the runner) to find the shared parameters.
Weightings of the Gramian ``J J^T`` come from torchjd (extra ``baselines``) through
:mod:`~mtl_plugins.strategies.torchjd_adapter`; CAGrad and Nash-MTL are solved here (scipy and a
Newton method) because torchjd's versions need cvxpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import register_strategy
from . import torchjd_adapter as tjd
from .base import Closure, Strategy, Updater, as_updater, losses_to_floats


# -- per-task gradients ---------------------------------------------------------------------------
def split_model_parameters(model: nn.Module | None, strategy: str) -> tuple[list[Tensor], list[Tensor]]:
    """(shared, task-specific) trainable parameters of ``model`` (unwrapping ``.module`` wrappers)."""
    if model is None:
        raise ValueError(
            f"strategy {strategy!r} aggregates the shared parameters' Jacobian: build it with "
            "model=<a model with get_share_params()> (the runner passes it)"
        )
    inner = model
    while not hasattr(inner, "get_share_params") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not hasattr(inner, "get_share_params"):
        raise TypeError(f"strategy {strategy!r} needs a model with get_share_params(); got {type(model).__name__}")
    shared_ids = {id(p) for p in inner.get_share_params()}
    shared = [p for p in inner.parameters() if p.requires_grad and id(p) in shared_ids]
    specific = [p for p in inner.parameters() if p.requires_grad and id(p) not in shared_ids]
    if not shared:
        raise ValueError(f"strategy {strategy!r}: the model has no trainable shared parameters")
    return shared, specific


@dataclass
class TaskGradients:
    """Per-task losses and gradients of one batch, averaged across processes and unscaled."""

    losses: list[float]
    #: K x n: row t is task t's gradient w.r.t. the shared parameters, flattened.
    jacobian: Tensor
    #: For each task-specific parameter, ``sum_t c_t grad_t`` (None if no task reached it).
    specific: list[Tensor | None]

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.jacobian).all()) and all(
            bool(torch.isfinite(g).all()) for g in self.specific if g is not None
        )


def task_gradients(
    closure: Closure,
    updater: Updater,
    tasks: Sequence[str],
    loss_weights: dict[str, float],
    shared: Sequence[Tensor],
    specific: Sequence[Tensor],
    coefficients: Sequence[float] | None = None,
) -> TaskGradients:
    """One forward/backward per task through the updater; see the module docstring.

    ``coefficients`` weight each task's contribution to the task-specific sums (default 1).
    """
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in shared) else torch.float32
    rows: list[Tensor] = []
    specific_sum: list[Tensor | None] = [None] * len(specific)
    values: list[float] = []
    for k, task in enumerate(tasks):
        updater.zero_grad()
        losses = closure(task=task)
        values += losses_to_floats(losses, [task])
        updater.backward(loss_weights[task] * losses[task])
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in shared
        ]))
        coefficient = 1.0 if coefficients is None else float(coefficients[k])
        for i, p in enumerate(specific):
            if p.grad is not None:
                g = coefficient * p.grad.to(dtype)
                specific_sum[i] = g if specific_sum[i] is None else specific_sum[i] + g
    jacobian = torch.stack(rows)
    present = [g for g in specific_sum if g is not None]
    if not updater.averages_gradients:
        updater.reduce_([jacobian, *present])
    scale = float(updater.loss_scale)
    if scale != 1.0:
        jacobian /= scale
        for g in present:
            g /= scale
    return TaskGradients(values, jacobian, specific_sum)


def write_gradients(
    shared: Sequence[Tensor], direction: Tensor, specific: Sequence[Tensor],
    specific_grads: Sequence[Tensor | None], scale: float,
) -> None:
    """Store ``direction`` (shared) and ``specific_grads`` in ``p.grad``, multiplied by ``scale``."""
    offset = 0
    for p in shared:
        chunk = direction[offset : offset + p.numel()]
        p.grad = (chunk * scale).reshape(p.shape).to(p.dtype)
        offset += p.numel()
    for p, g in zip(specific, specific_grads):
        p.grad = None if g is None else (g * scale).to(p.dtype)


def _check_non_finite(grads: TaskGradients, updater: Updater, tasks: Sequence[str], strategy: str) -> None:
    """Without loss scaling a non-finite gradient is an error; with it, the updater skips the step."""
    if updater.loss_scale == 1.0:
        bad = [t for t, row in zip(tasks, grads.jacobian) if not bool(torch.isfinite(row).all())]
        raise FloatingPointError(f"{strategy}: non-finite gradients for tasks {bad or list(tasks)}")


# -- the strategy base ----------------------------------------------------------------------------
class GradientAggregation(Strategy):
    """Base of the Jacobian-aggregating strategies: subclasses implement :meth:`aggregate`
    (Jacobian -> direction) or :meth:`gramian_weights` (Gramian -> K weights)."""

    needs_task_forward = True

    def __init__(
        self, tasks: Sequence[str], *, model: nn.Module | None = None,
        loss_weights: dict[str, float] | None = None, seed: int = 0,
    ):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.model = model
        self.last_weights: Tensor | None = None

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        """K weights from the K x K Gramian (float64, CPU)."""
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor) -> Tensor:
        """The combined direction for the shared parameters (default: weights of ``J J^T`` times ``J``)."""
        gramian = (jacobian @ jacobian.T).detach().to("cpu", torch.float64)
        weights = self.gramian_weights(gramian)
        self.last_weights = weights
        return weights.to(jacobian) @ jacobian

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        shared, specific = split_model_parameters(self.model, self.name)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        grads = task_gradients(closure, updater, self.tasks, self.loss_weights, shared, specific)
        if grads.is_finite():
            with tjd.seeded(seed, grads.jacobian.device):
                direction = self.aggregate(grads.jacobian)
        else:  # fp16 overflow: hand the non-finite sum to the updater, which skips the step
            _check_non_finite(grads, updater, self.tasks, self.name)
            direction = grads.jacobian.sum(0)
        write_gradients(shared, direction, specific, grads.specific, float(updater.loss_scale))
        updater.step(final=True)
        self.num_steps += 1
        return dict(zip(self.tasks, grads.losses))

    def log_metrics(self) -> dict[str, float]:
        if self.last_weights is None:
            return {}
        return {f"weight/{t}": float(w) for t, w in zip(self.tasks, self.last_weights)}


class _TorchJDWeighting(GradientAggregation):
    """A Gramian weighting taken from torchjd (built, and checked installed, at construction)."""

    method = ""

    def _build(self, **options: Any) -> None:
        self._weighting = tjd.gramian_weighting(self.name, self.method, len(self.tasks), **options)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return self._weighting(gramian)


@register_strategy("pcgrad", aliases=("PCGrad",))
class PCGrad(_TorchJDWeighting):
    """PCGrad (Yu et al. 2020): each task gradient is projected onto the normal plane of every
    conflicting gradient, in random order; the projected gradients are summed."""

    method = "pcgrad"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._build()


@register_strategy("mgda", aliases=("MGDA",))
class MGDA(_TorchJDWeighting):
    """MGDA (Sener & Koltun 2018): the minimum-norm point of the convex hull of the task gradients
    (Frank-Wolfe; tolerance and iterations of the authors' MinNormSolver)."""

    method = "mgda"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 epsilon: float = 1e-5, max_iters: int = 250):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._build(epsilon=epsilon, max_iters=max_iters)


@register_strategy("imtl", aliases=("IMTL", "IMTL_G", "IMTLG"))
class IMTLG(_TorchJDWeighting):
    """IMTL-G (Liu et al. 2021): the combination of the task gradients (weights summing to 1) whose
    projections onto every task's unit gradient are equal."""

    method = "imtl"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._build()


@register_strategy("upgrad", aliases=("UPGrad",))
class UPGrad(_TorchJDWeighting):
    """UPGrad (Quinton & Rey 2024): the mean of the task gradients, each projected onto the dual
    cone of all of them (no resulting direction conflicts with any task)."""

    method = "upgrad"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._build()


@register_strategy("aligned_mtl", aliases=("Aligned_MTL", "AlignedMTL"))
class AlignedMTL(_TorchJDWeighting):
    """Aligned-MTL (Senushkin et al. 2023): the Jacobian's singular values are equalised to the
    smallest one (``scale_mode``) and the aligned gradients summed, as in the authors' code."""

    method = "aligned_mtl"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 scale_mode: Literal["min", "median", "rmse"] = "min"):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._build(scale_mode=scale_mode)


@register_strategy("gradvac", aliases=("GradVac",))
class GradVac(_TorchJDWeighting):
    """Gradient Vaccine (Wang et al. 2021): pushes each pair's cosine similarity up to an EMA target
    (decay ``beta``, 0.01 in the paper); the corrected gradients are summed."""

    method = "gradvac"
    state_attributes = ("num_steps", "vaccine_state")

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0, beta: float = 0.01):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        self._build(beta=beta)

    @property
    def vaccine_state(self) -> dict[str, Any]:
        """The EMA targets of the pairwise cosine similarities."""
        return tjd.weighting_state(self._weighting)

    @vaccine_state.setter
    def vaccine_state(self, state: dict[str, Any]) -> None:
        tjd.load_weighting_state(self._weighting, state)


@register_strategy("graddrop", aliases=("GradDrop",))
class GradDrop(GradientAggregation):
    """GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, chosen at
    random with the probability of the sign's purity. Applied to the shared parameters' gradients
    (torchjd's form; the paper applies it to activations)."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self._aggregator = tjd.graddrop(self.name)

    def aggregate(self, jacobian: Tensor) -> Tensor:
        return self._aggregator(jacobian)


# -- aggregators solved here ----------------------------------------------------------------------
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


@register_strategy("cagrad", aliases=("CAGrad",))
class CAGrad(GradientAggregation):
    """CAGrad (Liu et al. 2021): the direction within ``c ||g0||`` of the average gradient ``g0``
    that maximises the worst task's improvement. ``c = 0.4`` and ``rescale = 1`` as in the authors'
    NYUv2 setting."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 c: float = 0.4, rescale: Literal[0, 1, 2] = 1):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        if c < 0:
            raise ValueError(f"cagrad: c must be non-negative, got {c}")
        self.c, self.rescale = float(c), int(rescale)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return cagrad_weights(gramian, self.c, self.rescale)


def nash_weights(gramian: Tensor, max_iters: int = 100, tol: float = 1e-10) -> Tensor:
    """Nash-MTL's bargaining weights: the ``alpha > 0`` with ``G alpha = 1 / alpha`` (Navon et al. 2022).

    It is the minimiser of the convex ``alpha^T G alpha / 2 - sum log alpha``, found by damped
    Newton steps on the Frobenius-normalised Gramian (a tiny ridge keeps zero-gradient tasks finite).
    """
    g = gramian.detach().cpu().double()
    norm = float(torch.linalg.matrix_norm(g))
    k = g.shape[0]
    if norm == 0.0:
        return torch.zeros(k, dtype=torch.float64)
    m = g / norm + 1e-10 * torch.eye(k, dtype=torch.float64)
    alpha = 1.0 / torch.sqrt(torch.diagonal(m))

    def objective(a: Tensor) -> float:
        return float(0.5 * a @ m @ a - torch.log(a).sum())

    for _ in range(max_iters):
        grad = m @ alpha - 1.0 / alpha
        if float(grad.norm()) < tol:
            break
        step = torch.linalg.solve(m + torch.diag(1.0 / alpha**2), grad)
        t, current = 1.0, objective(alpha)
        while bool((alpha - t * step <= 0).any()) or objective(alpha - t * step) > current - 1e-4 * t * float(grad @ step):
            t *= 0.5
            if t < 1e-12:
                break
        alpha = alpha - t * step
    return alpha / math.sqrt(norm)


@register_strategy("nash_mtl", aliases=("Nash_MTL", "NashMTL"))
class NashMTL(GradientAggregation):
    """Nash-MTL (Navon et al. 2022): weights solving the bargaining equation ``G alpha = 1/alpha``;
    the direction's norm is clipped to ``max_norm`` (1.0, the authors' default; 0 disables it), and
    the weights are recomputed every ``update_weights_every`` steps."""

    state_attributes = ("num_steps", "last_weights")

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 max_norm: float = 1.0, update_weights_every: int = 1):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        if max_norm < 0:
            raise ValueError(f"nash_mtl: max_norm must be non-negative, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"nash_mtl: update_weights_every must be >= 1, got {update_weights_every}")
        self.max_norm, self.update_weights_every = float(max_norm), int(update_weights_every)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        if self.last_weights is None or self.num_steps % self.update_weights_every == 0:
            return nash_weights(gramian)
        return self.last_weights

    def aggregate(self, jacobian: Tensor) -> Tensor:
        direction = super().aggregate(jacobian)
        norm = float(direction.norm())
        if self.max_norm > 0 and norm > self.max_norm:
            direction = direction * (self.max_norm / norm)
        return direction

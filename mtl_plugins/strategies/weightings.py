"""Loss-weighting strategies: one backward pass of ``sum_t lambda_t L_t`` with adaptive ``lambda_t``.

Each step reads the batch's losses, averages them across processes (``updater.reduce_``) and
computes the weights from those averages, so every process applies the same weights and keeps the
same strategy state. The static ``loss_weights`` multiply the losses before the method sees them.

Learnable weights (``uw``'s log-variances, ``famo``'s logits, ``gradnorm``'s weights) are owned by
the strategy and trained by its own small Adam optimizer (option ``lr``) inside :meth:`step`, right
after the model's update, and only when that update was applied (an fp16 overflow skips it:
``needs_step_outcome`` asks trainers to take the final step at once and report it); they are saved
by ``state_dict()``. Nothing needs adding to the model's optimizer. Their gradients come from the
process-averaged losses (and, for ``gradnorm``, the averaged, unscaled task gradients), so every
process takes the same step whatever the loss scale.

``uw``, ``gls`` and ``rlw`` use torchjd's scalarizers (extra ``baselines``): the weights are the
derivatives of the scalarized loss w.r.t. each task loss, so the model receives exactly the
scalarizer's gradient. ``dwa``, ``famo`` and ``gradnorm`` are written here: their state is plain
tensors that checkpoints can store, and ``gradnorm`` needs the per-task gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register_strategy
from . import torchjd_adapter as tjd
from .aggregators import split_model_parameters, task_gradients, write_gradients
from .base import Closure, Strategy, Updater, WeightingStrategy, as_updater, losses_to_floats


def _stack(losses: Mapping[str, Tensor | float], tasks: Sequence[str]) -> Tensor:
    return torch.stack([torch.as_tensor(losses[t]).detach().reshape(()).to(torch.float64).cpu() for t in tasks])


class OwnedParameter:
    """A strategy-owned tensor trained by its own Adam; ``state()``/``load()`` for checkpoints."""

    def __init__(self, value: Tensor, lr: float, weight_decay: float = 0.0, *, parameter: nn.Parameter | None = None):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.tensor = parameter if parameter is not None else nn.Parameter(value.clone())
        self.optimizer = torch.optim.Adam([self.tensor], lr=lr, weight_decay=weight_decay)

    def apply(self, grad: Tensor) -> None:
        """One Adam step along ``grad``."""
        self.tensor.grad = grad.detach().to(self.tensor)
        self.optimizer.step()
        self.tensor.grad = None

    def state(self) -> dict[str, Any]:
        return {"value": self.tensor.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.tensor.copy_(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])


class LossWeighting(WeightingStrategy):
    """Base of the loss-based weightings: :meth:`weights` sees the process-averaged losses."""

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.last_weights: list[float] | None = None

    def mean_losses(self, losses: Mapping[str, Tensor], updater: Updater) -> Tensor:
        """The (statically weighted) losses averaged across processes, float64 on CPU."""
        device = losses[self.tasks[0]].device
        values = torch.stack([self.loss_weights[t] * losses[t].detach().reshape(()).to(torch.float64) for t in self.tasks])
        values = values.to(device)
        updater.reduce_([values])
        return values.cpu()

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        """Hook after the model update (learnable weights update here)."""

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        losses = closure()
        observed = losses_to_floats(losses, self.tasks)
        values = self.mean_losses(losses, updater)
        weights = self.weights(dict(zip(self.tasks, values)))
        self.last_weights = [float(weights[t]) for t in self.tasks]
        updater.zero_grad()
        updater.backward(sum(float(weights[t]) * self.loss_weights[t] * losses[t] for t in self.tasks))
        stepped = updater.step(final=True)
        self.after_step(closure, updater, values, stepped is not False)
        self.num_steps += 1
        return dict(zip(self.tasks, observed))

    def log_metrics(self) -> dict[str, float]:
        return {} if self.last_weights is None else {f"weight/{t}": w for t, w in zip(self.tasks, self.last_weights)}


def scalarizer_gradients(scalarizer: nn.Module, values: Tensor, params: Sequence[Tensor] = ()) -> tuple[Tensor, ...]:
    """Derivatives of ``scalarizer(values)`` w.r.t. ``values`` (the task weights) and ``params``."""
    values = values.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        total = scalarizer(values)
        return tuple(g.detach() for g in torch.autograd.grad(total, [values, *params]))


# -- torchjd scalarizers --------------------------------------------------------------------------
@register_strategy("uw", aliases=("UW",))
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (Kendall et al. 2018): ``sum_t exp(-s_t) L_t / 2 + s_t / 2``.

    The log-variances ``s`` start at 0 and are trained by the strategy's own Adam (``lr``; set it to
    the model's learning rate to match the paper) on ``dL/ds_t = (1 - exp(-s_t) L_t) / 2``.
    """

    needs_step_outcome = True  # the log-variances move only when the model did
    state_attributes = ("num_steps", "log_var_state")

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 lr: float = 1e-3):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "uw", len(self.tasks))
        self.log_var = OwnedParameter(torch.zeros(len(self.tasks)), lr, parameter=self.scalarizer.log_var)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return dict(zip(self.tasks, scalarizer_gradients(self.scalarizer, _stack(losses, self.tasks))[0].tolist()))

    def update_log_var(self, values: Tensor) -> None:
        """One Adam step of the log-variances at the (averaged) losses ``values``."""
        self.log_var.apply(scalarizer_gradients(self.scalarizer, values, [self.scalarizer.log_var])[1])

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        if stepped:
            self.update_log_var(values)

    def backward(self, losses: Mapping[str, Tensor] | Tensor, updater: Updater | None = None, **kwargs: Any):
        """LibMTL contract: backward the weighted loss, then update the log-variances."""
        weights = super().backward(losses, updater, **kwargs)
        if isinstance(losses, Tensor):
            losses = dict(zip(self.tasks, losses.unbind()))
        self.update_log_var(_stack(losses, self.tasks))
        return weights

    @property
    def log_var_state(self) -> dict[str, Any]:
        return self.log_var.state()

    @log_var_state.setter
    def log_var_state(self, state: Mapping[str, Any]) -> None:
        self.log_var.load(state)

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        metrics.update({f"log_var/{t}": float(s) for t, s in zip(self.tasks, self.scalarizer.log_var.detach())})
        return metrics


@register_strategy("gls", aliases=("GLS",))
class GeometricLossStrategy(LossWeighting):
    """GLS (Chennupati et al. 2019): minimise the geometric mean ``(prod_t L_t)^(1/K)``; its gradient
    is ``sum_t GM / (K L_t) * grad L_t``. Losses must be positive."""

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "gls", len(self.tasks))

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        values = _stack(losses, self.tasks)
        if bool((values <= 0).any()):
            raise ValueError(f"gls needs positive losses, got {dict(zip(self.tasks, values.tolist()))}")
        return dict(zip(self.tasks, scalarizer_gradients(self.scalarizer, values)[0].tolist()))


@register_strategy("rlw", aliases=("RLW",))
class RandomLossWeighting(LossWeighting):
    """RLW (Lin et al. 2022): weights ``softmax(z)``, ``z ~ N(0, I)`` drawn afresh every step from the
    strategy's seed (identical on every process, restored with the state)."""

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "rlw", len(self.tasks))

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with tjd.seeded(seed):
            weights = scalarizer_gradients(self.scalarizer, _stack(losses, self.tasks))[0]
        return dict(zip(self.tasks, weights.tolist()))


# -- written here -----------------------------------------------------------------------------------
@register_strategy("dwa", aliases=("DWA",))
class DynamicWeightAverage(LossWeighting):
    """DWA (Liu et al. 2019): ``lambda_k = K softmax_k(r / T)``, ``r_k = L_k(e-1) / L_k(e-2)`` from the
    average losses of the two previous epochs; weights are 1 during the first two epochs.

    Epochs end where the trainer says (``set_progress(progress, epoch=e)``, as the
    ``MultiTaskTrainer`` calls it) or, when ``steps_per_epoch`` is given, every that many batches.
    ``temperature`` is 2, as in the paper.
    """

    state_attributes = ("num_steps", "epoch", "epoch_sum", "epoch_batches", "epoch_averages")

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 temperature: float = 2.0, steps_per_epoch: int | None = None):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if temperature <= 0:
            raise ValueError(f"dwa: temperature must be positive, got {temperature}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"dwa: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.temperature, self.steps_per_epoch = float(temperature), steps_per_epoch
        self.epoch: int | None = None
        self.epoch_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.epoch_batches = 0
        self.epoch_averages: list[Tensor] = []

    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        """Training progress in [0, 1]; a new ``epoch`` closes the running epoch average."""
        super().set_progress(progress)
        if epoch is None or self.steps_per_epoch is not None:
            return
        if self.epoch is not None and epoch != self.epoch:
            self._close_epoch()
        self.epoch = int(epoch)

    def _close_epoch(self) -> None:
        if self.epoch_batches:
            self.epoch_averages = [*self.epoch_averages, self.epoch_sum / self.epoch_batches][-2:]
        self.epoch_sum, self.epoch_batches = torch.zeros_like(self.epoch_sum), 0

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """The weights for this batch; records its losses into the running epoch average."""
        if self.steps_per_epoch is None and self.epoch is None:
            raise ValueError(
                "dwa needs to know where epochs end: train with the MultiTaskTrainer (it passes the epoch to "
                "set_progress), call set_progress(progress, epoch=e), or set steps_per_epoch"
            )
        values = _stack(losses, self.tasks)
        if len(self.epoch_averages) < 2:
            weights = torch.ones(len(self.tasks), dtype=torch.float64)
        else:
            rates = self.epoch_averages[-1] / self.epoch_averages[-2]
            weights = len(self.tasks) * torch.softmax(rates / self.temperature, dim=0)
        self.epoch_sum = self.epoch_sum + values
        self.epoch_batches += 1
        if self.epoch_batches == self.steps_per_epoch:
            self._close_epoch()
        return dict(zip(self.tasks, weights.tolist()))


@register_strategy("famo", aliases=("FAMO",))
class FAMO(LossWeighting):
    """FAMO (Liu et al. 2023): ``lambda_t = c z_t / (L_t + eps)``, ``z = softmax(w)``,
    ``c = 1 / sum_t z_t / (L_t + eps)`` (the gradient of ``c sum_t z_t log L_t``).

    The logits ``w`` take one Adam step (``lr`` 0.025, ``weight_decay`` 1e-3, the paper's values)
    along ``J_softmax(w)^T (log L_before - log L_after)``, where ``L_after`` are the batch's losses
    recomputed right after the model's update (one extra forward pass without gradient). The logits
    move only when that update was applied (``needs_step_outcome``: trainers take the final step at
    once instead of deferring it), so no state is carried from one batch to the next. Losses must be
    positive.
    """

    needs_step_outcome = True
    state_attributes = ("num_steps", "logits_state")
    eps = 1e-8

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 lr: float = 0.025, weight_decay: float = 1e-3):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if weight_decay < 0:
            raise ValueError(f"famo: weight_decay must be non-negative, got {weight_decay}")
        self.logits = OwnedParameter(torch.zeros(len(self.tasks), dtype=torch.float64), lr, weight_decay)

    def _values(self, losses: Mapping[str, Tensor] | Tensor) -> Tensor:
        values = losses if isinstance(losses, Tensor) else _stack(losses, self.tasks)
        if bool((values <= 0).any()):
            raise ValueError(f"famo needs positive losses, got {dict(zip(self.tasks, values.tolist()))}")
        return values

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        shifted = self._values(losses) + self.eps
        z = torch.softmax(self.logits.tensor.detach(), dim=0)
        weights = z / shifted / (z / shifted).sum()
        return dict(zip(self.tasks, weights.tolist()))

    def update_logits(self, before: Tensor, after: Tensor) -> None:
        """One Adam step of the logits from the losses before and after a model update."""
        delta = torch.log(self._values(before) + self.eps) - torch.log(self._values(after) + self.eps)
        logits = self.logits.tensor
        with torch.enable_grad():
            grad = torch.autograd.grad(torch.softmax(logits, dim=0), logits, grad_outputs=delta.to(logits))[0]
        self.logits.apply(grad)

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        """Recompute the batch's losses after the applied update and move the logits."""
        if not stepped:
            return
        with torch.no_grad():
            after = self.mean_losses(closure(), updater)
        self.update_logits(values, after)

    def backward(self, losses: Mapping[str, Tensor] | Tensor, updater: Updater | None = None, **kwargs: Any):
        raise NotImplementedError("famo updates its weights from the losses after the model's step: use step(closure, optimizer)")

    @property
    def logits_state(self) -> dict[str, Any]:
        return self.logits.state()

    @logits_state.setter
    def logits_state(self, state: Mapping[str, Any]) -> None:
        self.logits.load(state)


@register_strategy("gradnorm", aliases=("GradNorm",))
class GradNorm(Strategy):
    """GradNorm (Chen et al. 2018): weights ``lambda = K softmax(w)`` trained so that each task's
    weighted gradient norm ``lambda_t ||g_t||`` (w.r.t. the shared parameters) approaches
    ``mean_k(lambda_k ||g_k||) * r_t^alpha``, with ``r_t`` the task's loss ratio ``L_t / L_t(0)``
    relative to the mean ratio; ``alpha = 1.5``. ``L(0)`` is the first step's losses.

    Needs the per-task gradients (one forward/backward per task, as the gradient aggregators) and
    the model (``model=``). ``w`` is trained by the strategy's own Adam (``lr``).
    """

    needs_task_forward = True
    # Its finite check sees overflow in the per-task gradients, but not in the gradients written back
    # at the loss scale; the step's reported outcome covers both.
    needs_step_outcome = True
    state_attributes = ("num_steps", "initial_losses", "weights_state")

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 alpha: float = 1.5, lr: float = 1e-3):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if alpha < 0:
            raise ValueError(f"gradnorm: alpha must be non-negative, got {alpha}")
        self.model, self.alpha = model, float(alpha)
        self.logits = OwnedParameter(torch.zeros(len(self.tasks), dtype=torch.float64), lr)
        self.initial_losses: Tensor | None = None
        self.last_weights: list[float] | None = None

    def task_weights(self) -> Tensor:
        return len(self.tasks) * torch.softmax(self.logits.tensor.detach(), dim=0)

    def balance_gradient(self, norms: Tensor, values: Tensor) -> Tensor:
        """Gradient of ``sum_t |lambda_t ||g_t|| - target_t|`` w.r.t. the logits ``w``."""
        logits = self.logits.tensor
        ratios = values / self.initial_losses
        relative = ratios / ratios.mean()
        with torch.enable_grad():
            weighted = len(self.tasks) * torch.softmax(logits, dim=0) * norms
            target = (weighted.mean() * relative**self.alpha).detach()
            return torch.autograd.grad((weighted - target).abs().sum(), logits)[0]

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        shared, specific = split_model_parameters(self.model, self.name)
        weights = self.task_weights()
        grads = task_gradients(closure, updater, self.tasks, self.loss_weights, shared, specific, weights.tolist())
        values = torch.tensor([self.loss_weights[t] * v for t, v in zip(self.tasks, grads.losses)], dtype=torch.float64)
        values = values.to(grads.jacobian.device)
        updater.reduce_([values])
        values = values.cpu()
        finite = grads.is_finite()
        if not finite and updater.loss_scale == 1.0:
            raise FloatingPointError(f"{self.name}: non-finite gradients")
        direction = weights.to(grads.jacobian) @ grads.jacobian
        write_gradients(shared, direction, specific, grads.specific, float(updater.loss_scale))
        stepped = updater.step(final=True) is not False
        if finite and stepped:
            if self.initial_losses is None:
                self.initial_losses = values.clone()
            norms = grads.jacobian.norm(dim=1).detach().to("cpu", torch.float64)
            self.logits.apply(self.balance_gradient(norms, values))
        self.last_weights = weights.tolist()
        self.num_steps += 1
        return dict(zip(self.tasks, grads.losses))

    @property
    def weights_state(self) -> dict[str, Any]:
        return self.logits.state()

    @weights_state.setter
    def weights_state(self, state: Mapping[str, Any]) -> None:
        self.logits.load(state)

    def log_metrics(self) -> dict[str, float]:
        return {} if self.last_weights is None else {f"weight/{t}": w for t, w in zip(self.tasks, self.last_weights)}


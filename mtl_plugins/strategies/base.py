"""The strategy protocol: how one batch updates a multi-task model.

``strategy.step(closure, optimizer)`` performs the whole update for one batch and returns the
per-task losses it observed. ``closure(task=None)`` runs a fresh forward pass on the current batch
and returns per-task scalar losses (all tasks, or one task through its task-specific path).
``optimizer`` is a ``torch.optim.Optimizer`` or an :class:`Updater`; trainers pass their own
:class:`Updater` to add gradient clipping, loss scaling and distributed reduction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .loss_scaling import LossScaling

Closure = Callable[..., Mapping[str, Tensor]]
#: A ``loss_scaling`` option: a loss weighting's name, ``{"name": ..., "options": {...}}``, or None
#: (see :mod:`~mtl_plugins.strategies.loss_scaling`).
LossScalingSpec = str | dict[str, Any] | None


class NonFiniteLossError(FloatingPointError):
    """A task loss is NaN or infinite."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient is NaN or infinite (without a loss scaler that would skip the step); raised before
    the optimizer step, so the model is not updated. ``tasks`` names the culprits once identified."""

    def __init__(self, message: str, tasks: Sequence[str] | None = None):
        super().__init__(message)
        self.tasks = None if tasks is None else list(tasks)


def gradient_norm(params: Iterable[Tensor]) -> Tensor:
    """Total 2-norm of the gradients of ``params`` (one fused pass; 0 without gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def check_gradient_norm(norm: Tensor | float) -> None:
    """Raise :class:`NonFiniteGradientError` if the total gradient norm is NaN or infinite."""
    value = float(norm)
    if not math.isfinite(value):
        raise NonFiniteGradientError(f"non-finite gradient (total norm {value}): the optimizer step was not taken "
                                     "and the model was not updated")


def non_finite_gradient_tasks(closure: Closure, tasks: Sequence[str], params: Sequence[Tensor],
                              per_task: bool = False) -> list[str]:
    """Tasks whose own loss has a NaN/infinite gradient on a fresh forward pass (for error messages);
    ``per_task``: one forward per task, ``closure(task)`` (task-specific connections)."""
    trainable = [p for p in params if p.requires_grad]
    losses = None if per_task else closure()
    bad = []
    for task in tasks:
        loss = closure(task)[task] if per_task else losses[task]  # type: ignore[index]
        grads = torch.autograd.grad(loss, trainable, retain_graph=not per_task, allow_unused=True)
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            bad.append(task)
    return bad


def name_gradient_tasks(error: NonFiniteGradientError, closure: Closure, tasks: Sequence[str],
                        params: Sequence[Tensor], where: str = "", per_task: bool = False) -> NonFiniteGradientError:
    """``error`` restated with the tasks whose gradient is non-finite (found on a fresh forward pass)."""
    if error.tasks is not None:
        return error
    bad = non_finite_gradient_tasks(closure, tasks, params, per_task)
    named = f"tasks {bad}" if bad else f"one of tasks {list(tasks)} (not reproduced task by task)"
    return NonFiniteGradientError(f"{where}non-finite gradient for {named}: the optimizer step was not taken and "
                                  "the model was not updated", tasks=bad)


class Updater:
    """Applies updates for a strategy: clear gradients, backward, optimizer step.

    The default drives a plain ``torch.optim.Optimizer``. Trainers subclass it to route backward
    through accelerate, clip gradients, skip fp16-overflow steps and reduce across processes.
    """

    #: True when :meth:`backward` leaves gradients averaged across processes, so strategies need
    #: not :meth:`reduce_` the gradients they read (a single process needs nothing either way).
    averages_gradients: bool = False

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                 check_finite: bool = False):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        #: True when :meth:`step` itself refuses NaN/infinite gradients (one host read per step);
        #: otherwise strategies check them within their own host read where they can.
        self.check_finite = check_finite

    @property
    def params(self) -> list[Tensor]:
        """Every parameter the optimizer updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Backward ``loss``; ``retain_graph`` keeps the graph for another backward (per-task gradients
        from one forward pass)."""
        loss.backward(retain_graph=retain_graph)

    def step(self, final: bool = False) -> bool:
        """One optimizer step; ``final`` marks the batch's last update. Returns False if skipped.

        With ``check_finite``, raises :class:`NonFiniteGradientError` before stepping if a gradient
        is NaN or infinite."""
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.check_finite:
            check_gradient_norm(norm if norm is not None else gradient_norm(self.params))
        self.optimizer.step()
        return True

    def reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Average tensors across processes in place (identity in one process)."""

    def agree(self, value: Any) -> Any:
        """Return the main process's ``value`` on every process (identity in one process)."""
        return value

    @property
    def loss_scale(self) -> float:
        """Current loss scale of the backward pass (1.0 without fp16 scaling)."""
        return 1.0


def checks_own_gradients(updater: Updater) -> bool:
    """True when a strategy should check the gradients itself before a step: no loss scaler (which
    would skip a non-finite step) and an updater that does not check them."""
    return updater.loss_scale == 1.0 and not getattr(updater, "check_finite", False)


def checked_step(updater: Updater, closure: Closure, tasks: Sequence[str], where: str | Callable[[], str] = "", *,
                 final: bool = True, per_task: bool = False, on_error: Callable[[], None] | None = None) -> bool:
    """``updater.step(final)``, first checking the gradient where nothing else does (a plain loop: one more
    host read). A non-finite gradient raises :class:`NonFiniteGradientError` naming ``tasks`` whose own
    gradient is non-finite, prefixed by ``where`` (or what it returns, built only then), after ``on_error``
    (e.g. restoring a strategy's state); returns the step's outcome."""
    try:
        if checks_own_gradients(updater):
            check_gradient_norm(gradient_norm(updater.params))
        return updater.step(final=final)
    except NonFiniteGradientError as error:
        if on_error is not None:
            on_error()
        prefix = where() if callable(where) else where
        raise name_gradient_tasks(error, closure, tasks, updater.params, prefix, per_task) from error


def as_updater(optimizer: torch.optim.Optimizer | Updater) -> Updater:
    return optimizer if isinstance(optimizer, Updater) else Updater(optimizer)


def check_losses(losses: Mapping[str, Tensor], tasks: Sequence[str]) -> None:
    """Raise ``KeyError`` naming the tasks the closure returned no loss for."""
    missing = [t for t in tasks if t not in losses]
    if missing:
        raise KeyError(f"the closure returned no loss for tasks {missing}; got {sorted(losses)}")


def check_finite_losses(values: Sequence[float], tasks: Sequence[str]) -> list[float]:
    """Raise :class:`NonFiniteLossError` if any of the per-task loss ``values`` is NaN/inf."""
    values = [float(v) for v in values]
    bad = [t for t, v in zip(tasks, values) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(f"non-finite loss for tasks {bad}: {dict(zip(tasks, values))}")
    return values


def losses_to_floats(losses: Mapping[str, Tensor], tasks: Sequence[str]) -> list[float]:
    """Read per-task losses to the host in one transfer; raise if any is NaN/inf."""
    check_losses(losses, tasks)
    return check_finite_losses(torch.stack([losses[t].detach().float().reshape(()) for t in tasks]).tolist(), tasks)


def to_host(*tensors: Tensor) -> list[Tensor]:
    """Float64 CPU copies of ``tensors`` (same shapes), read from the device in one transfer: the one
    device synchronisation a strategy's step needs (losses, finiteness flags and Gramians together)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    values = torch.tensor(flat.tolist(), dtype=torch.float64)
    copies, offset = [], 0
    for t in tensors:
        copies.append(values[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return copies


class Strategy:
    """Base class of every strategy plugin.

    Subclasses implement :meth:`step`. :meth:`state_dict` holds the step counter, the progress and
    the strategy's RNG; subclasses with more state extend it (``{**super().state_dict(), ...}``) and
    :meth:`load_state_dict` (calling ``super().load_state_dict(state)`` first).

    An update method with ``accepts_loss_scaling`` (a loss weighting can be composed with it, see
    :mod:`~mtl_plugins.strategies.loss_scaling`) brackets its ``step`` with :meth:`begin_batch` /
    :meth:`end_batch` and weights each task's loss by :attr:`task_weights`.
    """

    name: str = "strategy"
    #: True when the strategy calls the closure with a task name (needs task-specific paths).
    needs_task_forward: bool = False
    #: True when the strategy needs a model with task-specific connections (architecture ``task_connections``).
    needs_task_connections: bool = False
    #: True when the strategy reads whether its final step was applied, so trainers must not defer that step.
    needs_step_outcome: bool = False
    #: True when the update is exact under gradient accumulation: one backward of a loss with static
    #: weights and no state updated per batch (trainers refuse accumulation for every other strategy).
    supports_accumulation: bool = False
    #: True for update methods that take the ``loss_scaling`` option (:meth:`set_loss_scaling`).
    accepts_loss_scaling: bool = False
    #: True when the method multiplies or divides by the weighted losses, so a zero loss weight is refused.
    needs_positive_loss_weights: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every strategy constructor also takes ``loss_scaling`` (applied by :meth:`set_loss_scaling`
        once the instance is built), so ``PCGrad(tasks, loss_scaling="uw")`` equals
        ``build_strategy("pcgrad", tasks, loss_scaling="uw")``, and refuses NaN or infinite option
        values however the strategy is built."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "takes_loss_scaling", False):
            return

        @functools.wraps(init)
        def with_loss_scaling(self: Strategy, *args: Any, loss_scaling: LossScalingSpec = None, **options: Any) -> None:
            from ..registry import non_finite_path

            bad = next((path for key, value in options.items() if (path := non_finite_path(value, key))), None)
            if bad is not None:
                raise ValueError(f"strategy {cls.name!r}: option {bad} must be a finite number (not NaN or "
                                 f"infinite), got {options[bad.split('[')[0]]!r}")
            init(self, *args, **options)
            if loss_scaling is not None:  # given to the outermost constructor only
                self.set_loss_scaling(loss_scaling)

        with_loss_scaling.takes_loss_scaling = True  # type: ignore[attr-defined]
        cls.__init__ = with_loss_scaling  # type: ignore[method-assign]

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        self.tasks = list(tasks)
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"loss_weights names unknown tasks {unknown}; tasks are {self.tasks}")
        self.loss_weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        bad = {t: w for t, w in self.loss_weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"{getattr(self, 'name', type(self).__name__)}: loss_weights must be finite and "
                             f"non-negative, got {bad}")
        zero = {t: w for t, w in self.loss_weights.items() if w == 0}
        if zero and self.needs_positive_loss_weights:
            raise ValueError(f"{getattr(self, 'name', type(self).__name__)} needs positive loss weights, got {zero}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_steps = 0
        self.progress = 0.0
        #: The loss weighting composed with this update method (:meth:`set_loss_scaling`), or None.
        self.loss_scaling: LossScaling | None = None

    def set_loss_scaling(self, spec: LossScalingSpec) -> None:
        """Compose a loss weighting with this update method (the ``loss_scaling`` option, which
        ``build_strategy`` applies); only before the first step."""
        if not self.accepts_loss_scaling:
            raise TypeError(f"strategy {self.name!r} takes no loss_scaling: it is not an update method that "
                            "uses per-task losses (sel_update, conn_strength, the gradient aggregators)")
        if self.num_steps:
            raise RuntimeError(f"{self.name}: set the loss scaling before the first step")
        from .loss_scaling import LossScaling

        self.loss_scaling = None if spec is None else LossScaling(spec, self.tasks, self.loss_weights, self.seed)
        # the weighting's learned state moves only when the batch's steps were applied
        self.needs_step_outcome = type(self).needs_step_outcome or (
            self.loss_scaling is not None and self.loss_scaling.needs_step_outcome)
        self.supports_accumulation = type(self).supports_accumulation and self.loss_scaling is None

    @property
    def label(self) -> str:
        """The strategy's name, ``METHOD+WEIGHTING`` (e.g. ``conn_strength+uw``) with a loss scaling."""
        return self.name if self.loss_scaling is None else f"{self.name}+{self.loss_scaling.name}"

    @property
    def task_weights(self) -> Mapping[str, float]:
        """Each task's loss weight in the current batch's update: the static ``loss_weights``, times the
        loss scaling's weights (set at the batch's first forward pass) when there is one."""
        return self.loss_weights if self.loss_scaling is None else self.loss_scaling.task_weights

    def begin_batch(self, closure: Closure, updater: Updater) -> tuple[Closure, Updater]:
        """The closure and updater a composed method uses for this batch (unchanged without loss scaling)."""
        return (closure, updater) if self.loss_scaling is None else self.loss_scaling.begin(closure, updater)

    def end_batch(self) -> None:
        """After the batch's last step: the loss scaling's learned state (nothing without one)."""
        if self.loss_scaling is not None:
            self.loss_scaling.end()

    # -- protocol -------------------------------------------------------------------------
    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        raise NotImplementedError

    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        """Training progress in [0, 1] (epoch e / E or step / total) and, when the caller knows it, the
        current 0-based ``epoch``; used by scheduled methods (the base class ignores the epoch)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        self.progress = float(progress)
        if self.loss_scaling is not None:
            self.loss_scaling.set_progress(progress, epoch)

    def weighted_loss(self, losses: Mapping[str, Tensor], tasks: Iterable[str] | None = None) -> Tensor:
        """Sum of ``w_t * L_t`` over ``tasks`` (all tasks by default), ``w`` = :attr:`task_weights`."""
        chosen = list(self.tasks if tasks is None else tasks)
        weights = self.task_weights
        return sum(weights[t] * losses[t] for t in chosen)  # type: ignore[return-value]

    def log_metrics(self) -> dict[str, float]:
        """Scalars describing the strategy's current state, for trainer logs (subclasses extend
        ``super().log_metrics()``, which holds the loss scaling's ``loss_scaling/...`` entries)."""
        return {} if self.loss_scaling is None else self.loss_scaling.log_metrics()

    def summarize_log(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The few of ``log_metrics()``'s scalars that trainer logs carry by default (the console,
        TensorBoard); strategies with per-pair or per-layer scalars summarise them. Default: all."""
        return dict(metrics)

    def log_images(self) -> dict[str, Any]:
        """Matrices logged as heatmap images (e.g. an inter-task affinity), by name. Default: none."""
        return {}

    def card_fields(self) -> dict[str, Any]:
        """What a model card reports of the strategy's learned state (e.g. ``task_groups``,
        ``priority_stats``); plain JSON values. Default: the loss scaling (name, options, latest
        weights) when there is one; subclasses extend ``super().card_fields()``."""
        return {} if self.loss_scaling is None else {"loss_scaling": self.loss_scaling.card()}

    def write_plots(self, out_dir: str | Path) -> list[Path]:
        """Write PNG plots of the strategy's state over training; returns the files written."""
        return []

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to resume exactly (copies, not references)."""
        state = {"num_steps": self.num_steps, "progress": self.progress, "rng_state": self.generator.get_state()}
        if self.loss_scaling is not None:
            state["loss_scaling"] = self.loss_scaling.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``KeyError`` naming missing entries before changing anything."""
        missing = [n for n in self.state_dict() if n not in state and n != "progress"]
        if missing:
            raise KeyError(f"{self.name} state is missing {missing}")
        self.num_steps = int(state["num_steps"])
        self.generator.set_state(state["rng_state"])
        self.progress = float(state.get("progress", 0.0))
        if self.loss_scaling is not None:
            self.loss_scaling.load_state_dict(state["loss_scaling"])

    def __repr__(self) -> str:
        scaling = "" if self.loss_scaling is None else f", loss_scaling={self.loss_scaling.name!r}"
        return f"{type(self).__name__}(tasks={self.tasks}{scaling})"


class WeightingStrategy(Strategy):
    """A single-step strategy that turns per-task losses into one backward pass.

    Subclasses implement :meth:`weights`; :meth:`backward` follows LibMTL's
    ``backward(losses, **kwargs)`` contract and returns the weights used.
    """

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def backward(self, losses: Mapping[str, Tensor] | Tensor, updater: Updater | None = None, **kwargs: Any):
        """Backward the weighted loss. ``losses`` is a task->loss mapping or a tensor in task order."""
        if isinstance(losses, Tensor):
            if losses.shape != (len(self.tasks),):
                raise ValueError(f"losses tensor must have shape ({len(self.tasks)},), got {tuple(losses.shape)}")
            losses = dict(zip(self.tasks, losses.unbind()))
        weights = self.weights(losses)
        total = sum(weights[t] * losses[t] for t in self.tasks)
        (updater.backward if updater is not None else Tensor.backward)(total)
        return [float(weights[t]) for t in self.tasks]

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        losses = closure()
        check_losses(losses, self.tasks)
        updater.zero_grad()
        self.backward(losses, updater=updater)
        stacked = torch.stack([losses[t].detach().float().reshape(()) for t in self.tasks])
        own_check = checks_own_gradients(updater)
        host = to_host(stacked, gradient_norm(updater.params).reshape(1).to(stacked.device)) if own_check \
            else to_host(stacked)  # the step's one host read: losses (and gradient norm) before the step
        values = check_finite_losses(host[0].tolist(), self.tasks)
        try:
            if own_check:
                check_gradient_norm(host[1][0])
            updater.step(final=True)
        except NonFiniteGradientError as error:
            raise name_gradient_tasks(error, closure, self.tasks, updater.params, f"{self.name}: ") from error
        self.num_steps += 1
        return dict(zip(self.tasks, values))

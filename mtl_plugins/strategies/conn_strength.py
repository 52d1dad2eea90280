"""Connection strength-based optimization (Jeong & Yoon, CVPR 2024): learn, then keep, task priority.

Phase 1 (learn priority) updates the tasks one at a time. Phase 2 (keep priority) takes per-task
gradients and, in every shared layer with task-specific connections, projects each task's gradient
off the top-priority task's gradient on that task's channel group when they conflict; every other
parameter gets the plain sum. The model must have task-specific connections
(:mod:`mtl_plugins.architectures.task_connections`).

Across processes, Phase 2 combines gradients averaged over all processes: by ``updater.reduce_``
unless the updater's backward already averages them (``updater.averages_gradients``).

Phase 2 keeps one forward pass per task: with task-specific connections each task has its own
path through the backbone, so the one-forward, K-retained-backward path of the gradient
aggregators does not apply (each task's BatchNorms still see the batch once).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..architectures.task_connections import (
    ConnectedLayer,
    connected_layers,
    layer_strength,
    top_priority_task,
)
from ..registry import register_strategy
from .base import (
    Closure,
    NonFiniteGradientError,
    Strategy,
    Updater,
    as_updater,
    check_gradient_norm,
    checked_step,
    checks_own_gradients,
    gradient_norm,
    losses_to_floats,
)

Schedule = Literal["mixed", "phase1", "phase2", "sequential"]
IncompleteNorms = Literal["extend", "released"]


def combine_task_gradients(grads: Tensor, strength: Tensor) -> Tensor:
    """Phase-2 gradient of one connected layer from per-task gradients ``grads`` ``[K, C, ...]``.

    ``strength`` ``[K, C]`` gives each channel's top-priority task ``nu(p) = argmax_tau`` (the lowest
    task index among exact ties, :func:`top_priority_task`). On the
    channel group ``CG_i = {p : nu(p) = i}``, every task ``j != i`` whose gradient conflicts with task
    ``i``'s (negative inner product over the group) is projected:
    ``G_j <- G_j - <G_i, G_j> / ||G_i||^2 G_i``; the result is the sum over tasks. No projection when
    all channels share one top task, nor on a group where ``G_i`` is zero.
    """
    num_tasks, channels = grads.shape[:2]
    if strength.shape != (num_tasks, channels):
        raise ValueError(f"strength must have shape {(num_tasks, channels)}, got {tuple(strength.shape)}")
    flat = grads.reshape(num_tasks, channels, -1)
    return combine_flat(flat, top_priority_task(strength)).reshape(grads.shape[1:])


def combine_flat(grads: Tensor, top: Tensor) -> Tensor:
    """:func:`combine_task_gradients` on gradients flattened to ``[K, C, D]``, given each channel's top
    task ``top`` ``[C]``; vectorised over channels (a loop over tasks only), returns ``[C, D]``."""
    num_tasks, channels, _ = grads.shape
    work = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
    top = top.to(work.device)
    rows = top * channels + torch.arange(channels, device=work.device)
    main = work.reshape(num_tasks * channels, -1).index_select(0, rows)  # G_nu(p) on row p: [C, D]
    row_dots = torch.stack([(work[k] * main).sum(1) for k in range(num_tasks)])  # <G_k[p], G_nu(p)[p]>: [K, C]
    groups = F.one_hot(top, num_tasks).to(work.dtype)  # [C, K]
    dots = groups.T @ row_dots.T  # dots[i, j] = <G_i, G_j> over the channel group CG_i
    norms = dots.diagonal()
    others = ~torch.eye(num_tasks, dtype=torch.bool, device=work.device)
    project = (dots < 0) & (norms > 0)[:, None] & others & (top != top[0]).any()
    coefficients = torch.where(project, dots / torch.where(norms > 0, norms, 1.0)[:, None], 0.0)
    # sum_j G_j' = sum_j G_j - (sum_j c[nu(p), j]) G_nu(p)
    combined = work.sum(0).sub_(main.mul_(coefficients.sum(1)[top][:, None]))
    return combined.to(grads.dtype)


def priority_shares(strength: Tensor) -> Tensor:
    """Share of channels whose top-priority task is each task (``[K]``, sums to 1)."""
    num_tasks, channels = strength.shape
    return torch.bincount(top_priority_task(strength), minlength=num_tasks).float() / channels


@register_strategy("conn_strength", aliases=("ConnStrength",))
class ConnectionStrength(Strategy):
    """Two-phase optimization with task priority measured by connection strength.

    ``schedule``: ``"mixed"`` draws ``P ~ U(0, 1)`` and runs Phase 1 if ``P >= progress`` else
    Phase 2 (progress ``e/E`` or ``step/total`` from :meth:`set_progress`); ``"phase1"`` or
    ``"phase2"`` only; ``"sequential"``: Phase 1 while ``progress < switch_point``, then Phase 2.
    ``draw``: ``"batch"`` draws for every batch; ``"epoch"`` draws once per epoch, the epoch coming
    from ``set_progress(progress, epoch=e)`` or, when the caller gives none, from
    ``floor(progress * epochs)``.
    ``incomplete_norms``: how a layer whose per-task BatchNorms lack affine weights or running
    variances is combined in Phase 2: ``"extend"`` (default, this project's extension) measures its
    strength with ``gamma = 1`` (variance term 1) and projects; ``"released"`` gives it the plain sum
    of the task gradients, as the released core does (its name match finds no BatchNorm weight).

    Agreement with the released core: strengths are computed in the parameters' dtype, as there;
    an exact tie for a channel's top task goes to the lowest task index here, while the released
    core's ``torch.topk`` leaves ties unspecified (on CPU it picks another index for 4 or more equal
    values); with ``incomplete_norms="released"`` everything else follows it. Its phase draws came
    from Python's global RNG, so they cannot be matched draw for draw.
    """

    needs_task_forward = True
    needs_task_connections = True
    accepts_loss_scaling = True
    #: What :meth:`state_dict` saves besides the base state.
    _state_names = ("last_phase", "phase_counts", "timeline", "epoch", "drawn_epoch", "epoch_phase")

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        model: nn.Module | None = None,
        schedule: Schedule = "mixed",
        incomplete_norms: IncompleteNorms = "extend",
        switch_point: float = 0.5,
        draw: Literal["batch", "epoch"] = "batch",
        epochs: int | None = None,
        max_timeline: int = 500,
        loss_weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if schedule not in ("mixed", "phase1", "phase2", "sequential"):
            raise ValueError(f"schedule must be 'mixed', 'phase1', 'phase2' or 'sequential', got {schedule!r}")
        if incomplete_norms not in ("extend", "released"):
            raise ValueError(f"incomplete_norms must be 'extend' or 'released', got {incomplete_norms!r}")
        if draw not in ("batch", "epoch"):
            raise ValueError(f"draw must be 'batch' or 'epoch', got {draw!r}")
        if not 0.0 <= switch_point <= 1.0:
            raise ValueError(f"switch_point must be in [0, 1], got {switch_point}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be a positive number of epochs, got {epochs}")
        if max_timeline < 2:
            raise ValueError(f"max_timeline must be at least 2, got {max_timeline}")
        if not isinstance(model, nn.Module):
            raise TypeError("conn_strength needs the model: build_strategy('conn_strength', tasks, model=model)")
        self.layers: list[ConnectedLayer] = connected_layers(model)
        if not self.layers:
            raise ValueError("conn_strength needs a model with task-specific connections: convert it with "
                             "add_task_connections() or the recipe option model.architecture=task_connections")
        for layer in self.layers:
            if set(layer.connection.tasks) != set(self.tasks):
                raise ValueError(f"layer {layer.name!r} has connections for tasks {layer.connection.tasks}, "
                                 f"the strategy has tasks {self.tasks}")
        self.model = model
        self.schedule, self.switch_point, self.draw, self.epochs = schedule, float(switch_point), draw, epochs
        self.max_timeline = max_timeline
        self.incomplete_norms = incomplete_norms
        self.last_phase: int | None = None
        self.phase_counts = [0, 0]
        self.timeline: list[dict[str, Any]] = []
        self.epoch: int | None = None
        self.drawn_epoch: int | None = None
        self.epoch_phase: int | None = None

    # -- schedule ------------------------------------------------------------------------------
    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        """Training progress in [0, 1] and, optionally, the current 0-based epoch (for ``draw="epoch"``)."""
        super().set_progress(progress, epoch)
        if epoch is not None:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
            self.epoch = epoch
        elif self.epochs is not None:
            self.epoch = min(math.floor(self.progress * self.epochs + 1e-9), self.epochs - 1)
        else:
            self.epoch = None

    def _draw(self, updater: Updater | None) -> int:
        value = float(torch.rand((), generator=self.generator))
        phase = 1 if value >= self.progress else 2
        return int(updater.agree(phase)) if updater is not None else phase

    def choose_phase(self, updater: Updater | None = None) -> int:
        """The phase of the next batch (1 or 2), agreed by all processes; sets ``last_phase``."""
        if self.schedule in ("phase1", "phase2"):
            phase = 1 if self.schedule == "phase1" else 2
        elif self.schedule == "sequential":
            phase = 1 if self.progress < self.switch_point else 2
        elif self.draw == "batch":
            phase = self._draw(updater)
        else:
            if self.epoch is None:
                raise ValueError("draw='epoch' needs the current epoch: call set_progress(progress, epoch=e) "
                                 "or give the strategy option epochs=<number of epochs>")
            if self.epoch != self.drawn_epoch:
                self.epoch_phase, self.drawn_epoch = self._draw(updater), self.epoch
            phase = int(self.epoch_phase)  # type: ignore[arg-type]
        self.last_phase = phase
        return phase

    # -- update ----------------------------------------------------------------------------------
    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        closure, updater = self.begin_batch(closure, as_updater(optimizer))
        phase = self.choose_phase(updater)
        values = self._phase1(closure, updater) if phase == 1 else self._phase2(closure, updater)
        self.end_batch()
        self.num_steps += 1
        self.phase_counts[phase - 1] += 1
        return dict(zip(self.tasks, values))

    def _task_loss(self, closure: Closure, task: str) -> Tensor:
        losses = closure(task)
        if task not in losses:
            raise KeyError(f"closure(task={task!r}) returned no loss for {task!r}; got {sorted(losses)}")
        return losses[task]

    def _phase1(self, closure: Closure, updater: Updater) -> list[float]:
        """One forward, backward and optimizer step per task, in task order; the losses are read to the
        host once, at the end (a non-finite one raises after the batch's steps). Without an updater that
        checks the gradients (a plain loop), each task's gradient is checked before its step."""
        losses: dict[str, Tensor] = {}
        own_check = checks_own_gradients(updater)
        for k, task in enumerate(self.tasks):
            updater.zero_grad()
            loss = self._task_loss(closure, task)
            losses[task] = loss.detach()
            updater.backward(self.task_weights[task] * loss)
            if own_check:
                self._check_phase1_gradient(updater, k)
            updater.step(final=k == len(self.tasks) - 1)
        return losses_to_floats(losses, self.tasks)

    def _check_phase1_gradient(self, updater: Updater, k: int) -> None:
        try:
            check_gradient_norm(gradient_norm(updater.params))
        except NonFiniteGradientError:
            task, applied = self.tasks[k], list(self.tasks[:k])
            done = (f"the Phase 1 steps of {applied} earlier in this batch were taken" if applied
                    else "the model was not updated")
            raise NonFiniteGradientError(f"{self.name}: non-finite gradient for tasks {[task]}: its Phase 1 step was "
                                         f"not taken and {done}", tasks=[task]) from None

    def _phase2(self, closure: Closure, updater: Updater) -> list[float]:
        """K task backwards; connected layers' gradients kept per task, the rest summed; averaged across
        processes unless the updater's backward already did; combined; one step."""
        num_tasks = len(self.tasks)
        per_task: list[Tensor | None] = [None] * len(self.layers)  # [K, C, D] per connected layer
        losses: dict[str, Tensor] = {}
        updater.zero_grad()
        for k, task in enumerate(self.tasks):
            loss = self._task_loss(closure, task)
            losses[task] = loss.detach()
            updater.backward(self.task_weights[task] * loss)
            for i, layer in enumerate(self.layers):
                grad = layer.weight.grad
                if grad is None:
                    continue
                if per_task[i] is None:
                    per_task[i] = grad.new_zeros((num_tasks, grad.shape[0], grad[0].numel()))
                per_task[i][k].copy_(grad.reshape(grad.shape[0], -1))  # type: ignore[index]
                grad.zero_()
        values = losses_to_floats(losses, self.tasks)
        if not updater.averages_gradients:
            self._reduce_gradients(updater, per_task)
        with torch.no_grad():
            used = [(layer, grads) for layer, grads in zip(self.layers, per_task) if grads is not None]
            plain = [self.incomplete_norms == "released" and not layer.connection.complete for layer, _ in used]
            tops = self._agreed_priorities(updater, [top_priority_task(layer_strength(layer, self.tasks))
                                                     for (layer, _), summed in zip(used, plain) if not summed])
            for (layer, grads), summed in zip(used, plain):
                # the released core finds no per-task BatchNorm weight in an incomplete layer: plain sum
                combined = grads.sum(0) if summed else combine_flat(grads, tops.pop(0))
                layer.weight.grad.copy_(combined.view_as(layer.weight))  # type: ignore[union-attr]
        checked_step(updater, closure, self.tasks, f"{self.name}: ", per_task=True)
        return values

    @staticmethod
    def _agreed_priorities(updater: Updater, tops: list[Tensor]) -> list[Tensor]:
        """Each channel's top-priority task, the main process's on every process when the processes keep
        their own BatchNorm statistics (``updater.buffers_shared`` False, e.g. ``ddp_broadcast_buffers=False``):
        the strengths read the running variances, so they would rank the channels differently."""
        if getattr(updater, "buffers_shared", True) or not tops:
            return tops
        agreed = updater.agree(torch.cat(tops).cpu())
        return [t.to(top.device) for t, top in zip(agreed.split([len(top) for top in tops]), tops)]

    def _reduce_gradients(self, updater: Updater, per_task: Sequence[Tensor | None]) -> None:
        """Average across processes, in one ``reduce_``, the connected layers' per-task gradients and
        the summed gradients of every other parameter, so every process combines the same gradients."""
        connected = {id(layer.weight) for layer in self.layers}
        others = {id(p): p.grad for p in updater.params if p.grad is not None and id(p) not in connected}
        updater.reduce_([*(g for g in per_task if g is not None), *others.values()])

    # -- observables -------------------------------------------------------------------------------
    def connection_strength(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per connected layer, the ``K x C`` normalised connection strengths (rows in task order)."""
        layers = self.layers if model is None or model is self.model else connected_layers(model)
        return {layer.name: layer_strength(layer, self.tasks) for layer in layers}

    def priority(self) -> dict[str, list[float]]:
        """Per connected layer, the share of channels whose top-priority task is each task."""
        return {name: priority_shares(s).tolist() for name, s in self.connection_strength().items()}

    def _overall(self, shares: Mapping[str, Sequence[float]]) -> list[float]:
        channels = {layer.name: layer.weight.shape[0] for layer in self.layers}
        total = sum(channels.values())
        return [sum(shares[n][k] * channels[n] for n in shares) / total for k in range(len(self.tasks))]

    def _record(self, shares: Mapping[str, Sequence[float]]) -> None:
        if self.timeline and self.timeline[-1]["step"] == self.num_steps:
            self.timeline.pop()
        self.timeline.append({"step": self.num_steps, "overall": self._overall(shares), "layers": dict(shares),
                              "phase": self.last_phase})
        if len(self.timeline) > self.max_timeline:  # thin out, keeping the latest point
            self.timeline = self.timeline[::-1][::2][::-1]

    def log_metrics(self) -> dict[str, float]:
        """Phase, Phase-2 fraction and priority shares (overall and per layer); recorded in ``timeline``."""
        shares = self.priority()
        self._record(shares)
        metrics: dict[str, float] = super().log_metrics()
        if self.last_phase is not None:
            metrics["phase"] = float(self.last_phase)
            metrics["phase2_fraction"] = self.phase_counts[1] / max(1, sum(self.phase_counts))
        for task, share in zip(self.tasks, self.timeline[-1]["overall"]):
            metrics[f"priority/{task}"] = share
        for name, values in shares.items():
            for task, share in zip(self.tasks, values):
                metrics[f"priority/{name}/{task}"] = share
        return metrics

    def summarize_log(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Phase, Phase-2 fraction and the overall priority shares (not those of each layer)."""
        return {k: v for k, v in metrics.items() if not (k.startswith("priority/") and k.count("/") > 1)}

    def card_fields(self) -> dict[str, Any]:
        """``priority_stats``: per connected layer, the share of channels each task has top priority on."""
        return {**super().card_fields(), "priority_stats": self.priority()}

    def write_plots(self, out_dir: str | Path) -> list[Path]:
        """``conn_strength_priority.png``: priority shares over training and per layer at the end."""
        from ..plots import plot_priority

        self._record(self.priority())
        return [plot_priority(self.timeline, self.tasks, Path(out_dir) / "conn_strength_priority.png")]

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **copy.deepcopy({name: getattr(self, name) for name in self._state_names})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for name in self._state_names:
            setattr(self, name, copy.deepcopy(state[name]))

"""The base of the gradient aggregators: per-task gradients in, one update direction out.

One step per batch: the per-task gradients (:mod:`~mtl_plugins.strategies.task_gradients`: one
forward pass and K retained backward passes unless the model has task-specific connections;
averaged across processes, unscaled), one host read (losses, finiteness and the Gramian ``J J^T``
together), the aggregator's direction for the shared parameters (task-specific parameters keep
their own task's gradient), written back at the loss scale, and ``updater.step(final=True)``. The
strategies take the model (``model=``, filled in by the runner) to find the shared parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import torchjd_adapter as tjd
from ..base import Closure, Strategy, Updater, as_updater
from ..rep_gradients import backward_representation, representation_gradients, shared_encoder
from ..task_gradients import (
    JacobianBuffer,
    check_non_finite,
    jacobian_gramian,
    shares_encoder_forward,
    split_model_parameters,
    task_gradients,
    write_gradients,
)

JacobianMode = Literal["auto", "loop", "batched"]

#: ``jacobian="auto"`` per device type: the K retained backward passes one by one ("loop") or as one
#: batched backward ("batched"). Measured on CPU (benchmarks/README.md): the loop is faster there
#: and holds one copy of the activation gradients instead of K. Not yet measured on CUDA, so the
#: loop is the default there too; pass ``jacobian="batched"`` to use it.
DEFAULT_JACOBIAN: dict[str, str] = {"cpu": "loop", "cuda": "loop"}


class GradientAggregation(Strategy):
    """Base of the Jacobian-aggregating strategies: subclasses implement :meth:`aggregate`
    (Jacobian -> direction) or :meth:`gramian_weights` (Gramian -> K weights).

    Options every aggregator takes: ``jacobian`` (``"loop"``, ``"batched"`` or ``"auto"``, see
    :data:`DEFAULT_JACOBIAN`). Those whose LibMTL counterpart offers it also take ``rep_grad``
    (:mod:`~mtl_plugins.strategies.rep_gradients`: aggregate the gradients w.r.t. the shared
    representation, an approximation that back-propagates the encoder once).
    """

    needs_task_forward = True
    accepts_loss_scaling = True
    #: True when :meth:`aggregate` may draw from torch's global RNG: it then runs seeded from the
    #: strategy's own generator, and the global RNG is restored after.
    draws_random = True

    def __init__(
        self, tasks: Sequence[str], *, model: nn.Module | None = None,
        loss_weights: dict[str, float] | None = None, seed: int = 0,
        jacobian: JacobianMode = "auto", rep_grad: bool = False,
    ):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if jacobian not in ("auto", "loop", "batched"):
            raise ValueError(f"{self.name}: jacobian must be 'auto', 'loop' or 'batched', got {jacobian!r}")
        if jacobian == "batched" and rep_grad:
            raise ValueError(f"{self.name}: rep_grad=True back-propagates the heads only; jacobian='batched' does not apply")
        self.model = model
        self.jacobian, self.rep_grad = jacobian, bool(rep_grad)
        self.last_weights: Tensor | None = None
        self.jacobian_buffer = JacobianBuffer()

    def batched(self, device: torch.device) -> bool:
        """Whether this step computes the Jacobian as one batched backward."""
        mode = DEFAULT_JACOBIAN.get(device.type, "loop") if self.jacobian == "auto" else self.jacobian
        return mode == "batched"

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        """K weights from the K x K Gramian (float64, CPU)."""
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        """The combined direction for the shared parameters (default: weights of the Gramian
        ``J J^T`` times ``J``). ``gramian`` (float64, CPU) saves computing and reading it again.
        ``jacobian``'s storage is reused at the next batch (:class:`~mtl_plugins.strategies.task_gradients.JacobianBuffer`):
        return a new tensor, not a view of it, and keep no reference to it."""
        if gramian is None:
            gramian = jacobian_gramian(jacobian.detach()).cpu()
        weights = self.gramian_weights(gramian)
        self.last_weights = weights
        return weights.to(jacobian) @ jacobian

    def aggregate_representation(self, per_sample: Tensor, gramian: Tensor, representation: Tensor,
                                 updater: Updater | None = None) -> Tensor:
        """The combined representation gradient (``B x ...``) from the per-sample representation
        gradients (``K x B x ...``) and the Gramian of their batch sums (over the whole batch, all
        processes): the Gramian weights times the per-sample gradients, as LibMTL does.
        ``representation`` is the encoder's output; ``updater`` reduces batch statistics across processes."""
        weights = self.gramian_weights(gramian)
        self.last_weights = weights
        return torch.tensordot(weights.to(per_sample), per_sample, dims=1)

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        closure, updater = self.begin_batch(closure, as_updater(optimizer))
        shared, specific = split_model_parameters(self.model, self.name)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        one_forward = shares_encoder_forward(self.model)
        if self.rep_grad:
            grads = representation_gradients(closure, updater, self.tasks, self.task_weights,
                                             shared_encoder(self.model, self.name), specific)
        else:
            batched = self.batched(shared[0].device)
            if batched and not one_forward:
                raise ValueError(f"{self.name}: jacobian='batched' needs one forward pass shared by every task; "
                                 "the model has task-specific connections")
            grads = task_gradients(closure, updater, self.tasks, self.task_weights, shared, specific,
                                   one_forward=one_forward, batched=batched, buffer=self.jacobian_buffer)
        host = grads.read(self.tasks)  # the step's one host read
        rows = grads.per_sample if self.rep_grad else grads.jacobian
        if host.finite:
            with tjd.seeded(seed, rows.device) if self.draws_random else nullcontext():
                if self.rep_grad:
                    direction = self.aggregate_representation(rows, host.gramian, grads.output.detach(), updater)
                else:
                    direction = self.aggregate(rows, host.gramian)
        else:  # fp16 overflow: hand the non-finite sum to the updater, which skips the step
            check_non_finite(grads, updater, self.tasks, self.name, closure, [*shared, *specific])
            direction = rows.sum(0)
        scale = float(updater.loss_scale)
        if self.rep_grad:
            backward_representation(grads, direction, updater, shared)
            write_gradients([], direction[:0], specific, grads.specific, scale)
        else:
            write_gradients(shared, direction, specific, grads.specific, scale)
        updater.step(final=True)
        self.end_batch()
        self.num_steps += 1
        return dict(zip(self.tasks, host.losses))

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        if self.last_weights is not None:
            metrics.update({f"weight/{t}": float(w) for t, w in zip(self.tasks, self.last_weights)})
        return metrics


class TorchJDWeighting(GradientAggregation):
    """A Gramian weighting taken from torchjd (built, and checked installed, at construction);
    subclasses name it in ``method`` and call :meth:`build_weighting` with its options."""

    method = ""

    def build_weighting(self, **options: Any) -> None:
        self.weighting = tjd.gramian_weighting(self.name, self.method, len(self.tasks), **options)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return self.weighting(gramian)

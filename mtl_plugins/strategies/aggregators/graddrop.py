"""GradDrop (Chen et al. 2020, LibMTL ``GradDrop``): sign dropout on the Jacobian or the representation gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...registry import register_strategy
from ..base import Updater
from .base import GradientAggregation, JacobianMode


@register_strategy("graddrop", aliases=("GradDrop",))
class GradDrop(GradientAggregation):
    """GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, chosen at
    random with the probability of the sign's purity. By default applied to the shared parameters'
    gradients (torchjd's form, with the same random draws); with ``rep_grad=True`` to the shared
    representation, as in the paper and LibMTL: per feature, the batch sums of ``sign(z) * dL_t/dz``
    give the purity ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``; with ``U ~ U(0, 1)``, task t's
    per-sample gradients are kept where ``P > U`` and ``g_t > 0`` or ``P < U`` and ``g_t < 0``, and
    summed."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        """Per coordinate the sum of the positive entries where ``P > U``, of the negative ones where
        ``P < U``, with ``P = (1 + s / m) / 2`` (``s``, ``m``: the column's sum and sum of magnitudes),
        from two column reductions instead of K masks: ``P > U`` is ``s > (2U - 1) m``, and the kept
        sum is ``(s + m) / 2`` or ``(s - m) / 2``. ``U`` is drawn as torchjd's ``GradDrop`` draws it."""
        total = jacobian.sum(0)
        magnitude = jacobian[0].abs()
        for row in jacobian[1:]:  # row by row: no K x n temporary
            magnitude += row.abs()
        threshold = torch.rand(total.shape, dtype=jacobian.dtype, device=jacobian.device)
        threshold.mul_(2).sub_(1).mul_(magnitude)
        side = torch.sub(total, threshold).sign_()  # +1: keep the positive entries, -1: the negative ones
        return side.mul_(magnitude).add_(total).mul_(0.5)  # a zero column (m = 0) gives 0

    def aggregate_representation(self, per_sample: Tensor, gramian: Tensor, representation: Tensor,
                                 updater: Updater | None = None) -> Tensor:
        signed = (per_sample * representation.sign()).sum(1)  # K x features, over the whole batch:
        if updater is not None:
            updater.reduce_([signed])  # every process keeps the same signs

        purity = 0.5 * (1 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))
        draw = torch.rand(purity.shape, dtype=purity.dtype, device=purity.device)
        keep = ((purity > draw) & (signed > 0)) | ((purity < draw) & (signed < 0))
        return (per_sample * keep.unsqueeze(1).to(per_sample.dtype)).sum(0)

"""GradDrop (Chen et al. 2020, LibMTL ``GradDrop``), torchjd's aggregator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from ..base import Updater
from .base import GradientAggregation, JacobianMode


@register_strategy("graddrop", aliases=("GradDrop",))
class GradDrop(GradientAggregation):
    """GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, chosen at
    random with the probability of the sign's purity. By default applied to the shared parameters'
    gradients (torchjd's form); with ``rep_grad=True`` to the shared representation, as in the paper
    and LibMTL: per feature, the batch sums of ``sign(z) * dL_t/dz`` give the purity
    ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``; with ``U ~ U(0, 1)``, task t's per-sample gradients
    are kept where ``P > U`` and ``g_t > 0`` or ``P < U`` and ``g_t < 0``, and summed."""


    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)
        self.aggregator = tjd.graddrop(self.name)

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        return self.aggregator(jacobian)

    def aggregate_representation(self, per_sample: Tensor, gramian: Tensor, representation: Tensor,
                                 updater: Updater | None = None) -> Tensor:
        signed = (per_sample * representation.sign()).sum(1)  # K x features, over the whole batch:
        if updater is not None:
            updater.reduce_([signed])  # every process keeps the same signs

        purity = 0.5 * (1 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))
        draw = torch.rand(purity.shape, dtype=purity.dtype, device=purity.device)
        keep = ((purity > draw) & (signed > 0)) | ((purity < draw) & (signed < 0))
        return (per_sample * keep.unsqueeze(1).to(per_sample.dtype)).sum(0)

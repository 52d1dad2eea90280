"""Random loss weighting (Lin et al. 2022, LibMTL ``RLW``), torchjd's scalarizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from .base import LossWeighting, scalarizer_gradients, stack_losses


@register_strategy("rlw", aliases=("RLW",))
class RandomLossWeighting(LossWeighting):
    """RLW (Lin et al. 2022): weights ``softmax(z)``, ``z ~ N(0, I)`` drawn afresh every step from the
    strategy's seed (identical on every process, restored with the state)."""

    weights_move_state = True

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "rlw", len(self.tasks))

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with tjd.seeded(seed):
            weights = scalarizer_gradients(self.scalarizer, stack_losses(losses, self.tasks))[0]
        return dict(zip(self.tasks, weights.tolist()))

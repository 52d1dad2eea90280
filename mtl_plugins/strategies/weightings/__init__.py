"""Loss weightings (one backward pass of ``sum_t lambda_t L_t``) and GradNorm, one module per method.

``uw``, ``gls`` and ``rlw`` use torchjd's scalarizers (extra ``baselines``); ``dwa``, ``famo`` and
``gradnorm`` are written here: their state is plain tensors that checkpoints can store, and
``gradnorm`` needs the per-task gradients (:mod:`~mtl_plugins.strategies.task_gradients`).
"""

from . import dwa, famo, gls, gradnorm, rlw, uw  # noqa: F401  (registration)
from .base import LossWeighting, OwnedParameter

__all__ = ["LossWeighting", "OwnedParameter"]

"""Gradient aggregators: combine the per-task gradients of the shared parameters, one module per method.

Weightings of the Gramian ``J J^T`` come from torchjd (extra ``baselines``) through
:mod:`~mtl_plugins.strategies.torchjd_adapter`; CAGrad and Nash-MTL are solved here
(:mod:`.solvers`: scipy and a Newton method) because torchjd's versions need cvxpy.
"""

from . import aligned_mtl, cagrad, graddrop, gradvac, imtl, mgda, nash_mtl, pcgrad, upgrad  # noqa: F401  (registration)
from .base import GradientAggregation, TorchJDWeighting

__all__ = ["GradientAggregation", "TorchJDWeighting"]

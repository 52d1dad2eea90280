"""Gradient aggregators: combine the per-task gradients of the shared parameters, one module per method.

PCGrad, IMTL-G, UPGrad, Aligned-MTL and GradVac weight the Gramian ``J J^T`` with torchjd (extra
``baselines``) through :mod:`~mtl_plugins.strategies.torchjd_adapter`. MGDA, CAGrad and Nash-MTL
are solved here (:mod:`.solvers`: Frank-Wolfe in numpy, where torchjd's runs one torch operation at
a time; scipy and a Newton method, where torchjd's need cvxpy), and GradDrop combines the Jacobian
in two column reductions (torchjd's masks each of the K rows), with torchjd's random draws.
"""

from . import aligned_mtl, cagrad, graddrop, gradvac, imtl, mgda, nash_mtl, pcgrad, upgrad  # noqa: F401  (registration)
from .base import GradientAggregation, TorchJDWeighting

__all__ = ["GradientAggregation", "TorchJDWeighting"]

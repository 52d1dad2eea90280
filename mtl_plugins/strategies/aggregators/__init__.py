"""Gradient aggregators: combine the per-task gradients of the shared parameters, one module per method.

IMTL-G, UPGrad and Aligned-MTL weight the Gramian ``J J^T`` with torchjd (extra ``baselines``)
through :mod:`~mtl_plugins.strategies.torchjd_adapter` (UPGrad with a scipy NNLS projector).
PCGrad, GradVac, MGDA, CAGrad and Nash-MTL are solved here (:mod:`.solvers`): PCGrad's and
GradVac's weights as torchjd computes them, with its random draws, and MGDA's Frank-Wolfe, in
Python floats where torchjd runs one torch operation per scalar (weights 2-12x faster at K = 5-40);
CAGrad with scipy and Nash-MTL by Newton's method, where torchjd's need cvxpy. GradDrop combines
the Jacobian in two column reductions (torchjd's masks each of the K rows), with torchjd's draws.
"""

from . import aligned_mtl, cagrad, graddrop, gradvac, imtl, mgda, nash_mtl, pcgrad, upgrad  # noqa: F401  (registration)
from .base import GradientAggregation, TorchJDWeighting

__all__ = ["GradientAggregation", "TorchJDWeighting"]

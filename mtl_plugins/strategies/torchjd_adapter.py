"""The one place that calls torchjd (optional extra ``baselines``).

torchjd's API changes between minor versions, so every use goes through this module: the supported
range is checked once, and a missing or incompatible torchjd raises an :class:`ImportError` naming
the extra to install. Nothing here imports torchjd at module import time.

Weightings take a Gramian ``G = J J^T`` (K x K, float64, CPU) and return K weights; the strategies
combine the Jacobian rows with them. Random draws (RLW's scalarizer, and the aggregators that draw
from torch's global RNG) run from the caller's seed (:func:`seeded`), so that every process and
every resumed run draws the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from importlib import import_module, metadata
from types import ModuleType
from typing import Any

import numpy as np
import torch
from packaging.specifiers import SpecifierSet
from torch import Tensor

EXTRA = "baselines"
INSTALL_HINT = f'pip install "mtl-plugins[{EXTRA}]"'
SUPPORTED = ">=0.18,<0.19"  # keep in step with the ``baselines`` extra in pyproject.toml


def require_torchjd(user: str, submodule: str = "aggregation") -> ModuleType:
    """Import ``torchjd.<submodule>`` for strategy ``user``, or raise an ImportError naming the extra."""
    try:
        module = import_module(f"torchjd.{submodule}")
    except ImportError as error:
        raise ImportError(f"strategy {user!r} needs torchjd, which is not installed: {INSTALL_HINT}") from error
    try:
        version = metadata.version("torchjd")
    except metadata.PackageNotFoundError:
        return module
    if not SpecifierSet(SUPPORTED).contains(version, prereleases=True):
        raise ImportError(f"strategy {user!r} supports torchjd {SUPPORTED}, found {version}: {INSTALL_HINT}")
    return module


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run torchjd's global-RNG draws (CPU, and ``device`` if CUDA) from ``seed``; restore the RNG after."""
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _dual_cone_point(root: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin_v ||root v||^2`` s.t. ``v >= u``: ``u + argmin_{z >= 0} ||root z + root u||^2`` by
    scipy's NNLS, or a bounded least-squares solve (BVLS) where NNLS reaches its iteration limit."""
    from scipy.optimize import lsq_linear, nnls

    try:
        return u + nnls(root, -(root @ u), maxiter=20 * len(u))[0]
    except RuntimeError:
        return lsq_linear(root, np.zeros(len(u)), bounds=(u, np.inf), method="bvls", tol=1e-12).x


def _least_squares_projector() -> Any:
    from torchjd.linalg import DualConeProjector

    class LeastSquaresProjector(DualConeProjector):
        """``min_v v^T G v`` s.t. ``v >= u`` for each row ``u`` of ``U``, with ``G = R^T R``
        (:func:`_dual_cone_point`). Used by UPGrad instead of torchjd's default quadprog projector,
        which needs extra packages; NNLS gives BVLS's solutions to rounding, about 8x faster at
        K = 5 and 14x at K = 40.
        """

        def __call__(self, U: Tensor, G: Tensor) -> Tensor:
            g = G.detach().cpu().double().numpy()
            g = g / max(np.trace(g), 1e-300)
            eigenvalues, vectors = np.linalg.eigh(0.5 * (g + g.T))
            root = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T  # root^T root = G
            u_rows = U.detach().cpu().double().reshape(-1, G.shape[0]).numpy()
            solutions = [_dual_cone_point(root, u) for u in u_rows]
            return torch.as_tensor(np.array(solutions), dtype=U.dtype, device=U.device).reshape(U.shape)

    return LeastSquaresProjector()


def gramian_weighting(user: str, method: str, num_tasks: int, **options: Any) -> Callable[[Tensor], Tensor]:
    """torchjd's weighting for ``method`` (imtl, upgrad, aligned_mtl) on a Gramian."""
    aggregation = require_torchjd(user)
    if method == "imtl":
        return aggregation.IMTLGWeighting()
    if method == "upgrad":
        return aggregation.UPGradWeighting(projector=_least_squares_projector())
    if method == "aligned_mtl":
        pref = torch.full((num_tasks,), float(options.pop("pref", 1.0)), dtype=torch.float64)
        return aggregation.AlignedMTLWeighting(pref_vector=pref, **options)
    raise ValueError(f"no torchjd Gramian weighting for {method!r}")


def scalarizer(user: str, method: str, num_tasks: int) -> torch.nn.Module:
    """torchjd's scalarizer for ``method`` (uw, gls, rlw): losses (K) -> scalar."""
    scalarization = require_torchjd(user, "scalarization")
    if method == "uw":
        return scalarization.UW(num_tasks)
    if method == "gls":
        return scalarization.GeometricMean()
    if method == "rlw":
        return scalarization.Random()
    raise ValueError(f"no torchjd scalarizer for {method!r}")

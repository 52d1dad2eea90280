"""Edge maps from label maps, as the PASCAL-Context release derives its edge targets.

Edges are the pixels where the 4-neighbour Laplacian of the label map is non-zero (borders reflected
without repeating the edge pixel, like OpenCV's default: ``scipy.ndimage.laplace`` with
``mode="mirror"``), thinned to one-pixel-wide curves by ``skimage.morphology.thin`` (Guo & Hall's
two-subiteration parallel thinning; pixels outside the image count as background). Both work on one
map ``H x W`` or map by map on a stack ``... x H x W``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import morphology


def laplacian(labels: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian (kernel [[0,1,0],[1,-4,1],[0,1,0]]) with reflect-101 borders over the last
    two axes, float64."""
    return ndimage.laplace(np.asarray(labels, dtype=np.float64), mode="mirror", axes=(-2, -1))


def thin(mask: np.ndarray) -> np.ndarray:
    """``skimage.morphology.thin`` of a boolean mask, or of each mask of a stack."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.reshape(-1, *mask.shape[-2:])
    thinned = np.empty_like(flat)
    for i, single in enumerate(flat):
        thinned[i] = morphology.thin(single)
    return thinned.reshape(mask.shape)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """Thinned boundaries of a label map (or of each map of a stack) as a float32 0/1 map."""
    return thin(laplacian(labels) != 0).astype(np.float32)

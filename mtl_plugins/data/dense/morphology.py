"""Edge maps from label maps, as the PASCAL-Context release derives its edge targets.

``label_boundaries`` marks pixels where the 4-neighbour Laplacian of the label map is non-zero
(borders reflected without repeating the edge pixel, like OpenCV's default); ``thin`` reduces them to
one-pixel-wide curves with the two-subiteration parallel thinning of Guo & Hall (1989), the algorithm
behind ``skimage.morphology.thin``.
"""

from __future__ import annotations

import numpy as np

# Neighbour order x1..x8: E, NE, N, NW, W, SW, S, SE (counter-clockwise from east), as (row, col) offsets.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _pad_last_two(array: np.ndarray, mode: str) -> np.ndarray:
    return np.pad(array, [(0, 0)] * (array.ndim - 2) + [(1, 1), (1, 1)], mode=mode)


def laplacian(labels: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian (kernel [[0,1,0],[1,-4,1],[0,1,0]]) with reflect-101 borders, over the last
    two axes (a stack of maps is filtered map by map)."""
    x = _pad_last_two(labels.astype(np.float64), "reflect")
    return x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:] - 4.0 * x[..., 1:-1, 1:-1]


def _neighbours(image: np.ndarray) -> list[np.ndarray]:
    padded = _pad_last_two(image, "constant")
    h, w = image.shape[-2:]
    return [padded[..., 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr, dc in _NEIGHBOURS]


def thin(mask: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Guo-Hall thinning of a boolean mask (pixels outside the image count as background); a stack of
    masks (``... x H x W``) is thinned mask by mask (iterating until every mask is stable)."""
    skeleton = np.asarray(mask, dtype=bool).copy()
    iterations = 0
    while max_iter is None or iterations < max_iter:
        before = int(skeleton.sum())
        for first in (True, False):
            x = _neighbours(skeleton)
            # Hilditch crossing number X_H(p) == 1
            crossing = sum(~x[i] & (x[i + 1] | x[(i + 2) % 8]) for i in (0, 2, 4, 6))
            n1 = sum(x[k] | x[k - 1] for k in (1, 3, 5, 7))
            n2 = sum(x[k] | x[(k + 1) % 8] for k in (1, 3, 5, 7))
            smallest = np.minimum(n1, n2)
            if first:  # (x2 or x3 or not x8) and x1 must be false
                g3 = ~((x[1] | x[2] | ~x[7]) & x[0])
            else:  # (x6 or x7 or not x4) and x5 must be false
                g3 = ~((x[5] | x[6] | ~x[3]) & x[4])
            delete = skeleton & (crossing == 1) & (smallest >= 2) & (smallest <= 3) & g3
            skeleton[delete] = False
        iterations += 1
        if int(skeleton.sum()) == before:
            break
    return skeleton


def label_edges(labels: np.ndarray) -> np.ndarray:
    """Thinned boundaries of a label map as a float32 0/1 map."""
    return thin(np.abs(laplacian(labels)) > 0).astype(np.float32)

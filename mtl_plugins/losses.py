"""Per-task loss functions by name.

Dense losses follow the ICLR 2025 selective-update recipe: cross-entropy ignoring 255 for
segmentation and human parts, L1 on valid pixels for depth, L1 on the L2-normalised prediction for
normals, class-balanced binary cross-entropy for edges (positive weight 0.95) and saliency (weight
from the label balance). Signed dense regression maps (Taskonomy) use L1 or MSE over every element.
Regression losses (``mse``, ``l1``) leave out labels equal to ``ignore_index`` when one is given.
Masked losses average over valid positions and are 0 when none is valid.

:data:`LOSSES` names every loss; :data:`KIND_LOSSES` says which of them each task kind trains with
(every model, HPS or Hub, takes a task's loss from there).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def class_indices(target: Tensor) -> Tensor:
    """``target`` as class indices; floating labels must be whole numbers (never silently truncated)."""
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError("class labels must be whole numbers (class indices); got fractional values, e.g. "
                         f"{target[target != target.round()].flatten()[:3].tolist()}")
    return target.long()


def checked_class_indices(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """``target`` as class indices after checking it against ``logits`` (class dim 1): shape ``B``
    (``B x ...`` for maps and tokens) and every label in ``[0, C - 1]`` or ``ignore_index``."""
    target = class_indices(target)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        expected = tuple(logits.shape[:1] + logits.shape[2:])
        raise ValueError(f"cross-entropy: labels of shape {tuple(target.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)}: expected class indices of shape {expected} (class dim 1)")
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if bad.any():
        raise ValueError(f"cross-entropy: labels {sorted(target[bad].unique().tolist())} are outside [0, "
                         f"{logits.shape[1] - 1}] (class ids of {logits.shape[1]} classes) and are not "
                         f"ignore_index={ignore_index}")
    return target


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over labelled positions (class dim 1); labels are checked first."""
    return F.cross_entropy(logits, checked_class_indices(logits, target, ignore_index), ignore_index=ignore_index)


def _regression_target(prediction: Tensor, target: Tensor, name: str) -> Tensor:
    """``target`` in ``prediction``'s shape: equal shapes, or one side with an extra trailing dim of size 1."""
    if target.shape != prediction.shape:
        if prediction.shape[-1:] == (1,) and target.shape == prediction.shape[:-1]:
            target = target.unsqueeze(-1)
        elif target.shape[-1:] == (1,) and target.shape[:-1] == prediction.shape:
            target = target.squeeze(-1)
        else:
            raise ValueError(f"{name}: labels of shape {tuple(target.shape)} do not match predictions of shape "
                             f"{tuple(prediction.shape)} (expected B x C, or B for one output)")
    return target


def _regression_loss(loss_fn: Callable[..., Tensor], prediction: Tensor, target: Tensor,
                     ignore_index: float | None, name: str) -> Tensor:
    """``loss_fn`` (``F.mse_loss`` or ``F.l1_loss``) averaged over the labels that are not ``ignore_index``."""
    target = _regression_target(prediction, target, name)
    values = target.to(prediction.dtype)
    if ignore_index is None:
        return loss_fn(prediction, values)
    return _masked_mean(loss_fn(prediction, values, reduction="none"), target != ignore_index)


def mse(prediction: Tensor, target: Tensor, ignore_index: float | None = None) -> Tensor:
    """Mean squared error over the labels that are not ``ignore_index`` (0 when none is left)."""
    return _regression_loss(F.mse_loss, prediction, target, ignore_index, "MSE loss")


def l1(prediction: Tensor, target: Tensor, ignore_index: float | None = None) -> Tensor:
    """Mean absolute error over the labels that are not ``ignore_index`` (0 when none is left)."""
    return _regression_loss(F.l1_loss, prediction, target, ignore_index, "L1 loss")


def _dense_target(prediction: Tensor, target: Tensor, name: str) -> Tensor:
    """``target`` in ``prediction``'s shape (a missing channel dim of size 1 is added)."""
    if target.dim() == prediction.dim() - 1 and prediction.shape[1] == 1:
        target = target.unsqueeze(1)
    if target.shape != prediction.shape:
        raise ValueError(f"{name}: labels of shape {tuple(target.shape)} do not match predictions of shape "
                         f"{tuple(prediction.shape)} (expected B x C x H x W or B x H x W for one channel)")
    return target.to(prediction.dtype)


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of ``values`` over ``valid`` positions divided by their count (0 when none is valid)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy (class dim 1) averaged over positions whose label is not ``ignore_index``.

    Works for ``B x C`` sequence logits, ``B x C x T`` token logits and ``B x C x H x W`` maps.
    """
    target = checked_class_indices(logits, target, ignore_index)
    valid = target != ignore_index
    per_position = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none")
    return _masked_mean(per_position, valid)


def depth_l1(prediction: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean absolute depth error over valid pixels: finite, positive and not ``ignore_index``
    (NYUD-v2 marks missing depth with 0)."""
    target = _dense_target(prediction, target, "depth loss")
    valid = torch.isfinite(target) & (target > 0) & (target != ignore_index)
    return _masked_mean((prediction - torch.nan_to_num(target)).abs(), valid)


def normals_l1(prediction: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """L1 between the L2-normalised prediction and the label normals, summed over the 3 channels and
    averaged over valid pixels (pixels where no channel equals ``ignore_index``)."""
    target = _dense_target(prediction, target, "normals loss")
    valid = (target != ignore_index).all(dim=1)
    per_pixel = (F.normalize(prediction, p=2, dim=1) - target).abs().sum(dim=1)
    return _masked_mean(per_pixel, valid)


def _dense_regression_valid(target: Tensor, ignore_index: float | None) -> Tensor:
    """Finite elements that are not ``ignore_index`` (every finite one when it is None); no sign test."""
    valid = torch.isfinite(target)
    if ignore_index is not None:
        valid &= target != ignore_index
    return valid


def dense_l1(prediction: Tensor, target: Tensor, ignore_index: float | None = None) -> Tensor:
    """Mean absolute error over every element of ``B x C x H x W`` maps (signed values are all valid;
    non-finite labels and, when given, labels equal to ``ignore_index`` are left out)."""
    target = _dense_target(prediction, target, "dense regression L1")
    valid = _dense_regression_valid(target, ignore_index)
    return _masked_mean((prediction - torch.nan_to_num(target)).abs(), valid)


def dense_mse(prediction: Tensor, target: Tensor, ignore_index: float | None = None) -> Tensor:
    """Mean squared error over every element of ``B x C x H x W`` maps, with the validity rule of
    :func:`dense_l1`."""
    target = _dense_target(prediction, target, "dense regression MSE")
    valid = _dense_regression_valid(target, ignore_index)
    return _masked_mean((prediction - torch.nan_to_num(target)) ** 2, valid)


def balanced_bce(logits: Tensor, target: Tensor, pos_weight: float | None = None, ignore_index: int = 255) -> Tensor:
    """Class-balanced binary cross-entropy with logits over valid pixels.

    ``mean(-w * y * log(sigmoid(x)) - (1 - w) * (1 - y) * log(1 - sigmoid(x)))`` where ``w`` is
    ``pos_weight`` or, when it is None, the share of negative labels among valid pixels (HED-style).
    """
    target = _dense_target(logits, target, "balanced BCE")
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    if pos_weight is None:
        w = ((1 - y) * valid).sum() / valid.sum().clamp_min(1)
    else:
        if not 0.0 <= pos_weight <= 1.0:
            raise ValueError(f"pos_weight must be in [0, 1], got {pos_weight}")
        w = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_pixel = -w * y * F.logsigmoid(logits) - (1 - w) * (1 - y) * F.logsigmoid(-logits)
    return _masked_mean(per_pixel, valid)


#: Positive-class weight of the edge loss in the released recipes.
EDGE_POS_WEIGHT = 0.95
edge_bce = partial(balanced_bce, pos_weight=EDGE_POS_WEIGHT)

LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "l1": l1,
    "masked_cross_entropy": masked_cross_entropy,
    "depth_l1": depth_l1,
    "normals_l1": normals_l1,
    "balanced_bce": balanced_bce,
    "edge_bce": edge_bce,
    "dense_l1": dense_l1,
    "dense_mse": dense_mse,
}


def token_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of ``B x T x C`` token logits over the labelled tokens."""
    return masked_cross_entropy(logits.transpose(1, 2), target, ignore_index=ignore_index)


#: Task kind -> the losses a task of that kind trains with (name -> function), the default first.
#: A kind with one loss always trains with it; a kind with several lets each task choose one.
KIND_LOSSES: dict[str, dict[str, LossFn]] = {
    "classification": {"cross_entropy": cross_entropy},
    "regression": {"mse": mse},
    "sequence_classification": {"cross_entropy": masked_cross_entropy},
    "token_classification": {"cross_entropy": token_cross_entropy},
    "semantic_segmentation": {"masked_cross_entropy": masked_cross_entropy},
    "human_parts": {"masked_cross_entropy": masked_cross_entropy},
    "saliency": {"balanced_bce": balanced_bce},
    "depth": {"depth_l1": depth_l1},
    "normals": {"normals_l1": normals_l1},
    "edges": {"edge_bce": edge_bce},
    "dense_regression": {"l1": dense_l1, "mse": dense_mse},
}


def kind_losses(kind: str) -> dict[str, LossFn]:
    """The losses of task kind ``kind`` (name -> function, the default first)."""
    if kind not in KIND_LOSSES:
        raise ValueError(f"unknown task kind {kind!r}; available: {', '.join(KIND_LOSSES)}")
    return KIND_LOSSES[kind]


def kind_loss_name(kind: str, name: str | None) -> str | None:
    """``kind``'s own name for loss ``name`` (its default for None): a name of the kind's losses, or a
    :data:`LOSSES` name of the same function (``dense_l1`` is ``dense_regression``'s ``l1``).
    None when the kind has no such loss."""
    losses = kind_losses(kind)
    if name is None:
        return next(iter(losses))
    if name in losses:
        return name
    function = LOSSES.get(name)
    return next((own for own, fn in losses.items() if function is not None and fn is function), None)


def loss_for_kind(kind: str, name: str | None = None) -> LossFn:
    """The loss function of task kind ``kind`` named ``name`` (:func:`kind_loss_name`; the default for None)."""
    own = kind_loss_name(kind, name)
    if own is None:
        raise ValueError(f"task kind {kind!r} trains with one of {sorted(kind_losses(kind))}, got loss={name!r}")
    return kind_losses(kind)[own]


def get_loss(name_or_fn: str | LossFn) -> LossFn:
    """A loss function from its name (a key of :data:`LOSSES`) or the function itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in LOSSES:
        raise ValueError(f"unknown loss {name_or_fn!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name_or_fn]

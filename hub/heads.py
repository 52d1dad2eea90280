"""Task heads by kind: what each kind predicts, its loss, and how to turn outputs into user units.

Dense kinds (vision) read multi-level feature maps that the model has already resized to one
resolution and concatenated: one 1x1 convolution per task, then bilinear upsampling to the input
size (the ICLR 2025 selective-update recipe). ``dense_regression`` predicts signed maps with any
number of channels (Taskonomy), trained with L1 or, when the task's ``loss`` says so, MSE over every
pixel. Text kinds read the encoder's token states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_plugins.losses import (
    balanced_bce,
    dense_l1,
    dense_mse,
    depth_l1,
    edge_bce,
    masked_cross_entropy,
    mse,
    normals_l1,
)


def _class_ids(logits: Tensor) -> Tensor:
    return logits.argmax(dim=1)


def _probabilities(logits: Tensor) -> Tensor:
    return torch.sigmoid(logits).squeeze(1)


def _depth(prediction: Tensor) -> Tensor:
    return prediction.clamp_min(0).squeeze(1)


def _unit_normals(prediction: Tensor) -> Tensor:
    return F.normalize(prediction, p=2, dim=1)


def _maps(prediction: Tensor) -> Tensor:
    return prediction


def _values(prediction: Tensor) -> Tensor:
    return prediction.squeeze(-1) if prediction.shape[-1] == 1 else prediction


def _token_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Token logits are ``B x T x C``; the cross-entropy takes classes on dim 1."""
    return masked_cross_entropy(logits.transpose(1, 2), target, ignore_index=ignore_index)


def _regression_loss(prediction: Tensor, target: Tensor, ignore_index: float | None = None) -> Tensor:
    """MSE over the labels that are not ``ignore_index``; labels are ``B`` (one output) or ``B x C``."""
    return mse(prediction, target, ignore_index=ignore_index)


@dataclass(frozen=True)
class HeadKind:
    """A head kind: input ``modality`` (``vision`` or ``text``), loss ``loss(pred, target, ignore_index=)``,
    output size (``fixed_outputs`` when the kind allows only one), default ``ignore_index`` (None: no
    ignore value), ``predict`` (raw output -> user units) and, for kinds whose loss a task may choose,
    ``losses`` (loss name -> function; the task's ``loss`` key picks one, ``default_loss`` otherwise).
    ``real_valued`` kinds take real labels: their ``ignore_index`` may be any number or None."""

    modality: str
    loss: Callable[..., Tensor]
    predict: Callable[[Tensor], Tensor]
    fixed_outputs: int | None = None
    ignore_index: int | None = 255
    losses: Mapping[str, Callable[..., Tensor]] = field(default_factory=dict)
    default_loss: str | None = None
    real_valued: bool = False

    def loss_for(self, name: str | None) -> Callable[..., Tensor]:
        """The loss function named ``name`` (the kind's own loss when None)."""
        if name is None:
            return self.loss
        if name not in self.losses:
            raise ValueError(f"unknown loss {name!r} for this head kind; available: {sorted(self.losses)}")
        return self.losses[name]


HEAD_KINDS: dict[str, HeadKind] = {
    "semantic_segmentation": HeadKind("vision", masked_cross_entropy, _class_ids),
    "human_parts": HeadKind("vision", masked_cross_entropy, _class_ids),
    "saliency": HeadKind("vision", balanced_bce, _probabilities, fixed_outputs=1),
    "depth": HeadKind("vision", depth_l1, _depth, fixed_outputs=1),
    "normals": HeadKind("vision", normals_l1, _unit_normals, fixed_outputs=3),
    "edges": HeadKind("vision", edge_bce, _probabilities, fixed_outputs=1),
    "dense_regression": HeadKind("vision", dense_l1, _maps, ignore_index=None, real_valued=True,
                                 losses={"l1": dense_l1, "mse": dense_mse}, default_loss="l1"),
    "sequence_classification": HeadKind("text", masked_cross_entropy, _class_ids, ignore_index=-100),
    "regression": HeadKind("text", _regression_loss, _values, ignore_index=-100, real_valued=True),
    "token_classification": HeadKind("text", _token_cross_entropy, partial(torch.argmax, dim=-1), ignore_index=-100),
}


class DenseHead(nn.Module):
    """A 1x1 convolution on the fused features, upsampled bilinearly to the input size."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_outputs, kernel_size=1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.conv(features), size=size, mode="bilinear", align_corners=False)


class SequenceHead(nn.Module):
    """Dropout and a linear layer on the pooled sentence representation."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(self.dropout(pooled))


class TokenHead(SequenceHead):
    """Dropout and a linear layer applied to every token state (``B x T x C`` logits)."""

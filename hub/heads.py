"""Task heads by kind: what each kind predicts and how to turn outputs into user units (the loss of
each kind is in :data:`mtl_plugins.losses.KIND_LOSSES`).

Dense kinds (vision) read multi-level feature maps that the model has already resized to one
resolution and concatenated: one 1x1 convolution per task, then bilinear upsampling to the input
size (the ICLR 2025 selective-update recipe). ``dense_regression`` predicts signed maps with any
number of channels (Taskonomy), trained with L1 or, when the task's ``loss`` says so, MSE over every
pixel. Text kinds read the encoder's token states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


@dataclass(frozen=True)
class HeadKind:
    """A head kind: input ``modality`` (``vision`` or ``text``), ``predict`` (raw output -> user units),
    output size (``fixed_outputs`` when the kind allows only one) and default ``ignore_index`` (None: no
    ignore value). ``real_valued`` kinds take real labels: their ``ignore_index`` may be any number or None."""

    modality: str
    predict: Callable[[Tensor], Tensor]
    fixed_outputs: int | None = None
    ignore_index: int | None = 255
    real_valued: bool = False


HEAD_KINDS: dict[str, HeadKind] = {
    "semantic_segmentation": HeadKind("vision", _class_ids),
    "human_parts": HeadKind("vision", _class_ids),
    "saliency": HeadKind("vision", _probabilities, fixed_outputs=1),
    "depth": HeadKind("vision", _depth, fixed_outputs=1),
    "normals": HeadKind("vision", _unit_normals, fixed_outputs=3),
    "edges": HeadKind("vision", _probabilities, fixed_outputs=1),
    "dense_regression": HeadKind("vision", _maps, ignore_index=None, real_valued=True),
    "sequence_classification": HeadKind("text", _class_ids, ignore_index=-100),
    "regression": HeadKind("text", _values, ignore_index=-100, real_valued=True),
    "token_classification": HeadKind("text", partial(torch.argmax, dim=-1), ignore_index=-100),
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

"""Backbones of a multi-task model: built from a config or a checkpoint, read as features.

Vision models with an ``AutoBackbone`` return one feature map per requested stage; ViT returns the
patch tokens of the requested blocks, reshaped to maps. Text encoders return their token states.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoBackbone, AutoModel, PreTrainedConfig

from mtl_plugins.pretrained import resolve_pretrained

from .configuration import VIT_MODEL_TYPES, backbone_modality


def backbone_class(config: PreTrainedConfig) -> tuple[type, dict]:
    """The model class for ``config`` and its extra init arguments: the ``AutoBackbone`` class of a
    vision model, else the ``AutoModel`` class (without the unused pooler)."""
    if backbone_modality(config) == "vision" and config.model_type not in VIT_MODEL_TYPES:
        return AutoBackbone._model_mapping[type(config)], {}
    model_class = AutoModel._model_mapping[type(config)]
    accepts_pooling = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return model_class, ({"add_pooling_layer": False} if accepts_pooling else {})


def build_backbone(config: PreTrainedConfig, pretrained: str | None = None) -> nn.Module:
    """The backbone for ``config``: pretrained weights from ``pretrained`` (safetensors only) or random."""
    model_class, kwargs = backbone_class(config)
    if pretrained is None:
        return model_class._from_config(config, **kwargs)
    if kwargs.get("add_pooling_layer") is False:
        model_class = without_pooler(model_class)
    return model_class.from_pretrained(resolve_pretrained(pretrained), config=config, use_safetensors=True, **kwargs)


@functools.cache
def without_pooler(model_class: type) -> type:
    """``model_class`` that expects a checkpoint's pooler weights to be left out (it is built without
    its pooler), so loading reports nothing about them."""
    ignored = [*(model_class._keys_to_ignore_on_load_unexpected or []), r"^pooler\."]
    return type(model_class.__name__, (model_class,), {"_keys_to_ignore_on_load_unexpected": ignored,
                                                       "__module__": model_class.__module__})


def vit_feature_maps(backbone: nn.Module, pixel_values: Tensor, levels: list[int]) -> list[Tensor]:
    """Patch tokens of ViT blocks ``levels`` (1-based) as ``B x C x H/p x W/p`` maps."""
    config = backbone.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    height, width = pixel_values.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the ViT patch size {patch}")
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    outputs = backbone(pixel_values, output_hidden_states=True,
                       interpolate_pos_encoding=(height, width) != (image_size, image_size))
    grid = (height // patch, width // patch)
    maps = []
    for level in levels:
        tokens = outputs.hidden_states[level][:, 1:]  # drop the CLS token
        maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid))
    return maps


def fuse_feature_maps(maps: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Resize every map bilinearly to the largest one and concatenate the channels."""
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    resized = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(resized, dim=1)


def feature_channels(backbone: nn.Module, config: PreTrainedConfig, levels: list[int] | None) -> int:
    """Channels of the fused vision features, or the hidden size of a text encoder."""
    if backbone_modality(config) == "text":
        return int(config.hidden_size)
    if config.model_type in VIT_MODEL_TYPES:
        return int(config.hidden_size) * len(levels or [])
    return int(sum(backbone.channels))


def mean_pool(states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of the token states over the attended tokens."""
    if attention_mask is None:
        return states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)

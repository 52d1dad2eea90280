"""Tiny backbones, tasks and batches shared by the hub tests (no tests here; random weights, built in milliseconds)."""

import torch
from transformers import BertConfig, ConvNextConfig, ResNetConfig, SwinConfig, ViTConfig

DENSE_TASKS = [
    {"name": "seg", "kind": "semantic_segmentation", "num_outputs": 5},
    {"name": "parts", "kind": "human_parts", "num_outputs": 3},
    {"name": "sal", "kind": "saliency"},
    {"name": "depth", "kind": "depth"},
    {"name": "normals", "kind": "normals", "loss_weight": 2.0},
    {"name": "edges", "kind": "edges"},
]
TEXT_TASKS = [
    {"name": "sentiment", "kind": "sequence_classification", "num_outputs": 3},
    {"name": "score", "kind": "regression"},
    {"name": "tags", "kind": "token_classification", "num_outputs": 4, "loss_weight": 0.5},
]


def convnext_config():
    return ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64])


def vit_config(layers=4):
    return ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32)


def resnet_config():
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])


def swin_config():
    return SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2)


def bert_config(**options):
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=32, **options)


def dense_labels(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)
    seg = torch.randint(0, 5, (batch, size, size), generator=g)
    seg[:, :4] = 255
    return {
        "seg": seg,
        "parts": torch.randint(0, 3, (batch, size, size), generator=g),
        "sal": torch.randint(0, 2, (batch, size, size), generator=g),
        "depth": torch.rand(batch, size, size, generator=g) * 10,
        "normals": normals,
        "edges": torch.randint(0, 2, (batch, 1, size, size), generator=g),
    }


def text_batch(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0
    tags = torch.randint(0, 4, (batch, length), generator=g)
    tags[mask == 0] = -100
    return {
        "input_ids": torch.randint(1, 50, (batch, length), generator=g),
        "attention_mask": mask,
        "sentiment": torch.randint(0, 3, (batch,), generator=g),
        "score": torch.randn(batch, generator=g),
        "tags": tags,
    }

"""Static loss weights come from the model: they change the training update, not only the reported loss."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from ddp_worker import ddp_args
from torch import nn
from transformers import BertConfig

import mtl_plugins
from mtl_plugins import runner
from mtl_plugins.architectures import HPS
from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel
from mtl_plugins.loop import make_closure, train_epoch
from mtl_plugins.loss_weights import strategy_for_model
from mtl_plugins.trainers import MultiTaskTrainer

LR = 0.1


def hps_model(loss_weights=None) -> HPS:
    torch.manual_seed(0)
    heads = {"a": nn.Linear(4, 3), "b": nn.Linear(4, 1)}
    return HPS(["a", "b"], encoder=nn.Sequential(nn.Linear(3, 4), nn.Tanh()), heads=heads,
               losses={"a": "cross_entropy", "b": "mse"}, loss_weights=loss_weights, input_name="x")


def hps_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 3, generator=g), "a": torch.randint(0, 3, (n,), generator=g),
            "b": torch.randn(n, generator=g)}


def text_model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    tasks = [{"name": "a", "kind": "sequence_classification", "num_outputs": 3},
             {"name": "b", "kind": "regression", "loss_weight": 10.0}]
    return MultiTaskModel(MultiTaskConfig(backbone_config=backbone, tasks=tasks))


def text_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 30, (n, 6), generator=g), "attention_mask": torch.ones(n, 6, dtype=torch.long),
            "a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, generator=g)}


def hand_sgd_step(model: nn.Module, batch, weights) -> dict[str, torch.Tensor]:
    """The parameters after one SGD step on ``sum_t w_t L_t``, cross-entropy and MSE written out (float64)."""
    reference = copy.deepcopy(model).double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items() if k not in ("a", "b")}
    logits = reference(**inputs).logits
    log_probs = logits["a"] - logits["a"].logsumexp(dim=1, keepdim=True)
    ce = -log_probs[torch.arange(len(batch["a"])), batch["a"]].mean()
    mse = ((logits["b"].reshape(-1) - batch["b"].double()) ** 2).mean()
    total = weights["a"] * ce + weights["b"] * mse
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return {n: p.detach() - LR * (g if g is not None else 0) for n, p, g in zip(names, params, grads)}


def trained_parameters(trainer: MultiTaskTrainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {n: p.detach().double() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make_model, make_batch", [(lambda: hps_model({"b": 10.0}), hps_batch),
                                                    (text_model, text_batch)])
def test_the_models_loss_weights_drive_the_trainer_update(tmp_path, make_model, make_batch):
    model, batch = make_model(), make_batch()
    assert model.loss_weights == {"a": 1.0, "b": 10.0}
    weighted = hand_sgd_step(model, batch, {"a": 1.0, "b": 10.0})
    unweighted = hand_sgd_step(model, batch, {"a": 1.0, "b": 1.0})
    data = datasets.Dataset.from_dict({k: v.numpy() for k, v in batch.items()}).with_format("torch")
    args = ddp_args(str(tmp_path / "out"), batch_size=len(data), steps=1, learning_rate=LR)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy="ew")
    assert trainer.strategy.loss_weights == {"a": 1.0, "b": 10.0}
    after = trained_parameters(trainer)
    for name, value in weighted.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6)
    assert max((after[n] - unweighted[n]).abs().max().item() for n in after) > 1e-3


def test_disagreeing_strategy_weights_are_an_error(tmp_path):
    model, batch = hps_model({"b": 10.0}), hps_batch()
    data = datasets.Dataset.from_dict({k: v.numpy() for k, v in batch.items()}).with_format("torch")
    args = ddp_args(str(tmp_path / "out"), batch_size=8, steps=1)
    with pytest.raises(ValueError, match="static loss weights come from the model"):
        MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy="ew",
                         strategy_options={"loss_weights": {"b": 2.0}})
    with pytest.raises(ValueError, match=r"the model's are \{'a': 1.0, 'b': 10.0\}"):
        MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=mtl_plugins.build_strategy("ew", ["a", "b"]))
    with pytest.raises(ValueError, match="static loss weights come from the model"):
        train_epoch(model, mtl_plugins.build_strategy("ew", ["a", "b"]), [batch], torch.optim.SGD(model.parameters()))
    # the same weights given twice agree
    agreeing = strategy_for_model("ew", model, ["a", "b"], {"loss_weights": {"a": 1.0, "b": 10.0}})
    assert agreeing.loss_weights == {"a": 1.0, "b": 10.0}


def test_plain_loop_and_recipes_build_strategies_with_the_models_weights():
    model, batch = hps_model({"b": 10.0}), hps_batch()
    strategy = strategy_for_model("pcgrad", model, ["a", "b"])
    assert strategy.loss_weights == {"a": 1.0, "b": 10.0}
    assert runner.make_strategy({"strategy": {"name": "ew"}}, ["a", "b"], model).loss_weights == {"a": 1.0, "b": 10.0}
    expected = hand_sgd_step(model, batch, {"a": 1.0, "b": 10.0})
    train_epoch(model, strategy_for_model("ew", model, ["a", "b"]), [batch], torch.optim.SGD(model.parameters(), lr=LR))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach().double(), expected[name], rtol=1e-5, atol=1e-6)
    # the closure hands the strategy the unweighted per-task losses
    losses = make_closure(model, batch)()
    torch.testing.assert_close(model(**batch).loss, losses["a"] + 10.0 * losses["b"])

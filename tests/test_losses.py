"""Each named loss against a hand computation (plain Python math, no torch.nn.functional)."""

import math

import pytest
import torch

from mtl_plugins.losses import (
    LOSSES,
    balanced_bce,
    cross_entropy,
    depth_l1,
    edge_bce,
    get_loss,
    l1,
    masked_cross_entropy,
    mse,
    normals_l1,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_masked_cross_entropy_ignores_255_on_maps():
    # 1 image, 2 classes, 1 x 3 pixels; the middle pixel is ignored.
    logits = torch.tensor([[[[0.0, 5.0, math.log(3.0)]], [[math.log(3.0), -2.0, 0.0]]]])
    target = torch.tensor([[[1, 255, 0]]])
    # pixel 0: p(class 1) = 3 / (1 + 3); pixel 2: p(class 0) = 3 / (3 + 1)
    expected = (-math.log(3 / 4) - math.log(3 / 4)) / 2
    assert masked_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_masked_cross_entropy_on_sequences_with_custom_ignore_index():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, -100])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert masked_cross_entropy(logits, target, ignore_index=-100).item() == pytest.approx(expected, rel=1e-6)


def test_masked_cross_entropy_all_ignored_is_zero_with_a_gradient_path():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_cross_entropy_rejects_out_of_range_labels_and_bad_shapes():
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 2\]"):
        masked_cross_entropy(torch.zeros(1, 3, 1, 2), torch.tensor([[[7, 255]]]))
    with pytest.raises(ValueError, match="do not match logits"):
        masked_cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))


def test_depth_l1_uses_valid_pixels_only():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # 0 marks missing depth and nan an unreadable pixel: only the first and the last pixel count
    target = torch.tensor([[[1.5, 0.0], [float("nan"), 2.5]]])
    assert depth_l1(prediction, target).item() == pytest.approx((0.5 + 1.5) / 2)
    # 255 is the ignore value
    target_255 = torch.tensor([[[[255.0, 2.0], [1.0, 1.0]]]])
    assert depth_l1(prediction, target_255).item() == pytest.approx((0.0 + 2.0 + 3.0) / 3)


def test_normals_l1_normalises_prediction_and_averages_per_pixel():
    # pixel 0 predicts (3, 0, 4) -> unit (0.6, 0, 0.8); label (0, 0, 1): |0.6| + 0 + |0.8 - 1| = 0.8
    # pixel 1 predicts (0, 2, 0) -> (0, 1, 0); label (0, 1, 0): 0
    # pixel 2 is ignored (one channel is 255)
    prediction = torch.tensor([[[[3.0, 0.0, 1.0]], [[0.0, 2.0, 1.0]], [[4.0, 0.0, 1.0]]]])
    target = torch.tensor([[[[0.0, 0.0, 255.0]], [[0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]]]])
    assert normals_l1(prediction, target).item() == pytest.approx((0.8 + 0.0) / 2, rel=1e-6)


def test_edge_bce_weights_positives_by_095():
    logits = torch.tensor([[[[0.5, -1.0, 2.0]]]])
    target = torch.tensor([[[1, 0, 255]]])
    w = 0.95
    expected = (-w * log_sigmoid(0.5) - (1 - w) * log_sigmoid(1.0)) / 2
    assert edge_bce(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert LOSSES["edge_bce"](logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_saliency_balanced_bce_weights_by_label_balance():
    # valid labels 1, 0, 0 (one ignored): w = share of negatives = 2 / 3
    logits = torch.tensor([[[[1.0, 0.0, -2.0, 3.0]]]])
    target = torch.tensor([[[[1, 0, 0, 255]]]])
    w = 2 / 3
    expected = (-w * log_sigmoid(1.0) - (1 - w) * log_sigmoid(-0.0) - (1 - w) * log_sigmoid(2.0)) / 3
    assert balanced_bce(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dense_losses_reject_label_shapes_that_do_not_match():
    with pytest.raises(ValueError, match="depth loss: labels of shape"):
        depth_l1(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="pos_weight must be in"):
        balanced_bce(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), pos_weight=1.5)


def test_get_loss_knows_the_dense_names():
    for name in ("masked_cross_entropy", "depth_l1", "normals_l1", "balanced_bce", "edge_bce"):
        assert get_loss(name) is LOSSES[name]
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        get_loss("dice")


def test_dense_regression_losses_count_every_signed_element():
    from mtl_plugins.losses import dense_l1, dense_mse

    # 1 x 2 x 1 x 2 maps: negative and zero labels are valid values, not missing ones
    prediction = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]]]])
    target = torch.tensor([[[[-0.5, 0.0]], [[1.0, -2.0]]]])
    errors = [0.5 - -0.5, -1.0 - 0.0, 2.0 - 1.0, 0.0 - -2.0]
    assert dense_l1(prediction, target).item() == pytest.approx(sum(abs(e) for e in errors) / 4)
    assert dense_mse(prediction, target).item() == pytest.approx(sum(e * e for e in errors) / 4)
    # an ignore value leaves out the elements equal to it (here the 0.0 label)
    assert dense_l1(prediction, target, ignore_index=0.0).item() == pytest.approx((1.0 + 1.0 + 2.0) / 3)
    # one channel: B x H x W labels match B x 1 x H x W predictions
    assert dense_l1(prediction[:, :1], target[:, 0]).item() == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="dense regression L1: labels of shape"):
        dense_l1(prediction, target[:, :1])
    assert get_loss("dense_mse") is dense_mse


def test_regression_losses_leave_out_the_ignore_value():
    prediction = torch.tensor([[1.0], [2.0], [3.0]])
    target = torch.tensor([0.0, -100.0, 5.0])  # B labels for B x 1 predictions
    assert mse(prediction, target, ignore_index=-100).item() == pytest.approx((1.0**2 + 2.0**2) / 2)
    assert l1(prediction, target, ignore_index=-100).item() == pytest.approx((1.0 + 2.0) / 2)
    # without an ignore value -100 is a label like any other
    assert mse(prediction, target).item() == pytest.approx((1.0 + 102.0**2 + 4.0) / 3)
    # B x C labels: each element is left out on its own
    two = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    labels = torch.tensor([[0.0, -100.0], [-100.0, 6.0]])
    assert mse(two, labels, ignore_index=-100).item() == pytest.approx((1.0 + 4.0) / 2)
    assert l1(two, labels, ignore_index=-100).item() == pytest.approx((1.0 + 2.0) / 2)


def test_regression_losses_with_every_label_ignored_are_zero_with_a_gradient_path():
    prediction = torch.tensor([[0.5], [1.5]], requires_grad=True)
    loss = mse(prediction, torch.full((2,), -100.0), ignore_index=-100)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prediction.grad, torch.zeros(2, 1))


def test_regression_losses_reject_label_shapes_that_do_not_match():
    prediction = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"MSE loss: labels of shape \(4,\) do not match predictions of shape \(2, 2\)"):
        mse(prediction, torch.zeros(4))
    with pytest.raises(ValueError, match=r"L1 loss: labels of shape \(1, 4\) do not match predictions of shape \(2, 2\)"):
        l1(prediction, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not match predictions of shape \(2, 1\)"):
        mse(torch.zeros(2, 1), torch.zeros(3))  # would broadcast to 2 x 3 without the check
    # B labels for B predictions with a trailing size-1 dim, and the other way round
    assert mse(torch.tensor([1.0, 2.0]), torch.tensor([[0.0], [0.0]])).item() == pytest.approx(2.5)


def test_class_labels_given_as_floats_must_be_whole_numbers():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    whole = torch.tensor([0.0, 2.0])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(cross_entropy(logits, whole), expected)
    torch.testing.assert_close(masked_cross_entropy(logits, whole), expected)
    for loss in (cross_entropy, masked_cross_entropy):
        with pytest.raises(ValueError, match="whole numbers"):
            loss(logits, torch.tensor([0.0, 1.7]))  # .long() would have trained on class 1


def test_each_task_kind_names_its_losses_and_accepts_their_long_names():
    from mtl_plugins.losses import KIND_LOSSES, loss_for_kind

    assert loss_for_kind("dense_regression") is LOSSES["dense_l1"]
    assert loss_for_kind("dense_regression", "dense_mse") is loss_for_kind("dense_regression", "mse") is LOSSES["dense_mse"]
    assert loss_for_kind("semantic_segmentation", "masked_cross_entropy") is LOSSES["masked_cross_entropy"]
    assert loss_for_kind("classification") is LOSSES["cross_entropy"]
    with pytest.raises(ValueError, match=r"task kind 'depth' trains with one of \['depth_l1'\], got loss='mse'"):
        loss_for_kind("depth", "mse")
    with pytest.raises(ValueError, match="unknown task kind 'dice'"):
        loss_for_kind("dice")
    # token logits are B x T x C: the cross-entropy of every labelled token
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.tensor([[0, 3, -100], [1, 2, 2]])
    keep = target != -100
    expected = -torch.log_softmax(logits, dim=-1)[keep].gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(KIND_LOSSES["token_classification"]["cross_entropy"](logits, target), expected)


def test_every_builtin_dataset_asks_for_a_loss_its_task_kinds_train_with():
    from mtl_plugins.data import drug_reviews, multidigits
    from mtl_plugins.data.dense import cityscapes, nyud, pascal_context, taskonomy
    from mtl_plugins.losses import loss_for_kind

    specs = [*multidigits.TASKS.values(), *drug_reviews.task_specs(3).values(), *cityscapes.TASKS.values(),
             *nyud.TASKS.values(), *pascal_context.TASKS.values(), *taskonomy.TASKS.values()]
    for spec in specs:
        assert callable(loss_for_kind(spec.kind, spec.loss)), spec  # raises for a loss the kind lacks


def test_cross_entropy_names_expected_label_shape_and_class_range():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) do not match logits of shape \(4, 3\): "
                                         r"expected class indices of shape \(4,\)"):
        cross_entropy(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \[-2, 3\] are outside \[0, 2\]"):
        cross_entropy(logits, torch.tensor([0, 3, -2, 1]))
    # ignore_index stays allowed: the mean is over the other labels
    expected = math.log(3.0)
    assert cross_entropy(logits, torch.tensor([0, -100, 2, 1])).item() == pytest.approx(expected, rel=1e-6)

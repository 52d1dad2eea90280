"""Log volume: strategy scalars summarised by default, all of them on request; matrices as images."""

import numpy as np
import pytest
from ddp_worker import TASKS, vector_data, vector_model
from transformers.integrations import TensorBoardCallback

import mtl_plugins
from mtl_plugins.trainers import MultiTaskTrainer, MultiTaskTrainingArguments


class CapturingWriter:
    def __init__(self):
        self.images = []

    def add_image(self, name, image, step, dataformats):
        self.images.append((name, image, step, dataformats))


class FakeTensorBoard(TensorBoardCallback):
    """A TensorBoard reporter whose writer records images (tensorboard itself is not needed)."""

    def __init__(self, writer):
        self.tb_writer = writer

    def on_train_begin(self, *args, **kwargs):
        pass

    def on_log(self, *args, **kwargs):
        pass

    def on_train_end(self, *args, **kwargs):
        pass


def train(tmp_path, callbacks=(), **args):
    arguments = MultiTaskTrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2,
                                           per_device_train_batch_size=8, report_to="none", use_cpu=True,
                                           disable_tqdm=True, **args)
    strategy = mtl_plugins.build_strategy("sel_update", TASKS, warmup_steps=0, affinity_decay=0.5)
    trainer = MultiTaskTrainer(model=vector_model(), args=arguments, train_dataset=vector_data(32),
                               strategy=strategy, callbacks=list(callbacks))
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_logs_carry_a_summary_and_the_affinity_as_an_image(tmp_path):
    writer = CapturingWriter()
    trainer, logs = train(tmp_path, [FakeTensorBoard(writer)])
    full = trainer.last_strategy_log
    assert any(k.startswith("affinity/a->") for k in full)  # what the full log has
    last = logs[-1]
    assert not any("->" in k or k.startswith(("group/", "loss_decrease/")) for k in last)
    off = [full["affinity/a->b"], full["affinity/b->a"]]
    assert last["affinity/mean"] == pytest.approx(np.mean(off)) and last["affinity/min"] == min(off)
    assert last["affinity/max"] == max(off) and last["num_groups"] == full["num_groups"]
    assert [(name, step, fmt) for name, _, step, fmt in writer.images] == [("sel_update/affinity", 2, "HWC"),
                                                                           ("sel_update/affinity", 4, "HWC")]
    image = writer.images[-1][1]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    affinity = trainer.strategy.affinity.numpy()
    for i in range(2):
        for j in range(2):
            red, _, blue = image[16 * i + 8, 16 * j + 8].astype(int)
            if affinity[i, j] > 0:
                assert red > blue
            elif affinity[i, j] < 0:
                assert blue > red


def test_full_strategy_logs_on_request(tmp_path):
    _, logs = train(tmp_path, strategy_log="full")
    assert {"affinity/a->b", "affinity/b->a", "group/a", "group/b"} <= set(logs[-1])
    with pytest.raises(ValueError, match="strategy_log must be one of"):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), strategy_log="everything")

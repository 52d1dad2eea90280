"""Plots: readable axes, labelled colour bars, the Phase 1 -> 2 mark, train and validation curves."""

import json

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mtl_plugins import plots  # noqa: E402


@pytest.fixture
def kept_figure(monkeypatch):
    """The plotting functions close their figure: keep it open to look at it."""
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    yield lambda: plt.gcf()
    plt.close("all")


def test_number_of_groups_has_integer_ticks(tmp_path, kept_figure):
    plots.plot_series([0, 3, 4, 9], {"groups": [4, 4, 2, 2]}, tmp_path / "g.png", "groups", "groups", integer=True)
    ax = kept_figure().axes[0]
    assert all(float(t).is_integer() for t in ax.get_yticks()) and all(float(t).is_integer() for t in ax.get_xticks())


def test_heatmap_has_a_labelled_colour_bar_and_a_note(tmp_path, kept_figure):
    plots.plot_heatmap([[0.0, 0.2], [-0.1, 0.0]], ["a", "b"], tmp_path / "h.png", "affinity",
                       colorbar_label="affinity (relative loss decrease)", note="row s, column t")
    fig = kept_figure()
    assert fig.axes[1].get_ylabel() == "affinity (relative loss decrease)"
    assert [t.get_text() for t in fig.texts] == ["row s, column t"]


def test_priority_plot_marks_the_phase_switch_and_has_legends(tmp_path, kept_figure):
    timeline = [{"step": s, "overall": [0.5, 0.5], "layers": {"encoder.0": [0.6, 0.4]}, "phase": p}
                for s, p in ((1, 1), (5, 1), (6, 2), (9, 2))]
    plots.plot_priority(timeline, ["a", "b"], tmp_path / "p.png")
    left, right = kept_figure().axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["a", "b", "Phase 1 -> 2 (step 6)"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["a", "b"]
    assert any(list(line.get_xdata()) == [6, 6] for line in left.get_lines())


def test_loss_curves_show_train_and_validation_loss(tmp_path, kept_figure):
    records = [{"step": s, "loss": 2.0 / s, "loss/a": 1.0 / s} for s in (1, 2, 3, 4)]
    plots.plot_loss_curves(records, ["a"], tmp_path / "l.png", evaluations=[{"step": 2, "eval_loss": 1.2},
                                                                          {"step": 4, "eval_loss": 0.9}])
    total = kept_figure().axes[-1]
    train, validation = total.get_lines()
    assert (train.get_label(), validation.get_label()) == ("train", "validation")
    assert list(validation.get_xdata()) == [2, 4] and list(validation.get_ydata()) == [1.2, 0.9]
    with pytest.raises(ValueError, match="no training logs"):
        plots.plot_loss_curves([], ["a"], tmp_path / "empty.png")


def test_a_run_shorter_than_logging_steps_warns_instead_of_an_empty_plot(tmp_path, capsys):
    from mtl_plugins.cli import main

    out = tmp_path / "run"
    assert main(["quickstart", "strategy=ew", "data.train_size=64", "data.eval_size=32", "data.validation_size=16",
                 "training.max_steps=2", "training.logging_steps=10", "--baselines", "skip", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert not (out / "loss_curves.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert "loss_curves.png" not in results["plots"]
    assert results["warnings"] == ["no training loss was logged (2 steps < logging_steps=10): no loss_curves.png; "
                                   "set training.logging_steps to at most the number of steps"]
    assert f"mtl-train: warning: {results['warnings'][0]}" in capsys.readouterr().err

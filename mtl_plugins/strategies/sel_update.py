"""Selective task group updates (Jeong & Yoon, ICLR 2025).

Every batch is used for several sequential updates, one per task group. The groups come from the
proximal inter-task affinity ``A`` (row = source task whose group was updated, column = target task
whose loss was measured), an EMA of how much each group step lowered every task's loss on the
batch, clustered by affinity propagation (:mod:`mtl_plugins.grouping`).

With ``loss_scaling`` (:mod:`~mtl_plugins.strategies.loss_scaling`) a group's loss is
``sum_t lambda_t w_t L_t`` with the batch's weights ``lambda``; the affinity is still measured on the
per-task losses ``L_t`` (``lambda`` and ``w`` are constant within a batch, so ``1 - L'_t / L_t`` does
not change with them).

Non-finite values: a NaN or infinite group loss gives a non-finite gradient, which the updater
refuses before the step (or a loss scaler skips); that group's losses are then read and
:class:`NonFiniteLossError` is raised, so the model and optimizer keep their state from before the
bad step (a finite loss with a non-finite gradient raises :class:`NonFiniteGradientError`). The
losses of the other passes are read once, at the batch's end. Either way the affinity, groups,
history and counters are left unchanged (earlier group steps of the batch, counted in the message,
stay applied).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..grouping import (
    AFFINITY_DTYPES,
    COLUMN_SCALINGS,
    RETRY_RULES,
    AffinityDtype,
    ColumnScaling,
    Grouping,
    RetryRule,
    check_option,
    choose_groups,
)
from ..registry import register_strategy
from .base import (
    Closure,
    NonFiniteLossError,
    Strategy,
    Updater,
    as_updater,
    checked_step,
)

logger = logging.getLogger(__name__)


def update_affinity(affinity: Tensor, before: Sequence[float], after: Sequence[float], group: Sequence[int],
                    decay: float) -> None:
    """EMA update (in place) of the rows of ``group`` for one group step that moved the losses
    from ``before`` to ``after``, with the sign rules of the proximal inter-task affinity.

    The values ``v`` are computed in float64; the EMA ``(1 - decay) * A + (decay * v)`` in the
    affinity's dtype, ``decay * v`` rounded to it first (the released code's float32 arithmetic)."""
    prev = torch.tensor(before, dtype=torch.float64)
    post = torch.tensor(after, dtype=torch.float64)
    valid = prev > 0  # a non-positive loss is no baseline
    ratio = torch.where(valid, (1 - post / torch.where(valid, prev, 1.0)) / len(group), 0.0)
    rows = torch.tensor(list(group))
    in_group = torch.zeros_like(valid)
    in_group[rows] = True
    r_s = ratio[rows, None]  # one row per source task s of the group, one column per target t
    inside = torch.where(ratio * r_s >= 0, ratio, -torch.maximum(ratio, r_s))
    value = torch.where(in_group, inside, ratio)
    update = valid & (~in_group | valid[rows, None])
    own = torch.arange(len(rows))
    value[own, rows] = ratio[rows]
    update[own, rows] = valid[rows] & (ratio[rows] >= 0)
    old = affinity[rows]
    affinity[rows] = torch.where(update, (1 - decay) * old + (decay * value).to(affinity.dtype), old)


@register_strategy("sel_update")
class SelectiveGroupUpdate(Strategy):
    """Sequential updates of affinity-based task groups on every batch.

    Options: ``affinity_decay`` (EMA rate beta), ``warmup_steps`` (singleton groups while the batch
    counter read before increment is ``<= warmup_steps``), ``attribution`` (``"paper"``: a group's
    own step is credited to its rows; ``"reference"``: the released code's crediting of the previous
    step to the current group), ``measure_last`` (paper mode: one extra no-grad forward pass to
    measure the last group's step), ``group_loss_norm`` (divide a group's loss by its size),
    ``preference`` (affinity-propagation preference, ``None`` = median), ``history_window``
    (number of per-batch records kept in :attr:`history`), ``column_scaling`` (``"spec"``: every
    column divided by its self-affinity; ``"released"``: the released code's in-place scaling,
    which leaves entries below the diagonal unscaled, see :func:`~mtl_plugins.grouping.scaled_affinity`),
    ``freeze_idle_tasks`` (``False`` gives the parameters of tasks outside the group a zero
    gradient once they have had a gradient, as the released code's ``zero_grad()`` did under torch
    1.13, so Adam's momentum and weight decay move them after their task's first update),
    ``affinity_dtype`` (``"float64"``, or ``"float32"``: the released code's precision for the
    affinity matrix, its EMA, scaling and clustering input), ``retry_rule`` (``"spec"``: a retried
    clustering also gets more iterations; ``"released"``: the released code's fixed ``max_iter``, so
    only two of the ten fits can converge; see :mod:`mtl_plugins.grouping`).

    The released code's behaviour: ``attribution="reference"``, ``column_scaling="released"``,
    ``freeze_idle_tasks=False``, ``affinity_dtype="float32"`` and ``retry_rule="released"``. Its
    random draws (group order, clustering noise) came from Python's and NumPy's global RNGs, so they
    cannot be matched draw for draw; everything else then follows it.

    Observable state: :attr:`affinity` (K x K in ``affinity_dtype``, task order as given), :attr:`groups` (the
    latest batch's partition), :attr:`history` (the last ``history_window`` batches, each a dict with
    ``step`` (batch counter before increment), ``order`` (groups in update order; a single group
    twice), ``losses`` (per forward pass, the per-task losses in task order; one more with
    ``measure_last``), ``applied`` (whether each optimizer step was applied) and ``affinity``).

    The updater's ``zero_grad`` must set gradients to ``None``: parameters outside the current group
    then receive no gradient and torch optimizers (Adam's momentum and weight decay included) leave
    them untouched (unless ``freeze_idle_tasks=False``). The extra forward pass of ``measure_last``
    runs in the model's current (training) mode, like the others, so it also updates BatchNorm
    running statistics.
    """

    accepts_loss_scaling = True
    needs_positive_loss_weights = True
    #: What :meth:`state_dict` saves besides the base state.
    _state_names = ("affinity", "groups", "history", "group_count_changes", "clustering_failures", "grouping_note",
                    "last_loss_decrease", "gradient_seen")

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        affinity_decay: float = 0.001,
        warmup_steps: int = 100,
        attribution: Literal["paper", "reference"] = "paper",
        measure_last: bool = False,
        group_loss_norm: bool = False,
        preference: float | None = None,
        history_window: int = 1000,
        column_scaling: ColumnScaling = "spec",
        freeze_idle_tasks: bool = True,
        affinity_dtype: AffinityDtype = "float64",
        retry_rule: RetryRule = "spec",
        loss_weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if not 0 < affinity_decay <= 1:
            raise ValueError(f"affinity_decay must be in (0, 1], got {affinity_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if attribution not in ("paper", "reference"):
            raise ValueError(f"attribution must be 'paper' or 'reference', got {attribution!r}")
        if measure_last and attribution == "reference":
            raise ValueError("measure_last applies to attribution='paper' only "
                             "(the released code measures no last step)")
        if history_window < 1:
            raise ValueError(f"history_window must be >= 1, got {history_window}")
        check_option("column_scaling", column_scaling, COLUMN_SCALINGS)
        check_option("affinity_dtype", affinity_dtype, AFFINITY_DTYPES)
        check_option("retry_rule", retry_rule, RETRY_RULES)
        if preference is not None and not math.isfinite(preference):
            raise ValueError(f"preference must be finite or None, got {preference}")
        self.affinity_decay = float(affinity_decay)
        self.warmup_steps = int(warmup_steps)
        self.attribution = attribution
        self.measure_last = bool(measure_last)
        self.group_loss_norm = bool(group_loss_norm)
        self.preference = None if preference is None else float(preference)
        self.history_window = int(history_window)
        self.column_scaling: ColumnScaling = column_scaling
        self.freeze_idle_tasks = bool(freeze_idle_tasks)
        self.affinity_dtype: AffinityDtype = affinity_dtype
        self.retry_rule: RetryRule = retry_rule
        k = len(self.tasks)
        #: K x K in ``affinity_dtype``: row = source task (its group was updated), column = target task.
        self.affinity = torch.zeros(k, k, dtype=getattr(torch, affinity_dtype))
        #: Groups of the latest batch (singletons before and during warm-up).
        self.groups: list[list[str]] = [[t] for t in self.tasks]
        #: Per-batch records: step, order, losses (per forward pass, task order), applied, affinity.
        self.history: deque[dict[str, Any]] = deque(maxlen=self.history_window)
        #: (step, number of groups) each time the number of groups changes.
        self.group_count_changes: list[tuple[int, int]] = []
        self.clustering_failures = 0
        self.grouping_note = ""
        #: Per task: decrease of its loss over its own group's latest measured step.
        self.last_loss_decrease: dict[str, float] = {}
        #: Positions (in the updater's parameter list) of the parameters that have had a gradient.
        self.gradient_seen: list[int] = []

    # -- one batch ------------------------------------------------------------------------------
    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        """One batch: a forward pass and an optimizer step per group, in a random group order, then
        the affinity update from the losses read once. Returns the losses of the first forward pass."""
        closure, updater = self.begin_batch(closure, as_updater(optimizer))
        step = self.num_steps
        # The first forward pass does not depend on the groups; on an accelerator it runs while the
        # host clusters.
        losses = closure()
        grouping = self._choose_groups(warmup=step <= self.warmup_steps)
        groups = grouping.groups
        order = [groups[i] for i in torch.randperm(len(groups), generator=self.generator).tolist()]
        if len(order) == 1:
            order = order * 2  # a single group is updated twice, as in the released code
        groups, order = updater.agree((groups, order))

        passes: list[Tensor] = []
        applied: list[bool] = []
        for j, group in enumerate(order):
            if j > 0:
                losses = closure()
            passes.append(self._loss_vector(losses))
            updater.zero_grad()
            self._check_cleared(updater)
            loss = self.weighted_loss(losses, group)
            if self.group_loss_norm:
                loss = loss / len(group)
            updater.backward(loss)
            if not self.freeze_idle_tasks:
                self._zero_fill_gradients(updater)
            where = functools.partial("sel_update batch {}, group {} (forward pass {}, {} earlier group steps applied): "
                                      .format, step, group, j, j)
            # a non-finite group loss ends here, before the step
            done = bool(checked_step(updater, closure, group, where, final=j == len(order) - 1 and not self.measure_last,
                                     on_error=functools.partial(self._check_pass, passes[-1], j, order, step, updater)))
            if not done:  # skipped by a loss scaler: stop if this pass's losses were the cause
                self._check_pass(passes[-1], j, order, step, updater)
            applied.append(done)
        if self.measure_last:
            with torch.no_grad():
                passes.append(self._loss_vector(closure()))
        values = torch.stack(passes)
        updater.reduce_([values])
        rows: list[list[float]] = values.tolist()  # the batch's one host synchronisation
        for j, row in enumerate(rows):
            self._check_finite(row, j, order, step)

        index = {t: i for i, t in enumerate(self.tasks)}
        for before, after, group in self._measurements(rows, order, applied):
            update_affinity(self.affinity, before, after, [index[t] for t in group], self.affinity_decay)
        self._commit(step, groups, order, rows, applied, grouping)
        self.end_batch()
        return dict(zip(self.tasks, rows[0]))

    def _choose_groups(self, warmup: bool) -> Grouping:
        if warmup:
            return Grouping([[t] for t in self.tasks])
        random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        return choose_groups(self.affinity, self.tasks, self.groups, preference=self.preference,
                             random_state=random_state, column_scaling=self.column_scaling,
                             dtype=self.affinity_dtype, retry_rule=self.retry_rule)

    def _measurements(self, rows: list[list[float]], order: list[list[str]], applied: list[bool]):
        """(losses before, losses after, credited group) for each measured group step."""
        if self.attribution == "paper":
            return [(rows[j], rows[j + 1], order[j]) for j in range(len(rows) - 1) if applied[j]]
        return [(rows[j - 1], rows[j], order[j]) for j in range(1, len(order)) if applied[j - 1]]

    def _commit(self, step: int, groups: list[list[str]], order: list[list[str]], rows: list[list[float]],
                applied: list[bool], grouping: Grouping) -> None:
        if grouping.kept_previous:
            self.clustering_failures += 1
            if grouping.reason != self.grouping_note:
                logger.warning("sel_update step %d: keeping the previous groups %s: %s", step, groups, grouping.reason)
        self.grouping_note = grouping.reason
        self.groups = [list(g) for g in groups]
        self.history.append({"step": step, "order": [list(g) for g in order], "losses": rows, "applied": applied,
                             "affinity": self.affinity.clone()})
        if not self.group_count_changes or self.group_count_changes[-1][1] != len(groups):
            self.group_count_changes.append((step, len(groups)))
        index = {t: i for i, t in enumerate(self.tasks)}
        for j in range(min(len(order), len(rows) - 1)):
            if applied[j]:
                for t in order[j]:
                    self.last_loss_decrease[t] = rows[j][index[t]] - rows[j + 1][index[t]]
        self.num_steps += 1

    def _loss_vector(self, losses: Mapping[str, Tensor]) -> Tensor:
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"the closure returned no loss for tasks {missing}; got {sorted(losses)}")
        values = [losses[t].detach().reshape(()) for t in self.tasks]
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in values), torch.float32)
        return torch.stack([v.to(dtype) for v in values])  # float64 losses keep their precision

    def _zero_fill_gradients(self, updater: Updater) -> None:
        """torch 1.13's ``zero_grad()``: a parameter has no gradient until its first backward, then a
        zero one whenever the group's loss does not reach it."""
        seen = set(self.gradient_seen)
        for i, p in enumerate(updater.params):
            if p.grad is not None:
                seen.add(i)
            elif i in seen:
                p.grad = torch.zeros_like(p)
        self.gradient_seen = sorted(seen)

    @staticmethod
    def _check_cleared(updater: Updater) -> None:
        if any(p.grad is not None for p in updater.params):
            raise RuntimeError("sel_update needs zero_grad() to set gradients to None: zero-filled gradients let "
                               "Adam's momentum and weight decay move the parameters of tasks outside the group")

    def _check_pass(self, values: Tensor, j: int, order: list[list[str]], step: int, updater: Updater) -> None:
        """After a failed or skipped step (rare): check forward pass ``j``'s losses, averaged over processes."""
        values = values.clone()
        updater.reduce_([values])
        self._check_finite(values.tolist(), j, order, step, stopped=True)

    def _check_finite(self, row: list[float], j: int, order: list[list[str]], step: int, stopped: bool = False) -> None:
        """Raise :class:`NonFiniteLossError` if forward pass ``j``'s losses hold a NaN or inf; ``stopped``:
        group ``j``'s step was not taken."""
        bad = [t for t, v in zip(self.tasks, row) if not math.isfinite(v)]
        if not bad:
            return
        if stopped:
            where = (f"before updating group {order[j]}: that step was not taken, so the model and optimizer were "
                     f"not updated by it ({j} earlier group steps of this batch were applied)")
        else:
            where = (f"before updating group {order[j]}" if j < len(order) else "after the last group step") + \
                    "; the batch's group steps were applied"
        raise NonFiniteLossError(f"sel_update batch {step}: non-finite loss for tasks {bad} in forward pass {j} "
                                 f"({where}): {dict(zip(self.tasks, row))}; the affinity was not updated")

    # -- reporting ------------------------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        """Number of groups, each task's group index, the affinity entries and the loss decreases."""
        metrics: dict[str, float] = {**super().log_metrics(), "num_groups": float(len(self.groups)),
                                     "clustering_failures": float(self.clustering_failures)}
        for i, group in enumerate(self.groups):
            for t in group:
                metrics[f"group/{t}"] = float(i)
        for i, s in enumerate(self.tasks):
            for j, t in enumerate(self.tasks):
                metrics[f"affinity/{s}->{t}"] = float(self.affinity[i, j])
        metrics.update({f"loss_decrease/{t}": v for t, v in self.last_loss_decrease.items()})
        return metrics

    def summarize_log(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Number of groups, clustering failures and the mean, min and max off-diagonal affinity."""
        kept = {k: v for k, v in metrics.items() if not k.startswith(("affinity/", "group/", "loss_decrease/"))}
        k = len(self.tasks)
        if k > 1:
            off = self.affinity[~torch.eye(k, dtype=torch.bool)].double()
            kept.update({"affinity/mean": float(off.mean()), "affinity/min": float(off.min()),
                         "affinity/max": float(off.max())})
        return kept

    def log_images(self) -> dict[str, Any]:
        """``affinity``: the inter-task affinity matrix (row: source task, column: target task)."""
        return {"sel_update/affinity": self.affinity.double().numpy()}

    def group_count_series(self) -> tuple[list[int], list[int]]:
        """(steps, number of groups) as a step function over every batch so far."""
        steps: list[int] = []
        counts: list[int] = []
        changes = self.group_count_changes
        for i, (start, count) in enumerate(changes):
            end = changes[i + 1][0] - 1 if i + 1 < len(changes) else self.num_steps - 1
            steps += [start, end]
            counts += [count, count]
        return steps, counts

    def card_fields(self) -> dict[str, Any]:
        """``task_groups``: the latest batch's groups."""
        return {**super().card_fields(), "task_groups": [list(g) for g in self.groups]}

    def write_plots(self, out_dir: str | Path) -> list[Path]:
        """``sel_update_affinity.png`` (heatmap) and ``sel_update_num_groups.png`` (timeline)."""
        from ..plots import plot_heatmap, plot_series

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        heatmap = plot_heatmap(self.affinity.numpy(), self.tasks, out / "sel_update_affinity.png",
                               title=f"Inter-task affinity ({self.num_steps} batches)",
                               xlabel="target task (loss measured)", ylabel="source task (group updated)",
                               colorbar_label="affinity (relative loss decrease)",
                               note="Row s, column t: how much updating s's group lowered t's loss, relative to "
                                    "t's loss (decayed average); positive helps, negative hurts.")
        steps, counts = self.group_count_series()
        timeline = plot_series(steps, {"groups": counts}, out / "sel_update_num_groups.png",
                               title="Number of task groups", ylabel="groups", integer=True)
        return [heatmap, timeline]

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Affinity, groups, counters, history window and RNG (plain containers: loads with weights_only)."""
        state = copy.deepcopy({name: getattr(self, name) for name in self._state_names})
        state["history"] = list(state["history"])
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        affinity = state.get("affinity")
        k = len(self.tasks)
        if not isinstance(affinity, Tensor) or tuple(affinity.shape) != (k, k):
            shape = tuple(affinity.shape) if isinstance(affinity, Tensor) else type(affinity).__name__
            raise ValueError(f"sel_update state has affinity {shape}, expected a {k} x {k} tensor "
                             f"for tasks {self.tasks}")
        grouped = sorted(t for g in state.get("groups", []) for t in g)
        if grouped != sorted(self.tasks):
            raise ValueError(f"sel_update state has groups {state.get('groups')}, which do not partition "
                             f"tasks {self.tasks}")
        if "gradient_seen" not in state and not self.freeze_idle_tasks:
            raise KeyError("sel_update state has no gradient_seen (which parameters have had a gradient), "
                           "needed with freeze_idle_tasks=False")
        state = {"gradient_seen": [], **state}
        super().load_state_dict(state)
        for name in self._state_names:
            setattr(self, name, copy.deepcopy(state[name]))
        self.affinity = self.affinity.to(getattr(torch, self.affinity_dtype))
        self.history = deque(self.history, maxlen=self.history_window)

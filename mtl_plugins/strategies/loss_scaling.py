"""Loss scaling: a loss weighting composed with an update method (``loss_scaling`` option).

Every update method (``sel_update``, ``conn_strength``, the gradient aggregators) takes
``loss_scaling``: a loss weighting's name (``"uw"``) or ``{"name": "uw", "options": {...}}``. Its
weights ``lambda_t`` multiply the task losses before the method uses them: wherever the method
would use ``w_t L_t`` (``w_t`` the static loss weights), it uses ``lambda_t w_t L_t``
(:attr:`~mtl_plugins.strategies.base.Strategy.task_weights`).

One batch, whatever the method does with it:

1. **Weights, once per batch.** At the method's first forward pass the weighting reads the batch's
   losses at the parameters before any update (``w_t L_t``, averaged across processes) and computes
   ``lambda`` from them, updating its own state (DWA's loss history, RLW's draw) exactly as when it
   runs alone. A method whose first forward pass is ``closure()`` (``sel_update``, aggregators on
   models without task-specific connections) lends it that pass; one whose first pass runs a single
   task (``conn_strength``, aggregators on models with task-specific connections) gets one extra
   forward pass without gradient for all tasks first (it also updates BatchNorm running
   statistics). ``ew`` (static weights 1) reads nothing: the composed method then equals the bare
   one exactly. The weights stay fixed for every step of the batch (``sel_update``'s group steps,
   ``conn_strength``'s Phase 1 per-task steps).
2. **The method's update**, with ``lambda_t w_t L_t``.
3. **The weighting's learned state, once per batch**, after the method's last step: UW's
   log-variances and FAMO's logits take one step of their own Adam (the weighting's ``lr`` and
   ``weight_decay`` options) only if every optimizer step of the batch was applied (an fp16 overflow
   leaves them unchanged: the composed strategy has ``needs_step_outcome``, so trainers report every
   step). These parameters belong to the weighting, not to the model: they are in no parameter
   group of the model's optimizer, ``lr_ts``, the lr scheduler and gradient clipping do not apply
   to them, and they are saved with the strategy state.

``sel_update``'s affinity stays measured on the per-task losses ``L_t``: ``lambda_t`` and ``w_t`` are
constant within a batch, so the ratio ``1 - L'_t / L_t`` is the same on ``L_t``, ``w_t L_t`` and
``lambda_t w_t L_t``; the weighting changes how each group step moves the parameters, not how a
step's effect is measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Closure, NonFiniteLossError, Updater

#: Loss weightings that cannot scale an update method's losses, and why.
REFUSED = {"gradnorm": "it trains its weights from per-task gradient norms inside its own update"}


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"uw"`` or ``{"name": "uw", "options": {...}}`` -> ``("uw", {...})``."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"loss_scaling must be a loss weighting's name or {{name: ..., options: {{...}}}}, got {spec!r}")
    unknown = sorted(set(spec) - {"name", "options"})
    if unknown or not isinstance(spec.get("name"), str):
        raise ValueError(f"loss_scaling {dict(spec)!r}: expected keys 'name' (a loss weighting) and optional "
                         f"'options'{f', got unknown keys {unknown}' if unknown else ''}")
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise TypeError(f"loss_scaling options must be a mapping, got {options!r}")
    return spec["name"], dict(options)


class StepRecorder(Updater):
    """An :class:`Updater` that forwards everything to ``inner`` and records whether each step was applied."""

    def __init__(self, inner: Updater):  # no optimizer of its own: everything goes to inner
        self.inner = inner
        self.applied: list[bool] = []

    averages_gradients = property(lambda self: self.inner.averages_gradients)  # type: ignore[assignment]
    optimizer = property(lambda self: self.inner.optimizer)  # type: ignore[assignment]
    max_grad_norm = property(lambda self: self.inner.max_grad_norm)  # type: ignore[assignment]

    @property
    def params(self) -> list[Tensor]:
        return self.inner.params

    @property
    def loss_scale(self) -> float:
        return self.inner.loss_scale

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.inner.backward(loss, **kwargs)

    def step(self, final: bool = False) -> bool:
        applied = self.inner.step(final=final) is not False
        self.applied.append(applied)
        return applied

    def reduce_(self, tensors: Sequence[Tensor]) -> None:
        self.inner.reduce_(tensors)

    def agree(self, value: Any) -> Any:
        return self.inner.agree(value)


class LossScaling:
    """The loss weighting of a composed strategy: per-batch weights and the weighting's own state."""

    def __init__(self, spec: str | Mapping[str, Any], tasks: Sequence[str], loss_weights: Mapping[str, float],
                 seed: int = 0):
        from .. import build_strategy
        from ..registry import STRATEGIES
        from .ew import EqualWeighting
        from .weightings.base import LossWeighting

        name, options = parse_spec(spec)
        canonical = STRATEGIES.resolve(name)
        cls = STRATEGIES.get(canonical)
        accepted = sorted(n for n, c in ((n, STRATEGIES.get(n)) for n in STRATEGIES.available())
                          if n not in REFUSED and (c is EqualWeighting or issubclass(c, LossWeighting)))
        if canonical in REFUSED or not (cls is EqualWeighting or issubclass(cls, LossWeighting)):
            why = REFUSED.get(canonical, "it is not a loss weighting")
            raise ValueError(f"loss_scaling {canonical!r} cannot scale the losses ({why}); "
                             f"loss weightings: {', '.join(accepted)}")
        for key in ("loss_weights", "seed"):
            if key in options:
                raise ValueError(f"loss_scaling options take no {key!r}: the weighting gets the update method's "
                                 f"{key} (static loss weights come from the model)")
        self.name, self.options = canonical, options
        self.weighting = build_strategy(canonical, tasks, loss_weights=dict(loss_weights), seed=seed, **options)
        self.tasks = list(tasks)
        self.static = {t: float(loss_weights[t]) for t in self.tasks}
        #: ``lambda_t w_t`` of the current batch (updated in place: methods may hold this mapping).
        self.task_weights: dict[str, float] = dict(self.static)
        self.reads_losses = isinstance(self.weighting, LossWeighting)
        self._closure: Closure | None = None
        self._recorder: StepRecorder | None = None
        self._values: Tensor | None = None

    @property
    def needs_step_outcome(self) -> bool:
        return bool(self.weighting.needs_step_outcome)

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``: plain values, as a recipe writes it."""
        return {"name": self.name, "options": dict(self.options)}

    # -- one batch ---------------------------------------------------------------------------
    def begin(self, closure: Closure, updater: Updater) -> tuple[Closure, Updater]:
        """The closure and updater the method uses for this batch (see the module docstring)."""
        self._closure, self._values = closure, None
        self._recorder = StepRecorder(updater)
        if not self.reads_losses:
            return closure, self._recorder

        def scaled_closure(task: str | None = None) -> Mapping[str, Tensor]:
            if self._values is None and task is None:
                losses = closure()
                self._read(losses)
                return losses
            if self._values is None:
                with torch.no_grad():
                    self._read(closure())
            return closure() if task is None else closure(task=task)

        return scaled_closure, self._recorder

    def _read(self, losses: Mapping[str, Tensor]) -> None:
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"the closure returned no loss for tasks {missing}; got {sorted(losses)}")
        values = self.weighting.mean_losses(losses, self._recorder)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = [t for t, ok in zip(self.tasks, finite.tolist()) if not ok]
            raise NonFiniteLossError(f"loss_scaling {self.name!r}: non-finite loss for tasks {bad}: "
                                     f"{dict(zip(self.tasks, values.tolist()))}")
        weights = self.weighting.weights(dict(zip(self.tasks, values)))
        self.weighting.last_weights = [float(weights[t]) for t in self.tasks]
        self.task_weights.update({t: self.static[t] * float(weights[t]) for t in self.tasks})
        self._values = values

    def end(self) -> None:
        """After the method's last step: the weighting's learned state and step counter."""
        if self.reads_losses:
            if self._values is None:
                raise RuntimeError(f"loss_scaling {self.name!r}: the update method ran no forward pass")
            stepped = bool(self._recorder.applied) and all(self._recorder.applied)
            self.weighting.after_step(self._closure, self._recorder, self._values, stepped)
        self.weighting.num_steps += 1
        self._closure = self._recorder = None

    # -- reporting and persistence -----------------------------------------------------------
    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        self.weighting.set_progress(progress, epoch)

    def log_metrics(self) -> dict[str, float]:
        return {f"loss_scaling/{k}": v for k, v in self.weighting.log_metrics().items()}

    def card(self) -> dict[str, Any]:
        """The model card's ``loss_scaling``: name, options and the latest batch's weights ``lambda_t``."""
        last = getattr(self.weighting, "last_weights", None)
        return {**self.spec(), "weights": None if last is None else dict(zip(self.tasks, map(float, last)))}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.weighting.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the saved state holds loss scaling {state.get('name')!r}, this strategy scales "
                             f"its losses with {self.name!r}")
        self.weighting.load_state_dict(state["state"])


def split_label(label: str) -> tuple[str, dict[str, Any]]:
    """``"conn_strength+uw"`` -> ``("conn_strength", {"loss_scaling": "uw"})``; a plain name has no options."""
    method, plus, scaling = label.partition("+")
    if not plus:
        return label, {}
    if not method or not scaling or "+" in scaling:
        raise ValueError(f"composed strategy {label!r}: write METHOD+WEIGHTING, e.g. conn_strength+uw")
    return method, {"loss_scaling": scaling}


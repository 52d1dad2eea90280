"""Task-specific connections (Jeong & Yoon, CVPR 2024): per-task normalisations after shared layers.

:func:`add_task_connections` converts a backbone in place. Every BatchNorm fed directly by a
convolution or linear layer becomes one BatchNorm per task (:class:`TaskBatchNorm`), each a copy of
the original; the feeding weight layer is found structurally, from the data flow of one forward pass
on an example input. :func:`active_task` routes every connection to one task; a converted module
used outside it raises an error.

Transformer backbones (LayerNorm and Linear, no BatchNorm) get this project's own extension, not part
of the paper: a per-task channel scale and shift after every shared ``nn.Linear`` but the
``out_proj`` of ``nn.MultiheadAttention``, which attention applies without calling it
(:class:`TaskScaleShift`, identity at initialisation), whose connection strength is
``gamma_{tau,p}^2 * sum_q W[p, q]^2``.

Connection strength of output channel ``p`` of weight ``W`` for task ``tau`` (BatchNorm case)::

    S_p^tau = gamma_{tau,p}^2 / (running_var_{tau,p} + 1e-5) * sum_{q,m,n} W[p, q, m, n]^2

normalised over channels per task; the top-priority task of channel ``p`` is the argmax over tasks,
the lowest task index among exact ties (:func:`top_priority_task`). Strengths are computed in the
parameters' dtype (float32 at least), so a float64 model gets float64 strengths.

A BatchNorm without affine parameters counts with ``gamma = 1`` (and one without running statistics
with a variance term of 1): this project's extension. The released core pairs a conv with the
per-task BatchNorm weights and running variances by name, so it gives such layers the plain sum of
the task gradients instead (``TaskConnection.complete`` is False for them).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import check_tasks, register_architecture

#: The ``eps`` of the connection-strength formula (the spec's constant, whatever the BatchNorm's eps).
STRENGTH_EPS = 1e-5
#: Weight layers whose output channels (dim 0 of the weight) a connection can follow.
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Mode = Literal["auto", "batchnorm", "scale_shift"]


def strength_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype connection strengths are computed in: the tensors' promoted dtype, float32 at least."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class TaskConnection(nn.Module):
    """Base of task-specific connections: per-task parameters on the output channels of ``source``.

    ``source`` (the shared weight layer) is kept as a plain reference, not a submodule, so it stays
    registered where it was. ``active`` is the task the connection currently routes to.
    """

    def __init__(self, tasks: Sequence[str], source: nn.Module, layer_name: str):
        super().__init__()
        self.tasks = list(tasks)
        self.layer_name = layer_name
        self.__dict__["source"] = source
        self.active: str | None = None

    @property
    def num_channels(self) -> int:
        return int(self.source.weight.shape[0])

    def current_task(self) -> str:
        if self.active is None:
            raise RuntimeError(
                f"task-specific connection {self.layer_name!r} used outside active_task(): run the model "
                f"with a task (model(x, task=...)) or inside `with active_task(model, task):`; tasks: {self.tasks}"
            )
        return self.active

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters that only ``task`` uses."""
        raise NotImplementedError

    def strength_factors(self) -> Tensor:
        """Per-task channel factors ``[K, C]`` multiplying ``sum_q W[p, q]^2`` (tasks in ``self.tasks`` order)."""
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        """Whether every task's connection has the parameters the released core measures strength from."""
        return True


class TaskBatchNorm(TaskConnection):
    """One BatchNorm per task (``norms[task]``), each initialised as a copy of the original."""

    def __init__(self, norm: _BatchNorm, tasks: Sequence[str], source: nn.Module, layer_name: str = ""):
        super().__init__(tasks, source, layer_name)
        self.norms = nn.ModuleDict({t: copy.deepcopy(norm) for t in self.tasks})

    def forward(self, x: Tensor) -> Tensor:
        return self.norms[self.current_task()](x)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.norms[task].parameters())

    def strength_factors(self) -> Tensor:
        """``gamma^2 / (running_var + eps)``; gamma is 1 without affine, the variance term 1 without running stats."""
        rows = []
        weight = self.source.weight
        for t in self.tasks:
            norm = self.norms[t]
            present = [x for x in (norm.weight, norm.running_var) if x is not None]
            dtype = strength_dtype(weight, *present)
            gamma = norm.weight.detach() if norm.weight is not None else torch.ones(norm.num_features, device=weight.device)
            factor = gamma.to(dtype) ** 2
            if norm.running_var is not None:
                factor = factor / (norm.running_var.detach().to(dtype) + STRENGTH_EPS)
            rows.append(factor)
        dtype = strength_dtype(*rows)
        return torch.stack([row.to(dtype) for row in rows])

    @property
    def complete(self) -> bool:
        """False when a task's BatchNorm has no affine weight or no running variance."""
        return all(norm.weight is not None and norm.running_var is not None for norm in self.norms.values())


class TaskScaleShift(TaskConnection):
    """Per-task channel scale and shift on the output of a shared Linear (this project's extension).

    Attached to the Linear as its child ``task_connection`` and applied by a forward hook, so the
    Linear keeps its place and parameter names. Scale starts at 1 and shift at 0 (identity).
    """

    def __init__(self, tasks: Sequence[str], source: nn.Linear, layer_name: str = ""):
        super().__init__(tasks, source, layer_name)
        channels = {"size": source.weight.shape[:1], "dtype": source.weight.dtype, "device": source.weight.device}
        self.scale = nn.ParameterDict({t: nn.Parameter(torch.ones(**channels)) for t in self.tasks})
        self.shift = nn.ParameterDict({t: nn.Parameter(torch.zeros(**channels)) for t in self.tasks})

    def forward(self, x: Tensor) -> Tensor:
        task = self.current_task()
        return x * self.scale[task] + self.shift[task]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.scale[task], self.shift[task]]

    def strength_factors(self) -> Tensor:
        """``gamma^2`` (the per-task scale squared)."""
        scales = [self.scale[t].detach() for t in self.tasks]
        return torch.stack(scales).to(strength_dtype(*scales)) ** 2


def _apply_task_connection(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return module.task_connection(output)


# -- finding the weight layer that feeds each BatchNorm ----------------------------------------------


def _example_input(module: nn.Module) -> Tensor:
    """A small input for ``module``'s first weight layer: ``[2, C_in, 64, 64]`` for a Conv2d, etc."""
    first = next((m for m in module.modules() if isinstance(m, WEIGHT_LAYERS)), None)
    if first is None:
        raise ValueError(f"{type(module).__name__} has no convolution or linear layer to infer an example input from")
    weight = first.weight
    if isinstance(first, nn.Linear):
        shape: tuple[int, ...] = (2, first.in_features)
    else:
        spatial = weight.dim() - 2
        shape = (2, first.in_channels, *((16,) * 3 if spatial == 3 else (64,) * spatial))
    return torch.randn(shape, dtype=weight.dtype, device=weight.device)


def _run(module: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, dict):
        module(**example_input)
    elif isinstance(example_input, (tuple, list)):
        module(*example_input)
    else:
        module(example_input)


def trace_feeding_layers(module: nn.Module, example_input: Any = None) -> dict[_BatchNorm, nn.Module]:
    """Map each BatchNorm of ``module`` to the conv/linear layer whose output it normalises directly.

    Runs one forward pass (eval mode, no grad) on ``example_input`` (inferred from the first weight
    layer when omitted) and follows the tensors: a BatchNorm is paired with a weight layer only when
    every call receives that layer's output unchanged (no op, in-place or not, in between).
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    if example_input is None:
        example_input = _example_input(module)
    producers: dict[int, tuple[nn.Module, int]] = {}
    keep: list[Tensor] = []  # keeps traced tensors alive so their ids stay unique
    feeders: dict[nn.Module, list[nn.Module | None]] = {}

    def after(mod: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            known = producers.get(id(output))
            if known is None or known[1] != output._version:  # new tensor, or modified in place
                producers[id(output)] = (mod, output._version)
            keep.append(output)

    def before(norm: nn.Module, inputs: Any) -> None:
        x = inputs[0] if inputs else None
        known = producers.get(id(x)) if isinstance(x, Tensor) else None
        feeders.setdefault(norm, []).append(known[0] if known and known[1] == x._version else None)

    modes = {m: m.training for m in module.modules()}
    handles = [m.register_forward_hook(after) for m in module.modules()]
    handles += [n.register_forward_pre_hook(before) for n in norms]
    try:
        module.eval()
        with torch.no_grad():
            _run(module, example_input)
    except Exception as error:
        shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__
        raise RuntimeError(
            f"add_task_connections runs one forward pass to find which layer feeds each BatchNorm; it failed "
            f"on an example input {shape}: {error}. Pass example_input= with a valid input for "
            f"{type(module).__name__}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    pairs: dict[_BatchNorm, nn.Module] = {}
    for norm, sources in feeders.items():
        source = sources[0]
        direct = source is not None and all(s is source for s in sources) and isinstance(source, WEIGHT_LAYERS)
        if direct and source.weight.shape[0] == norm.num_features:
            pairs[norm] = source  # type: ignore[index]
    return pairs


# -- conversion ------------------------------------------------------------------------------------


def _check_task_names(tasks: Sequence[str]) -> list[str]:
    tasks = check_tasks(tasks)
    bad = [t for t in tasks if "." in t]
    if bad:
        raise ValueError(f"task names used as module keys cannot contain '.': {bad}")
    return tasks


def check_plain_weight(layer: nn.Module, name: str, owner: nn.Module | None = None) -> None:
    """Refuse a weight layer whose ``weight`` is not a plain parameter (parametrized, weight norm):
    its captured weight would be a computed tensor that never receives a gradient."""
    if not isinstance(getattr(layer, "weight", None), nn.Parameter):
        where = f" of {type(owner).__name__}" if owner is not None else ""
        raise ValueError(f"layer {name!r} ({type(layer).__name__}){where} has a computed weight (a parametrization or "
                         "weight norm), not a parameter: task-specific connections need a plain weight parameter "
                         "to measure and project; remove the parametrization from this layer first")


def _connectable_linears(module: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` of ``module`` that runs as a module. ``nn.MultiheadAttention`` reads its
    ``out_proj`` weight directly, so a forward hook there would never run: those are left out."""
    skipped = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    return [m for m in module.modules() if isinstance(m, nn.Linear) and id(m) not in skipped]


def _replace_modules(root: nn.Module, replacements: dict[nn.Module, nn.Module]) -> None:
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if child in replacements:
                setattr(parent, child_name, replacements[child])


def add_task_connections(module: nn.Module, tasks: Sequence[str], *, mode: Mode = "auto", example_input: Any = None) -> nn.Module:
    """Convert ``module`` in place to task-specific connections and return it.

    ``mode="batchnorm"`` converts every BatchNorm fed directly by a conv/linear layer into a
    :class:`TaskBatchNorm` (found with :func:`trace_feeding_layers` on ``example_input``; other
    BatchNorms stay shared). ``mode="scale_shift"`` adds a :class:`TaskScaleShift` after every
    ``nn.Linear`` (the transformer extension) except ``nn.MultiheadAttention.out_proj``, which
    attention applies without calling it. ``"auto"`` picks ``batchnorm`` when the module has a
    BatchNorm, ``scale_shift`` otherwise. A source layer with a parametrized weight is refused.
    """
    tasks = _check_task_names(tasks)
    if mode not in ("auto", "batchnorm", "scale_shift"):
        raise ValueError(f"mode must be 'auto', 'batchnorm' or 'scale_shift', got {mode!r}")
    if has_task_connections(module):
        raise ValueError(f"{type(module).__name__} already has task-specific connections")
    if mode == "auto":
        mode = "batchnorm" if any(isinstance(m, _BatchNorm) for m in module.modules()) else "scale_shift"
    names = {m: n for n, m in module.named_modules()}
    if mode == "batchnorm":
        pairs = trace_feeding_layers(module, example_input)
        if not pairs:
            raise ValueError(f"{type(module).__name__} has no BatchNorm fed directly by a convolution or linear layer")
        fed: dict[nn.Module, nn.Module] = {}
        for norm, source in pairs.items():
            if source in fed:
                raise ValueError(f"layer {names[source]!r} feeds two BatchNorms ({names[fed[source]]!r}, {names[norm]!r}): "
                                 "its channels would have two priorities")
            fed[source] = norm
            check_plain_weight(source, names[source], module)
        _replace_modules(module, {n: TaskBatchNorm(n, tasks, s, names[n]) for n, s in pairs.items()})
    else:
        linears = _connectable_linears(module)
        if not linears:
            raise ValueError(f"{type(module).__name__} has no nn.Linear layer to add per-task scale and shift to "
                             "(nn.MultiheadAttention's out_proj does not count)")
        for linear in linears:
            check_plain_weight(linear, names[linear], module)
        for linear in linears:
            linear.task_connection = TaskScaleShift(tasks, linear, names[linear])
            linear.register_forward_hook(_apply_task_connection)
    return module


def task_connections(module: nn.Module) -> list[TaskConnection]:
    """Every task-specific connection inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, TaskConnection)]


def has_task_connections(module: nn.Module) -> bool:
    """True if ``module`` contains task-specific connections."""
    return any(isinstance(m, TaskConnection) for m in module.modules())


def task_connection_parameters(module: nn.Module, task: str) -> list[nn.Parameter]:
    """The parameters of ``module``'s connections that only ``task`` uses."""
    return [p for c in task_connections(module) for p in c.task_parameters(task)]


@contextmanager
def active_task(module: nn.Module, task: str) -> Iterator[nn.Module]:
    """Route every task-specific connection of ``module`` to ``task`` inside the ``with`` block."""
    connections = task_connections(module)
    if not connections:
        raise ValueError(f"{type(module).__name__} has no task-specific connections")
    for connection in connections:
        if task not in connection.tasks:
            raise ValueError(f"unknown task {task!r} for connection {connection.layer_name!r}; tasks: {connection.tasks}")
    previous = [c.active for c in connections]
    for connection in connections:
        connection.active = task
    try:
        yield module
    finally:
        for connection, before in zip(connections, previous):
            connection.active = before


# -- connection strength -----------------------------------------------------------------------------


@dataclass
class ConnectedLayer:
    """A shared weight layer followed by a task-specific connection."""

    name: str
    weight: nn.Parameter
    connection: TaskConnection


def connected_layers(model: nn.Module) -> list[ConnectedLayer]:
    """The shared weight layers of ``model`` that have task-specific connections, named as in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for connection in task_connections(model):
        name = names.get(id(connection.source), connection.layer_name)
        check_plain_weight(connection.source, name)
        layers.append(ConnectedLayer(name, connection.source.weight, connection))
    return layers


def normalized_strength(weight: Tensor, factors: Tensor) -> Tensor:
    """``S^_p^tau``: per-task strengths ``factors[tau, p] * sum_q W[p, q]^2``, normalised over channels."""
    dtype = strength_dtype(weight, factors)
    squares = weight.detach().to(dtype).pow(2).reshape(weight.shape[0], -1).sum(1)
    strength = factors.to(device=squares.device, dtype=dtype) * squares
    total = strength.sum(1, keepdim=True)
    return torch.where(total > 0, strength / torch.where(total > 0, total, 1.0), 0.0)


def top_priority_task(strength: Tensor) -> Tensor:
    """``nu(p)``: per channel, the task (row) of largest strength in ``strength`` ``[K, C]``; among exact
    ties the lowest task index, on every device (the released core's ``topk`` leaves ties unspecified)."""
    num_tasks = strength.shape[0]
    index = torch.arange(num_tasks, device=strength.device)[:, None].expand_as(strength)
    at_max = strength == strength.max(0, keepdim=True).values
    return torch.where(at_max, index, num_tasks).min(0).values


def layer_strength(layer: ConnectedLayer, tasks: Sequence[str] | None = None) -> Tensor:
    """The ``K x C`` normalised connection strengths of one layer, rows in ``tasks`` order."""
    strength = normalized_strength(layer.weight, layer.connection.strength_factors())
    if tasks is None:
        return strength
    order = [layer.connection.tasks.index(t) for t in tasks]
    return strength[order]


def _accepted_options(method: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` that ``method`` accepts; raises naming the ones it does not."""
    parameters = inspect.signature(method).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    refused = sorted(set(options) - names)
    if refused:
        raise TypeError(f"{method.__qualname__}() does not accept the options {refused}")
    return dict(options)


def _convert_with_model_method(model: nn.Module, tasks: Sequence[str], options: Mapping[str, Any]) -> None:
    """Let a model that converts itself (``model.add_task_connections(**options)``, e.g. a Hub
    ``MultiTaskModel``, which converts its backbone and records the options in its config) do it."""
    own = getattr(model, "tasks", None)
    if own is not None and set(own) != set(tasks):
        raise ValueError(f"task_connections for tasks {list(tasks)}, but the model's tasks are {list(own)}")
    model.add_task_connections(**_accepted_options(model.add_task_connections, options))


@register_architecture("task_connections", aliases=("TaskConnections",))
class TaskConnections:
    """Architecture plugin: ``build_architecture("task_connections", tasks, model=m)`` converts ``m``
    in place and returns ``m`` itself. A model with its own ``add_task_connections()`` method (the Hub
    ``MultiTaskModel``: backbone only, saved in its config) converts itself; otherwise
    :func:`add_task_connections` converts the ``encoder`` of hard-parameter-sharing models with
    ``encoder`` and ``heads``, else the whole model."""

    def __new__(cls, tasks: Sequence[str], **options: Any) -> nn.Module:  # type: ignore[misc]
        model = options.pop("model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"task_connections converts a model: pass model=<nn.Module>, got {model!r}")
        if callable(getattr(model, "add_task_connections", None)):
            _convert_with_model_method(model, tasks, options)
            return model
        target = model.encoder if hasattr(model, "encoder") and hasattr(model, "heads") else model
        add_task_connections(target, tasks, **options)
        return model

    def __init__(self, tasks: Sequence[str], *, model: nn.Module, mode: Mode = "auto", example_input: Any = None):
        """The options: the model to convert, the conversion ``mode`` and an ``example_input`` to trace."""

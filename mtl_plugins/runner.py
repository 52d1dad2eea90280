"""Run a recipe end to end: data, model, strategy, training, test metrics, Delta_m, checkpoint, plots."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from . import build_architecture
from .data import DataBundle, build_data
from .loss_weights import strategy_for_model
from .metrics import delta_m
from .metrics.compute_metrics import ComputeMetrics
from .metrics.paper import delta_m_selection
from .models import build_model as build_recipe_model
from .plots import plot_loss_curves
from .predictions import can_draw, plot_predictions
from .recipe_checks import resume_checkpoint
from .registry import ARCHITECTURES

TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "max_steps": -1,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "lr_ts": 1.0,
    "seed": 0,
    "logging_steps": 10,
    # As in the released configs: Adam, no gradient clipping; a constant learning rate unless the
    # recipe sets ``lr_scheduler_type`` (e.g. ``polynomial``). ``optim: adam`` is torch.optim.Adam;
    # any other value is a TrainingArguments ``optim`` name.
    "optim": "adam",
    "max_grad_norm": 0.0,
    "lr_scheduler_type": "constant",
    "save_strategy": "no",
}


def cache_dir() -> Path:
    """Where single-task baselines are cached (``$MTL_PLUGINS_CACHE`` or ``~/.cache/mtl_plugins``)."""
    return Path(os.environ.get("MTL_PLUGINS_CACHE", Path.home() / ".cache" / "mtl_plugins"))


def training_options(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's ``training`` section over the defaults; keys are MultiTaskTrainingArguments names."""
    from dataclasses import fields

    from .trainers import MultiTaskTrainingArguments

    options = dict(TRAINING_DEFAULTS)
    accepted = (set(options) | {f.name for f in fields(MultiTaskTrainingArguments)}) - {"output_dir"}
    unknown = sorted(set(recipe.get("training", {})) - accepted)
    if unknown:
        raise ValueError(f"unknown training options {unknown}; accepted: the TrainingArguments names, e.g. "
                         f"{sorted(options)}")
    options.update(recipe.get("training", {}))
    return options


def build_datasets(recipe: Mapping[str, Any]) -> DataBundle:
    """The recipe's ``data`` section: ``dataset`` names a builder, the other keys are its options."""
    options = dict(recipe.get("data", {}))
    return build_data(options.pop("dataset", "multidigits"), **options)


def build_model(recipe: Mapping[str, Any], data: DataBundle) -> torch.nn.Module:
    """The recipe's ``model`` section: a registered model (the Hub's included), converted by its
    ``architecture`` when that is one that converts a model (takes ``model=``, e.g. ``task_connections``)."""
    import mtl_plugins.hub  # noqa: F401  (registers the Hub's recipe models)

    spec = recipe.get("model", {})
    tasks = data.tasks
    model = build_recipe_model(spec.get("name", "multidigits_cnn"), tasks, data.task_specs, **spec.get("options", {}))
    architecture = ARCHITECTURES.resolve(spec.get("architecture", "hps"))
    if "model" in ARCHITECTURES.accepted_options(architecture):
        build_architecture(architecture, tasks, model=model)
    return model


def make_strategy(recipe: Mapping[str, Any], tasks: Sequence[str], model: torch.nn.Module):
    """The recipe's ``strategy`` section, built for ``model`` (whose loss weights it takes)."""
    spec = recipe.get("strategy", {})
    return strategy_for_model(spec.get("name", "ew"), model, tasks, spec.get("options", {}))


def higher_is_better(data: DataBundle, dataset: str | None = None,
                     available: Collection[str] = ()) -> dict[str, bool]:
    """The metrics Delta_m averages, ``{"<task>/<metric>": higher_is_better}``.

    The papers' selection for ``dataset`` (:func:`~mtl_plugins.metrics.paper.delta_m_selection`) when
    it has one and every metric it names is in ``available``; otherwise each task's main metric.
    """
    main = {f"{t}/{spec.metric}": spec.higher_is_better for t, spec in data.task_specs.items()}
    if dataset is None:
        return main
    try:
        selection = delta_m_selection(dataset)
    except ValueError:  # no paper selection for this dataset
        return main
    return selection if all(name in available for name in selection) else main


def split_metrics(results: Mapping[str, Any], data: DataBundle, prefix: str = "test") -> dict[str, dict[str, float]]:
    """An evaluation's ``"<prefix>_<task>/<metric>"`` results as ``{"main": ..., "all": ...}``: each
    task's main metric (in task order) and every metric computed for the tasks, named ``"<task>/<metric>"``."""
    every = {}
    for key, value in results.items():
        name = key.removeprefix(f"{prefix}_")
        if name != key and name.split("/")[0] in data.tasks and "/" in name:
            every[name] = float(value)
    main = {name: every[name] for name in (f"{t}/{data.task_specs[t].metric}" for t in data.tasks)}
    return {"main": main, "all": every}


def epoch_table(records: Sequence[Mapping[str, Any]], evaluations: Sequence[Mapping[str, Any]],
                data: DataBundle) -> list[dict[str, Any]]:
    """One row per evaluation during training: ``epoch``, ``step``, ``train_loss`` (mean of the
    training logs since the previous row), ``validation_loss`` and each task's main validation metric."""
    rows, start = [], 0
    for evaluation in evaluations:
        window = [r["loss"] for r in records if start < r["step"] <= evaluation["step"]]
        row = {"epoch": evaluation.get("epoch"), "step": evaluation["step"],
               "train_loss": sum(window) / len(window) if window else None,
               "validation_loss": evaluation.get("eval_loss")}
        for t in data.tasks:
            name = f"{t}/{data.task_specs[t].metric}"
            row[f"validation_{name}"] = evaluation.get(f"eval_{name}")
        rows.append(row)
        start = evaluation["step"]
    return rows


def format_epoch_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-epoch rows as an aligned text table."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [[c.removeprefix("validation_") if "/" in c else c for c in columns],
             *([cell(r.get(c)) for c in columns] for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def chance_metrics(data: DataBundle) -> dict[str, float]:
    """``{"<task>/accuracy": 1 / classes}``: the accuracy of guessing, for classification tasks."""
    return {f"{t}/accuracy": 1.0 / spec.num_outputs for t, spec in data.task_specs.items()
            if spec.kind == "classification" and spec.metric == "accuracy" and spec.num_outputs > 1}


def is_main_process() -> bool:
    """False on every process but the first of a distributed launch (torchrun, accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def trainer_arguments(opts: Mapping[str, Any], output_dir: str | Path, progress: bool, validation: bool = False):
    """MultiTaskTrainingArguments from training options, and the optimizer override for ``optim: adam``."""
    from .trainers import MultiTaskTrainingArguments

    options = {k: v for k, v in opts.items() if k != "optim"}
    if opts.get("optim", "adam") != "adam":
        options["optim"] = opts["optim"]
    options.setdefault("use_cpu", not torch.cuda.is_available())
    options.setdefault("dataloader_pin_memory", not options["use_cpu"])  # pinned memory helps GPU copies only
    if validation:  # a per-epoch train / validation table unless the recipe sets its own schedule
        options.setdefault("eval_strategy", "epoch")
    options.setdefault("report_to", "none")
    args = MultiTaskTrainingArguments(output_dir=str(output_dir), disable_tqdm=not progress, **options)
    optimizer = None
    if opts.get("optim", "adam") == "adam":
        # lr: the default that schedulers read (polynomial decay's lr_end is relative to it)
        optimizer = (torch.optim.Adam, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                                        "eps": args.adam_epsilon})
    return args, optimizer


def fit(recipe: Mapping[str, Any], progress: bool = True, log_path: Path | None = None,
        output_dir: str | Path | None = None, resume: str | bool | None = None,
        label: str | None = None) -> dict[str, Any]:
    """Train the recipe's model with its strategy through :class:`~mtl_plugins.trainers.MultiTaskTrainer`;
    returns model, strategy, test metrics (``metrics``: each task's main metric; ``all_metrics``: every
    metric the evaluation computes) and log records. Trainer checkpoints, when the recipe's
    ``training.save_strategy`` asks for them, go to ``<output_dir>/checkpoints``; ``resume`` (a
    checkpoint folder, or ``True`` for the last one there) or ``training.resume_from_checkpoint``
    continues from one."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .trainers import LogRecorder, LossProgress, MultiTaskTrainer

    opts = training_options(recipe)
    set_seed(int(opts["seed"]))
    data = build_datasets(recipe)
    tasks = data.tasks
    model = build_model(recipe, data)
    strategy = make_strategy(recipe, tasks, model)
    out = Path(output_dir or recipe.get("output_dir", "runs/run"))
    args, optimizer = trainer_arguments(opts, out / "checkpoints", progress, validation=data.validation is not None)
    recorder = LogRecorder(log_path if is_main_process() else None)
    # training evaluates on the validation split (per epoch, model selection); test is scored once at the end
    validation = data.validation if data.validation is not None else data.eval
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=validation,
                               strategy=strategy, tasks=tasks, callbacks=[recorder], optimizer_cls_and_kwargs=optimizer,
                               compute_metrics=ComputeMetrics(data.task_specs, tasks=tasks))
    recorder.details = lambda: trainer.last_strategy_log  # the log file keeps every strategy scalar
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgress(label or f"multi-task ({trainer.strategy.label})"))
    else:
        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    checkpoint = resume_checkpoint(recipe, resume)
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        folder = Path(args.output_dir)
        checkpoint = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if checkpoint is None:
            raise ValueError(f"nothing to resume: no checkpoint in {str(folder)!r} (runs save checkpoints with "
                             "training.save_strategy=steps or epoch)")
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    if is_main_process():
        with contextlib.suppress(OSError):  # the Trainer creates it even when it saves nothing
            (out / "checkpoints").rmdir()
    metrics = split_metrics(trainer.evaluate(eval_dataset=data.eval, metric_key_prefix="test"), data)
    return {"model": model, "strategy": trainer.strategy, "metrics": metrics["main"], "all_metrics": metrics["all"],
            "records": recorder.records, "evaluations": recorder.evaluations, "data": data,
            "train_seconds": seconds, "steps": trainer.state.global_step,
            "environment": run_environment(trainer.args)}


def single_task_baselines(recipe: Mapping[str, Any], tasks: Sequence[str], mode: str, progress: bool) -> dict[str, float] | None:
    """Every test metric of one single-task model per task (``ew`` on that task alone), cached by config."""
    if mode == "skip":
        return None
    if mode not in ("cache", "train"):
        raise ValueError(f"baselines must be 'cache', 'train' or 'skip', got {mode!r}")
    key_source = {k: recipe.get(k) for k in ("data", "model", "training")}
    # a checkpoint to resume from belongs to the multi-task run: the baselines train from scratch
    key_source["training"] = {k: v for k, v in (key_source["training"] or {}).items()
                              if k != "resume_from_checkpoint"}
    model = dict(key_source["model"] or {})
    if "loss_weights" in (model.get("options") or {}):  # they weigh tasks against each other: not for one task
        model["options"] = {k: v for k, v in model["options"].items() if k != "loss_weights"}
    key_source["model"] = {**model, "architecture": "hps"}
    key_source["metrics"] = "all"  # caches that hold each task's main metric only are not reused
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # DDP baselines train with the run's global batch: not those of one process
        key_source["world_size"] = world_size
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "baselines" / f"{key}.json"
    cached = json.loads(path.read_text()) if path.exists() and mode == "cache" else {}
    trained = False
    for i, task in enumerate(tasks, start=1):
        if any(name.startswith(f"{task}/") for name in cached):
            continue
        single = {**recipe, "data": {**recipe.get("data", {}), "tasks": [task]}, "strategy": {"name": "ew"},
                  "model": key_source["model"], "training": key_source["training"]}
        label = f"single-task baseline {i}/{len(tasks)}: {task}"
        cached.update(fit(single, progress=progress, label=label)["all_metrics"])
        trained = True
    if trained and is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    return {k: v for k, v in cached.items() if k.split("/")[0] in tasks}


def same_tensors(model: torch.nn.Module, path: Path) -> bool:
    """True when the safetensors file ``path`` holds exactly ``model``'s state dict (names and values)."""
    from safetensors.torch import load_file

    saved, state = load_file(str(path)), model.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[k], v.detach().cpu()) for k, v in state.items())


def save_hub_model(model: torch.nn.Module, folder: Path, summary: Mapping[str, Any], strategy: Any,
                   processor: Any = None, card: Mapping[str, Any] | None = None) -> bool:
    """Save a Hugging Face model with ``save_pretrained`` (safetensors) to ``folder``, with the
    tokenizer or image processor that prepared its inputs and a model card (``README.md``: strategy,
    test metrics, Delta_m; ``card``: the recipe's ``license`` and ``datasets``) when its config is a
    multi-task config.
    Returns False, saving nothing, for models without ``save_pretrained``."""
    if not callable(getattr(model, "save_pretrained", None)):
        return False
    model.save_pretrained(folder)  # safetensors
    saves_processor = callable(getattr(processor, "save_pretrained", None))
    if saves_processor:
        processor.save_pretrained(folder)
    if hasattr(getattr(model, "config", None), "task_names"):
        from .hub.card import build_model_card, card_fields_from_strategy

        card = dict(card or {})
        model_card = build_model_card(model.config, metrics=summary["test_metrics"], delta_m=summary.get("delta_m"),
                                      tokenizer_included=saves_processor and hasattr(processor, "tokenize"),
                                      license=card.get("license"), datasets=card.get("datasets"),
                                      **card_fields_from_strategy(strategy))
        model_card.save(folder / "README.md")
    return True


#: What a run writes besides its plots (``*.png``); a folder that held a run loses these before the next
#: run's outputs move in, so no output of an earlier run (e.g. another strategy's plots) stays behind.
RUN_OUTPUTS = ("config.yaml", "train_log.jsonl", "results.json", "model.safetensors", "strategy_state.pt", "model")
#: The folder inside the output folder where a run writes until it succeeded.
STAGING = ".incomplete"


def run_environment(args: Any) -> dict[str, Any]:
    """How a run ran: processes, device, CPU threads, mixed precision, library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    return {
        "world_size": int(args.world_size),
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "mixed_precision": precision,
        "global_train_batch_size": int(args.per_device_train_batch_size) * int(args.world_size)
        * int(args.gradient_accumulation_steps),
        "versions": {"python": platform.python_version(),
                     **{name: installed(name) for name in ("mtl-plugins", "torch", "transformers", "accelerate")}},
    }


def describe_environment(environment: Mapping[str, Any]) -> str:
    """One line: ``2 processes on cpu, 1 CPU thread each, mixed precision: no, global batch 128``."""
    n, threads = environment["world_size"], environment["threads"]
    return (f"{n} process{'es' if n != 1 else ''} on {environment['device']}, {threads} CPU thread"
            f"{'s' if threads != 1 else ''} each, mixed precision: {environment['mixed_precision']}, "
            f"global batch {environment['global_train_batch_size']}")


def _publish(staging: Path, out: Path) -> list[str]:
    """Move a finished run's outputs from ``staging`` into ``out``, after removing the outputs of an
    earlier run there; returns the names moved."""
    import shutil

    previous = out / "results.json"
    if previous.is_file():
        try:
            listed = json.loads(previous.read_text()).get("outputs") or []
        except (ValueError, AttributeError):
            listed = []
        stale = {*RUN_OUTPUTS, *listed, *(p.name for p in out.glob("*.png"))}
    else:
        stale = set(RUN_OUTPUTS) if (out / "config.yaml").is_file() else set()
    for name in stale:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.rglob("*.safetensors"):  # safetensors writes owner-only files (0600)
        path.chmod(0o666 & ~umask)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        (staging / name).replace(out / name)
    staging.rmdir()
    return names


def run_recipe(recipe: Mapping[str, Any], output_dir: str | Path | None = None, baselines: str | None = None,
               progress: bool = True, resume: str | bool | None = None) -> dict[str, Any]:
    """Run a recipe and write its outputs; returns the summary written to ``results.json``.

    Outputs: ``config.yaml`` (the recipe run, with the real ``output_dir``), ``train_log.jsonl``,
    ``results.json`` (``test_metrics``: each task's main metric; ``all_test_metrics``: every metric of
    the evaluation; ``environment``: processes, device, threads, precision, versions),
    ``model.safetensors``, ``strategy_state.pt``, plots and, for Hugging Face models, ``model/``
    (``save_pretrained`` folder with a model card) that ``AutoModel.from_pretrained`` loads after
    ``import mtl_plugins.hub``. They are written to ``<output_dir>/.incomplete`` and moved into
    ``output_dir`` only once the run succeeded, replacing the outputs of an earlier run there; a
    failed run leaves the folder as it was. ``resume``: see :func:`fit`.

    Under a distributed launch every process trains and only the main process writes outputs.
    """
    import shutil

    out = Path(output_dir or recipe.get("output_dir", "runs/run"))
    main = is_main_process()
    staging = out / STAGING
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "config.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(out)}, sort_keys=False))
    try:
        summary = _run(recipe, out, staging, baselines, progress, main, resume)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main:
        _publish(staging, out)
    return summary


def _run(recipe: Mapping[str, Any], out: Path, staging: Path, baselines: str | None, progress: bool,
         main: bool, resume: str | bool | None) -> dict[str, Any]:
    result = fit(recipe, progress=progress, log_path=staging / "train_log.jsonl", output_dir=out, resume=resume)
    data, metrics = result["data"], result["metrics"]
    tasks = data.tasks
    summary: dict[str, Any] = {
        "strategy": result["strategy"].label,
        "tasks": tasks,
        "steps": result["steps"],
        "train_seconds": round(result["train_seconds"], 2),
        "test_metrics": metrics,
        "all_test_metrics": result["all_metrics"],
        "environment": result["environment"],
        "chance_metrics": chance_metrics(data),
        "epochs": epoch_table(result["records"], result["evaluations"], data),
    }
    reference = single_task_baselines(recipe, tasks, baselines or recipe.get("baselines", "cache"), progress)
    if reference is not None:
        summary["single_task_metrics"] = reference
        dataset = recipe.get("data", {}).get("dataset", "multidigits")
        selection = higher_is_better(data, dataset, set(result["all_metrics"]) & set(reference))
        summary["delta_m"] = delta_m(result["all_metrics"], reference, selection)
        summary["delta_m_metrics"] = list(selection)
        environment = result["environment"]
        summary["delta_m_baselines"] = (
            f"single-task ew runs of this recipe with the same launch: {environment['world_size']} process(es), "
            f"global batch {environment['global_train_batch_size']}")
    if not main:
        return summary
    from safetensors.torch import save_model

    hub_weights = staging / "model" / "model.safetensors"
    if save_hub_model(result["model"], staging / "model", summary, result["strategy"], processor=data.processor,
                      card=recipe.get("card")) \
            and hub_weights.is_file() and same_tensors(result["model"], hub_weights):
        try:  # one copy of the weights on disk: model.safetensors is a second name for the Hub folder's file
            os.link(hub_weights, staging / "model.safetensors")
        except OSError:
            save_model(result["model"], str(staging / "model.safetensors"))
    else:
        save_model(result["model"], str(staging / "model.safetensors"))
    torch.save(result["strategy"].state_dict(), staging / "strategy_state.pt")
    plots = []
    if result["records"]:
        plots.append(plot_loss_curves(result["records"], tasks, staging / "loss_curves.png", result["evaluations"]))
    else:
        warning = (f"no training loss was logged ({result['steps']} steps < logging_steps="
                   f"{training_options(recipe)['logging_steps']}): no loss_curves.png; set training.logging_steps "
                   "to at most the number of steps")
        summary["warnings"] = [warning]
    plots += result["strategy"].write_plots(staging)
    if can_draw(data.task_specs):
        plots.append(plot_predictions(result["model"], data.eval, data.task_specs, tasks, staging / "predictions.png"))
    summary["plots"] = [p.name for p in plots]
    summary["outputs"] = sorted({*(p.name for p in staging.iterdir()), "results.json"})
    (staging / "results.json").write_text(json.dumps(summary, indent=2))
    return summary

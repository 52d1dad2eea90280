"""Run a recipe end to end: data, model, strategy, training, test metrics, Delta_m, checkpoint, plots."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from . import build_architecture, build_strategy
from .data import DataBundle, build_data
from .loop import train_epoch
from .metrics import delta_m, task_metric
from .models import build_model as build_recipe_model
from .param_groups import parameter_groups
from .plots import plot_loss_curves
from .registry import STRATEGIES

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
}


def cache_dir() -> Path:
    """Where single-task baselines are cached (``$MTL_PLUGINS_CACHE`` or ``~/.cache/mtl_plugins``)."""
    return Path(os.environ.get("MTL_PLUGINS_CACHE", Path.home() / ".cache" / "mtl_plugins"))


def training_options(recipe: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(TRAINING_DEFAULTS)
    unknown = sorted(set(recipe.get("training", {})) - set(options))
    if unknown:
        raise ValueError(f"unknown training options {unknown}; accepted: {sorted(options)}")
    options.update(recipe.get("training", {}))
    return options


def build_datasets(recipe: Mapping[str, Any]) -> DataBundle:
    """The recipe's ``data`` section: ``dataset`` names a builder, the other keys are its options."""
    options = dict(recipe.get("data", {}))
    return build_data(options.pop("dataset", "multidigits"), **options)


def build_model(recipe: Mapping[str, Any], data: DataBundle) -> torch.nn.Module:
    """The recipe's ``model`` section: a registered model, converted by ``architecture`` if not ``hps``."""
    spec = recipe.get("model", {})
    tasks = data.tasks
    model = build_recipe_model(spec.get("name", "multidigits_cnn"), tasks, data.task_specs, **spec.get("options", {}))
    architecture = spec.get("architecture", "hps")
    if architecture not in ("hps", "HPS"):
        build_architecture(architecture, tasks, model=model)
    return model


def make_strategy(recipe: Mapping[str, Any], tasks: Sequence[str], model: torch.nn.Module):
    spec = recipe.get("strategy", {})
    name = spec.get("name", "ew")
    options = dict(spec.get("options", {}))
    if "model" in STRATEGIES.accepted_options(name):
        options["model"] = model
    return build_strategy(name, tasks, **options)


def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int) -> dict[str, float]:
    """Each task's main metric on the eval split, as ``{"<task>/<metric>": value}``."""
    metrics = {t: task_metric(data.task_specs[t]) for t in data.tasks}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.eval), batch_size):
            batch = data.eval[start : start + batch_size]
            inputs = {k: v for k, v in batch.items() if k not in data.tasks}
            logits = model(**inputs).logits
            for t in data.tasks:
                metrics[t].update(logits[t], batch[t])
    return {f"{t}/{data.task_specs[t].metric}": m.compute() for t, m in metrics.items()}


def higher_is_better(data: DataBundle) -> dict[str, bool]:
    return {f"{t}/{spec.metric}": spec.higher_is_better for t, spec in data.task_specs.items()}


def fit(recipe: Mapping[str, Any], progress: bool = True, log_path: Path | None = None) -> dict[str, Any]:
    """Train the recipe's model with its strategy; returns model, strategy, test metrics, log records."""
    opts = training_options(recipe)
    torch.manual_seed(int(opts["seed"]))
    data = build_datasets(recipe)
    tasks, train = data.tasks, data.train
    model = build_model(recipe, data)
    strategy = make_strategy(recipe, tasks, model)
    optimizer = torch.optim.Adam(
        parameter_groups(model, float(opts["learning_rate"]), float(opts["lr_ts"]), float(opts["weight_decay"]))
    )
    batch_size = int(opts["per_device_train_batch_size"])
    epochs = int(opts["num_train_epochs"])
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs if int(opts["max_steps"]) < 0 else int(opts["max_steps"])
    generator = torch.Generator().manual_seed(int(opts["seed"]))
    records: list[dict[str, float]] = []
    log_file = open(log_path, "w") if log_path else None
    bar = _progress_bar(total, strategy.name, enabled=progress)
    step, started = 0, time.perf_counter()
    try:
        while step < total:
            order = torch.randperm(len(train), generator=generator).tolist()
            batches = (train[order[i : i + batch_size]] for i in range(0, len(order), batch_size))

            def limited():
                nonlocal step
                for batch in batches:
                    if step >= total:
                        return
                    strategy.set_progress(step / total)
                    yield batch
                    step += 1

            def on_step(losses: dict[str, float]) -> None:
                bar.update(1)
                if step % int(opts["logging_steps"]) == 0 or step == total - 1:
                    record = {"step": step + 1, **{f"loss/{t}": v for t, v in losses.items()}, **strategy.log_metrics()}
                    records.append(record)
                    bar.set_postfix(loss=f"{sum(losses.values()):.3f}")
                    if log_file:
                        log_file.write(json.dumps(record) + "\n")

            train_epoch(model, strategy, limited(), optimizer, on_step=on_step)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    seconds = time.perf_counter() - started
    metrics = evaluate(model, data, int(opts["per_device_eval_batch_size"]))
    return {"model": model, "strategy": strategy, "metrics": metrics, "records": records, "data": data,
            "train_seconds": seconds, "steps": total}


def _progress_bar(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"train [{label}]", disable=not enabled, leave=False, dynamic_ncols=True)


def single_task_baselines(recipe: Mapping[str, Any], tasks: Sequence[str], mode: str, progress: bool) -> dict[str, float] | None:
    """Test metrics of one single-task model per task (``ew`` on that task alone), cached by config."""
    if mode == "skip":
        return None
    if mode not in ("cache", "train"):
        raise ValueError(f"baselines must be 'cache', 'train' or 'skip', got {mode!r}")
    key_source = {k: recipe.get(k) for k in ("data", "model", "training")}
    key_source["model"] = {**(key_source["model"] or {}), "architecture": "hps"}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "baselines" / f"{key}.json"
    cached = json.loads(path.read_text()) if path.exists() and mode == "cache" else {}
    for task in tasks:
        if any(name.startswith(f"{task}/") for name in cached):
            continue
        single = {**recipe, "data": {**recipe.get("data", {}), "tasks": [task]}, "strategy": {"name": "ew"},
                  "model": key_source["model"]}
        cached.update(fit(single, progress=progress)["metrics"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=2))
    return {k: v for k, v in cached.items() if k.split("/")[0] in tasks}


def run_recipe(recipe: Mapping[str, Any], output_dir: str | Path | None = None, baselines: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run a recipe and write its outputs; returns the summary written to ``results.json``."""
    out = Path(output_dir or recipe.get("output_dir", "runs/run"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
    result = fit(recipe, progress=progress, log_path=out / "train_log.jsonl")
    data, metrics = result["data"], result["metrics"]
    tasks = data.tasks
    summary: dict[str, Any] = {
        "strategy": result["strategy"].name,
        "tasks": tasks,
        "steps": result["steps"],
        "train_seconds": round(result["train_seconds"], 2),
        "test_metrics": metrics,
    }
    reference = single_task_baselines(recipe, tasks, baselines or recipe.get("baselines", "cache"), progress)
    if reference is not None:
        summary["single_task_metrics"] = reference
        summary["delta_m"] = delta_m(metrics, reference, higher_is_better(data))
    from safetensors.torch import save_model

    save_model(result["model"], str(out / "model.safetensors"))
    torch.save(result["strategy"].state_dict(), out / "strategy_state.pt")
    plots = [plot_loss_curves(result["records"], tasks, out / "loss_curves.png")]
    plots += result["strategy"].write_plots(out)
    summary["plots"] = [p.name for p in plots]
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary

"""``mtl-train RECIPE [key=value ...]``: run a bundled or YAML recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import available_architectures, available_strategies
from .config import apply_overrides, check_recipe, list_recipes, load_recipe
from .recipe_checks import check_recipe_types, resume_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl-train",
        description="Train a multi-task model from a recipe (a bundled name or a YAML path).",
        epilog="Example: mtl-train quickstart strategy.name=ew training.num_train_epochs=1",
    )
    parser.add_argument("recipe", nargs="?", help="bundled recipe name or path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as dotted key=value (values are YAML)")
    parser.add_argument("--list", action="store_true", help="list bundled recipes, strategies and architectures")
    parser.add_argument("--output-dir", help="output folder (default: the recipe's output_dir)")
    parser.add_argument("--baselines", choices=("cache", "train", "skip"),
                        help="single-task baselines for Delta_m: cached, retrained, or skipped")
    parser.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                        help="continue from a checkpoint folder (default: the last one in OUTPUT_DIR/checkpoints); "
                             "runs save checkpoints with training.save_strategy=steps or epoch")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of a configuration error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.isdir(args.resume):
        args.overrides.append(args.resume)  # `--resume key=value`: the last checkpoint, then an override
        args.resume = True
    if args.list:
        print("recipes:       " + ", ".join(list_recipes()))
        print("strategies:    " + ", ".join(available_strategies()))
        print("architectures: " + ", ".join(available_architectures()))
        return 0
    if not args.recipe:
        build_parser().print_usage(sys.stderr)
        print("mtl-train: error: give a recipe (see mtl-train --list)", file=sys.stderr)
        return 2
    notes: list[str] = []
    try:
        recipe = check_recipe(apply_overrides(load_recipe(args.recipe), args.overrides, notes))
        check_recipe_types(recipe)
        if isinstance(args.resume, str) or (recipe.get("training") or {}).get("resume_from_checkpoint"):
            resume_checkpoint(recipe, args.resume)
    except (ValueError, FileNotFoundError) as error:
        print(f"mtl-train: error: {one_line(error)}", file=sys.stderr)
        return 2
    for note in notes if int(os.environ.get("RANK", "0")) == 0 else ():
        print(f"mtl-train: note: {note}", file=sys.stderr)
    from transformers.utils import logging as transformers_logging

    from .runner import describe_environment, format_epoch_table, is_main_process, run_recipe

    transformers_logging.disable_progress_bar()  # weight loading and shard writing: the run's own bars stay

    try:
        summary = run_recipe(recipe, output_dir=args.output_dir, baselines=args.baselines,
                             progress=not args.no_progress, resume=args.resume)
    except (ValueError, TypeError, KeyError, OSError) as error:
        if args.traceback:
            raise
        print(f"mtl-train: error: {describe(error, recipe)}", file=sys.stderr)
        print("mtl-train: (run again with --traceback for details)", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    if is_main_process():
        print(json.dumps({k: v for k, v in summary.items() if k not in ("plots", "outputs", "epochs")}, indent=2))
        if summary.get("epochs"):
            print("per epoch (validation split):")
            print(format_epoch_table(summary["epochs"]))
        print(f"ran as {describe_environment(summary['environment'])}")
        for warning in summary.get("warnings", []):
            print(f"mtl-train: warning: {warning}", file=sys.stderr)
        print(f"outputs written to {args.output_dir or recipe.get('output_dir', 'runs/run')}")
    return 0


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split())


def describe(error: BaseException, recipe: Mapping[str, Any]) -> str:
    """A one-line message; a model or file that could not be read (e.g. a pretrained backbone missing
    from the offline cache) says so first, with the recipe's ``backbone_pretrained`` if it has one."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        backbone = ((recipe.get("model") or {}).get("options") or {}).get("backbone_pretrained")
        source = f" (model.options.backbone_pretrained={backbone})" if backbone else ""
        return f"could not load a pretrained model or file{source}: {one_line(error)}"
    return one_line(error)


def _end_distributed() -> None:
    """Close the process group of a distributed launch (torchrun, accelerate launch) before exiting."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

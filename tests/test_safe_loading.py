"""Nothing in the repository (library, trainers, tooling, tests) loads files through pickle with code execution."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Loading calls that run arbitrary code from the file they read.
UNSAFE = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.load\(|joblib\.load\(")


def test_no_file_is_unpickled_with_code_execution():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == Path(__file__).resolve() or any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if UNSAFE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

"""Delta_m: mean relative change of a multi-task model's metrics against single-task baselines.

``Delta_m = (1/T) sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i * 100`` with ``l_i = 1`` when lower is
better (Maninis et al.; the formula of both papers). Higher is better.
"""

from __future__ import annotations

from collections.abc import Mapping


def delta_m(
    metrics: Mapping[str, float], baseline: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    """Delta_m in percent over the metrics named in ``higher_is_better``."""
    if not higher_is_better:
        raise ValueError("higher_is_better is empty: name at least one metric")
    total = 0.0
    for name, higher in higher_is_better.items():
        for source, values in (("metrics", metrics), ("baseline", baseline)):
            if name not in values:
                raise KeyError(f"{source} has no value for {name!r}; it has {sorted(values)}")
        base = float(baseline[name])
        if base == 0:
            raise ValueError(f"baseline value of {name!r} is 0: relative change is undefined")
        sign = 1.0 if higher else -1.0
        total += sign * (float(metrics[name]) - base) / base
    return 100.0 * total / len(higher_is_better)

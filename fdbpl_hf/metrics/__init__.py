"""Metrics for prompt-learning protocols.

Plain functions (numpy only) live in `functional` and are re-exported here. The same metrics ship
as `evaluate` modules inside this package (`fdbpl_accuracy`, `base_novel_hm`, `ood_detection`);
`load_metric(name)` loads them from their local folder, so it works offline (`HF_HUB_OFFLINE=1`).
`evaluate` itself is optional: only `load_metric` needs it.
"""

from __future__ import annotations

import os
from typing import Any

from .functional import (
    accuracy,
    auroc,
    average_base_novel,
    fpr_at_tpr,
    harmonic_mean,
    per_class_accuracy,
    summarize_seeds,
)

METRIC_MODULES = ("fdbpl_accuracy", "base_novel_hm", "ood_detection")

__all__ = [
    "METRIC_MODULES",
    "accuracy",
    "auroc",
    "average_base_novel",
    "fpr_at_tpr",
    "harmonic_mean",
    "load_metric",
    "metric_path",
    "per_class_accuracy",
    "summarize_seeds",
]


def metric_path(name: str) -> str:
    """Folder of a shipped `evaluate` module (usable as `evaluate.load(metric_path(name))`)."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {list(METRIC_MODULES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load_metric(name: str, **kwargs: Any):
    """`evaluate.load` of a shipped metric module from its local path (no Hub access needed)."""
    try:
        import evaluate
    except ImportError as err:  # optional dependency
        raise ImportError(
            "load_metric needs the optional `evaluate` package (pip install evaluate); the plain functions in "
            "fdbpl_hf.metrics work without it"
        ) from err
    return evaluate.load(metric_path(name), **kwargs)

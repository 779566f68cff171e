"""Metrics as plain numpy functions (no `evaluate` needed).

Inputs may be lists, numpy arrays or torch tensors. Accuracies are fractions in [0, 1];
`harmonic_mean`, `summarize_seeds` and `average_base_novel` are scale-free, so percentages work
as well (the literature reports percentages).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "accuracy",
    "auroc",
    "average_base_novel",
    "fpr_at_tpr",
    "harmonic_mean",
    "per_class_accuracy",
    "summarize_seeds",
]


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _class_predictions(predictions: Any) -> np.ndarray:
    pred = _array(predictions)
    # 2-D input is (N, C) logits or probabilities.
    return pred.argmax(-1) if pred.ndim == 2 else pred.reshape(-1)


def accuracy(predictions: Any, references: Any) -> float:
    """Top-1 accuracy in [0, 1]; `predictions` are class ids (N,) or logits (N, C)."""
    logits = _array(predictions)
    pred, ref = _class_predictions(logits), _array(references).reshape(-1)
    if pred.shape != ref.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {ref.shape[0]} references")
    if ref.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    if logits.ndim == 2 and (ref.min() < 0 or ref.max() >= logits.shape[1]):
        # a reference no logit column stands for would count as a miss: a silently low accuracy
        bad = int(ref.min()) if ref.min() < 0 else int(ref.max())
        raise ValueError(f"reference class id {bad} is outside the {logits.shape[1]} classes of the logits")
    return float(np.mean(pred == ref))


def per_class_accuracy(predictions: Any, references: Any, num_classes: int | None = None) -> np.ndarray:
    """Accuracy of each class (index = class id); NaN for classes without references.

    `np.nanmean` of the result is the mean per-class (balanced) accuracy.
    """
    pred, ref = _class_predictions(predictions), _array(references).reshape(-1).astype(np.int64)
    if pred.shape != ref.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {ref.shape[0]} references")
    n = int(num_classes) if num_classes is not None else (int(ref.max()) + 1 if ref.size else 0)
    if ref.size and (ref.min() < 0 or ref.max() >= n):
        # such a reference would silently drop out of the table (or fail inside numpy)
        raise ValueError(f"reference class id {int(ref.min()) if ref.min() < 0 else int(ref.max())} is outside "
                         f"0..{n - 1} (num_classes={n})")
    total = np.bincount(ref, minlength=n)[:n].astype(np.float64)
    correct = np.bincount(ref[pred == ref], minlength=n)[:n].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N); 0 when either is 0 (or negative)."""
    base, novel = float(base), float(novel)
    if base <= 0 or novel <= 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as in the Mann-Whitney U test)."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last element of each tie group
    return (upper - (counts - 1) / 2.0)[inverse]


def auroc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC curve, in-distribution positive and higher score = more in-distribution.

    Equals P(s_in > s_out) + P(s_in = s_out) / 2, computed from midranks (Mann-Whitney U), so
    ties count one half: identical score sets give 0.5, perfectly separated ones 1.0.
    """
    s_in, s_out = _array(scores_in).astype(np.float64).reshape(-1), _array(scores_out).astype(np.float64).reshape(-1)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("AUROC needs at least one in-distribution and one out-of-distribution score")
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        raise ValueError("scores contain NaN")
    ranks = _midranks(np.concatenate([s_in, s_out]))
    u = ranks[: s_in.size].sum() - s_in.size * (s_in.size + 1) / 2.0
    return float(u / (s_in.size * s_out.size))


def fpr_at_tpr(scores_in: Any, scores_out: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the given true-positive rate (FPR95 by default).

    In-distribution is the positive class and higher scores mean more in-distribution. The
    threshold is the largest t with at least `tpr` of the ID scores >= t (i.e. the
    ceil(tpr * n_in)-th largest ID score); the FPR is the fraction of OOD scores >= t.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = _array(scores_in).astype(np.float64).reshape(-1), _array(scores_out).astype(np.float64).reshape(-1)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("FPR needs at least one in-distribution and one out-of-distribution score")
    # The tolerance keeps 0.95 * 20 (= 19.000000000000004 in floating point) at 19, not 20.
    k = max(1, math.ceil(tpr * s_in.size - 1e-9))
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


def summarize_seeds(results: Sequence[Mapping[str, float]], ddof: int = 1) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over seeds.

    The std is the sample standard deviation (`ddof=1`) when there are at least two seeds and
    0.0 for a single seed. Dassl's `parse_test_res.py` prints `np.std` (ddof=0, smaller by
    sqrt((n-1)/n), about 18% for 3 seeds): pass `ddof=0` to match those logs. Only keys present
    in every per-seed dict are summarised. Returns {key: {"mean", "std", "n"}}.
    """
    if not results:
        raise ValueError("no per-seed results to summarise")
    keys = [k for k in results[0] if all(k in r for r in results[1:])]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        values = np.asarray([float(r[k]) for r in results], dtype=np.float64)
        std = float(values.std(ddof=ddof)) if values.size >= 2 else 0.0
        out[k] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return out


def average_base_novel(per_dataset: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """The base-to-novel summary the literature reports.

    `per_dataset` maps a dataset name to (base, novel) accuracy (each usually a 3-seed mean).
    Returns `base` and `novel` averaged over datasets, `hm` = HM of those two averages (the
    convention of CoOp, MaPLe, PromptSRC, PromptKD tables: CLIP 69.34 / 74.22 -> 71.70), plus
    `per_dataset` {name: {"base", "novel", "hm"}} and `mean_of_hm` (the average of per-dataset HMs,
    which is a different, lower-or-equal number and should not be mixed up with `hm`).
    """
    if not per_dataset:
        raise ValueError("no datasets to average")
    rows = {name: (float(b), float(n)) for name, (b, n) in per_dataset.items()}
    base = float(np.mean([b for b, _ in rows.values()]))
    novel = float(np.mean([n for _, n in rows.values()]))
    per = {name: {"base": b, "novel": n, "hm": harmonic_mean(b, n)} for name, (b, n) in rows.items()}
    return {
        "base": base,
        "novel": novel,
        "hm": harmonic_mean(base, novel),
        "num_datasets": len(rows),
        "per_dataset": per,
        "mean_of_hm": float(np.mean([p["hm"] for p in per.values()])),
    }

"""`evaluate` module: out-of-distribution detection, AUROC and FPR at 95% TPR.

Stands alone (numpy, datasets, evaluate; no fdbpl_hf), so the folder can be published as a Hub
metric repo: `evaluate.load("path/to/ood_detection")`. With fdbpl_hf installed,
`fdbpl_hf.metrics.load_metric("ood_detection")` loads it offline. Its numbers equal
`fdbpl_hf.metrics.functional.auroc` / `fpr_at_tpr` (tested).
"""

import math

import datasets
import evaluate
import numpy as np


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (Mann-Whitney U)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """P(s_in > s_out) + P(s_in = s_out) / 2."""
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("AUROC needs at least one in-distribution and one out-of-distribution score")
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        raise ValueError("scores contain NaN")
    ranks = _midranks(np.concatenate([s_in, s_out]))
    u = ranks[: s_in.size].sum() - s_in.size * (s_in.size + 1) / 2.0
    return float(u / (s_in.size * s_out.size))


def fpr_at_tpr(s_in: np.ndarray, s_out: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD scores >= the largest threshold that keeps at least `tpr` of the ID scores."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("FPR needs at least one in-distribution and one out-of-distribution score")
    k = max(1, math.ceil(tpr * s_in.size - 1e-9))  # 0.95 * 20 is 19.000000000000004 in floating point
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))

_DESCRIPTION = """OOD detection quality of a score where higher means more in-distribution (e.g. the
maximum softmax probability or maximum concept matching score). In-distribution samples are the
positive class. AUROC counts ties as one half (Mann-Whitney U); FPR95 is the fraction of OOD
samples scored at or above the threshold that keeps at least 95% of ID samples."""

_KWARGS_DESCRIPTION = """
Args:
    scores (`list` of `float`): one score per sample, higher = more in-distribution.
    references (`list` of `int`): 1 for in-distribution, 0 for out-of-distribution.
    tpr (`float`, default 0.95): the true-positive rate of the FPR.
Returns:
    auroc (`float`), fpr95 (`float`; key `fpr@{tpr}` when tpr != 0.95), both fractions in [0, 1].
Examples:
    >>> metric = evaluate.load("ood_detection")  # this folder
    >>> metric.compute(scores=[0.9, 0.8, 0.2, 0.1], references=[1, 1, 0, 0])
    {'auroc': 1.0, 'fpr95': 0.0}
"""

_CITATION = """@inproceedings{hendrycks2017baseline, title={A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks}, booktitle={ICLR}, year={2017}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OodDetection(evaluate.Metric):
    """AUROC and FPR@95%TPR with in-distribution as the positive class."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, scores, references, tpr: float = 0.95) -> dict:
        scores, references = np.asarray(scores, dtype=np.float64), np.asarray(references)
        if not np.isin(references, (0, 1)).all():
            raise ValueError("references must be 1 (in-distribution) or 0 (out-of-distribution)")
        s_in, s_out = scores[references == 1], scores[references == 0]
        key = "fpr95" if tpr == 0.95 else f"fpr@{tpr:g}"
        return {"auroc": auroc(s_in, s_out), key: fpr_at_tpr(s_in, s_out, tpr=tpr)}

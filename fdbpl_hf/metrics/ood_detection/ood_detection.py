"""`evaluate` module: out-of-distribution detection, AUROC and FPR at 95% TPR.

Load it offline with `fdbpl_hf.metrics.load_metric("ood_detection")`.
"""

import datasets
import evaluate
import numpy as np

from fdbpl_hf.metrics.functional import auroc
from fdbpl_hf.metrics.functional import fpr_at_tpr

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
    >>> metric = fdbpl_hf.metrics.load_metric("ood_detection")
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

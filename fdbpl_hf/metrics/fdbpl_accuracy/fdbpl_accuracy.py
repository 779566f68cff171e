"""`evaluate` module: top-1 accuracy, optionally per class.

Stands alone (numpy, datasets, evaluate; no fdbpl_hf), so the folder can be published as a Hub
metric repo: `evaluate.load("path/to/fdbpl_accuracy")`. With fdbpl_hf installed,
`fdbpl_hf.metrics.load_metric("fdbpl_accuracy")` loads it offline. Its numbers equal
`fdbpl_hf.metrics.functional` (tested).
"""

import datasets
import evaluate
import numpy as np


def _class_ids(predictions) -> np.ndarray:
    pred = np.asarray(predictions)
    return pred.argmax(-1) if pred.ndim == 2 else pred.reshape(-1)  # 2-D: (N, C) logits


def accuracy(predictions, references) -> float:
    """Top-1 accuracy in [0, 1]."""
    pred, ref = _class_ids(predictions), np.asarray(references).reshape(-1)
    if pred.shape != ref.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {ref.shape[0]} references")
    if ref.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(pred == ref))


def per_class_accuracy(predictions, references, num_classes=None) -> np.ndarray:
    """Accuracy of each class id; NaN for classes without references."""
    pred, ref = _class_ids(predictions), np.asarray(references).reshape(-1).astype(np.int64)
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

_DESCRIPTION = """Top-1 accuracy (fraction in [0, 1]) of predicted class ids against reference class ids.
With `per_class=True` it also returns each class's accuracy and their mean (balanced accuracy)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (argmax of the logits).
    references (`list` of `int`): ground-truth class ids.
    per_class (`bool`, default False): also return `per_class_accuracy` and `mean_per_class_accuracy`.
    num_classes (`int`, optional): length of the per-class list (default: max reference + 1).
Returns:
    accuracy (`float`), and with `per_class=True`: per_class_accuracy (`list` of `float`, NaN for
    classes without references) and mean_per_class_accuracy (`float`).
Examples:
    >>> metric = evaluate.load("fdbpl_accuracy")  # this folder
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = """@article{fdbpl2025, title={Faster Distillation-Based Prompt Learning for Region-Aware Vision-Language Models Adaptation}, journal={arXiv:2505.18053}, year={2025}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FdbplAccuracy(evaluate.Metric):
    """Top-1 (and per-class) accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, per_class: bool = False, num_classes=None) -> dict:
        result = {"accuracy": accuracy(predictions, references)}
        if per_class:
            per = per_class_accuracy(predictions, references, num_classes=num_classes)
            result["per_class_accuracy"] = per.tolist()
            result["mean_per_class_accuracy"] = float(np.nanmean(per))
        return result

"""`evaluate` module: top-1 accuracy, optionally per class, computed by `fdbpl_hf.metrics.functional`.

Load it offline with `fdbpl_hf.metrics.load_metric("fdbpl_accuracy")`.
"""

import datasets
import evaluate
import numpy as np

from fdbpl_hf.metrics.functional import accuracy
from fdbpl_hf.metrics.functional import per_class_accuracy

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
    >>> metric = fdbpl_hf.metrics.load_metric("fdbpl_accuracy")
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

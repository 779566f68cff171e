"""`evaluate` module: base-to-novel summary, averages over datasets and the harmonic mean of the averages.

Stands alone (numpy, datasets, evaluate; no fdbpl_hf), so the folder can be published as a Hub
metric repo: `evaluate.load("path/to/base_novel_hm")`. With fdbpl_hf installed,
`fdbpl_hf.metrics.load_metric("base_novel_hm")` loads it offline. Its numbers equal
`fdbpl_hf.metrics.functional.average_base_novel` (tested).
"""

import datasets
import evaluate
import numpy as np


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N); 0 when either is 0 (or negative)."""
    base, novel = float(base), float(novel)
    return 0.0 if base <= 0 or novel <= 0 else 2.0 * base * novel / (base + novel)


def average_base_novel(per_dataset: dict) -> dict:
    """Average base and novel accuracy over datasets, the HM of the averages, and per-dataset rows."""
    if not per_dataset:
        raise ValueError("no datasets to average")
    rows = {name: (float(b), float(n)) for name, (b, n) in per_dataset.items()}
    base = float(np.mean([b for b, _ in rows.values()]))
    novel = float(np.mean([n for _, n in rows.values()]))
    per = {name: {"base": b, "novel": n, "hm": harmonic_mean(b, n)} for name, (b, n) in rows.items()}
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel), "num_datasets": len(rows),
            "per_dataset": per, "mean_of_hm": float(np.mean([p["hm"] for p in per.values()]))}

_DESCRIPTION = """Base-to-novel generalisation summary (CoOp protocol). Each input row is one dataset's
base and novel accuracy (any scale, usually percent, usually a 3-seed mean). Returns the average
base and novel accuracy over datasets and HM = 2BN/(B+N) of those averages, the number reported in
the CoOp / MaPLe / PromptSRC / PromptKD tables (zero-shot CLIP: 69.34 / 74.22 -> 71.70)."""

_KWARGS_DESCRIPTION = """
Args:
    base (`list` of `float`): base-class accuracy of each dataset.
    novel (`list` of `float`): novel-class accuracy of each dataset (same order).
    dataset_names (`list` of `str`, optional): names for the per-dataset breakdown.
Returns:
    base, novel, hm (`float`), num_datasets (`int`), mean_of_hm (`float`, the average of per-dataset
    HMs, a different number), per_dataset (`dict` name -> {base, novel, hm}).
Examples:
    >>> metric = evaluate.load("base_novel_hm")  # this folder
    >>> round(metric.compute(base=[69.34], novel=[74.22])["hm"], 2)
    71.7
"""

_CITATION = """@article{zhou2022coop, title={Learning to Prompt for Vision-Language Models}, journal={IJCV}, year={2022}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BaseNovelHm(evaluate.Metric):
    """Averages of base and novel accuracy over datasets, and their harmonic mean."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"base": datasets.Value("float64"), "novel": datasets.Value("float64")}),
        )

    def _compute(self, base, novel, dataset_names=None) -> dict:
        names = list(dataset_names) if dataset_names is not None else [f"dataset_{i}" for i in range(len(base))]
        if len(names) != len(base) or len(set(names)) != len(names):
            raise ValueError("dataset_names must be unique and have one name per row")
        return average_base_novel({n: (b, v) for n, b, v in zip(names, base, novel)})

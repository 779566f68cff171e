"""Metric functions against hand-computed values, and the shipped `evaluate` modules offline."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fdbpl_hf.metrics as M
from fdbpl_hf.metrics import (
    accuracy,
    auroc,
    average_base_novel,
    fpr_at_tpr,
    harmonic_mean,
    per_class_accuracy,
    summarize_seeds,
)

REPO = Path(__file__).resolve().parents[1]


def test_accuracy_from_ids_logits_and_tensors():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    logits = torch.tensor([[2.0, 1.0], [0.1, 0.3], [5.0, -1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_per_class_accuracy():
    per = per_class_accuracy([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], num_classes=3)
    assert per[0] == 0.5 and per[1] == pytest.approx(2 / 3) and np.isnan(per[2])
    assert np.nanmean(per) == pytest.approx((0.5 + 2 / 3) / 2)


def test_per_class_accuracy_refuses_references_outside_the_classes():
    """A reference >= num_classes used to vanish from the table (here: class 2 at 1.0, not 0.0)."""
    with pytest.raises(ValueError, match=r"reference class id 2 is outside 0..1 \(num_classes=2\)"):
        per_class_accuracy([0, 1, 0], [0, 1, 2], num_classes=2)
    with pytest.raises(ValueError, match="reference class id -1 is outside"):
        per_class_accuracy([0, 1, 0], [0, 1, -1])
    with pytest.raises(ValueError, match="reference class id 3 is outside the 2 classes of the logits"):
        accuracy(torch.tensor([[2.0, 1.0], [0.1, 0.3]]), [0, 3])


def test_harmonic_mean():
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70
    assert harmonic_mean(0.8, 0.8) == pytest.approx(0.8)
    assert harmonic_mean(0.0, 0.9) == 0.0 and harmonic_mean(0.9, 0.0) == 0.0


def test_auroc_hand_computed():
    # Pairs (in, out): 0.9 beats both, 0.8 beats both, 0.4 beats only 0.3 -> 5 of 6.
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    # 0.9 beats both (2), 0.5 ties 0.5 (1/2) and beats 0.1 (1) -> 3.5 of 4.
    assert auroc([0.9, 0.5], [0.5, 0.1]) == pytest.approx(0.875)
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1, 2], [3, 4, 5]) == 0.0


def test_auroc_ties_and_identical_distributions():
    assert auroc([1, 2, 3], [1, 2, 3]) == 0.5
    assert auroc([1, 2, 3], [2, 2]) == 0.5
    assert auroc([7.0] * 4, [7.0] * 9) == 0.5


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.integers(0, 6, 40), rng.integers(0, 5, 30)  # many ties
    diff = s_in[:, None] - s_out[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auroc(s_in, s_out) == pytest.approx(expected)
    assert auroc(torch.tensor(s_in, dtype=torch.float16), s_out) == pytest.approx(expected)


def test_fpr_at_95_tpr_hand_computed():
    # 20 ID scores 1..20: keeping >= 95% (19 of 20) gives threshold 2; OOD >= 2 are 2, 2.5, 10.
    assert fpr_at_tpr(np.arange(1, 21), [0.5, 1.5, 2, 2.5, 10]) == pytest.approx(3 / 5)
    # 10 ID scores: 95% needs all 10, threshold 1; OOD >= 1 are 1 and 5.
    assert fpr_at_tpr(np.arange(1, 11), [0, 1, 5]) == pytest.approx(2 / 3)
    # TPR 0.5 of 1..10 keeps 5 scores, threshold 6.
    assert fpr_at_tpr(np.arange(1, 11), [5, 6, 7, 100], tpr=0.5) == pytest.approx(3 / 4)
    assert fpr_at_tpr([5, 6, 7], [1, 2, 3]) == 0.0
    assert fpr_at_tpr([1, 2, 3], [4, 5, 6]) == 1.0


def test_fpr_threshold_keeps_at_least_the_tpr():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1, 1, 333), rng.normal(0, 1, 200)
    fpr = fpr_at_tpr(s_in, s_out)
    # Brute force: the largest threshold among ID scores with TPR >= 0.95.
    t = max(t for t in s_in if np.mean(s_in >= t) >= 0.95)
    assert fpr == pytest.approx(np.mean(s_out >= t))


def test_summarize_seeds():
    out = summarize_seeds([{"acc": 1.0, "hm": 2.0}, {"acc": 2.0, "hm": 2.0}, {"acc": 3.0, "hm": 2.0, "extra": 1.0}])
    assert set(out) == {"acc", "hm"}
    assert out["acc"] == {"mean": 2.0, "std": 1.0, "n": 3}  # sample std (ddof=1)
    assert out["hm"]["std"] == 0.0
    assert summarize_seeds([{"acc": 1.0}, {"acc": 3.0}], ddof=0)["acc"]["std"] == 1.0
    assert summarize_seeds([{"acc": 0.7}])["acc"] == {"mean": 0.7, "std": 0.0, "n": 1}


def test_hm_of_averages_reproduces_the_literature():
    # Two datasets whose averages are zero-shot CLIP's 69.34 / 74.22 (ViT-B/16, 11 datasets).
    res = average_base_novel({"a": (70.34, 73.22), "b": (68.34, 75.22)})
    assert res["base"] == pytest.approx(69.34) and res["novel"] == pytest.approx(74.22)
    assert round(res["hm"], 2) == 71.70
    assert res["num_datasets"] == 2 and set(res["per_dataset"]) == {"a", "b"}
    assert res["mean_of_hm"] <= res["hm"]
    assert round(average_base_novel({"promptkd": (86.96, 80.73)})["hm"], 2) == 83.73


def test_functional_does_not_import_evaluate():
    tree = ast.parse((REPO / "fdbpl_hf" / "metrics" / "functional.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "typing", "numpy"}


def test_load_metric_explains_missing_evaluate(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # makes `import evaluate` fail
    with pytest.raises(ImportError, match="optional `evaluate`"):
        M.load_metric("ood_detection")
    with pytest.raises(ValueError, match="unknown metric"):
        M.metric_path("accuracy")


def test_metric_modules_ship_as_files():
    for name in M.METRIC_MODULES:
        assert (Path(M.metric_path(name)) / f"{name}.py").is_file()


_OFFLINE_SCRIPT = """
import json
import evaluate
# each module from a copy of its folder, outside the package, with fdbpl_hf unimportable (the
# prelude blocks it): the folders stand alone, as Hub metric repos would
acc = evaluate.load("./fdbpl_accuracy")
hm = evaluate.load("./base_novel_hm")
ood = evaluate.load("./ood_detection")
print(json.dumps({
    "accuracy": acc.compute(predictions=[0, 1, 1, 2, 2], references=[0, 1, 0, 2, 1], per_class=True),
    "hm": hm.compute(base=[70.34, 68.34], novel=[73.22, 75.22], dataset_names=["a", "b"]),
    "ood": ood.compute(scores=[0.9, 0.5, 0.5, 0.1, 3.0, 2.0], references=[1, 1, 0, 0, 1, 0]),
}))
"""


def test_evaluate_modules_load_offline_and_match_functional(tmp_path):
    pytest.importorskip("evaluate")
    env = dict(os.environ)
    # Offline and with an unreachable endpoint and an empty cache: only the local path can work.
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    from stock_process import _BLOCK_FDBPL

    for name in M.METRIC_MODULES:
        shutil.copytree(M.metric_path(name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        card = (tmp_path / name / "README.md").read_text()
        assert card.startswith("---\n") and "- evaluate" in card and "- metric" in card and "evaluate.load(" in card
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_FDBPL + _OFFLINE_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["accuracy"]["accuracy"] == accuracy([0, 1, 1, 2, 2], [0, 1, 0, 2, 1]) == 0.6
    assert out["accuracy"]["per_class_accuracy"] == per_class_accuracy([0, 1, 1, 2, 2], [0, 1, 0, 2, 1]).tolist()
    assert round(out["hm"]["hm"], 2) == 71.70
    assert out["hm"] == json.loads(json.dumps(average_base_novel({"a": (70.34, 73.22), "b": (68.34, 75.22)})))
    s_in, s_out = [0.9, 0.5, 3.0], [0.5, 0.1, 2.0]
    assert out["ood"] == {"auroc": auroc(s_in, s_out), "fpr95": fpr_at_tpr(s_in, s_out)}
    # 0.9: beats 0.5, 0.1 (2); 0.5: ties 0.5, beats 0.1 (1.5); 3.0: beats all (3) -> 6.5 / 9.
    assert out["ood"]["auroc"] == pytest.approx(6.5 / 9)
    # 95% of 3 ID scores needs all 3: threshold 0.5; OOD >= 0.5 are 0.5 and 2.0.
    assert out["ood"]["fpr95"] == pytest.approx(2 / 3)

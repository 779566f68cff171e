"""Cards as the ecosystem reads them, through the loopback Hub: RIL table facts in the dataset
card's YAML, evaluation results in the adapter card's model-index."""

import os
import subprocess
import sys

import datasets
from conftest import make_clip
from huggingface_hub import DatasetCard, ModelCard

from fdbpl_hf import FDBPLConfig, build_ril_table, get_fdbpl_model, push_ril_table
from fdbpl_hf.evaluation import load_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT_NAMES = [str(d) for d in range(10)]


def test_ril_table_card_yaml(fake_hub, digits_small, tokenizer, tmp_path):
    teacher = make_clip("tiny", seed=1)
    kw = dict(teacher_tokenizer=tokenizer, class_names=DIGIT_NAMES)
    a = build_ril_table(digits_small, teacher, num_regions=3, top_k=4, output_dir=str(tmp_path / "a"), **kw)
    b = build_ril_table(digits_small, teacher, num_regions=2, top_k=10, output_dir=str(tmp_path / "b"), **kw)
    name_a, name_b = push_ril_table(a, "tester/ril-card"), push_ril_table(b, "tester/ril-card")
    # read back with huggingface_hub alone, as a `load_dataset` user would
    data = DatasetCard.load("tester/ril-card", repo_type="dataset").data
    described = data["fdbpl_ril"]
    assert set(described) == {name_a, name_b}
    for name, k, m in ((name_a, 4, 3), (name_b, 10, 2)):
        entry = described[name]
        assert entry["class_names"] == DIGIT_NAMES and entry["top_k"] == k and entry["num_regions"] == m
        assert entry["teacher"]["name"] and isinstance(entry["regions"], dict) and entry["regions"]
        assert entry["source"]["num_rows"] == len(digits_small)
    assert "zero-shot-image-classification" in data["task_categories"] and "ril-table" in data["tags"]
    # the configs YAML still works for datasets (our key lives beside it, not in it)
    assert sorted(datasets.get_dataset_config_names("tester/ril-card")) == sorted([name_a, name_b])


def test_evaluate_records_results_on_the_adapter_card(fake_hub, tiny_checkpoints, tokenizer, tmp_path):
    from transformers import CLIPModel

    student = tiny_checkpoints["student"]
    model = get_fdbpl_model(CLIPModel.from_pretrained(student), FDBPLConfig(), tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    model.push_to_hub("tester/evaluated")
    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, os.path.join(REPO, "examples", "evaluate.py"), "--student", student,
                          "--adapter", str(tmp_path / "adapter"), "--dataset", "digits", "--max_eval_samples", "20",
                          "--no_ood", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "tester/evaluated"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    b2n = load_results(out / "results.json")["results"]["base_to_novel"]
    for card in (ModelCard.load(tmp_path / "adapter" / "README.md"), ModelCard.load("tester/evaluated")):
        results = {r.metric_name: r for r in card.data.eval_results}
        assert set(results) == {"base accuracy", "novel accuracy", "harmonic mean (base, novel)"}
        assert results["base accuracy"].metric_value == round(b2n["base_acc"], 2)
        assert results["harmonic mean (base, novel)"].metric_value == round(b2n["hm"], 2)
        assert results["novel accuracy"].dataset_name == "digits" and results["base accuracy"].dataset_split == "test"
        assert card.data.library_name == "peft" and "model-index" in card.content

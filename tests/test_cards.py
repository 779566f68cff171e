"""Cards as the ecosystem reads them, through the loopback Hub: RIL table facts in the dataset
card's YAML (evaluation results in the adapter card: tests/test_evaluation.py)."""

import datasets
from conftest import make_clip
from huggingface_hub import DatasetCard

from fdbpl_hf import build_ril_table, push_ril_table

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

"""The protocol on the pretrained numbers zoo: 100 classes, where a table's top-K (K < C) drops classes.

Marked `zoo` (pretrains two small CLIPs on the numbers world, about 9 CPU-minutes, then cached
under $HF_HOME, which the test session points at a temporary directory): `make test-zoo` runs
them, `make test` skips them. Set FDBPL_ZOO_CACHE to a zoo root (e.g. ~/.cache/huggingface/fdbpl_hf/zoo)
to reuse a zoo built outside the test session (the cache key still checks every setting).
"""

import os

import pytest
import torch

from fdbpl_hf import FDBPLConfig, get_fdbpl_model
from fdbpl_hf.data import training_set
from fdbpl_hf.protocol import run_base_to_novel
from fdbpl_hf.ril import CLIPTeacher, RegionSpec, RILDataset, build_ril_table
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from fdbpl_hf.testing.zoo import build_zoo, read_zoo_marker

pytestmark = pytest.mark.zoo

TOP_K = 10  # of C = 50 base classes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster, and stable on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo():
    return build_zoo(os.environ.get("FDBPL_ZOO_CACHE") or None, world="numbers")


def test_the_numbers_teacher_is_clearly_stronger_than_the_student(zoo):
    accuracy = read_zoo_marker(zoo)["zero_shot_base_novel"]
    for part in ("base", "novel"):
        assert accuracy["teacher"][part] > accuracy["student"][part] + 0.15, accuracy


def test_fdbpl_from_a_top_k_table_beats_the_zero_shot_student(zoo, tmp_path):
    # The ablation's settings (8 shots, 10 epochs), K = 10 of the 50 base classes. Seeds differ by
    # up to ~8 base points here (few shots of 50 classes), so the claim is on the three-seed mean.
    zero_shot = run_base_to_novel("zero-shot", student=zoo["student"], dataset="numbers",
                                  output_dir=str(tmp_path / "zs"))
    results = []
    for seed in (1, 2, 3):
        result = run_base_to_novel("fdbpl-offline", student=zoo["student"], teacher=zoo["teacher"], dataset="numbers",
                                   seed=seed, num_shots=8, num_train_epochs=10, top_k=TOP_K, flip_prob=0.0,
                                   output_dir=str(tmp_path / f"fdbpl{seed}"))
        assert result["table_regions"] == 50 * 8 * 10
        results.append(result)
    base = sum(r["base_acc"] for r in results) / 3
    hm = sum(r["hm"] for r in results) / 3
    assert base > zero_shot["base_acc"] + 3.0, ([r["base_acc"] for r in results], zero_shot["base_acc"])
    assert hm > zero_shot["hm"] + 3.0, ([r["hm"] for r in results], zero_shot["hm"])


def _logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log]


def test_offline_with_stored_entropy_logs_the_online_information_weight(zoo, tmp_path):
    """At K < C the table's weights come from the stored full-distribution entropy, so offline and
    online runs on the same regions log the same `loss_weight` at every step; weights rebuilt from
    top-K alone (the 0.3 behaviour) are measurably higher."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    data = training_set("numbers", num_shots=2, seed=1)
    names = data["class_names"]
    teacher = CLIPTeacher(CLIPModel.from_pretrained(zoo["teacher"]), AutoTokenizer.from_pretrained(zoo["teacher"]),
                          names, data["template"])
    processor = CLIPImageProcessorPil.from_pretrained(zoo["student"])
    spec = RegionSpec(output_size=28, scale=(0.08, 1.0), flip_prob=0.0)
    kw = dict(image_mean=processor.image_mean, image_std=processor.image_std)
    table = build_ril_table(data["dataset"], teacher, class_names=names, num_regions=2, top_k=TOP_K, seed=1,
                            region_spec=spec, output_dir=str(tmp_path / "table"))
    assert "teacher_entropy" in table.column_names
    weights = {}
    for run in ("online", "offline", "offline-topk"):
        if run == "online":
            train = RILDataset.online(data["dataset"], class_names=names, region_spec=spec, num_regions=2, seed=1, **kw)
        else:
            train = RILDataset(data["dataset"], table, image_size=28, class_names=names, **kw)
        student = CLIPModel.from_pretrained(zoo["student"])
        model = get_fdbpl_model(student, FDBPLConfig(base_model_name_or_path=zoo["student"], template=data["template"]),
                                AutoTokenizer.from_pretrained(zoo["student"]))
        args = FDBPLTrainingArguments(output_dir=str(tmp_path / run), num_train_epochs=2,
                                      per_device_train_batch_size=20,
                                      seed=1, save_strategy="no", report_to="none", logging_steps=1,
                                      disable_tqdm=True, use_cpu=True,
                                      weight_entropy="topk" if run == "offline-topk" else "full")
        trainer = FDBPLTrainer(model=model, args=args, train_dataset=train,
                               teacher=teacher if run == "online" else None)
        trainer.train()
        weights[run] = _logged(trainer, "loss_weight")
    assert len(weights["online"]) == len(weights["offline"]) == 10  # 100 images x 2 epochs / 20
    for step, (on, off) in enumerate(zip(weights["online"], weights["offline"])):
        assert abs(on - off) < 2e-3, (step, on, off)  # fp16 entropy in the table
    # The top-K rebuild drops the tail's entropy, so its weights are higher at every step (measured:
    # by 0.033 on average, weights about 0.6, first run on the cached numbers zoo).
    assert all(t > o for t, o in zip(weights["offline-topk"], weights["online"])), weights
    gap = sum(t - o for t, o in zip(weights["offline-topk"], weights["online"])) / len(weights["online"])
    assert gap > 0.02, (weights["offline-topk"], weights["online"])

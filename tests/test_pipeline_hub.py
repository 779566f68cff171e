"""The whole pipeline from Hub ids (loopback Hub), and from a local image folder, through the example scripts.

teacher, student and an image dataset on the Hub -> examples/build_table.py (table pushed) ->
examples/train.py --table <table repo> (adapter pushed) -> examples/evaluate.py -> results.json,
with nothing but Hub ids for models, data, table and adapter on the command lines.
"""

import json
import os
import runpy
import shutil
import sys
from unittest import mock

import datasets
from conftest import HUB_SITE, run_ok
from huggingface_hub import HfApi, ModelCard

from fdbpl_hf.testing.worlds import DIGIT_NAMES, load_digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = {name: os.path.join(REPO, "examples", f"{name}.py") for name in ("build_table", "train", "evaluate")}
TRAIN_FLAGS = ["--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
               "--disable_tqdm", "true", "--save_strategy", "no"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))


def _pipeline(tmp_path, teacher, student, dataset, *, push: bool, in_process: bool = False) -> dict:
    """build_table -> train -> evaluate; returns the results.json record."""
    table, run, out = str(tmp_path / "table"), str(tmp_path / "run"), str(tmp_path / "eval")
    protocol = ["--dataset", dataset, "--num_shots", "2", "--split_seed", "1"]
    build = [sys.executable, SCRIPT["build_table"], "--teacher", teacher, *protocol, "--num_regions", "2",
             "--top_k", "2", "--teacher_batch_size", "64", "--output_dir", table]
    train = [sys.executable, SCRIPT["train"], "--student", student, *protocol, *TRAIN_FLAGS, "--output_dir", run]
    evaluate = [sys.executable, SCRIPT["evaluate"], "--student", student, *protocol, "--output_dir", out]
    if push:
        build += ["--push_to_hub", "--hub_dataset_id", "tester/digits-table"]
        train += ["--table", "tester/digits-table", "--push_to_hub", "--hub_model_id", "tester/digits-adapter"]
        evaluate += ["--adapter", "tester/digits-adapter"]
    else:
        train += ["--table", table]
        evaluate += ["--adapter", run]
    for cmd, local_output in ((build, table), (train, run), (evaluate, None)):
        if in_process:  # the same scripts, without three more interpreter start-ups (seconds of imports each)
            with mock.patch.object(sys, "argv", cmd[1:]):
                runpy.run_path(cmd[1], run_name="__main__")
        else:
            run_ok(cmd, env=_env(), timeout=300)
        if push and local_output:  # the next step can only have read it from the Hub
            shutil.rmtree(local_output)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_pipeline_from_hub_ids(fake_hub, tiny_checkpoints, tmp_path):
    api = HfApi()
    for name in ("teacher", "student"):
        api.create_repo(f"tester/tiny-{name}")
        api.upload_folder(repo_id=f"tester/tiny-{name}", folder_path=tiny_checkpoints[name])
    digits = load_digits(num_per_class=3)
    datasets.DatasetDict({"train": digits, "test": load_digits(num_per_class=2, seed=1)}).push_to_hub("tester/digits")

    record = _pipeline(tmp_path, "tester/tiny-teacher", "tester/tiny-student", "tester/digits", push=True)

    assert fake_hub.list_files("tester/digits-table", repo_type="dataset")  # the table was published
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(fake_hub.list_files("tester/digits-adapter"))  # and the adapter
    # the adapter card as the ecosystem writes it: peft, a Hub base model, the training dataset, versions
    card = ModelCard(fake_hub.read_file("tester/digits-adapter", "README.md").decode())
    assert card.data.library_name == "peft" and card.data.base_model == "tester/tiny-student"
    assert card.data.datasets == ["tester/digits"] and card.data.pipeline_tag == "zero-shot-image-classification"
    assert "## Framework versions" in card.text and "- peft " in card.text and "- transformers " in card.text
    assert str(tmp_path) not in card.content  # no local path leaks into a pushed card
    protocol, b2n = record["protocol"], record["results"]["base_to_novel"]
    assert protocol["dataset_id"] == "tester/digits" and protocol["adapter"] == "tester/digits-adapter"
    assert protocol["student"] == "tester/tiny-student" and protocol["split"] == "test"
    assert protocol["base_classnames"] == DIGIT_NAMES[:5] and protocol["novel_classnames"] == DIGIT_NAMES[5:]
    assert protocol["adapter_trained_classnames"] == DIGIT_NAMES[:5]
    assert b2n["num_base_images"] + b2n["num_novel_images"] == 20
    assert 0.0 <= b2n["base_acc"] <= 100.0 and 0.0 <= b2n["novel_acc"] <= 100.0


def test_pipeline_from_a_local_image_folder(tiny_checkpoints, tmp_path):
    from PIL import Image

    root = tmp_path / "flowers"
    classes = ["daisy", "iris", "rose", "tulip"]
    for c, name in enumerate(classes):
        for split, count in (("train", 3), ("test", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), (60 * c, 30 * i, 200 - 40 * c)).save(root / split / name / f"{i}.png")

    record = _pipeline(tmp_path, tiny_checkpoints["teacher"], tiny_checkpoints["student"], str(root), push=False,
                       in_process=True)

    protocol, b2n = record["protocol"], record["results"]["base_to_novel"]
    assert protocol["base_classnames"] == ["daisy", "iris"] and protocol["novel_classnames"] == ["rose", "tulip"]
    assert b2n["num_base_images"] == b2n["num_novel_images"] == 4

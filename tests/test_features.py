"""Student-feature cache: build, resume, replay, verification against the student, training from it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HUB_SITE, make_clip

from fdbpl_hf import (CallableTeacher, FDBPLConfig, RILDataset, build_feature_cache, build_ril_table,
                      get_fdbpl_model, load_feature_cache)
from fdbpl_hf.testing.worlds import DIGIT_NAMES, clip_config
from fdbpl_hf.ril.features import feature_cache_metadata
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from transformers import CLIPModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _teacher():
    weights = torch.randn(3 * 8 * 8, 10, generator=torch.Generator().manual_seed(0))
    return CallableTeacher(lambda px: 5 * torch.nn.functional.adaptive_avg_pool2d(px, 8).flatten(1) @ weights, 10, 32)


@pytest.fixture(scope="module")
def table(digits_small, tmp_path_factory):
    return build_ril_table(digits_small, _teacher(), num_regions=4, top_k=4,
                           output_dir=str(tmp_path_factory.mktemp("tables") / "t"))


@pytest.fixture(scope="module")
def other_table(digits_small, tmp_path_factory):
    return build_ril_table(digits_small, _teacher(), num_regions=4, top_k=4, seed=7,
                           output_dir=str(tmp_path_factory.mktemp("tables") / "t7"))


def student(tokenizer, seed=2):
    return get_fdbpl_model(make_clip("tiny", seed=seed), FDBPLConfig(), tokenizer)


def data_for(digits, table, cache=None):
    return RILDataset(digits, table, image_mean=MEAN, image_std=STD, class_names=DIGIT_NAMES, feature_cache=cache)


@pytest.mark.numerics
def test_cache_holds_the_students_features_of_the_replayed_regions(digits_small, table, tokenizer, tmp_path):
    model = student(tokenizer)
    data = data_for(digits_small, table)
    cache = build_feature_cache(data, model, epochs=3, dtype="float32", output_dir=str(tmp_path / "c"),
                                batch_size=7, shard_size=11, num_workers=2)
    meta = feature_cache_metadata(cache)
    assert len(cache) == len(digits_small) * 3 and meta["epochs"] == 3 and meta["dim"] == model.clip.config.projection_dim == 16
    cached = data_for(digits_small, table, cache)
    derived = data.with_feature_cache(cache)  # the same dataset, reading the cache
    assert derived.feature_cache is not None and data.feature_cache is None
    for epoch in range(3):
        data.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in (0, 13, len(digits_small) - 1):
            item, fast = data[index], cached[index]
            assert "pixel_values" not in fast and int(fast["region"]) == int(item["region"])
            with torch.no_grad():
                expected = model.get_image_features(item["pixel_values"].unsqueeze(0))[0]
            # the cache ran the image tower on batches of regions, this on one: float32 reductions in
            # another order (2-4 layers, features of size ~1: ~1e-6); a wrong region changes them by 1e-1
            torch.testing.assert_close(fast["image_features"], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast["topk_logits"], item["topk_logits"])
            assert int(fast["labels"]) == int(item["labels"])
            derived.set_epoch(epoch)
            torch.testing.assert_close(derived[index]["image_features"], fast["image_features"])
    # the same call returns the finished cache; other settings into the same folder are refused
    again = build_feature_cache(data, model, epochs=3, dtype="float32", output_dir=str(tmp_path / "c"))
    assert again.info.description == cache.info.description
    with pytest.raises(ValueError, match="other settings"):
        build_feature_cache(data, model, epochs=2, dtype="float32", output_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="other settings"):  # same architecture and name, other weights
        build_feature_cache(data, student(tokenizer, seed=9), epochs=3, dtype="float32",
                            output_dir=str(tmp_path / "c"))
    (tmp_path / "not_a_cache").mkdir()
    (tmp_path / "not_a_cache" / "other.txt").write_text("x")  # (an empty folder is filled: tested below)
    with pytest.raises(ValueError, match="is not a student-feature cache"):
        build_feature_cache(data, model, epochs=3, output_dir=str(tmp_path / "not_a_cache"))


@pytest.mark.numerics
def test_training_from_the_cache_equals_training_from_pixels(digits_small, table, tokenizer, tmp_path):
    def run(cache, out):
        model = student(tokenizer)
        args = FDBPLTrainingArguments(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=8,
                                      logging_steps=1, save_strategy="no", use_cpu=True, report_to="none",
                                      disable_tqdm=True, seed=3, warmup_epochs=0.5, learning_rate=0.05)
        trainer = FDBPLTrainer(model=model, args=args, train_dataset=data_for(digits_small, table, cache))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return model.prompts.contexts().detach(), losses, trainer

    cache = build_feature_cache(data_for(digits_small, table), student(tokenizer), epochs=3, dtype="float32",
                                output_dir=str(tmp_path / "c"))
    ctx_pixels, losses_pixels, _ = run(None, tmp_path / "a")
    ctx_cached, losses_cached, trainer = run(cache, tmp_path / "b")
    assert not torch.allclose(ctx_pixels, student(tokenizer).prompts.contexts())
    # equal up to float summation order (features computed in other batches), over 15 unclipped steps
    torch.testing.assert_close(ctx_cached, ctx_pixels, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(losses_cached, losses_pixels, rtol=1e-4, atol=1e-6)
    assert "3 epochs, float32" in trainer._training_summary()["student-feature cache"]


@pytest.mark.numerics
def test_float16_cache_trains_close_to_pixels(digits_small, table, tokenizer, tmp_path):
    data = data_for(digits_small, table)
    cache = build_feature_cache(data, student(tokenizer), epochs=1, output_dir=str(tmp_path / "c"))
    assert feature_cache_metadata(cache)["dtype"] == "float16"
    item, fast = data[5], data_for(digits_small, table, cache)[5]
    with torch.no_grad():
        expected = student(tokenizer).get_image_features(item["pixel_values"].unsqueeze(0))[0]
    torch.testing.assert_close(fast["image_features"], expected, rtol=2e-3, atol=2e-3)  # float16: 2^-11 relative


def test_another_student_checkpoint_is_refused(digits_small, table, tokenizer, tmp_path):
    cache = build_feature_cache(data_for(digits_small, table), student(tokenizer, seed=2), epochs=2,
                                output_dir=str(tmp_path / "c"))
    args = FDBPLTrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=2, use_cpu=True,
                                  report_to="none", save_strategy="no")
    data = data_for(digits_small, table, cache)
    with pytest.raises(ValueError, match="student weights: the cache was built with another checkpoint"):
        FDBPLTrainer(model=student(tokenizer, seed=5), args=args, train_dataset=data)
    # a cache whose stored values are wrong but whose metadata looks right: its content digests
    # refuse it when the dataset is made (since 0.4) ...
    wrong = cache.map(lambda b: {"image_features": [[0.5] * len(v) for v in b["image_features"]]},
                      batched=True, features=cache.features)
    wrong.info.description = cache.info.description
    with pytest.raises(ValueError, match="student-feature cache: rows 0-59 differ from what was written"):
        data_for(digits_small, table, wrong)
    with pytest.raises(ValueError, match="stored features of image 0, epoch 0 differ"):
        # ... and, unverified, the trainer's probe of recomputed rows still does
        FDBPLTrainer(model=student(tokenizer, seed=2), args=args, train_dataset=RILDataset(
            digits_small, table, image_mean=MEAN, image_std=STD, class_names=DIGIT_NAMES, feature_cache=wrong,
            verify=False))
    config = clip_config("tiny")
    config.vision_config.num_hidden_layers += 1
    deeper = get_fdbpl_model(CLIPModel(config).eval(), FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match=f"vision_layers cache {config.vision_config.num_hidden_layers - 1} vs model"):
        FDBPLTrainer(model=deeper, args=args, train_dataset=data)
    FDBPLTrainer(model=student(tokenizer, seed=2), args=args, train_dataset=data)  # the right one passes


def test_cache_bound_to_its_table_epochs_and_normalisation(digits_small, table, other_table, tokenizer, tmp_path):
    model = student(tokenizer)
    cache = build_feature_cache(data_for(digits_small, table), model, epochs=2, output_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="RIL table: cache built from table"):
        data_for(digits_small, other_table, cache)
    with pytest.raises(ValueError, match="image normalisation"):
        RILDataset(digits_small, table, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, feature_cache=cache)
    args = FDBPLTrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=3, use_cpu=True,
                                  report_to="none", save_strategy="no")
    with pytest.raises(ValueError, match="covers 2 epochs of replay, training asks for 3"):
        FDBPLTrainer(model=model, args=args, train_dataset=data_for(digits_small, table, cache))
    by_steps = FDBPLTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=9, per_device_train_batch_size=8,
                                      use_cpu=True, report_to="none", save_strategy="no")  # 4 steps per epoch
    assert by_steps.replay_epochs(len(digits_small)) == 3
    with pytest.raises(ValueError, match="covers 2 epochs of replay, training asks for 3"):
        FDBPLTrainer(model=model, args=by_steps, train_dataset=data_for(digits_small, table, cache))
    with pytest.raises(ValueError, match="has 30 rows, its table needs 60"):
        data_for(digits_small, table, cache.select(range(30)))
    cached = data_for(digits_small, table, cache)
    cached.set_epoch(2)
    with pytest.raises(ValueError, match="first 2 epochs"):
        cached[0]
    cached.set_epoch(5)  # epoch 5 replays slot 5 mod 4 = 1: inside the cache
    assert cached[0]["image_features"].shape == (16,)
    with pytest.raises(ValueError, match="online teacher scores pixels"):
        FDBPLTrainer(model=model, args=args, train_dataset=data_for(digits_small, table, cache), teacher=_teacher())
    with pytest.raises(TypeError, match="offline RILDataset"):
        build_feature_cache(cached, model)
    with pytest.raises(ValueError, match="epochs must be between 1 and"):
        build_feature_cache(data_for(digits_small, table), model, epochs=5)


def test_cache_output_dir_may_exist_empty(digits_small, table, tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    cache = build_feature_cache(data_for(digits_small, table), student(tokenizer), epochs=1,
                                output_dir=str(tmp_path / "empty"))
    assert len(cache) == len(digits_small)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("mine")
    with pytest.raises(ValueError, match="exists but is not a student-feature cache"):
        build_feature_cache(data_for(digits_small, table), student(tokenizer), output_dir=str(tmp_path / "occupied"))


def test_interrupted_cache_build_resumes(digits_small, table, tokenizer, tmp_path, monkeypatch):
    """A build killed after its first shard leaves `<dir>.incomplete`; loading refuses it, and the next
    call finishes only the missing shards (the finished one is reused as written)."""
    out = str(tmp_path / "cache")
    table_dir = table.cache_files[0]["filename"].split("/data/")[0]
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from conftest import make_clip
        import fdbpl_hf.ril.features as features
        from fdbpl_hf import FDBPLConfig, RILDataset, get_fdbpl_model, load_ril_table, build_feature_cache
        from fdbpl_hf.testing.worlds import DIGIT_NAMES, clip_tokenizer, load_digits
        from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        real_replace = os.replace
        def replace_then_die(src, dst):
            real_replace(src, dst)
            if "shard-" in dst:
                os.kill(os.getpid(), 9)  # SIGKILL right after the first shard lands
        os.replace = replace_then_die
        data = RILDataset(load_digits(num_per_class=3), load_ril_table({table_dir!r}), image_mean=OPENAI_CLIP_MEAN,
                          image_std=OPENAI_CLIP_STD, class_names=DIGIT_NAMES)
        model = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), clip_tokenizer())
        build_feature_cache(data, model, epochs=2, output_dir={out!r}, shard_size=12, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    shards = sorted(os.listdir(out + ".incomplete"))
    assert "shard-00000" in shards and "shard-00001" not in shards
    with pytest.raises(ValueError, match="never finished"):
        load_feature_cache(out)
    model = student(tokenizer)
    data = data_for(digits_small, table)
    import fdbpl_hf.ril.features as features

    computed = []
    real = features._image_features
    monkeypatch.setattr(features, "_image_features", lambda clip, px: computed.append(len(px)) or real(clip, px))
    resumed = build_feature_cache(data, model, epochs=2, output_dir=out, shard_size=12, progress=False)
    monkeypatch.undo()
    assert not os.path.exists(out + ".incomplete") and len(resumed) == len(digits_small) * 2
    assert sum(computed) == (len(digits_small) - 12) * 2  # only the two unfinished shards were computed
    fresh = build_feature_cache(data, model, epochs=2, output_dir=str(tmp_path / "fresh"), shard_size=12,
                                progress=False)
    np.testing.assert_array_equal(np.asarray(resumed["image_features"]), np.asarray(fresh["image_features"]))


def test_examples_train_with_a_feature_cache(tiny_checkpoints, tmp_path):
    """`examples/train.py --table ... --feature_cache DIR` builds the cache on first use and trains from it."""
    from fdbpl_hf import load_ril_table, ril_metadata
    from fdbpl_hf.data import training_set
    from fdbpl_hf.ril import CLIPTeacher
    from fdbpl_hf.testing.worlds import clip_tokenizer

    data = training_set("digits", num_shots=4, seed=1, classes="base")
    teacher = CLIPTeacher(CLIPModel.from_pretrained(tiny_checkpoints["teacher"]), clip_tokenizer(),
                          data["class_names"], data["template"])
    build_ril_table(data["dataset"], teacher, num_regions=3, output_dir=str(tmp_path / "table"))
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    subprocess.run([sys.executable, os.path.join(REPO, "examples", "train.py"), "--student", tiny_checkpoints["student"],
                    "--dataset", "digits", "--num_shots", "4", "--split_seed", "1", "--table", str(tmp_path / "table"),
                    "--feature_cache", str(cache_dir), "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                    "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
                    "--output_dir", str(out)], check=True, env=env, timeout=600, capture_output=True)
    cache = load_feature_cache(str(cache_dir))
    assert feature_cache_metadata(cache)["epochs"] == 2
    assert feature_cache_metadata(cache)["table_build_key"] == ril_metadata(load_ril_table(str(tmp_path / "table")))[
        "build_key"]
    with open(out / "fdbpl_config.json") as f:  # the adapter config (peft format after 0.3.0)
        assert "student-feature cache" in f.read()


def test_cached_items_without_labels_and_metrics_after_predict(digits_small, table, tokenizer, tmp_path):
    """Missing labels read as -1 (as on the pixel path); predict() leaves no loss terms behind for the next
    evaluate(), and every logged term is a mean over batches."""
    model = student(tokenizer)
    cache = build_feature_cache(data_for(digits_small, table), model, epochs=1, output_dir=str(tmp_path / "c"))
    unlabeled = digits_small.map(lambda row, i: {"label": None if i % 2 else row["label"]}, with_indices=True,
                                 features=digits_small.features)
    data = RILDataset(unlabeled, table, image_mean=MEAN, image_std=STD, feature_cache=cache, verify=False)
    assert [int(data[i]["labels"]) for i in range(4)] == [digits_small[0]["label"], -1, digits_small[2]["label"], -1]
    args = FDBPLTrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=1, per_device_train_batch_size=8,
                                  per_device_eval_batch_size=8, use_cpu=True, report_to="none", save_strategy="no")
    trainer = FDBPLTrainer(model=model, args=args, train_dataset=data_for(digits_small, table, cache))
    trainer.predict(data_for(digits_small, table, cache))
    assert trainer._metrics["eval"] is None
    metrics = trainer.evaluate(data_for(digits_small, table, cache))
    assert {"eval_loss_pos", "eval_loss_neg", "eval_loss_pcd"} <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in metrics if k.startswith("eval_loss_"))


@pytest.mark.numerics
def test_cache_built_with_the_device_kernel_equals_the_cpu_build(digits_small, table, tokenizer, tmp_path,
                                                                 monkeypatch):
    """On an accelerator the cache build renders its regions with the batched device kernel (each
    image decoded once); forced here on CPU: same region columns, same features bit for bit (the same
    pixels in the same forward batches), same build key and metadata."""
    from fdbpl_hf.ril import device_replay
    from fdbpl_hf.ril import features as features_module

    submitted = []
    render = device_replay.DeviceChunkRenderer.render
    monkeypatch.setattr(device_replay.DeviceChunkRenderer, "render",
                        lambda self, prepared: submitted.append(len(prepared.index)) or render(self, prepared))
    model, data = student(tokenizer), data_for(digits_small, table)
    caches = {}
    for name, flag in (("cpu", False), ("kernel", True)):
        monkeypatch.setattr(features_module, "DEVICE_RENDER", flag)
        caches[name] = build_feature_cache(data, model, epochs=3, dtype="float32", output_dir=str(tmp_path / name),
                                           batch_size=7, shard_size=11, progress=False)
    # 30 images x 3 epochs, two images (6 regions) per forward, groups split at the 11-image shards
    assert sum(submitted) == len(digits_small) * 3 and max(submitted) == 6
    cpu, kernel = caches["cpu"], caches["kernel"]
    assert np.array_equal(np.asarray(cpu["region"]), np.asarray(kernel["region"]))
    assert np.array_equal(np.asarray(cpu["image_features"]), np.asarray(kernel["image_features"]))
    meta_cpu, meta_kernel = feature_cache_metadata(cpu), feature_cache_metadata(kernel)
    assert meta_cpu["build_key"] == meta_kernel["build_key"] and meta_cpu == meta_kernel
    # and the kernel-built cache is the replay's: a stored row equals the student on the replayed pixels
    data.set_epoch(2)
    item = data[13]
    with torch.no_grad():
        expected = model.get_image_features(item["pixel_values"].unsqueeze(0))[0]
    stored = np.asarray(kernel[13 * 3 + 2]["image_features"], dtype=np.float32)
    torch.testing.assert_close(torch.from_numpy(stored), expected, rtol=1e-5, atol=1e-5)  # batched vs single, as above
    assert int(kernel[13 * 3 + 2]["region"]) == int(item["region"])

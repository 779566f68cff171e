"""Composed tables: several teachers' tables over the same regions, mixed per region at replay
(issue 23): equal to the joint EnsembleTeacher build where they must be, refused where they do not
align, trained from local folders and from the loopback Hub."""

import json
import math
import os
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import make_clip
from PIL import Image

from fdbpl_hf import (CallableTeacher, CLIPTeacher, EnsembleTeacher, FDBPLConfig, RILDataset, build_feature_cache,
                      build_ril_table, dense_teacher_logits, get_fdbpl_model, load_ril_table, push_ril_table,
                      ril_metadata)
from fdbpl_hf.integrity import IntegrityError, metadata_digest
from fdbpl_hf.ril import check_composable, mix_soft_labels, region_key
from fdbpl_hf.ril.table import table_origin
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.testing.worlds import DIGIT_NAMES
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 3


@pytest.fixture(scope="module")
def teachers(tokenizer):
    return [CLIPTeacher(make_clip("tiny", seed=seed), tokenizer, DIGIT_NAMES, name=f"t{seed}") for seed in (1, 2)]


@pytest.fixture(scope="module")
def dense_tables(digits_small, teachers, tmp_path_factory):
    """Each teacher's table of the same regions (seed 0), K = C = 10, built separately."""
    root = tmp_path_factory.mktemp("dense")
    return [build_ril_table(digits_small, t, num_regions=M, top_k=10, output_dir=str(root / t.name)) for t in teachers]


def replay(ds, table, **kw):
    return RILDataset(ds, table, image_mean=MEAN, image_std=STD, **kw)


def soft_labels(data, indices):
    """The batch's teacher log-probabilities `[B, C]` and entropies `[B]`, as the trainer sees them."""
    items = data.__getitems__(indices)
    if "teacher_log_probs" in items[0]:
        log_p = torch.stack([i["teacher_log_probs"] for i in items])
    else:
        log_p = dense_teacher_logits(torch.stack([i["topk_indices"] for i in items]),
                                     torch.stack([i["topk_logits"] for i in items]), data.num_classes,
                                     fill=data.fill).log_softmax(-1)
    return log_p, torch.stack([i["teacher_entropy"] for i in items]), items


@pytest.mark.parametrize("weighting,weights", [("fixed", None), ("fixed", [0.7, 0.3]), ("max_prob", None),
                                               ("entropy", [1.0, 2.0])])
def test_composition_equals_the_joint_ensemble_build_at_k_equal_c(digits_small, teachers, dense_tables, tmp_path,
                                                                  weighting, weights):
    joint = build_ril_table(digits_small, EnsembleTeacher(teachers, weights=weights, weighting=weighting),
                            num_regions=M, top_k=10, output_dir=str(tmp_path / "joint"))
    assert region_key(ril_metadata(joint)) == region_key(ril_metadata(dense_tables[0]))  # teacher not in the key
    composed = replay(digits_small, dense_tables, teacher_weighting=weighting, teacher_weights=weights)
    alone = replay(digits_small, joint)
    everything = list(range(len(digits_small)))
    for epoch in (0, 2):
        composed.set_epoch(epoch)
        alone.set_epoch(epoch)
        log_p, entropy, items = soft_labels(composed, everything)
        ref_log_p, ref_entropy, ref_items = soft_labels(alone, everything)
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(items, ref_items))
        # Both sides read fp16 log-probabilities (relative rounding 2^-11): a probability p moves by at
        # most p |log p| 2^-11 <= 2^-11 / e = 1.8e-4 per table, and the per-region weights come from fp16
        # max-probabilities / entropies (|dw| <= 1.1e-3 / log 10 = 5e-4, times |p_1 - p_2| <= 1): 2e-3 covers both.
        torch.testing.assert_close(log_p.exp(), ref_log_p.exp(), rtol=0, atol=2e-3)
        assert bool((log_p.argmax(-1) == ref_log_p.argmax(-1)).float().mean() >= 0.95)  # ties within fp16 may flip
        # the mixture's entropy: each table's stored fp16 entropy (<= log 10 = 2.3, rounding 2.3 * 2^-11 = 1.1e-3)
        # plus the divergence term from the fp16 rebuilds, against the joint build's fp16 entropy: 5e-3
        torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=5e-3)


def test_a_table_composed_with_itself_is_that_table(digits_small, teachers, tmp_path):
    """At K < C too: the mixture of a rebuild with itself is the rebuild, its entropy the stored one."""
    table = build_ril_table(digits_small, teachers[0], num_regions=M, top_k=4, output_dir=str(tmp_path / "k4"))
    for weighting in ("fixed", "confidence", "entropy"):
        log_p, entropy, _ = soft_labels(replay(digits_small, [table, table], teacher_weighting=weighting), [0, 5, 29])
        ref_log_p, ref_entropy, _ = soft_labels(replay(digits_small, table), [0, 5, 29])
        # the same float32 values mixed with weights summing to 1: float32 rounding only (1e-6)
        torch.testing.assert_close(log_p, ref_log_p, rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-6)


def test_tables_of_other_k_and_fill_compose(digits_small, teachers, dense_tables, tmp_path):
    """K and the teacher are not part of the region key: a K = 2 table mixes with a K = C one."""
    narrow = build_ril_table(digits_small, teachers[1], num_regions=M, top_k=2, output_dir=str(tmp_path / "k2"))
    data = replay(digits_small, [dense_tables[0], narrow], teacher_weighting="max_prob")
    log_p, entropy, items = soft_labels(data, [3, 4])
    assert log_p.shape == (2, 10) and "topk_indices" not in items[0]
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2))
    assert bool(((entropy >= 0) & (entropy <= math.log(10))).all())


def test_device_replay_of_composed_tables(digits_small, dense_tables):
    """An image store renders the regions in the step; the mixed soft labels come with the items as on the
    CPU path."""
    from fdbpl_hf.ril import DeviceImageStore

    data = replay(digits_small, dense_tables, teacher_weighting="max_prob")
    stored = replay(digits_small, dense_tables, teacher_weighting="max_prob").use_image_store(
        DeviceImageStore.from_dataset(digits_small))
    cpu, store = data.__getitems__([2, 9]), stored.__getitems__([2, 9])
    assert "region_crop" in store[0] and "pixel_values" not in store[0]
    for a, b in zip(cpu, store):
        assert torch.equal(a["teacher_log_probs"], b["teacher_log_probs"])
        assert torch.equal(a["teacher_entropy"], b["teacher_entropy"])


def _images(count, seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def _dataset(images, labels, names):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _teacher(scale=1.0, classes=4):
    weights = scale * torch.randn(3, classes, generator=torch.Generator().manual_seed(int(scale * 10)))
    return CallableTeacher(lambda px: px.mean(dim=(2, 3)) @ weights, classes, 16)


def test_tables_that_do_not_align_are_refused_naming_the_first_difference(tmp_path):
    from fdbpl_hf import RegionSpec

    names = ["a", "b", "c", "d"]
    ds = _dataset(_images(3), [0, 1, 2], names)
    base = dict(num_regions=2, top_k=2)

    def table(name, data=ds, teacher=None, **kw):
        return build_ril_table(data, teacher or _teacher(2.0), **{**base, **kw}, output_dir=str(tmp_path / name))

    first = table("first", teacher=_teacher(1.0))
    assert len(replay(ds, [first, table("ok", top_k=4)])) == 3  # other teacher and K: composable
    cases = [
        (table("images", data=_dataset(_images(3, seed=1), [0, 1, 2], names)),
         "source dataset: the images or labels differ"),
        (table("rows", data=ds.select([0, 1])), "source dataset: built on 3 vs 2 images"),
        (table("spec", region_spec=RegionSpec(output_size=16, flip_prob=0.0)), "region spec: flip_prob 0.5 vs 0.0"),
        (table("seed", seed=4), "region seed: 0 vs 4"),
        (table("m", num_regions=3), "regions per image M: 2 vs 3"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=r"RIL table #2 \S+ cannot be composed with RIL table #1 \S+first: their "
                                             rf"regions do not align\. First difference: {re.escape(message)}"):
            replay(ds, [first, other], verify=False)
    # the same images and labels, the classes named in another order: refused at the class names
    relabelled = ds.cast_column("label", datasets.ClassLabel(names=["b", "a", "c", "d"]))
    other = table("names", data=relabelled)
    with pytest.raises(ValueError, match=r"class names and order: class 0 is 'a' vs 'b' \(the same classes in "
                                         r"another order\)"):
        check_composable([ril_metadata(first), ril_metadata(other)])


def test_older_tables_compose_by_their_settings_and_an_edited_key_is_refused(digits_small, dense_tables, tmp_path):
    """Tables of 0.6 and before carry no region key: it is recomputed from their settings."""
    folder = tmp_path / "old"
    shutil.copytree(table_origin(dense_tables[1])["path"], folder)
    path = folder / "ril_metadata.json"
    meta = json.loads(path.read_text())
    stored = meta.pop("region_key")
    meta["library_version"] = "0.6.0"
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    old = load_ril_table(str(folder))
    assert "region_key" not in ril_metadata(old) and region_key(ril_metadata(old)) == stored
    log_p, _, _ = soft_labels(replay(digits_small, [dense_tables[0], old]), [1])
    ref, _, _ = soft_labels(replay(digits_small, dense_tables), [1])
    assert torch.equal(log_p, ref)
    meta["region_key"] = "0" * 16  # edited: the key no longer hashes the settings
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="its region key 0000000000000000 is not the hash of its regions"):
        load_ril_table(str(folder))


def test_rows_that_break_the_region_promise_are_named(digits_small, dense_tables):
    """Equal region keys promise equal boxes; a table whose rows say otherwise (here edited, unverified) is
    refused at the first batch that reads the row, never mixed."""
    edited = dense_tables[1].map(lambda row, i: {"box": [1, 1, 100, 100] if i == 4 * M + 1 else row["box"]},
                                 with_indices=True, features=dense_tables[1].features)
    edited.info.description = dense_tables[1].info.description
    data = replay(digits_small, [dense_tables[0], edited], verify=False)
    data.set_epoch(next(e for e in range(M) if data.region_for(4, e) == 1))
    with pytest.raises(ValueError, match=r"RIL table #2 holds another region than RIL table #1 \S+ at row 13: image 4, "
                                         r"region 1 \(box \[1, 1, 100, 100\] vs"):
        data.__getitems__([3, 4])


def test_weightings_and_weights_are_checked(digits_small, dense_tables):
    with pytest.raises(ValueError, match="teacher weighting must be one of"):
        replay(digits_small, dense_tables, teacher_weighting="best")
    with pytest.raises(ValueError, match=r"weights must be 2 finite non-negative numbers \(one per table\)"):
        replay(digits_small, dense_tables, teacher_weights=[1.0])
    with pytest.raises(ValueError, match=r"weights must be 2 .*, got 0\.7"):  # a TypeError before ('float' not iterable)
        replay(digits_small, dense_tables, teacher_weights=0.7)  # e.g. one value for the list in a JSON config
    with pytest.raises(ValueError, match="mix several tables' soft labels: give a list of tables"):
        replay(digits_small, dense_tables[0], teacher_weighting="max_prob")
    old = dense_tables[1].remove_columns("teacher_entropy")
    old.info.description = dense_tables[1].info.description
    with pytest.raises(ValueError, match=r"RIL table #2 has no 'teacher_entropy' column \(built by fdbpl_hf 0\.3\)"):
        replay(digits_small, [dense_tables[0], old], teacher_weighting="entropy", verify=False)
    assert EnsembleTeacher([_teacher(1.0), _teacher(2.0)], weighting="confidence").weighting == "max_prob"


def test_the_mixture_entropy_is_exact_for_full_distributions():
    """H(sum_t w_t p_t) = sum_t w_t H(p_t) + sum_t w_t KL(p_t || mix), in float64 on random distributions;
    the per-region weights are EnsembleTeacher's."""
    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(3, 7, 12, generator=gen, dtype=torch.float64), -1)
    entropies = -(log_p.exp() * log_p).sum(-1)
    ensemble = EnsembleTeacher([_teacher(1.0, 12), _teacher(2.0, 12), _teacher(3.0, 12)], weights=[1, 2, 3],
                               weighting="entropy")
    log_mix, entropy, weights = mix_soft_labels(log_p, ensemble.weights.double(), "entropy", log_p.max(-1).values,
                                                entropies)
    torch.testing.assert_close(weights, ensemble.region_weights(log_p.exp()), rtol=0, atol=1e-12)
    # the rule itself, written out: fixed weight times confidence (information weight 1 - H / log C, or top
    # probability), renormalised; float64 throughout, so 1e-12
    fixed = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for weighting, confidence in (("entropy", 1 - entropies / math.log(12)), ("max_prob", log_p.exp().max(-1).values)):
        _, _, found = mix_soft_labels(log_p, fixed / 6, weighting, log_p.max(-1).values, entropies)
        raw = fixed.view(3, 1) * confidence
        torch.testing.assert_close(found, raw / raw.sum(0), rtol=0, atol=1e-12)
    mix = (weights.unsqueeze(-1) * log_p.exp()).sum(0)
    torch.testing.assert_close(log_mix, mix.log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, -(mix * mix.log()).sum(-1), rtol=0, atol=1e-12)


def _args(tmp_path, **kw):
    return FDBPLTrainingArguments(**{**dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                            use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                                            warmup_epochs=0), **kw})


def test_training_records_every_table_and_reads_the_feature_cache(digits_small, dense_tables, tokenizer, tmp_path):
    """The trainer consumes the mixture; a feature cache built from one of the tables serves the composition
    (the regions are the same) and yields the same soft labels."""
    data = replay(digits_small, dense_tables, teacher_weighting="entropy")
    model = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), tokenizer)
    cache = build_feature_cache(replay(digits_small, dense_tables[1]), model, epochs=2, output_dir=str(tmp_path / "c"),
                                progress=False)
    cached = data.with_feature_cache(cache)
    fast, slow = cached.__getitems__([0, 7]), data.__getitems__([0, 7])
    assert "pixel_values" not in fast[0]
    assert all(torch.equal(a["teacher_log_probs"], b["teacher_log_probs"]) for a, b in zip(fast, slow))
    trainer = FDBPLTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=cached)
    trainer.train()
    record = trainer._training_summary()
    assert record["method"] == "FDBPL, 2 composed RIL tables" and record["teacher"] == "t1 + t2"
    assert record["teacher weighting"] == "entropy, weights [0.5, 0.5]"
    assert [(t["teacher"], t["top_k"], t["num_regions"], t["seed"]) for t in record["tables"]] == [
        ("t1", 10, M, 0), ("t2", 10, M, 0)]
    # absolute folders by their name: a pushed card names no local directory
    assert [t["path"] for t in record["tables"]] == [os.path.basename(table_origin(t)["path"]) for t in dense_tables]
    assert record["region weights"].startswith("entropy of the tables' mixture")


def test_two_tables_built_separately_train_from_folders_and_from_the_hub(fake_hub, tiny_checkpoints, digits_small,
                                                                         tokenizer, tmp_path):
    """Issue 23's 'done when': two teachers' tables of one region seed, built and published on their own,
    train one student with `examples/train.py --table a --table b --teacher_weighting confidence`, from
    local folders and from Hub ids; the adapter records both tables."""
    import sys

    from transformers import CLIPModel

    from fdbpl_hf import FDBPLConfig
    from fdbpl_hf.data import training_set

    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train
    finally:
        sys.path.pop(0)
    digits_small.save_to_disk(str(tmp_path / "digits"))  # a local dataset folder loads faster than the registry's
    protocol = ["--dataset", str(tmp_path / "digits"), "--num_shots", "2", "--split_seed", "1"]
    data = training_set(str(tmp_path / "digits"), num_shots=2, seed=1, classes="base")  # what train.py draws
    folders = {}
    for name, teacher in (("strong", tiny_checkpoints["teacher"]), ("weak", tiny_checkpoints["student"])):
        folders[name] = str(tmp_path / name)
        table = build_ril_table(data["dataset"], CLIPModel.from_pretrained(teacher), teacher_tokenizer=tokenizer,
                                class_names=data["class_names"], template=data["template"], num_regions=2,
                                top_k=3 if name == "strong" else 5, teacher_name=name, output_dir=folders[name])
        push_ril_table(table, f"tester/digits-{name}")
    flags = [*protocol, "--student", tiny_checkpoints["student"], "--max_steps", "2", "--per_device_train_batch_size",
             "4", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
             "--teacher_weighting", "confidence"]
    for where, tables, configs in (("local", [folders["strong"], folders["weak"]], []),
                                   ("hub", ["tester/digits-strong", "tester/digits-weak"],
                                    ["--table_config", "strong_k3_m2", "--table_config", "-"])):  # -: its only one
        out = str(tmp_path / f"run_{where}")
        trainer = train.main([*flags, "--table", tables[0], "--table", tables[1], *configs, "--output_dir", out])
        assert trainer.state.global_step == 2 and trainer.train_dataset.is_composed
        record = FDBPLConfig.from_pretrained(out).training
        assert record["teacher weighting"] == "max_prob, weights [0.5, 0.5]"
        assert [t["top_k"] for t in record["tables"]] == [3, 5]
        if where == "local":
            assert [t["path"] for t in record["tables"]] == ["strong", "weak"]  # absolute folders by their name
        else:
            assert [(t["hub_id"], t["config"]) for t in record["tables"]] == [
                ("tester/digits-strong", "strong_k3_m2"), ("tester/digits-weak", "weak_k5_m2")]
        card = open(os.path.join(out, "README.md")).read()
        assert ("hub_id tester/digits-strong" if where == "hub" else "path strong") in card and "top_k 5" in card
        assert str(tmp_path) not in card
    from huggingface_hub import DatasetCard

    # the Hub cards carry the region key each config composes by
    keys = [DatasetCard.load(f"tester/digits-{n}", repo_type="dataset").data["fdbpl_ril"] for n in ("strong", "weak")]
    assert len({entry["region_key"] for card in keys for entry in card.values()}) == 1
    with pytest.raises(SystemExit, match="--table_config names 1 config"):
        train.main([*flags, "--table", tables[0], "--table", tables[1], "--table_config", "x",
                    "--output_dir", str(tmp_path / "x")])

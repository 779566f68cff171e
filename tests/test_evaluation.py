"""Evaluation: zero-shot and adapter logits, base-to-novel, OOD scores, results files, plots, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HUB_SITE, make_clip

from fdbpl_hf import FDBPLConfig, get_fdbpl_model
from fdbpl_hf.data import make_base_novel_test
from fdbpl_hf.evaluation import (ZeroShotCLIP, encode_images, evaluate_base_to_novel, evaluate_cross_dataset,
                                 evaluate_ood, format_summary_markdown, load_classifier, load_results, ood_metrics,
                                 ood_scores, predict_logits, summarize_runs, write_results)
from fdbpl_hf.metrics import accuracy, average_base_novel, harmonic_mean, per_class_accuracy
from fdbpl_hf.prompts import ADAPTER_CARD_HEADINGS
from fdbpl_hf.saving import card_owner
from fdbpl_hf.testing.worlds import DIGIT_NAMES, image_processor_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR = "a photo of a {}."


@pytest.fixture(scope="module")
def clip():
    return make_clip("tiny", seed=3)


@pytest.fixture(scope="module")
def processor(clip):
    return image_processor_for(clip.config)


@pytest.mark.numerics
def test_zero_shot_equals_direct_clip(clip, tokenizer, processor, digits_small):
    rows = digits_small.select(range(6))
    logits, labels = predict_logits(clip, rows, DIGIT_NAMES, tokenizer=tokenizer, template="a photo of the digit {}.",
                                    image_processor=processor, batch_size=4, progress=False)
    texts = tokenizer([f"a photo of the digit {n}." for n in DIGIT_NAMES], padding=True, return_tensors="pt")
    pixels = processor(images=[im.convert("RGB") for im in rows["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = clip(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                      pixel_values=pixels).logits_per_image
    assert logits.shape == (6, 10)
    # batched differently from CLIPModel's own call: float32 rounding of logits of scale 100 (100 * 2^-24 *
    # a few layers, ~1e-5); a wrong template, normalisation or class order changes them by 1e-1 or more
    torch.testing.assert_close(logits, direct, atol=1e-4, rtol=1e-4)
    assert labels.tolist() == rows["label"]


@pytest.mark.numerics
def test_adapter_at_init_equals_zero_shot_anchor(clip, tokenizer, processor, digits_small):
    adapter = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    zero_shot = ZeroShotCLIP(clip, tokenizer, ANCHOR)
    kw = dict(image_processor=processor, progress=False)
    a, _ = predict_logits(adapter, digits_small, DIGIT_NAMES, **kw)
    z, _ = predict_logits(zero_shot, digits_small, DIGIT_NAMES, **kw)
    torch.testing.assert_close(a, z, atol=1e-4, rtol=1e-4)  # as in test_zero_shot_equals_direct_clip
    # ...and through the whole protocol (the adapter ignores the template; zero-shot uses it)
    ra = evaluate_base_to_novel(adapter, digits_small, "digits", template=ANCHOR, ood=False, **kw)
    rz = evaluate_base_to_novel(zero_shot, digits_small, "digits", template=ANCHOR, ood=False, **kw)
    assert ra == rz


def test_base_to_novel_matches_metrics(clip, tokenizer, processor, digits_small):
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    with torch.no_grad():  # move away from the anchor so the numbers are not trivially zero-shot
        model.prompts.ctx_pos.add_(0.5 * torch.randn_like(model.prompts.ctx_pos))
    res = evaluate_base_to_novel(model, digits_small, "digits", image_processor=processor, batch_size=7,
                                 progress=False)
    split = make_base_novel_test(digits_small, info="digits")
    assert res["base_classnames"] == DIGIT_NAMES[:5] and res["novel_classnames"] == DIGIT_NAMES[5:]
    for part in ("base", "novel"):
        names = split[f"{part}_classnames"]
        logits, labels = predict_logits(model, split[part], names, image_processor=processor, progress=False)
        assert res[f"{part}_acc"] == pytest.approx(100 * accuracy(logits, labels))
        expected = per_class_accuracy(logits, labels, num_classes=len(names)) * 100
        assert list(res["per_class_accuracy"][part].values()) == pytest.approx(expected.tolist())
        assert res[f"num_{part}_images"] == 15
    assert res["hm"] == pytest.approx(harmonic_mean(res["base_acc"], res["novel_acc"]))
    ood = res["ood"]
    assert set(ood["scores"]) == {"msp", "pos_neg_margin", "msp_diff"}
    assert (ood["num_in"], ood["num_out"]) == (15, 15)
    for m in ood["scores"].values():
        assert 0 <= m["auroc"] <= 100 and 0 <= m["fpr95"] <= 100


def test_ood_scores_definitions_and_perfect_separation():
    pos_in = torch.tensor([[10.0, 0.0, 0.0], [0.0, 9.0, 1.0]])
    neg_in = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    pos_out = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 0.4]])
    neg_out = torch.tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    s_in, s_out = ood_scores(pos_in, neg_in), ood_scores(pos_out, neg_out)
    np.testing.assert_allclose(s_in["msp"], pos_in.softmax(-1).max(-1).values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s_in["pos_neg_margin"], [10.0 - 0.0, 9.0 - 0.0])  # at the predicted class
    np.testing.assert_allclose(s_out["pos_neg_margin"], [1.0 - 5.0, 0.5 - 4.0])
    np.testing.assert_allclose(s_out["msp_diff"], (pos_out.softmax(-1).max(-1).values
                                                   - neg_out.softmax(-1).max(-1).values).numpy(), rtol=1e-6)
    metrics = ood_metrics(s_in, s_out)
    assert metrics == {k: {"auroc": 100.0, "fpr95": 0.0} for k in ("msp", "pos_neg_margin", "msp_diff")}
    reversed_ = ood_metrics(s_out, s_in)["pos_neg_margin"]
    assert reversed_ == {"auroc": 0.0, "fpr95": 100.0}
    assert set(ood_scores(pos_in)) == {"msp"}  # zero-shot: no negative prompt
    with pytest.raises(ValueError, match="differ in shape"):
        ood_scores(pos_in, neg_in[:, :2])


def test_cross_dataset_and_ood_between_datasets(clip, tokenizer, processor, digits_small):
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    out = evaluate_cross_dataset(model, {"digits": (digits_small, DIGIT_NAMES),
                                         "first_three": (digits_small.select(range(9)), DIGIT_NAMES, "{} digit")}, **kw)
    logits, labels = predict_logits(model, digits_small, DIGIT_NAMES, **kw)
    assert out["digits"]["accuracy"] == pytest.approx(100 * accuracy(logits, labels))
    assert out["digits"]["num_images"] == 30 and out["first_three"]["num_images"] == 9
    res = evaluate_ood(model, digits_small.select(range(10)), digits_small.select(range(10, 20)), DIGIT_NAMES[:5],
                       **kw)
    assert (res["num_in"], res["num_out"]) == (10, 10) and "pos_neg_margin" in res["scores"]


def _fake_run(dataset, seed, base, novel, method="FDBPL"):
    results = {"base_to_novel": {"base_acc": base, "novel_acc": novel, "hm": harmonic_mean(base, novel),
                                 "per_class_accuracy": {"base": {"a": float("nan")}, "novel": {}},
                                 "ood": {"scores": {"msp": {"auroc": 70.0 + seed, "fpr95": 50.0}}}}}
    protocol = {"dataset": dataset, "method": method, "seed": seed, "num_shots": 16, "split": "test",
                "base_classnames": ["a"], "novel_classnames": ["b"], "student": "tiny"}
    return results, protocol


def test_results_round_trip_and_summary(tmp_path):
    numbers = {"eurosat": [(90.0, 60.0), (92.0, 62.0), (94.0, 58.0)], "dtd": [(80.0, 30.0), (81.0, 32.0), (79.0, 34.0)]}
    paths = []
    for dataset, runs in numbers.items():
        for seed, (b, n) in enumerate(runs, start=1):
            results, protocol = _fake_run(dataset, seed, b, n)
            paths.append(write_results(tmp_path / f"{dataset}_{seed}.json", results, protocol))
    record = load_results(paths[0])
    assert record["protocol"]["seed"] == 1 and record["units"] == "percent"
    assert record["results"]["base_to_novel"]["base_acc"] == 90.0
    assert record["results"]["base_to_novel"]["per_class_accuracy"]["base"]["a"] is None  # NaN -> null
    with open(paths[0]) as f:
        assert "NaN" not in f.read()

    summary = summarize_runs(paths)
    eurosat = summary["methods"]["FDBPL"]["datasets"]["eurosat"]
    assert eurosat["seeds"] == [1, 2, 3]
    base = eurosat["metrics"]["base_to_novel/base_acc"]
    assert base["mean"] == pytest.approx(92.0) and base["std"] == pytest.approx(np.std([90, 92, 94], ddof=1))
    assert eurosat["metrics"]["base_to_novel/ood/scores/msp/auroc"]["mean"] == pytest.approx(72.0)
    avg = summary["methods"]["FDBPL"]["average"]
    b_avg, n_avg = np.mean([92.0, 80.0]), np.mean([60.0, 32.0])
    assert (avg["base"], avg["novel"]) == pytest.approx((b_avg, n_avg))
    assert avg["hm"] == pytest.approx(harmonic_mean(b_avg, n_avg))  # HM of the averages...
    assert avg["hm"] > avg["mean_of_hm"] + 0.5  # ...not the average of HMs
    assert avg == average_base_novel({"eurosat": (92.0, 60.0), "dtd": (80.0, 32.0)})

    table = format_summary_markdown(summary)
    assert "| Base | Novel | HM |" in table and "92.00 ± 2.00" in table and "average (2)" in table
    assert f"{avg['hm']:.2f}" in table and "OOD msp AUROC" in table

    dup = [json.load(open(paths[0])), json.load(open(paths[0]))]
    with pytest.raises(ValueError, match="same seed"):
        summarize_runs(dup)
    with pytest.raises(ValueError, match="missing"):
        write_results(tmp_path / "x.json", {}, {"dataset": "dtd", "method": "m"})


def test_plots_write_pngs(tmp_path):
    from fdbpl_hf.plots import plot_base_novel, plot_loss_curves, plot_per_class_accuracy

    log = [{"step": s, "loss": 1 / s, "loss_pos": 0.5 / s, "loss_neg": -2.0 - 0.1 / s, "loss_sim": 0.3,
            "loss_pcd": 0.1 / s, "loss_weight": 0.4} for s in range(1, 11)] + [{"step": 10, "train_runtime": 1.0}]
    log_path = tmp_path / "train_log.json"
    log_path.write_text(json.dumps(log))
    many = {f"class {i}": float(i % 101) for i in range(150)}
    paths = [
        plot_per_class_accuracy({"base": {"zero": 50.0, "one": None}, "novel": {"two": 100.0}}, tmp_path / "pc.png"),
        plot_per_class_accuracy(many, tmp_path / "many.png"),
        plot_base_novel({"eurosat": {"base_acc": 90.0, "novel_acc": 60.0}, "dtd": {"base": 80.0, "novel": 50.0}},
                        tmp_path / "bn.png"),
        plot_loss_curves(log, tmp_path / "loss.png"),
        plot_loss_curves(log_path, tmp_path / "loss_from_file.png"),
    ]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 2000
    with pytest.raises(ValueError, match="none of the loss keys"):
        plot_loss_curves([{"step": 1, "train_runtime": 1.0}], tmp_path / "none.png")


def test_evaluate_script(fake_hub, tiny_checkpoints, tokenizer, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import CLIPModel

    student = tiny_checkpoints["student"]
    adapter_dir = tmp_path / "adapter"
    model = get_fdbpl_model(CLIPModel.from_pretrained(student), FDBPLConfig(), tokenizer)
    model.save_pretrained(adapter_dir)
    model.push_to_hub("tester/evaluated")
    log = tmp_path / "trainer_state.json"  # what Trainer.save_state writes
    log.write_text(json.dumps({"log_history": [{"step": s, "loss": 1.0 / s, "loss_pos": 0.5 / s, "loss_neg": -1.0,
                                                "loss_sim": 0.1, "loss_pcd": 0.0} for s in range(1, 6)]}))
    out = tmp_path / "eval"
    # the loopback Hub (not offline): --push_to_hub records the results on the adapter's Hub card
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    run = subprocess.run([sys.executable, os.path.join(REPO, "examples", "evaluate.py"), "--student", student,
                          "--adapter", str(adapter_dir), "--dataset", "digits", "--max_eval_samples", "40",
                          "--num_shots", "4", "--split_seed", "2", "--train_log", str(log), "--output_dir", str(out),
                          "--push_to_hub", "--hub_model_id", "tester/evaluated"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| FDBPL | digits | 1 |" in run.stdout
    assert {"results.json", "per_class.png", "base_novel.png", "loss_curves.png"} <= set(os.listdir(out))
    record = load_results(out / "results.json")
    protocol, b2n = record["protocol"], record["results"]["base_to_novel"]
    assert (protocol["dataset"], protocol["seed"], protocol["num_shots"], protocol["split"]) == ("digits", 2, 4, "test")
    assert protocol["base_classnames"] == DIGIT_NAMES[:5] and protocol["adapter"] == str(adapter_dir)
    assert b2n["num_base_images"] + b2n["num_novel_images"] == 40
    assert b2n["hm"] == pytest.approx(harmonic_mean(b2n["base_acc"], b2n["novel_acc"]))
    assert set(b2n["ood"]["scores"]) == {"msp", "pos_neg_margin", "msp_diff"}
    # model-index results: in the local adapter's card and on the Hub repo's
    for card in (ModelCard.load(adapter_dir / "README.md"), ModelCard.load("tester/evaluated")):
        results = {r.metric_name: r for r in card.data.eval_results}
        assert set(results) == {"base accuracy", "novel accuracy", "harmonic mean (base, novel)"}
        assert results["base accuracy"].metric_value == round(b2n["base_acc"], 2)
        assert results["harmonic mean (base, novel)"].metric_value == round(b2n["hm"], 2)
        assert results["novel accuracy"].dataset_name == "digits" and results["base accuracy"].dataset_split == "test"
        assert card.data.library_name == "peft" and "model-index" in card.content
    # still fdbpl_hf's own card (stamped again): the adapter's next save refreshes it, nothing is kept by mistake
    assert card_owner(str(adapter_dir / "README.md"), ADAPTER_CARD_HEADINGS) is None


# ---- bad input ------------------------------------------------------------------------------------


def test_adapter_from_another_base_model_is_refused(tiny_checkpoints, tokenizer, tmp_path):
    other = make_clip("small")
    get_fdbpl_model(other, FDBPLConfig(base_model_name_or_path="other-clip"), tokenizer).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"cannot evaluate adapter .* on student .*: adapter context width"):
        load_classifier(tiny_checkpoints["student"], str(tmp_path / "a"), local_files_only=True)
    # same shapes, different recorded name: refused unless the name check is switched off
    same_shape = make_clip("tiny")
    get_fdbpl_model(same_shape, FDBPLConfig(base_model_name_or_path="another/tiny-clip"),
                    tokenizer).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="another/tiny-clip"):
        load_classifier(tiny_checkpoints["student"], str(tmp_path / "b"), local_files_only=True)
    model, processor = load_classifier(tiny_checkpoints["student"], str(tmp_path / "b"), check_base_model=False,
                                       local_files_only=True)
    assert processor.crop_size["height"] == model.clip.config.vision_config.image_size


def test_bad_inputs(clip, tokenizer, processor, digits_small):
    zero_shot = ZeroShotCLIP(clip, tokenizer, ANCHOR)
    kw = dict(image_processor=processor, progress=False)
    long_name = "very " * 80 + "long digit"
    with pytest.raises(ValueError, match=r"prompt for class 'very very .* tokens long, more than .* 77"):
        predict_logits(zero_shot, digits_small, ["zero", long_name], label_column=None, **kw)
    adapter = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match="shorten the class name"):
        predict_logits(adapter, digits_small, [long_name], label_column=None, **kw)
    empty = digits_small.select([])
    with pytest.raises(ValueError, match="has no rows"):
        predict_logits(zero_shot, empty, DIGIT_NAMES, **kw)
    with pytest.raises(ValueError, match="has no rows"):
        evaluate_base_to_novel(zero_shot, empty, "digits", **kw)
    with pytest.raises(ValueError, match="has no rows"):
        evaluate_cross_dataset(adapter, {"empty": (empty, DIGIT_NAMES)}, **kw)
    with pytest.raises(ValueError, match="no negative prompt"):
        predict_logits(zero_shot, digits_small, DIGIT_NAMES, negative=True, **kw)
    with pytest.raises(ValueError, match="tokenizer"):
        predict_logits(clip, digits_small, DIGIT_NAMES, **kw)
    with pytest.raises(KeyError, match="no column 'img'"):
        encode_images(zero_shot, digits_small, image_column="img", **kw)
    with pytest.raises(ValueError, match="template 'a photo' has no '{}' field"):
        ZeroShotCLIP(clip, tokenizer, "a photo")
    one_class = predict_logits(adapter, digits_small.select(range(2)), ["x"], label_column=None, **kw)[0]
    assert not math.isnan(one_class.sum().item())


def test_class_names_that_are_not_the_labels_classes_are_refused(clip, tokenizer, processor, digits_small):
    """Fewer names than classes, or the names in another order, used to score a silently wrong accuracy."""
    import datasets

    from fdbpl_hf.evaluation import evaluate_domain_generalization

    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    with pytest.raises(ValueError, match=r"the label column 'label' of cross-dataset target 'd' has 10 classes, the "
                                         r"class names given 3: they agree up to class 2"):
        evaluate_cross_dataset(model, {"d": (digits_small, DIGIT_NAMES[:3])}, **kw)
    with pytest.raises(ValueError, match=r"class 0 is 'zero' in the label column 'label' of cross-dataset target 'd' "
                                         r"but 'eight' in the class names given, which is class 8"):
        evaluate_cross_dataset(model, {"d": (digits_small, sorted(DIGIT_NAMES))}, **kw)
    plain = digits_small.cast_column("label", datasets.Value("int64"))  # no ClassLabel: the labels are checked
    with pytest.raises(ValueError, match=r"target 'p' has label 9 but 3 class names were given"):
        evaluate_cross_dataset(model, {"p": (plain, DIGIT_NAMES[:3])}, **kw)
    with pytest.raises(ValueError, match=r"class 0 is 'zero' in the label column 'label' of source 's' but 'nine'"):
        evaluate_domain_generalization(model, (digits_small, DIGIT_NAMES[::-1]), {"t": plain}, source_name="s", **kw)
    unlabelled = plain.map(lambda row: {"label": -1})
    with pytest.raises(ValueError, match=r"source 'u' has label -1 .*unlabelled rows"):
        evaluate_domain_generalization(model, (unlabelled, DIGIT_NAMES), {"t": plain}, source_name="u", **kw)


def test_ood_without_an_ood_set_or_with_the_same_images_is_refused(clip, tokenizer, processor, digits_small):
    """Identical sets used to score AUROC 50 as if it were a finding; None failed inside len()."""
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    ten = digits_small.select(range(10))
    with pytest.raises(ValueError, match="got None for the OOD one"):
        evaluate_ood(model, ten, None, DIGIT_NAMES, **kw)
    with pytest.raises(ValueError, match="datasets are the same"):
        evaluate_ood(model, ten, ten, DIGIT_NAMES, **kw)
    with pytest.raises(ValueError, match="sets hold the same images"):
        evaluate_ood(model, ten, digits_small.select(range(10)), DIGIT_NAMES, **kw)

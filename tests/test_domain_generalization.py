"""Domain generalisation (source -> targets, CoOp's table shape) on a tiny "ImageNet" of digits."""

import numpy as np
import pytest
import torch
from conftest import make_clip

import datasets
from fdbpl_hf.data import DatasetInfo, subset_classes
from fdbpl_hf.evaluation import ZeroShotCLIP, class_logits, encode_images, evaluate_domain_generalization
from fdbpl_hf.testing.worlds import DIGIT_NAMES, image_processor_for

datasets.disable_progress_bars()
SUBSET = [2, 5, 7]  # the target's classes, as source ids (ImageNet-A/R: 200 ImageNet ids)


@pytest.fixture(scope="module")
def setup(tokenizer):
    clip = make_clip("tiny", seed=3)
    return ZeroShotCLIP(clip, tokenizer, "a photo of the digit {}."), image_processor_for(clip.config)


def _wnid_target(source):
    """The source's rows of SUBSET, labelled by strings (like axiong/imagenet-r's wnid column)."""
    rows = source.filter(lambda y: y in SUBSET, input_columns="label")
    return datasets.Dataset.from_dict({"image": rows["image"], "wnid": [f"n{y}" for y in rows["label"]]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "wnid": datasets.Value("string")}))


def test_dg_table_matches_logits_restricted_to_each_targets_classes(setup, digits_small):
    model, processor = setup
    info = DatasetInfo.custom(label_column="wnid", source="digits", source_class_ids=tuple(SUBSET),
                              expected_class_names=tuple(f"n{i}" for i in SUBSET))
    target = info.prepare(_wnid_target(digits_small)).rename_column("wnid", "label")
    ids = info.class_ids_in_source(target.rename_column("label", "wnid"))
    assert ids == SUBSET
    relabelled = subset_classes(digits_small, SUBSET)  # the same subset, built by the protocol code
    result = evaluate_domain_generalization(
        model, (digits_small, DIGIT_NAMES), {"subset": (target, ids), "relabelled": (relabelled, SUBSET),
                                              "same": digits_small},
        image_processor=processor, source_name="digits", batch_size=8, progress=False)

    # independent computation: full 10-way logits, then only the target's columns
    images = encode_images(model, digits_small, image_processor=processor, batch_size=8, progress=False)
    logits = class_logits(model, images, DIGIT_NAMES)
    source_acc = 100 * (logits.argmax(1) == images.labels).float().mean().item()
    keep = torch.isin(images.labels, torch.tensor(SUBSET))
    sub_pred = torch.as_tensor(SUBSET)[logits[keep][:, SUBSET].argmax(1)]
    subset_acc = 100 * (sub_pred == images.labels[keep]).float().mean().item()

    assert result["source"]["accuracy"] == pytest.approx(source_acc)
    assert result["targets"]["subset"]["accuracy"] == pytest.approx(subset_acc)
    assert result["targets"]["relabelled"]["accuracy"] == pytest.approx(subset_acc)
    assert result["targets"]["same"]["accuracy"] == pytest.approx(source_acc)
    assert result["targets"]["subset"]["num_classes"] == 3 and result["targets"]["subset"]["num_images"] == 9
    assert set(result["targets"]["subset"]["per_class_accuracy"]) == {DIGIT_NAMES[i] for i in SUBSET}
    expected_avg = np.mean([subset_acc, subset_acc, source_acc])
    assert result["target_average"] == pytest.approx(expected_avg)
    assert list(result["table"]) == ["digits", "subset", "relabelled", "same", "average"]
    assert result["table"]["average"] == pytest.approx(expected_avg)


def test_dg_refuses_a_target_without_its_class_map(setup, digits_small):
    model, processor = setup
    relabelled = subset_classes(digits_small, SUBSET)
    with pytest.raises(ValueError, match="class ids must be distinct source class ids"):
        evaluate_domain_generalization(model, (digits_small, DIGIT_NAMES), {"t": (relabelled, [2, 5, 70])},
                                       image_processor=processor, progress=False)
    with pytest.raises(ValueError, match="give its class ids in the source"):
        evaluate_domain_generalization(model, (digits_small, DIGIT_NAMES), {"t": (relabelled, [2, 5])},
                                       image_processor=processor, progress=False)
    with pytest.raises(ValueError, match="no domain-generalisation targets"):
        evaluate_domain_generalization(model, (digits_small, DIGIT_NAMES), {}, image_processor=processor)

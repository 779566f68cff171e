"""The many-class "numbers" world (100 two-digit numbers from real MNIST digits) and the
confidence-weighted ensemble teacher: fast checks (the pretrained-zoo runs are in test_numbers_zoo.py)."""

import math

import numpy as np
import pytest
import torch

from fdbpl_hf.testing import zoo
from fdbpl_hf.data import base_novel_split, get_dataset_info, training_set
from fdbpl_hf.testing.worlds import NUMBER_NAMES, compose_numbers, load_digits
from fdbpl_hf.ril import CallableTeacher, EnsembleTeacher


def test_compose_numbers_puts_the_tens_digit_left_of_the_ones_digit():
    digits = load_digits(num_per_class=2, seed=3)
    numbers = compose_numbers(digits, per_class=1, seed=0)
    assert len(numbers) == 100 and numbers.features["label"].names == NUMBER_NAMES
    assert numbers["label"] == list(range(100))
    image = numbers[37]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    # Each half is a digit image of the right class, shrunk 2:1 horizontally by the box filter.
    pixels = np.asarray(image, dtype=np.float64)
    for half, digit in ((pixels[:, :14], 3), (pixels[:, 14:], 7)):
        candidates = [np.asarray(im, dtype=np.float64) for im, y in zip(digits["image"], digits["label"]) if y == digit]
        errors = [np.abs(half - c.reshape(28, 14, 2).mean(-1)).max() for c in candidates]
        assert min(errors) <= 1.0, errors  # rounding only
    with pytest.raises(ValueError, match="digit"):
        compose_numbers(digits.filter(lambda y: y != 4, input_columns="label"), per_class=1)


def test_numbers_registry_entry_splits_base_novel_and_keeps_test_digits_unseen():
    info = get_dataset_info("numbers")
    train, test = info.load("train"), info.load("test")
    assert (len(train), len(test)) == (6000, 2000) and info.num_classes == 100
    assert np.bincount(test["label"], minlength=100).tolist() == [20] * 100
    base, novel = base_novel_split(train.features["label"].names)
    assert base == list(range(50)) and novel == list(range(50, 100))
    # Composites are deterministic and the test composites share no image with the train ones
    # (they come from the disjoint digit test split).
    assert info.load("train")[5]["image"].tobytes() == train[5]["image"].tobytes()
    assert not {im.tobytes() for im in train["image"]} & {im.tobytes() for im in test["image"]}
    data = training_set("numbers", num_shots=2, seed=1)
    assert len(data["dataset"]) == 100 and data["class_names"][:3] == ["00", "01", "02"]
    assert data["template"] == zoo.NUMBER_EVAL_TEMPLATE
    with pytest.raises(ValueError, match="splits"):
        info.load("validation")


def test_numbers_world_student_captions_avoid_the_eval_prompt_words():
    world = zoo.WORLDS["numbers"]()
    assert world.student.captions == zoo.NUMBER_STUDENT_CAPTION_TEMPLATES and world.teacher.captions is None
    eval_words = {"photo", "of", "the"}
    assert eval_words <= set(world.eval_template.rstrip(".").split())
    for template in world.student.captions:
        assert "{}" in template and not eval_words & set(template.rstrip(".").split()), template
    assert world.eval_template in world.captions  # the teacher reads the evaluation prompt
    assert world.teacher.image_size == world.student.image_size
    # The digit world keeps its cache key; the numbers world has its own.
    digits = zoo.WORLDS["digits"]()
    assert digits.settings(zoo.TEACHER_SPEC, zoo.STUDENT_SPEC) == zoo._zoo_settings(zoo.TEACHER_SPEC, zoo.STUDENT_SPEC)
    assert world.settings(world.teacher, world.student)["world"] == "numbers"
    with pytest.raises(ValueError, match="unknown zoo world"):
        zoo.build_zoo(world="letters")


def _fixed(logits: torch.Tensor, name: str) -> CallableTeacher:
    return CallableTeacher(lambda x: logits[: len(x)], num_classes=logits.shape[1], input_size=4, name=name,
                           image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))


@pytest.mark.numerics
@pytest.mark.parametrize("weighting", ["max_prob", "entropy"])
def test_confidence_weighted_ensemble_trusts_the_sure_member_per_region(weighting):
    sure = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # region 0: sure of class 0; region 1: uniform
    unsure = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0]])  # the other way round
    members = [_fixed(sure, "a"), _fixed(unsure, "b")]
    pixels = torch.rand(2, 3, 4, 4)
    equal = EnsembleTeacher(members)(pixels).exp()
    weighted = EnsembleTeacher(members, weighting=weighting)(pixels).exp()
    torch.testing.assert_close(weighted.sum(-1), torch.ones(2))
    # Equal weights dilute each region's sure member by half; confidence weighting keeps more of it.
    assert weighted[0, 0] > equal[0, 0] + 0.1 and weighted[1, 2] > equal[1, 2] + 0.1
    probs = torch.stack([sure.softmax(-1), unsure.softmax(-1)])
    mix = EnsembleTeacher(members, weighting=weighting).region_weights(probs)
    torch.testing.assert_close(mix.sum(0), torch.ones(2))
    if weighting == "entropy":  # a uniform member has information weight 0: the sure member decides alone
        torch.testing.assert_close(mix[:, 0], torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(weighted[0], sure[0].softmax(-1))
    else:
        top = probs.max(-1).values[:, 0]
        torch.testing.assert_close(mix[:, 0], top / top.sum())
    assert EnsembleTeacher(members, weighting=weighting).describe()["weighting"] == weighting


@pytest.mark.numerics
def test_entropy_weighted_ensemble_falls_back_to_fixed_weights_when_no_member_is_sure():
    flat = torch.zeros(1, 5)
    ensemble = EnsembleTeacher([_fixed(flat, "a"), _fixed(flat, "b")], weights=[3, 1], weighting="entropy")
    mix = ensemble.region_weights(torch.stack([flat.softmax(-1), flat.softmax(-1)]))
    torch.testing.assert_close(mix[:, 0], torch.tensor([0.75, 0.25]))
    assert math.isclose(float(ensemble(torch.rand(1, 3, 4, 4)).exp().sum()), 1.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        EnsembleTeacher([_fixed(flat, "a")], weighting="vote")
    with pytest.raises(ValueError, match="non-negative"):
        EnsembleTeacher([_fixed(flat, "a"), _fixed(flat, "b")], weights=[1, -1])

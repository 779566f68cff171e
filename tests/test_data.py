"""The data protocol: few-shot splits, CoOp base/novel rule, relabelling, dataset registry."""

import json
import warnings

import datasets
import pytest

from fdbpl_hf.data import (
    DATASETS,
    DatasetInfo,
    FewShotSplit,
    base_novel_split,
    clean_class_name,
    few_shot_indices,
    get_dataset_info,
    make_base_novel,
    make_base_novel_test,
    subset_classes,
)
from fdbpl_hf.offline import DIGIT_NAMES, load_digits

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def digits():
    """50 real MNIST digits, 5 per class."""
    return load_digits(num_per_class=5)


# ---- few-shot sampling -------------------------------------------------------------------------


def test_few_shot_is_deterministic_per_seed(digits):
    a = few_shot_indices(digits, 2, seed=1)
    assert a == few_shot_indices(digits, 2, seed=1)
    assert a != few_shot_indices(digits, 2, seed=2)
    assert a == sorted(a) and len(set(a)) == len(a) == 20
    labels = digits["label"][:]
    assert sorted(labels[i] for i in a) == sorted(list(range(10)) * 2)


def test_few_shot_restricts_to_classes(digits):
    idx = few_shot_indices(digits, 3, seed=1, classes=[7, 2])
    labels = digits["label"][:]
    assert sorted(labels[i] for i in idx) == [2, 2, 2, 7, 7, 7]
    # The draw for a class subset is the same whatever order the classes are given in.
    assert idx == few_shot_indices(digits, 3, seed=1, classes=[2, 7])


def test_few_shot_takes_small_classes_whole_and_warns(digits):
    with pytest.warns(UserWarning, match="fewer than 7 rows"):
        idx = few_shot_indices(digits, 7, seed=1)
    assert idx == list(range(len(digits)))


def test_few_shot_respects_index_mappings(digits):
    # Indices are relative to the dataset as given, also after a select (index mapping).
    view = digits.select(range(len(digits) - 1, -1, -1))
    idx = few_shot_indices(view, 1, seed=3)
    assert sorted(view.select(idx)["label"][:]) == list(range(10))


def test_few_shot_split_json_round_trip(digits, tmp_path):
    split = FewShotSplit.create(digits, 2, seed=1, dataset_id="local/digits", split="train", revision="abc")
    path = tmp_path / "shot_2-seed_1.json"
    split.to_json(path)
    assert json.loads(path.read_text())["indices"] == split.indices
    loaded = FewShotSplit.from_json(path)
    assert loaded == split
    assert loaded.indices == few_shot_indices(digits, 2, seed=1)
    subset = loaded.apply(digits)
    assert len(subset) == 20
    assert subset["label"][:] == split.labels


def test_few_shot_split_refuses_another_dataset(digits):
    split = FewShotSplit.create(digits, 2, seed=1)
    with pytest.raises(ValueError, match="rows"):
        split.apply(digits.select(range(len(digits) - 1)))
    # Same row count, different row order: the stored labels no longer match.
    with pytest.raises(ValueError, match="labels"):
        split.apply(digits.shuffle(seed=0))


# ---- base / novel --------------------------------------------------------------------------------


def test_coop_rule_even_and_odd():
    assert base_novel_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    base, novel = base_novel_split([f"c{i}" for i in range(11)])
    assert base == [0, 1, 2, 3, 4, 5] and novel == [6, 7, 8, 9, 10]  # ceil(11 / 2) = 6


def test_coop_rule_with_excluded_classes():
    names = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion"]
    base, novel = base_novel_split(names, exclude=DATASETS["caltech101"].exclude_classes)
    assert base == [1, 3] and novel == [4]


def test_subset_classes_relabels_in_given_order(digits):
    sub = subset_classes(digits, [7, 2, 5])
    assert isinstance(sub.features["label"], datasets.ClassLabel)
    assert sub.features["label"].names == ["seven", "two", "five"]
    assert isinstance(sub.features["image"], datasets.Image)
    old = digits.filter(lambda y: y in (7, 2, 5), input_columns="label")["label"][:]
    assert sub["label"][:] == [{7: 0, 2: 1, 5: 2}[y] for y in old]
    assert len(sub) == 15
    assert sub[0]["image"].size == (28, 28)


def test_subset_classes_does_not_decode_images():
    # Bytes that are not an image: any decode would raise.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}] * 6, "label": [0, 1, 2, 0, 1, 2]}, features=features
    )
    sub = subset_classes(ds, [2, 0])
    assert sub["label"][:] == [1, 0, 1, 0]
    assert sub.features["label"].names == ["c", "a"]


def test_subset_classes_rejects_bad_ids(digits):
    with pytest.raises(ValueError):
        subset_classes(digits, [3, 3])
    with pytest.raises(ValueError):
        subset_classes(digits, [10])


def test_make_base_novel_on_digits(digits):
    out = make_base_novel(digits, 2, seed=1, info="digits")
    train = out["train"]
    assert out["base_ids"] == [0, 1, 2, 3, 4] and out["novel_ids"] == [5, 6, 7, 8, 9]
    assert train.features["label"].names == DIGIT_NAMES[:5]
    assert sorted(train["label"][:]) == sorted(list(range(5)) * 2)
    assert out["base_classnames"] == DIGIT_NAMES[:5] and out["novel_classnames"] == DIGIT_NAMES[5:]
    split = out["few_shot_split"]
    assert split.class_ids == [0, 1, 2, 3, 4] and split.num_shots == 2 and split.seed == 1
    assert split.indices == few_shot_indices(digits, 2, seed=1, classes=range(5))

    test = make_base_novel_test(digits, info="digits")
    assert test["base"].features["label"].names == DIGIT_NAMES[:5]
    assert test["novel"].features["label"].names == DIGIT_NAMES[5:]
    assert len(test["base"]) == len(test["novel"]) == 25
    assert set(test["novel"]["label"][:]) == set(range(5))


def test_make_base_novel_cleans_names_for_prompts():
    features = datasets.Features({"label": datasets.ClassLabel(names=["apple_pie", "baby_back_ribs", "caesar_salad"])})
    ds = datasets.Dataset.from_dict({"label": [0, 0, 1, 1, 2, 2]}, features=features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = make_base_novel(ds, 1, seed=1, info="food101")
    assert out["base_classnames"] == ["apple pie", "baby back ribs"]
    assert out["novel_classnames"] == ["caesar salad"]
    assert out["few_shot_split"].dataset_id == "ethz/food101"
    assert out["train"].features["label"].names == ["apple_pie", "baby_back_ribs"]


# ---- registry ------------------------------------------------------------------------------------

COOP_TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}


def test_registry_has_the_benchmark_and_digits():
    # "digits" and "numbers" (two-digit numbers composed from them) are the offline worlds.
    assert set(DATASETS) == set(COOP_TEMPLATES) | {"digits", "numbers"}
    for name, info in DATASETS.items():
        assert "{}" in info.template, name
        assert info.name == name
        if name in COOP_TEMPLATES:
            assert info.template == COOP_TEMPLATES[name]
        assert info.hub_id is None or info.hub_id.count("/") == 1
    assert DATASETS["digits"].template == "a photo of the digit {}."
    assert DATASETS["numbers"].num_classes == 100
    assert sum(info.num_classes for n, info in DATASETS.items() if n not in ("digits", "numbers")) == 1000 + 100 + 37 + 196 + 102 + 101 + 100 + 397 + 47 + 10 + 101


def test_get_dataset_info_is_lenient_about_names():
    assert get_dataset_info("OxfordPets").name == "oxford_pets"
    assert get_dataset_info("FGVCAircraft").name == "fgvc_aircraft"
    assert get_dataset_info("Flowers102").name == "oxford_flowers"
    assert get_dataset_info("StanfordCars") is DATASETS["stanford_cars"]
    with pytest.raises(KeyError):
        get_dataset_info("cifar10")


def test_digits_entry_loads_offline():
    info = get_dataset_info("digits")
    train, test = info.load("train"), info.load(info.test_split)
    assert len(train) == 4000 and len(test) == 1000
    assert train.features["label"].names == DIGIT_NAMES
    assert info.prompts(DIGIT_NAMES[:2]) == ["a photo of the digit zero.", "a photo of the digit one."]


def test_entries_without_hub_id_explain_themselves():
    with pytest.raises(ValueError, match="no Hub id"):
        DATASETS["ucf101"].load("test")


def test_custom_dataset_info():
    info = DatasetInfo.custom(template="a photo of a {}, a kind of bird.", hub_id="someone/birds", image_column="img")
    assert info.prompts(["blue_jay"]) == ["a photo of a blue jay, a kind of bird."]
    assert info.image_column == "img" and info.label_column == "label"
    with pytest.raises(ValueError, match="must contain"):
        DatasetInfo.custom(template="a photo")


@pytest.mark.parametrize(
    "name, style, expected",
    [
        ("apple_pie", "default", "apple pie"),
        ("tench, Tinca tinca", "first_synonym", "tench"),
        ("/b/bakery/shop", "sun397", "shop bakery"),
        ("a/apartment_building/outdoor", "sun397", "outdoor apartment building"),
        ("abbey", "sun397", "abbey"),
        ("ApplyEyeMakeup", "camel_case", "Apply Eye Makeup"),
        ("Apply_Eye_Makeup", "camel_case", "Apply Eye Makeup"),
        ("AM General Hummer SUV 2000", "year_first", "2000 AM General Hummer SUV"),
    ],
)
def test_clean_class_name(name, style, expected):
    assert clean_class_name(name, style) == expected


def test_dataset_specific_names():
    assert DATASETS["caltech101"].clean_class_names(["airplanes", "Faces", "yin_yang"]) == ["airplane", "face", "yin yang"]
    assert DATASETS["eurosat"].clean_class_names(["AnnualCrop", "SeaLake"]) == ["Annual Crop Land", "Sea or Lake"]
    assert DATASETS["oxford_pets"].clean_class_names(["Abyssinian", "american_bulldog"]) == ["abyssinian", "american bulldog"]

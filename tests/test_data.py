"""The data protocol: few-shot splits, CoOp base/novel rule, relabelling, dataset registry."""

import json
import os
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
from fdbpl_hf.testing.worlds import DIGIT_NAMES, load_digits

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


def test_few_shot_names_rows_whose_label_is_missing_or_not_a_class_id():
    """A ClassLabel cell holding None (an unlabelled row) failed with numpy's bare "cannot convert float
    NaN to integer"; a label of 1.5 would have been truncated to class 1."""
    missing = datasets.Dataset.from_dict(
        {"label": [0, None, 1, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])}))
    with pytest.raises(ValueError, match=r"'label' holds 1 value\(s\) that are not class ids: row 1 \(missing\)"):
        few_shot_indices(missing, 1, seed=0)
    with pytest.raises(ValueError, match=r"row 2 \(1.5\)"):
        few_shot_indices(datasets.Dataset.from_dict({"label": [0.0, 1.0, 1.5]}), 1, seed=0)
    # whole floats and -1 (unlabelled, skipped) are still fine
    assert few_shot_indices(datasets.Dataset.from_dict({"label": [0.0, 1.0, -1.0]}), 1, seed=0) == [0, 1]


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


DG_TARGETS = {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


def test_registry_has_the_benchmark_and_digits():
    # the four ImageNet domain-generalisation targets joined the benchmark (issue 15); "digits" and
    # "numbers" (two-digit numbers composed from them) are the offline worlds
    assert set(DATASETS) == set(COOP_TEMPLATES) | {"digits", "numbers"} | DG_TARGETS
    for name, info in DATASETS.items():
        assert "{}" in info.template, name
        assert info.name == name
        if name in COOP_TEMPLATES:
            assert info.template == COOP_TEMPLATES[name]
        assert info.hub_id is None or info.hub_id.count("/") == 1
    assert DATASETS["digits"].template == "a photo of the digit {}."
    assert DATASETS["numbers"].num_classes == 100
    assert sum(info.num_classes for n, info in DATASETS.items() if n in COOP_TEMPLATES) == 1000 + 100 + 37 + 196 + 102 + 101 + 100 + 397 + 47 + 10 + 101


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
    with pytest.raises(ValueError, match="template 'a photo' has no '{}' field"):
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


# ---- verified registry, CoOp's class order ---------------------------------------------------------


def test_every_registry_entry_is_verified_or_says_why():
    for name, info in DATASETS.items():
        if name in ("digits", "numbers"):  # the offline worlds: built here, no mirror to verify
            continue
        assert isinstance(info.verified, bool), name
        assert info.evidence, f"{name}: no evidence"
        if info.verified:
            assert "https://huggingface.co/datasets/" in info.evidence and info.hub_id, name
            # a verified entry knows whether the mirror's order is CoOp's, and maps it where it is not
            assert info.coop_order is not None or info.source is not None, name
        if info.coop_order is False:
            assert info.class_order != "dataset", f"{name}: order differs from CoOp's but no mapping"


def test_unverified_entry_warns_and_verified_one_does_not():
    table = datasets.Dataset.from_dict({"label": [0, 1]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["a", "b"])}))
    unverified = DatasetInfo("x", verified=False, evidence="card not seen.", loader=lambda split: table)
    with pytest.warns(UserWarning, match="unverified registry entry: card not seen"):
        unverified.load("train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DatasetInfo("y", verified=True, evidence="...", loader=lambda split: table).load("train")
        DatasetInfo.custom(loader=lambda split: table).load("train")  # a user's own data: no claim, no warning


def _labelled(names, labels):
    return datasets.Dataset.from_dict(
        {"label": labels, "row": list(range(len(labels)))},
        features=datasets.Features({"label": datasets.ClassLabel(names=names), "row": datasets.Value("int32")}))


# ethz/food101's first 21 class names in its ClassLabel order (its card) and the order CoOp-family code
# lists them in (Python's sort of the folders): cheese_plate and cheesecake swap.
FOOD_MIRROR = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets",
               "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad", "cannoli",
               "caprese_salad", "carrot_cake", "ceviche", "cheesecake", "cheese_plate", "chicken_curry",
               "chicken_quesadilla", "chicken_wings"]
FOOD_COOP = FOOD_MIRROR[:16] + ["cheese_plate", "cheesecake"] + FOOD_MIRROR[18:]


def test_food101_mirror_is_relabelled_to_coops_sorted_order():
    prepared = DATASETS["food101"].prepare(_labelled(FOOD_MIRROR, list(range(len(FOOD_MIRROR)))))
    assert prepared.features["label"].names == FOOD_COOP
    # ethz/food101 puts cheesecake before cheese_plate; CoOp's Python sort of the folders does not
    names = ["apple_pie", "cheesecake", "cheese_plate", "churros"]
    mirror = _labelled(names, [0, 1, 2, 3, 1, 2])
    prepared = DATASETS["food101"].prepare(mirror)
    assert prepared.features["label"].names == ["apple_pie", "cheese_plate", "cheesecake", "churros"]
    # every row keeps its class; only the ids change
    for before, after in zip(mirror, prepared):
        assert names[before["label"]] == prepared.features["label"].names[after["label"]]
    assert prepared["label"] == [0, 2, 1, 3, 2, 1]


def test_caltech101_mirror_gets_coops_base_and_novel_classes():
    # dpdl-benchmark/caltech101 names (a 9-class excerpt, in its alphabetical order)
    names = ["accordion", "airplanes", "anchor", "background_google", "faces", "faces_easy", "leopards",
             "motorbikes", "yin_yang"]
    mirror = _labelled(names, list(range(len(names))))
    info = DATASETS["caltech101"]
    prepared = info.prepare(mirror)
    order = prepared.features["label"].names
    # CoOp: sorted original folders BACKGROUND_Google, Faces, Faces_easy, Leopards, Motorbikes, accordion, ...
    assert order == ["background_google", "faces", "faces_easy", "leopards", "motorbikes", "accordion", "airplanes",
                     "anchor", "yin_yang"]
    split = make_base_novel_test(prepared, info=info)
    assert split["base_classnames"] == ["face", "leopard", "motorbike", "accordion"]
    assert split["novel_classnames"] == ["airplane", "anchor", "yin yang"]
    # without the mapping the halves would differ (the reason for the mapping)
    plain = make_base_novel_test(mirror, info=DatasetInfo.custom(exclude_classes=info.exclude_classes,
                                                                 classname_overrides=info.classname_overrides))
    assert plain["base_classnames"] != split["base_classnames"]


def test_explicit_class_order_and_its_errors():
    mirror = _labelled(["b", "a", "c"], [0, 1, 2])
    info = DatasetInfo.custom(class_order=["c", "a", "b"], loader=lambda split: mirror)
    assert info.load("train")["label"] == [2, 1, 0]
    with pytest.raises(ValueError, match="not the dataset's 3 classes"):
        DatasetInfo.custom(class_order=["a", "b"]).prepare(mirror)
    with pytest.raises(ValueError, match="class_order must be"):
        DatasetInfo.custom(class_order="alphabetical")


def test_string_labels_are_encoded_and_checked():
    table = datasets.Dataset.from_dict({"wnid": ["n2", "n1", "n2", "n3"]})
    info = DatasetInfo.custom(label_column="wnid", expected_class_names=("n1", "n2", "n3"))
    prepared = info.prepare(table)
    assert prepared.features["wnid"].names == ["n1", "n2", "n3"] and prepared["wnid"] == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="classes differ from the registered ones"):
        DatasetInfo.custom(label_column="wnid", expected_class_names=("n1", "n2")).prepare(table)
    with pytest.raises(KeyError, match="no label column 'label'"):
        DatasetInfo.custom().prepare(table)


def test_imagenet_first_synonyms_stay_distinct():
    """ImageNet's label names 638 "maillot" and 639 "maillot, tank suit" (and the Hub copy's 134
    "crane" / 517 "crane2") must not become one prompt."""
    raw = ["crane", "crane2", "maillot", "maillot, tank suit", "tench, Tinca tinca"]
    names = DATASETS["imagenet"].clean_class_names(raw)
    assert names == ["crane", "construction crane", "maillot", "tank suit", "tench"]


def test_imagenet_a_and_r_class_maps():
    from fdbpl_hf.imagenet_variants import (IMAGENET_A_CLASS_IDS, IMAGENET_A_WNIDS, IMAGENET_R_CLASS_IDS,
                                            IMAGENET_R_WNIDS)

    for ids, wnids in ((IMAGENET_A_CLASS_IDS, IMAGENET_A_WNIDS), (IMAGENET_R_CLASS_IDS, IMAGENET_R_WNIDS)):
        assert len(ids) == len(set(ids)) == len(wnids) == len(set(wnids)) == 200
        assert list(ids) == sorted(ids) and list(wnids) == sorted(wnids) and 0 <= ids[0] and ids[-1] < 1000
    # the two subsets were taken from independent lists; on their 86 shared classes they agree
    a, r = dict(zip(IMAGENET_A_WNIDS, IMAGENET_A_CLASS_IDS)), dict(zip(IMAGENET_R_WNIDS, IMAGENET_R_CLASS_IDS))
    shared = set(a) & set(r)
    assert len(shared) == 86 and all(a[w] == r[w] for w in shared)
    assert a["n01498041"] == 6 and r["n01443537"] == 1  # stingray, goldfish
    assert DATASETS["imagenet_r"].class_ids_in_source(
        DATASETS["imagenet_r"].prepare(datasets.Dataset.from_dict({"wnid": list(IMAGENET_R_WNIDS)}))) == list(
        IMAGENET_R_CLASS_IDS)


def test_imagenet_v2_folder_names_map_back_to_imagenet_ids():
    # imagefolder sorts the folders 0..999 as strings: class k is not ImageNet class k
    names = sorted(str(i) for i in range(12))
    assert names[:4] == ["0", "1", "10", "11"]
    table = _labelled(names, [2, 0])
    assert DATASETS["imagenet_v2"].class_ids_in_source(table) == [int(n) for n in names]
    with pytest.raises(ValueError, match="integer source ids"):
        DATASETS["imagenet_v2"].class_ids_in_source(_labelled(["cat"], [0]))


def test_test_only_entries_refuse_training():
    from fdbpl_hf.data import training_set

    with pytest.raises(ValueError, match="test-only"):
        training_set("imagenet_a")


# ---- custom datasets without code ----------------------------------------------------------------------


def _image_folder(root, classes=("cat", "dog", "emu"), per_class=3):
    from PIL import Image

    for c, name in enumerate(classes):
        for split in ("train", "test"):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 90)).save(root / split / name / f"{i}.png")
    return root


def test_dataset_info_from_json_and_yaml(tmp_path):
    from fdbpl_hf.data import resolve_dataset, training_set

    _image_folder(tmp_path / "pets")
    spec = {"data_dir": "pets", "template": "a photo of a {}, a pet.", "classname_overrides": {"emu": "big bird"},
            "class_order": ["emu", "cat", "dog"]}
    (tmp_path / "pets.json").write_text(json.dumps(spec))
    (tmp_path / "pets.yaml").write_text("data_dir: pets\ntemplate: 'a photo of a {}, a pet.'\n"
                                        "classname_overrides: {emu: big bird}\nclass_order: [emu, cat, dog]\n")
    for path in ("pets.json", "pets.yaml"):
        info = resolve_dataset(str(tmp_path / path))
        assert info.name == "pets" and info.builder == "imagefolder" and info.verified is None
        data = training_set(str(tmp_path / path), num_shots=2, seed=1, classes="all")
        assert data["class_names"] == ["big bird", "cat", "dog"] and data["template"] == "a photo of a {}, a pet."
        assert len(data["dataset"]) == 6
    (tmp_path / "bad.json").write_text(json.dumps({"data_dir": "pets", "labels": "y"}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['labels'\]"):
        resolve_dataset(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        resolve_dataset(str(tmp_path / "missing.json"))


def test_image_folder_is_a_dataset(tmp_path):
    from fdbpl_hf.data import resolve_dataset

    _image_folder(tmp_path / "imgs")
    info = resolve_dataset(str(tmp_path / "imgs"))
    test = info.load(info.test_split)
    assert test.features["label"].names == ["cat", "dog", "emu"] and len(test) == 9


def test_domain_generalization_target_from_a_folder_of_imagenet_ids(tmp_path):
    from PIL import Image

    from fdbpl_hf.data import domain_generalization_target

    for cls in ("0", "1", "2", "10"):  # ImageNet-V2's layout: one folder per ImageNet id
        (tmp_path / "v2" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (int(cls) * 20, 0, 0)).save(tmp_path / "v2" / cls / "a.png")
    with pytest.warns(UserWarning, match="unverified registry entry"):
        data, ids = domain_generalization_target("imagenet_v2", data_dir=str(tmp_path / "v2"))
    assert data.features["label"].names == ["0", "1", "10", "2"] and ids == [0, 1, 10, 2]
    # each image's ImageNet id is its folder's
    assert sorted(ids[y] for y in data["label"]) == [0, 1, 2, 10]


def test_custom_columns_become_image_and_label_for_the_scripts(tmp_path):
    from PIL import Image

    from fdbpl_hf.data import training_set

    table = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4), (i * 30, 0, 0)) for i in range(6)], "species": ["b", "a", "c", "a", "b", "c"],
         "label": [9] * 6},  # an unrelated column that happens to be called "label"
        features=datasets.Features({"img": datasets.Image(), "species": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "birds.yaml").write_text("data_dir: saved\nimage_column: img\nlabel_column: species\n")
    data = training_set(str(tmp_path / "birds.yaml"), num_shots=1, seed=0, classes="all")
    assert data["dataset"].column_names == ["image", "label"] and data["class_names"] == ["a", "b", "c"]
    assert sorted(data["dataset"]["label"]) == [0, 1, 2]

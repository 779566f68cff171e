"""`build_ril_table`: run the teacher once, offline, over M random regions of every image."""

from __future__ import annotations

import dataclasses
import logging
import os
from itertools import islice
from typing import Any, Iterable, Optional, Sequence

import datasets
import numpy as np
import torch

from ..clip_ops import channel_stats
from ..integrity import build_output_dir, is_sampled_fingerprint
from ..rows import stored_rows
from ..losses import shannon_entropy
from .compose import REGION_KEY, region_key
from ..validation import check_class_names, check_class_order
from .device_replay import DeviceChunkRenderer
from .host_pipeline import (
    DeviceResults, HostPool, check_host_threads, default_host_threads, lagged, ordered, source_cells, to_device,
)
from .regions import RegionSpec, image_to_tensor, region_rng, render_jobs, sample_regions
from .sharding import ShardedBuild, absent_or_empty, default_build_dir, remove_leftover_work
from .table import (
    ENTROPY_COLUMN, METADATA_FILE, TABLE_FORMAT, build_key, columns_to_arrow, columns_to_dataset, content_differences,
    decode_image, describe_source, library_version, load_ril_table, read_metadata_file, table_features,
)
from .table_config import (  # DEFAULT_NUM_REGIONS: re-exported, its home before 0.5
    BUILD_CONFIG_KEY, DEFAULT_NUM_REGIONS, DEFAULT_TEMPLATE, DEFAULT_TOP_K, RILTableConfig,
)
from .teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Teacher, as_teacher

logger = logging.getLogger(__name__)

FLOAT16_MIN = float(np.finfo(np.float16).min)  # the most negative finite value of the stored log-probabilities


def resolve_class_names(dataset: datasets.Dataset, label_column: Optional[str],
                        class_names: Optional[Sequence[str]]) -> list[str]:
    if class_names is not None:
        names = check_class_names("class_names", class_names)
        feature = dataset.features.get(label_column) if label_column else None
        if isinstance(feature, datasets.ClassLabel) and feature.num_classes != len(names):
            # the labels index the ClassLabel: an extra or missing name would shift or add a class silently
            raise ValueError(f"class_names has {len(names)} names, but the label column {label_column!r} is a "
                             f"ClassLabel of {feature.num_classes} classes ({', '.join(feature.names[:5])}"
                             f"{', ...' if feature.num_classes > 5 else ''}): give one name per class, in label "
                             "order, or cast the column to a ClassLabel of your classes first")
        if isinstance(feature, datasets.ClassLabel):
            # the same names in another order (e.g. sorted) would prompt every class with another's name
            check_class_order(f"the label column {label_column!r} (ClassLabel)", feature.names, "class_names", names,
                              labels=True, fix="give the names in the label order (dataset.features[label].names)")
    else:
        feature = dataset.features.get(label_column) if label_column else None
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                f"label column {label_column!r} is {feature!r}, not a datasets.ClassLabel, so the class "
                "names are unknown: pass class_names=[...] or cast the column, e.g. "
                f"dataset.cast_column({label_column!r}, datasets.ClassLabel(names=[...]))"
            )
        names = list(feature.names)
    if not names:
        raise ValueError("the class list is empty")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    return names


# Render table regions with the batched device kernel (device_replay.DeviceChunkRenderer): None = when the
# teacher runs on an accelerator; True/False force it (tests compare both on CPU)
DEVICE_RENDER: Optional[bool] = None


class _RegionLabeler:
    """Images in, `num_regions` labelled regions per image out: the `datasets.map` function of a
    build with `num_proc`, and the whole-shard pipeline (`label_rows`) of a build without.

    The host work runs in a pool of threads ahead of the teacher (fdbpl_hf.ril.host_pipeline):
    images are decoded and their boxes drawn there, chunks of regions are rendered there (or
    prepared there and rendered on the teacher's device in one batched kernel), and each chunk's
    top-K comes back to the host while the teacher runs the next. Regions are grouped into teacher
    batches exactly as `datasets.map` batches the images (`images_per_batch` images per group,
    `teacher_batch_size` regions per call within a group), so the teacher sees the same batches
    whichever path runs."""

    def __init__(self, teacher: Teacher, spec: RegionSpec, num_regions: int, top_k: int, seed: int,
                 image_column: str, offset: int, teacher_batch_size: int, device: Optional[str],
                 index_dtype: np.dtype, images_per_batch: int = 4, host_threads: Optional[int] = None):
        self.teacher, self.spec, self.num_regions, self.top_k = teacher, spec, num_regions, top_k
        self.seed, self.image_column, self.offset = seed, image_column, offset
        self.teacher_batch_size, self.device, self.index_dtype = teacher_batch_size, device, index_dtype
        self.images_per_batch, self.host_threads = images_per_batch, host_threads

    def _device_for(self, rank: Optional[int]) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if rank is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{rank % torch.cuda.device_count()}")
        return self.teacher.device

    def __call__(self, batch: dict, indices: list[int], rank: Optional[int] = None) -> dict:
        if rank is not None and torch.get_num_threads() > 1 and not torch.cuda.is_available():
            # A forked CPU worker inherits the parent's OpenMP pool, which can deadlock: one
            # thread per worker (num_proc workers already use the cores).
            torch.set_num_threads(1)
        rows = [index + self.offset for index in indices]
        columns = self._label([list(zip(rows, batch[self.image_column]))], self._device_for(rank))
        if not len(columns["box"]):
            return columns
        # an Arrow table: datasets.map would encode the list columns row by row
        table = columns_to_arrow(columns, table_features(self.top_k, self.teacher.num_classes))
        return columns if table is None else table

    def label_rows(self, source: datasets.Dataset, rows: range, desc: Optional[str] = None) -> dict:
        """The columns of source rows `rows` (positions in `source`; table rows `offset + row`), in
        groups of `images_per_batch` as `datasets.map` would batch them, pipelined across groups;
        with `desc`, a progress bar of the regions labelled (when datasets' bars are on, as the
        bar `datasets.map` draws)."""
        from tqdm.auto import tqdm

        cells = source_cells(source, self.image_column, rows)

        def groups():
            while True:
                group = [(row + self.offset, cell) for row, cell in islice(cells, self.images_per_batch)]
                if not group:
                    return
                yield group

        with tqdm(total=len(rows) * self.num_regions, desc=desc, unit=" regions",
                  disable=desc is None or not datasets.is_progress_bar_enabled()) as bar:
            return self._label(groups(), self._device_for(None), bar.update)

    def _label(self, groups: Iterable[list], device: torch.device, done=None) -> dict:
        if self.teacher.device != device:
            self.teacher.to(device)
        spec = self.spec
        # the uint8 renderer crops on the CPU (or in the batched kernel on the device); the float one where
        # the teacher runs
        render_device = torch.device("cpu") if spec.renderer == "uint8" else device
        on_device = spec.renderer == "uint8" and (device.type != "cpu" if DEVICE_RENDER is None else DEVICE_RENDER)
        device_renderer = (DeviceChunkRenderer(spec, self.teacher.image_mean, self.teacher.image_std, device)
                           if on_device else None)
        mean_std = channel_stats(self.teacher.image_mean, self.teacher.image_std)
        threads = self.host_threads or default_host_threads(device)
        columns = {"box": [], "flip": [], "topk_indices": [], "topk_logits": [], "teacher_entropy": []}

        def decode(item):
            row, cell = item
            image = image_to_tensor(decode_image(cell, row, spec.exif_transpose),
                                    f"row {row} of the source dataset").to(render_device)
            boxes, flips = sample_regions(image.shape[1], image.shape[2], self.num_regions, spec,
                                          region_rng(self.seed, row))
            return row, image, boxes, flips

        def prepare(chunk):  # on a host thread
            return device_renderer.prepare(chunk) if on_device else render_jobs(chunk, spec, *mean_std)

        def flagged():  # every image, and whether it ends its group
            for group in groups:
                for n, item in enumerate(group):
                    yield item, n == len(group) - 1

        with HostPool(threads, single_thread_ops=device.type == "cpu") as pool:
            decoded = ordered(pool, lambda item: (decode(item[0]), item[1]), flagged(),
                              ahead=max(2 * self.images_per_batch, 2 * threads))

            def chunks():  # teacher batches within each group, as datasets.map batches the images
                jobs = []
                for (row, image, boxes, flips), last in decoded:
                    columns["box"].append(boxes)
                    columns["flip"].append(flips)
                    jobs.extend((image, boxes[r], bool(flips[r]), row) for r in range(self.num_regions))
                    if last:
                        for start in range(0, len(jobs), self.teacher_batch_size):
                            yield jobs[start: start + self.teacher_batch_size]
                        jobs = []

            rendered = ordered(pool, lambda chunk: (chunk, prepare(chunk)), chunks(), ahead=2)
            scored = (self._score(chunk, prepared, device_renderer, device) for chunk, prepared in rendered)
            for chunk, results in lagged(scored, lambda item: (item[0], item[1].numpy())):
                finite = results["finite"]
                if not finite.all():
                    bad = chunk[int(np.flatnonzero(~finite)[0])][3]
                    raise ValueError(f"the teacher produced NaN or inf logits on a region of source row {bad}")
                columns["topk_indices"].append(results["topk_indices"].astype(self.index_dtype))
                columns["topk_logits"].append(results["topk_logits"].astype(np.float16))
                columns["teacher_entropy"].append(results["teacher_entropy"].astype(np.float16))
                if done is not None:
                    done(len(chunk))
        if not columns["box"]:
            return {key: [] for key in columns}
        return {key: np.concatenate(values) for key, values in columns.items()}

    def _score(self, chunk: list, prepared, device_renderer, device: torch.device) -> tuple[list, DeviceResults]:
        """Queue the teacher and the top-K of one chunk; its results come back without a wait."""
        with torch.inference_mode():
            if device_renderer is not None:
                pixels = device_renderer.render(prepared)
            else:
                pixels = to_device(prepared, device) if prepared.device != device else prepared
            logits = self.teacher(pixels)
            del pixels
            if logits.ndim != 2 or logits.shape != (len(chunk), self.teacher.num_classes):
                raise ValueError(f"the teacher returned logits of shape {tuple(logits.shape)}, expected "
                                 f"({len(chunk)}, {self.teacher.num_classes})")
            log_p = torch.log_softmax(logits.float(), dim=-1)
            values, idx = log_p.topk(self.top_k, dim=-1)
            # a log-probability below float16's range (a teacher with a logit range over 65504) would be
            # stored as -inf, which replay refuses: clamped, it still means p = 0
            return chunk, DeviceResults({
                "topk_indices": idx, "topk_logits": values.clamp_min(FLOAT16_MIN),
                # of the FULL distribution: a top-K rebuild caps it at log K (spec §3)
                "teacher_entropy": shannon_entropy(log_p),
                # checked on the host when the results arrive, not by a sync per chunk
                "finite": torch.isfinite(logits).all(-1),
            })


# the old name: it places feature caches too (kind="feature_caches")
default_table_dir = default_build_dir


def build_ril_table(
    dataset: datasets.Dataset,
    teacher,
    config: Optional[RILTableConfig] = None,
    *,
    class_names: Optional[Sequence[str]] = None,
    teacher_tokenizer=None,
    region_spec: Optional[RegionSpec] = None,
    output_dir: Optional[str] = None,
    **settings: Any,
) -> datasets.Dataset:
    """Build the Region Information Lookup table of `dataset` with `teacher`.

    Each image gets `num_regions` RandomResizedCrop regions (seeded by `seed` and its row), the
    teacher scores each region once, and the table keeps the top-`top_k` log-probabilities with
    the crop geometry. The work runs through `datasets.Dataset.map(batched=True)` shard by shard;
    finished shards live under `<output_dir>.incomplete` until the whole table is written to
    `output_dir`, so a killed build resumes where it stopped, and a half-built table never loads.

    The settings are the fields of `config` (an `RILTableConfig`); any of them may also be given
    as a keyword (`build_ril_table(ds, teacher, num_regions=50)`), which overrides `config`. The
    finished table's metadata stores the config whole (`RILTableConfig.from_metadata`).

    Args:
        dataset: an image-classification `datasets.Dataset` (an `Image` column and a label column).
        teacher: a `transformers.CLIPModel` (scored with `template` prompts; pass
            `teacher_tokenizer`), a `fdbpl_hf.ril.Teacher`, or a callable
            `pixel_values -> logits [B, C]` (pass `teacher_input_size`).
        config: the build settings (default `RILTableConfig()`); the keywords below are its fields.
        num_regions: M, regions per image (paper: 500).
        top_k: K, teacher classes kept per region (paper: 20); default min(20, number of classes).
        seed: seed of the region sampling (region r of image i depends only on seed, i and r).
        class_names: the classes, in label order; default the label column's `ClassLabel` names.
        template: prompt template(s) of a `CLIPModel` teacher (several are ensembled).
        teacher_tokenizer: the tokenizer of a `CLIPModel` teacher.
        teacher_input_size, teacher_image_mean, teacher_image_std: region size and normalisation
            of a callable teacher (a `CLIPModel`'s size comes from its config).
        teacher_name, teacher_revision, source_id, source_revision: recorded in the metadata, so
            that a table used with another teacher or dataset fails loudly.
        region_spec: crop scale/ratio, flip probability, output size and renderer
            (`RegionSpec`; default the paper's RandomResizedCrop at the teacher's input size).
        image_column, label_column: the dataset's columns; `label_column=None` for unlabelled data
            (then pass `class_names`).
        output_dir: where the finished table goes; default a cache folder named by the settings,
            so calling again with the same inputs returns the cached table.
        images_per_batch: images per group (a `map` batch under `num_proc`); `teacher_batch_size`:
            regions per teacher call within a group.
        host_threads: threads that decode images and crop regions ahead of the teacher (default: 1
            with the teacher on the CPU, else every usable CPU up to 32).
        shard_size: images per resumable shard.
        num_proc: `datasets.map` worker processes (`with_rank=True`: worker r uses GPU r); without
            it, one process runs each shard as one pipeline (no `map`); under
            `accelerate launch`/torchrun each process builds every world_size-th shard instead.
        device: where the teacher runs (default: where it is; under `num_proc`, GPU `rank`).
        fill: how training rebuilds dense logits: "mr" (marginal re-norm: the K stored classes keep
            their log-probabilities, every other class gets the smallest of them minus 10) or
            "dense" (the table stores every class: K = C).

    Returns:
        the table as a `datasets.Dataset` (memory-mapped), its metadata under `ril_metadata(table)`.
    """
    config = RILTableConfig.with_overrides(config, settings)
    num_regions, top_k, seed, fill = config.num_regions, config.top_k, config.seed, config.fill
    image_column, label_column = config.image_column, config.label_column
    template = DEFAULT_TEMPLATE if config.template is None else config.template
    teacher_image_mean = OPENAI_CLIP_MEAN if config.teacher_image_mean is None else config.teacher_image_mean
    teacher_image_std = OPENAI_CLIP_STD if config.teacher_image_std is None else config.teacher_image_std
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if region_spec is not None and not isinstance(region_spec, RegionSpec):
        raise TypeError(f"region_spec must be a RegionSpec, got {type(region_spec).__name__}")
    dataset = stored_rows(dataset, "the dataset of build_ril_table")  # not a format's tensors or a transform's output
    for column in (image_column, label_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"column {column!r} is not in the dataset (columns: {dataset.column_names})")
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(f"column {image_column!r} is {dataset.features[image_column]!r}, not a datasets.Image")
    # the settings' types and ranges were checked by RILTableConfig; numpy integers (e.g. from np.ceil(...).astype(int)) as plain ints: they go into the JSON metadata
    config = dataclasses.replace(config, num_regions=int(num_regions), seed=int(seed),
                                 teacher_batch_size=int(config.teacher_batch_size),
                                 images_per_batch=int(config.images_per_batch),
                                 host_threads=check_host_threads(config.host_threads))
    num_regions, seed = config.num_regions, config.seed
    names = resolve_class_names(dataset, label_column, class_names)
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, len(names))
    if not 1 <= top_k <= len(names):
        raise ValueError(f"top_k must be between 1 and the number of classes ({len(names)}), got {top_k!r}")
    top_k = int(top_k)
    if fill == "dense" and top_k != len(names):
        raise ValueError(f"fill='dense' stores every class: top_k must equal the class count {len(names)}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty (0 rows): there are no images to label")

    teacher = as_teacher(teacher, names, teacher_tokenizer, template, config.teacher_input_size,
                         teacher_image_mean, teacher_image_std)
    if config.teacher_name:
        teacher.name = config.teacher_name
    if config.teacher_revision:
        teacher.revision = config.teacher_revision
    spec = region_spec or RegionSpec(output_size=teacher.input_size)
    if spec.output_size != teacher.input_size:
        raise ValueError(f"region_spec.output_size {spec.output_size} differs from the teacher's input size "
                         f"{teacher.input_size}")

    metadata = {
        "format": TABLE_FORMAT,
        "num_regions": num_regions,
        "top_k": top_k,
        "seed": seed,
        "fill": fill,
        "values": "log_softmax",
        "entropy_column": ENTROPY_COLUMN,
        "class_names": names,
        "teacher": teacher.describe(),
        "regions": spec.to_dict(),
        "source": describe_source(dataset, image_column, label_column, config.source_id, config.source_revision,
                                  len(names)),
        "layout": "row = image_index * num_regions + region",
        # the settings as resolved for this build; how fast it ran is not part of the build key
        BUILD_CONFIG_KEY: dataclasses.replace(config, top_k=top_k, template=template,
                                              teacher_image_mean=list(teacher_image_mean),
                                              teacher_image_std=list(teacher_image_std)).to_dict(),
    }
    key = build_key(metadata)
    # which tables compose with this one (fdbpl_hf.ril.compose): recomputed for tables without it
    metadata.update(build_key=key, library_version=library_version(), **{REGION_KEY: region_key(metadata)})
    if output_dir is None and not identified(metadata["teacher"]):
        # the default folder is named by the build key: without the teacher's content in it, two
        # different callables of one name would share (and return) one table
        raise ValueError(f"the teacher {teacher.name!r} is (or holds) a callable whose weights fdbpl_hf cannot "
                         "fingerprint, so "
                         "the default cache folder could hand back another teacher's table: pass output_dir=, or "
                         "teacher_revision= (a string that identifies its weights), or give a torch.nn.Module")
    output_dir = build_output_dir(output_dir if output_dir else default_build_dir(key))

    done = _existing_table(output_dir, metadata)
    if done is not None:
        logger.info("RIL table already built at %s", output_dir)
        return done

    features = table_features(top_k, len(names))
    index_dtype = np.dtype(features["topk_indices"].feature.dtype)
    source = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    build = ShardedBuild(output_dir, metadata, kind="RIL table", num_items=len(dataset),
                         shard_size=config.shard_size, metadata_file=METADATA_FILE)

    def build_shard(shard: int, start: int, stop: int) -> datasets.Dataset:
        labeler = _RegionLabeler(teacher, spec, num_regions, top_k, seed, image_column, start,
                                 config.teacher_batch_size, config.device, index_dtype, config.images_per_batch,
                                 config.host_threads)
        if config.num_proc is None:
            # one pipeline over the whole shard: the teacher never waits for datasets.map between batches
            columns = labeler.label_rows(source.select(range(start, stop)), range(stop - start),
                                         desc=f"RIL shard {shard + 1}/{build.num_shards}")
            return columns_to_dataset(columns, features)
        return source.select(range(start, stop)).map(
            labeler, batched=True, batch_size=config.images_per_batch, with_indices=True,
            with_rank=config.num_proc is not None, remove_columns=[image_column], features=features,
            num_proc=config.num_proc, keep_in_memory=True, new_fingerprint=f"ril-{key}-{shard}",
            desc=f"RIL shard {shard + 1}/{build.num_shards}",
        )

    build.run(build_shard)
    return load_ril_table(output_dir)


def identified(teacher: dict) -> bool:
    """Whether a teacher's description pins what it computes: a revision, or the digest of its
    weights (for an ensemble: every member's; its own "weights" are the mixing weights)."""
    if teacher.get("revision"):
        return True
    if "members" in teacher:
        return all(identified(m) for m in teacher["members"])
    return teacher.get("weights") is not None


def _sampled_teacher_key(teacher) -> bool:
    """Whether a stored teacher description holds a weights fingerprint of 0.4-0.6 (sampled)."""
    if not isinstance(teacher, dict):
        return False
    if "members" in teacher:
        return any(_sampled_teacher_key(m) for m in teacher["members"])
    return is_sampled_fingerprint(teacher.get("weights"))


def _existing_table(output_dir: str, metadata: dict) -> Optional[datasets.Dataset]:
    meta_path = os.path.join(output_dir, METADATA_FILE)
    if absent_or_empty(output_dir):
        return None
    if not os.path.isfile(meta_path):
        raise ValueError(f"output_dir {output_dir} exists but is not an RIL table; choose another folder")
    existing = read_metadata_file(meta_path)
    if not isinstance(existing, dict):
        raise ValueError(f"output_dir {output_dir} holds a {METADATA_FILE} that is not an RIL table's; choose another "
                         "folder")
    if existing.get("build_key") != metadata["build_key"]:
        differences = content_differences(existing, metadata)
        sampled = (f". Its teacher was identified by fdbpl_hf {existing.get('library_version')}'s sampled weights "
                   "fingerprint, this version digests all the weights: the same teacher gets another key. "
                   "load_ril_table(output_dir) still loads and replays it as it is"
                   if _sampled_teacher_key(existing.get("teacher")) else "")
        raise ValueError(f"output_dir {output_dir} already holds an RIL table built with other settings (built by "
                         f"fdbpl_hf {existing.get('library_version')}; differs in "
                         f"{', '.join(differences) or 'its build key'}){sampled}; delete it or pick another folder")
    table = load_ril_table(output_dir)
    remove_leftover_work(output_dir, metadata["build_key"], "RIL table")
    return table


"""`build_ril_table`: run the teacher once, offline, over M random regions of every image."""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import torch

from ..clip_ops import channel_stats, normalize_pixels
from ..integrity import build_output_dir, is_sampled_fingerprint
from ..rows import stored_rows
from ..losses import shannon_entropy
from .compose import REGION_KEY, region_key
from ..validation import check_class_names, check_class_order
from .device_replay import DeviceChunkRenderer
from .regions import RegionSpec, image_to_tensor, region_rng, render_region, sample_regions
from .sharding import ShardedBuild, absent_or_empty, default_build_dir
from .table import (
    ENTROPY_COLUMN, METADATA_FILE, TABLE_FORMAT, build_key, content_differences, decode_image,
    describe_source, library_version, load_ril_table, read_metadata_file, table_features,
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
    """The `datasets.map` function: images in, `num_regions` labelled regions per image out."""

    def __init__(self, teacher: Teacher, spec: RegionSpec, num_regions: int, top_k: int, seed: int,
                 image_column: str, offset: int, teacher_batch_size: int, device: Optional[str],
                 index_dtype: np.dtype):
        self.teacher, self.spec, self.num_regions, self.top_k = teacher, spec, num_regions, top_k
        self.seed, self.image_column, self.offset = seed, image_column, offset
        self.teacher_batch_size, self.device, self.index_dtype = teacher_batch_size, device, index_dtype

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
        device = self._device_for(rank)
        if self.teacher.device != device:
            self.teacher.to(device)
        jobs, boxes, flips = [], [], []
        # the uint8 renderer crops on the CPU; the float one where the teacher runs
        render_device = torch.device("cpu") if self.spec.renderer == "uint8" else device
        for item, index in zip(batch[self.image_column], indices):
            row = index + self.offset
            image = image_to_tensor(decode_image(item, row, self.spec.exif_transpose),
                                    f"row {row} of the source dataset").to(render_device)
            b, f = sample_regions(image.shape[1], image.shape[2], self.num_regions, self.spec,
                                  region_rng(self.seed, row))
            boxes.append(b)
            flips.append(f)
            jobs.extend((image, b[r], bool(f[r]), row) for r in range(self.num_regions))
        if not jobs:
            return {"box": [], "flip": [], "topk_indices": [], "topk_logits": [], "teacher_entropy": []}
        top_idx, top_val, entropies = [], [], []
        chunks = [jobs[start : start + self.teacher_batch_size]
                  for start in range(0, len(jobs), self.teacher_batch_size)]
        # Crops of chunk k + 1 are rendered in a background thread while the teacher scores chunk k
        # (torch ops release the GIL), so cropping costs no teacher time; with the teacher on an
        # accelerator, uint8 crops are rendered there in one batched kernel (same pixels, bit for bit).
        if self.spec.renderer == "uint8" and (device.type != "cpu" if DEVICE_RENDER is None else DEVICE_RENDER):
            renderer_cm = DeviceChunkRenderer(self.spec, self.teacher.image_mean, self.teacher.image_std, device)
        else:
            renderer_cm = _ChunkRenderer(self.spec, self.teacher.image_mean, self.teacher.image_std,
                                         single_thread=device.type == "cpu")
        with renderer_cm as renderer:
            pending = renderer.submit(chunks[0])
            for k, chunk in enumerate(chunks):
                pixels = pending.result().to(device, non_blocking=True)
                pending = renderer.submit(chunks[k + 1]) if k + 1 < len(chunks) else None
                with torch.inference_mode():
                    logits = self.teacher(pixels)
                    del pixels
                    if logits.ndim != 2 or logits.shape != (len(chunk), self.teacher.num_classes):
                        raise ValueError(f"the teacher returned logits of shape {tuple(logits.shape)}, expected "
                                         f"({len(chunk)}, {self.teacher.num_classes})")
                    finite = torch.isfinite(logits).all(-1)
                    if not bool(finite.all()):
                        bad = chunk[int((~finite).nonzero()[0])][3]
                        raise ValueError(f"the teacher produced NaN or inf logits on a region of source row {bad}")
                    log_p = torch.log_softmax(logits.float(), dim=-1)
                    values, idx = log_p.topk(self.top_k, dim=-1)
                    top_idx.append(idx.cpu().numpy().astype(self.index_dtype))
                    # a log-probability below float16's range (a teacher with a logit range over 65504)
                    # would be stored as -inf, which replay refuses: clamped, it still means p = 0
                    top_val.append(values.clamp_min(FLOAT16_MIN).cpu().numpy().astype(np.float16))
                    # of the FULL distribution: a top-K rebuild caps it at log K (spec §3)
                    entropies.append(shannon_entropy(log_p).cpu().numpy().astype(np.float16))
        return {
            "box": np.concatenate(boxes),
            "flip": np.concatenate(flips),
            "topk_indices": np.concatenate(top_idx),
            "topk_logits": np.concatenate(top_val),
            "teacher_entropy": np.concatenate(entropies),
        }


def _render_chunk(chunk: list, spec: RegionSpec, mean_std: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Normalised pixels `[len(chunk), 3, S, S]` of `(image, box, flip, row)` jobs."""
    with torch.inference_mode():
        pixels = torch.stack([render_region(image, box, flip, spec) for image, box, flip, _ in chunk])
        return normalize_pixels(pixels, *mean_std, inplace=True)  # no chunk-sized copies


class _ChunkRenderer:
    """One background thread that renders the next chunk of regions while the teacher runs.

    On CPU the thread renders with one intra-op thread: the crops are small ops whose OpenMP
    barriers stall badly when the cores are busy (the teacher, other processes); one thread beside
    the teacher's pool costs the teacher little. The caller's thread count is restored on exit
    (`torch.set_num_threads` in a thread sets the default of threads started later).
    """

    def __init__(self, spec: RegionSpec, mean, std, single_thread: bool):
        self.spec, self.single_thread = spec, single_thread
        self.mean_std = channel_stats(mean, std)
        self.executor: Optional[ThreadPoolExecutor] = None

    def __enter__(self) -> "_ChunkRenderer":
        self.threads = torch.get_num_threads()
        self.restore = self.single_thread and self.threads > 1
        init = (lambda: torch.set_num_threads(1)) if self.restore else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ril-render", initializer=init)
        return self

    def submit(self, chunk: list) -> Future:
        return self.executor.submit(_render_chunk, chunk, self.spec, self.mean_std)

    def __exit__(self, *exc) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.restore:
            torch.set_num_threads(self.threads)


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
        images_per_batch: images per `map` batch; `teacher_batch_size`: regions per teacher call.
        shard_size: images per resumable shard.
        num_proc: `map` worker processes (`with_rank=True`: worker r uses GPU r); under
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
                                 teacher_batch_size=int(config.teacher_batch_size))
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
                                 config.teacher_batch_size, config.device, index_dtype)
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
    return load_ril_table(output_dir)


"""Student-feature cache: the frozen student's image features of the replayed regions, stored once.

FDBPL's default student learns text prompts only, so its frozen image tower gives the same
feature for a stored region in every run and every epoch that replays it. A feature cache is a
second table, beside an RIL table, holding those features for the regions the replay schedule
visits in the first `epochs` epochs. Training from it (`RILDataset(..., feature_cache=cache)`)
skips image decoding, cropping and the image tower: a step is the text tower and the losses.

Layout: one row per (image, epoch), `row = image_index * epochs + epoch`, columns `region`
(int32, the table region that epoch replays) and `image_features` (float16 or float32
`[projection_dim]`, the student's projected, unnormalised image features). The cache is tied to
one RIL table (its build key) and one student checkpoint: `check_feature_cache` compares the
student's architecture and recomputes a few stored rows with it, so another checkpoint of the
same shape fails loudly instead of training on the wrong features.
"""

from __future__ import annotations

import copy
import os
import logging
from typing import Iterator, Optional, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ..clip_ops import channel_stats
from ..integrity import build_output_dir, is_sampled_fingerprint, sampled_tensor_fingerprint, tensor_fingerprint
from ..modeling import FDBPLCLIPModel, model_name
from ..validation import check_value, integer, one_of
from .feature_cache import (  # re-exported: the cache's format lives in feature_cache.py
    CACHE_FORMAT, CACHE_LAYOUT, CACHE_METADATA_FILE, CACHE_REQUIRED_KEYS, check_cache_matches_table,
    check_cache_metadata, content_key, feature_cache_metadata, load_feature_cache, verify_cache,
)
from .device_replay import DeviceChunkRenderer
from .host_pipeline import (
    DeviceResults, HostPool, check_host_threads, default_host_threads, lagged, ordered, source_cells, to_device,
)
from .regions import image_to_tensor, render_jobs
from .replay import RILDataset
from .sharding import ShardedBuild, absent_or_empty, default_build_dir, remove_leftover_work
from .table import columns_to_dataset, decode_image, library_version, take_rows

logger = logging.getLogger(__name__)

# Render the cached regions with the batched device kernel (device_replay.DeviceChunkRenderer), each
# image decoded once: None = when the student runs on an accelerator; True/False force it (tests
# compare both on CPU). Tables of the float renderer (fdbpl_hf 0.1) always render on the CPU.
DEVICE_RENDER: Optional[bool] = None

# Stored fp16 features vs a fresh fp32 forward differ by ~1e-3 relative; another checkpoint of the
# same architecture gives unrelated features (cosine far below this).
PROBE_MIN_COSINE = 0.995
PROBE_MAX_NORM_ERROR = 0.02


def student_signature(clip) -> dict:
    """Architecture facts of a CLIP's image side (what a feature cache depends on)."""
    vision = clip.config.vision_config
    return {
        "vision_hidden_size": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "projection_dim": clip.config.projection_dim,
    }


def _image_side(clip) -> dict:
    return {"vision_model": clip.vision_model, "visual_projection": clip.visual_projection}


def weights_fingerprint(clip) -> str:
    """A digest of all the image side's weights (`fdbpl_hf.integrity.tensor_fingerprint`): two
    checkpoints that differ in any value get different fingerprints, so one never reuses the
    other's cache."""
    return tensor_fingerprint(_image_side(clip))


def student_matches(stored: str, clip) -> tuple[bool, str]:
    """(whether a cache's stored student fingerprint is `clip`'s, the fingerprint compared with):
    caches of 0.4-0.6 stored 0.6's sampled fingerprint, and are compared by that scheme (their probe
    rows, recomputed by the student, back it up)."""
    found = sampled_tensor_fingerprint(_image_side(clip)) if is_sampled_fingerprint(stored) else weights_fingerprint(clip)
    return stored == found, found


def _clip_of(student):
    return student.clip if isinstance(student, FDBPLCLIPModel) else student


class _AllEpochs(torch.utils.data.Dataset):
    """Item i: image i's regions for the first `epochs` epochs of replay (`RILDataset.render_epochs`)."""

    def __init__(self, data, epochs: int):
        self.data, self.epochs = data, epochs

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data.render_epochs(index, self.epochs)


def _image_features(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return clip.get_image_features(pixel_values=pixel_values).pooler_output.float()


def build_feature_cache(data, student, *, epochs: Optional[int] = None, output_dir: Optional[str] = None,
                        batch_size: int = 256, shard_size: int = 1000, dtype: str = "float16",
                        device: Optional[str] = None, num_workers: int = 0, host_threads: Optional[int] = None,
                        progress: bool = True) -> datasets.Dataset:
    """Compute the student's image features of every region the replay schedule visits.

    Calling it again with the same table, student weights and settings returns the finished cache.

    Args:
        data: the offline `RILDataset` training will use (table, source images, the student's
            normalisation); its regions are rendered exactly as training would render them.
        student: the frozen student, an `FDBPLCLIPModel` or its `CLIPModel`.
        epochs: cache the regions of epochs 0..epochs-1 (default: all `num_regions` regions);
            training for more epochs than cached raises. 50 epochs of a 500-region table need a
            tenth of it.
        output_dir: where the finished cache goes (default: a cache folder named by the table and
            the student); built shard by shard in `<output_dir>.incomplete`, so an interrupted
            build resumes, and only a complete cache is ever loaded.
        dtype: "float16" (default, half the size) or "float32" (bit-faithful to the student).
        host_threads: threads that decode images and crop regions ahead of the student (default: 1
            with the student on the CPU, else every usable CPU up to 32).
        num_workers: with the student on the CPU, > 0 renders in that many DataLoader worker
            processes instead of the host threads.

    Returns:
        the cache as a `datasets.Dataset`, its metadata under `feature_cache_metadata(cache)`.
    """
    if not isinstance(data, RILDataset) or data.is_online or data.feature_cache is not None:
        raise TypeError("build_feature_cache needs an offline RILDataset (over an RIL table, without a cache)")
    check_value("build_feature_cache dtype", dtype, one_of("float16", "float32"))
    check_value("build_feature_cache epochs", epochs, integer(1, optional=True))
    for name, value, least in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                               ("num_workers", num_workers, 0)):
        check_value(f"build_feature_cache {name}", value, integer(least))
    host_threads = check_host_threads(host_threads)
    clip = _clip_of(student)
    size = clip.config.vision_config.image_size
    if size != data.spec.output_size:
        raise ValueError(f"the student's image size {size} differs from the table's region size "
                         f"{data.spec.output_size}")
    epochs = data.num_regions if epochs is None else int(epochs)
    if not 1 <= epochs <= data.num_regions:
        raise ValueError(f"epochs must be between 1 and the table's num_regions ({data.num_regions}), got {epochs}")
    table_meta = data.metadata
    dim = clip.config.projection_dim
    metadata = {
        "format": CACHE_FORMAT,
        "table_build_key": table_meta["build_key"],
        "source_fingerprint": table_meta["source"]["fingerprint"],
        "num_images": len(data),
        "num_regions": data.num_regions,
        "seed": data.seed,
        "epochs": epochs,
        "dim": dim,
        "dtype": dtype,
        "student": {"signature": student_signature(clip), "weights": weights_fingerprint(clip),
                    "image_mean": list(data.image_mean), "image_std": list(data.image_std)},
        "layout": "row = image_index * epochs + epoch; region = the region replayed at that epoch",
    }
    key = content_key(metadata)  # the name is information only: ./ckpt and ckpt are the same weights
    metadata["student"]["name"] = model_name(clip) or None
    metadata.update(build_key=key, library_version=library_version())
    output_dir = build_output_dir(output_dir if output_dir else default_build_dir(f"{table_meta['build_key']}-{key}",
                                                                                   "feature_caches"))
    existing = _existing_cache(output_dir, key)
    if existing is not None:
        return existing

    build = ShardedBuild(output_dir, metadata, kind="student-feature cache", num_items=len(data),
                         shard_size=shard_size, metadata_file=CACHE_METADATA_FILE)
    _build_cache(build, data, clip, epochs, dim, dtype, batch_size, device, num_workers, host_threads, progress)
    return load_feature_cache(output_dir)


def _existing_cache(output_dir: str, key: str) -> Optional[datasets.Dataset]:
    if absent_or_empty(output_dir):
        return None
    if not os.path.isfile(os.path.join(output_dir, CACHE_METADATA_FILE)):
        raise ValueError(f"output_dir {output_dir} exists but is not a student-feature cache; choose another "
                         "folder")
    existing = load_feature_cache(output_dir)
    if feature_cache_metadata(existing).get("build_key") != key:
        raise ValueError(f"output_dir {output_dir} already holds a feature cache built with other settings "
                         "(another table, student checkpoint, epochs or dtype): delete it or pass another "
                         "output_dir")
    remove_leftover_work(output_dir, key, "student-feature cache")
    return existing


def _build_cache(build: ShardedBuild, data, clip, epochs: int, dim: int, dtype: str, batch_size: int,
                 device: Optional[str], num_workers: int, host_threads: Optional[int], progress: bool) -> None:
    if device is not None:
        clip.to(device)
    model_device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    features = datasets.Features({"region": datasets.Value("int32"),
                                  "image_features": datasets.List(datasets.Value(dtype), length=dim)})
    own_images = sum(stop - start for _, start, stop in build.my_shards())
    bar = _progress(progress and build.rank == 0, own_images * epochs)

    on_device = data.spec.renderer == "uint8" and (model_device.type != "cpu" if DEVICE_RENDER is None
                                                   else DEVICE_RENDER)
    # each image is decoded once and rendered for all its cached epochs; about batch_size regions
    # per forward (the same image groups on every path, so the forwards see the same batches)
    images_per_batch = max(1, batch_size // epochs)

    def write(out, regions, first: int, feats: np.ndarray, region: np.ndarray) -> int:
        n = region.shape[0]
        out[first: first + n] = feats.reshape(n, epochs, dim)
        regions[first: first + n] = region
        bar.update(n * epochs)
        return first + n

    def build_shard(shard: int, start: int, stop: int) -> datasets.Dataset:
        out = np.empty((stop - start, epochs, dim), dtype=dtype)
        regions = np.empty((stop - start, epochs), dtype=np.int32)
        first = 0
        if num_workers > 0 and not on_device:  # worker processes render on the CPU
            loader = DataLoader(_AllEpochs(data, epochs), batch_size=images_per_batch,
                                sampler=range(start, stop), num_workers=num_workers, collate_fn=default_collate,
                                pin_memory=model_device.type == "cuda")
            for batch in loader:
                pixels = batch["pixel_values"]  # [images, epochs, 3, S, S]
                feats = _image_features(clip, pixels.flatten(0, 1).to(model_device, non_blocking=True))
                first = write(out, regions, first, feats.cpu().numpy(), batch["region"].numpy())
        else:
            threads = host_threads or default_host_threads(model_device)
            for feats, region in _pipelined_features(data, clip, range(start, stop), epochs, images_per_batch,
                                                     model_device, on_device, threads):
                first = write(out, regions, first, feats, region)
        return columns_to_dataset({"region": regions.reshape(-1), "image_features": out.reshape(-1, dim)}, features)

    def restore() -> None:
        bar.close()
        clip.train(was_training)

    build.run(build_shard, on_skip=lambda shard, start, stop: bar.update((stop - start) * epochs),
              after_shards=restore)


def _pipelined_features(data, clip, indices: range, epochs: int, images_per_batch: int, device: torch.device,
                        on_device: bool, threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(features [n * epochs, dim], regions [n, epochs])` per group of `images_per_batch` images:
    images decoded by a pool of host threads ahead of the student, each group's regions rendered
    there (or prepared there and rendered on the device), features read back one group later."""
    renderer = DeviceChunkRenderer(data.spec, data.image_mean, data.image_std, device) if on_device else None
    mean_std = channel_stats(data.image_mean, data.image_std)

    def decode(item):
        index, cell = item
        return image_to_tensor(decode_image(cell, index, data.spec.exif_transpose), f"row {index} of the source dataset")

    def prepare(jobs):
        return renderer.prepare(jobs) if on_device else render_jobs(jobs, data.spec, *mean_std)

    def forward(prepared) -> DeviceResults:
        with torch.inference_mode():
            pixels = renderer.render(prepared) if on_device else to_device(prepared, device)
            return DeviceResults({"features": _image_features(clip, pixels)})

    with HostPool(threads, single_thread_ops=device.type == "cpu") as pool:
        images = ordered(pool, decode, source_cells(data.source, data.image_column, indices),
                         ahead=max(2 * images_per_batch, 2 * threads))

        def groups():  # the render jobs of each group, image-major (as RILDataset.render_epochs orders them)
            for start in range(indices.start, indices.stop, images_per_batch):
                group = range(start, min(start + images_per_batch, indices.stop))
                region = np.array([[data.region_for(i, e) for e in range(epochs)] for i in group], dtype=np.int32)
                rows = take_rows(data.table, [i * data.num_regions + int(r) for i, rs in zip(group, region)
                                              for r in rs], ["box", "flip"])
                jobs = []
                for n, index in enumerate(group):
                    image = next(images)
                    jobs.extend((image, rows["box"][n * epochs + e], bool(rows["flip"][n * epochs + e]), index)
                                for e in range(epochs))
                yield jobs, region

        rendered = ordered(pool, lambda item: (item[1], prepare(item[0])), groups(), ahead=2)
        queued = ((region, forward(prepared)) for region, prepared in rendered)
        yield from lagged(queued, lambda item: (item[1].numpy()["features"], item[0]))


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="student features", unit="region", disable=not enabled)


def check_feature_cache(data, student, rows: Optional[Sequence[int]] = None) -> None:
    """Verify that `data`'s feature cache belongs to `student`: same image-side architecture, same
    weights (fingerprint), and a few stored rows recomputed by the student agree. Raises a
    `ValueError` naming what differs. `FDBPLTrainer` calls it; custom training loops should too."""
    meta = data.cache_metadata
    clip = _clip_of(student)
    problems = []
    stored, found = meta["student"]["signature"], student_signature(clip)
    diff = {k: (v, found.get(k)) for k, v in stored.items() if found.get(k) != v}
    if diff:
        problems.append("student architecture: " + ", ".join(f"{k} cache {a} vs model {b}"
                                                            for k, (a, b) in diff.items()))
    elif not (match := student_matches(meta["student"].get("weights"), clip))[0]:
        problems.append(f"student weights: the cache was built with another checkpoint "
                        f"({meta['student'].get('name') or 'unnamed'}; weights {meta['student'].get('weights')} vs "
                        f"{match[1]})")
    else:
        total = meta["num_images"] * meta["epochs"]
        picks = rows if rows is not None else sorted({0, total // 2, total - 1})
        probe = copy.copy(data)
        probe.feature_cache = None
        device = next(clip.parameters()).device
        was_training = clip.training
        clip.eval()
        for row in picks:
            index, epoch = divmod(int(row), meta["epochs"])
            probe.set_epoch(epoch)
            item = probe.__getitems__([index])[0]
            fresh = _image_features(clip, item["pixel_values"].unsqueeze(0).to(device))[0].cpu()
            cached = torch.from_numpy(np.asarray(data.feature_cache[int(row)]["image_features"], dtype=np.float32))
            cos = float(torch.nn.functional.cosine_similarity(fresh, cached, dim=0))
            norm_err = float((fresh.norm() - cached.norm()).abs() / fresh.norm().clamp_min(1e-12))
            if cos < PROBE_MIN_COSINE or norm_err > PROBE_MAX_NORM_ERROR:
                problems.append(f"stored features of image {index}, epoch {epoch} differ from this student's "
                                f"(cosine {cos:.4f}, norm error {norm_err:.2%}): the cache was built with another "
                                f"checkpoint ({meta['student']['name'] or 'unnamed'})")
                break
        clip.train(was_training)
    if problems:
        raise ValueError("the student-feature cache does not belong to this student:\n  - " + "\n  - ".join(problems)
                         + "\nRebuild it with build_feature_cache(data, student).")

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
import hashlib
import json
import logging
import math
import os
import shutil
from typing import Optional, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ..integrity import tensor_fingerprint
from ..modeling import FDBPLCLIPModel, _model_name
from ..integrity import BuildLock, IntegrityError, expand_path, metadata_digest, require_keys, verification_enabled
from .build import _absent_or_empty, _assemble, _dist_info, _on_every_rank, _on_rank0, _start_build, default_table_dir
from .table import (attach_metadata, described_metadata, is_verified, library_version, load_from_disk_named,
                    read_metadata_file, verify_rows)

logger = logging.getLogger(__name__)

CACHE_FORMAT = "fdbpl-feature-cache/1"
CACHE_METADATA_FILE = "feature_cache.json"
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


def weights_fingerprint(clip, samples_per_tensor: int = 4096) -> str:
    """A hash of the image side's weights (an even subsample of every tensor): two checkpoints of
    the same architecture get different fingerprints, so one never reuses the other's cache."""
    return tensor_fingerprint({"vision_model": clip.vision_model, "visual_projection": clip.visual_projection},
                              samples_per_tensor)


def _clip_of(student):
    return student.clip if isinstance(student, FDBPLCLIPModel) else student


class _AllEpochs(torch.utils.data.Dataset):
    """Item i: image i's regions for the first `epochs` epochs of replay (`RILDataset.replay_epochs`)."""

    def __init__(self, data, epochs: int):
        self.data, self.epochs = data, epochs

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data.replay_epochs(index, self.epochs)


def _image_features(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return clip.get_image_features(pixel_values=pixel_values).pooler_output.float()


def build_feature_cache(data, student, *, epochs: Optional[int] = None, output_dir: Optional[str] = None,
                        batch_size: int = 256, shard_size: int = 1000, dtype: str = "float16",
                        device: Optional[str] = None, num_workers: int = 0,
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

    Returns:
        the cache as a `datasets.Dataset`, its metadata under `feature_cache_metadata(cache)`.
    """
    from .replay import RILDataset

    if not isinstance(data, RILDataset) or data.is_online or data.feature_cache is not None:
        raise TypeError("build_feature_cache needs an offline RILDataset (over an RIL table, without a cache)")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
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
    key = _content_key(metadata)  # the name is information only: ./ckpt and ckpt are the same weights
    metadata["student"]["name"] = _model_name(clip) or None
    metadata.update(build_key=key, library_version=library_version())
    output_dir = expand_path(output_dir) if output_dir else default_table_dir(f"{table_meta['build_key']}-{key}",
                                                                              "feature_caches")
    existing = _existing_cache(output_dir, key)
    if existing is not None:
        return existing

    rank, world = _dist_info()
    work = output_dir + ".incomplete"
    lock = BuildLock(output_dir + ".lock", "student-feature cache")
    try:
        _on_rank0(rank, _start_build, lock, work, dict(metadata, shard_size=shard_size), "student-feature cache")
        return _build_cache(data, clip, metadata, output_dir, work, rank, world, epochs, dim, dtype, batch_size,
                            shard_size, device, num_workers, progress)
    finally:
        lock.release()


def _existing_cache(output_dir: str, key: str) -> Optional[datasets.Dataset]:
    if _absent_or_empty(output_dir):
        return None
    if not os.path.isfile(os.path.join(output_dir, CACHE_METADATA_FILE)):
        raise ValueError(f"output_dir {output_dir} exists but is not a student-feature cache; choose another "
                         "folder")
    existing = load_feature_cache(output_dir)
    if feature_cache_metadata(existing).get("build_key") != key:
        raise ValueError(f"output_dir {output_dir} already holds a feature cache built with other settings "
                         "(another table, student checkpoint, epochs or dtype): delete it or pass another "
                         "output_dir")
    return existing


def _build_cache(data, clip, metadata, output_dir, work, rank, world, epochs, dim, dtype, batch_size, shard_size,
                 device, num_workers, progress) -> datasets.Dataset:
    if device is not None:
        clip.to(device)
    model_device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    features = datasets.Features({"region": datasets.Value("int32"),
                                  "image_features": datasets.List(datasets.Value(dtype), length=dim)})
    num_shards = math.ceil(len(data) / shard_size)
    mine = range(rank, num_shards, world)
    own_images = sum(min((k + 1) * shard_size, len(data)) - k * shard_size for k in mine)
    bar = _progress(progress and rank == 0, own_images * epochs)

    def build_my_shards() -> None:
        for shard in mine:
            shard_dir = os.path.join(work, f"shard-{shard:05d}")
            start, stop = shard * shard_size, min((shard + 1) * shard_size, len(data))
            if os.path.isdir(shard_dir):
                bar.update((stop - start) * epochs)
                continue
            out = np.empty((stop - start, epochs, dim), dtype=dtype)
            regions = np.empty((stop - start, epochs), dtype=np.int32)
            # each image is decoded once and rendered for all its cached epochs; about batch_size
            # regions per forward
            loader = DataLoader(_AllEpochs(data, epochs), batch_size=max(1, batch_size // epochs),
                                sampler=range(start, stop), num_workers=num_workers, collate_fn=default_collate,
                                pin_memory=model_device.type == "cuda")
            first = start
            for batch in loader:
                pixels = batch["pixel_values"]  # [images, epochs, 3, S, S]
                n = pixels.shape[0]
                feats = _image_features(clip, pixels.flatten(0, 1).to(model_device, non_blocking=True))
                out[first - start: first - start + n] = feats.view(n, epochs, dim).cpu().numpy()
                regions[first - start: first - start + n] = batch["region"].numpy()
                first += n
                bar.update(n * epochs)
            part = datasets.Dataset.from_dict(
                {"region": regions.reshape(-1), "image_features": out.reshape(-1, dim)}, features=features)
            tmp = shard_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            part.save_to_disk(tmp)
            os.replace(tmp, shard_dir)  # a shard exists only once fully written

    try:
        _on_every_rank(rank, build_my_shards)  # also the barrier before assembling
    finally:
        bar.close()
        clip.train(was_training)
    _on_rank0(rank, _assemble, work, output_dir, num_shards, metadata, metadata_file=CACHE_METADATA_FILE)
    return load_feature_cache(output_dir)


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="student features", unit="region", disable=not enabled)


def _content_key(metadata: dict) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]


def feature_cache_metadata(cache: datasets.Dataset) -> dict:
    """The metadata of a cache returned by `build_feature_cache` or `load_feature_cache`."""
    return described_metadata(cache, CACHE_FORMAT, "this dataset is not a student-feature cache: load caches "
                              "with fdbpl_hf.ril.load_feature_cache(path)")


CACHE_REQUIRED_KEYS = ("format", "table_build_key", "num_images", "num_regions", "seed", "epochs", "dim", "dtype",
                       "student.signature", "student.weights", "student.image_mean", "student.image_std",
                       "build_key")
CACHE_LAYOUT = "; row = image_index * epochs + epoch"


def check_cache_metadata(metadata: dict, where: str) -> None:
    """Refuse cache metadata that lacks a key or was edited after the build (build key and digest)."""
    require_keys(metadata, CACHE_REQUIRED_KEYS, where)
    content = {k: v for k, v in metadata.items()
               if k not in ("build_key", "library_version", "complete", "stats", "integrity", "metadata_digest")}
    content["student"] = {k: v for k, v in content["student"].items() if k != "name"}
    if _content_key(content) != metadata["build_key"]:
        raise IntegrityError(f"{where} was edited after the build: its build key is not the hash of its content. "
                             "Rebuild the cache.")
    if "metadata_digest" in metadata and metadata["metadata_digest"] != metadata_digest(metadata):
        raise IntegrityError(f"{where} was edited after the build (its metadata digest does not match). Rebuild "
                             "the cache.")


def verify_cache(cache: datasets.Dataset, metadata: dict, what: str) -> None:
    """Check a cache's rows against the digests recorded when it was built."""
    verify_rows(cache, metadata, what, CACHE_LAYOUT)


def load_feature_cache(path: str, *, verify: Optional[bool] = None) -> datasets.Dataset:
    """Load a complete feature cache written by `build_feature_cache` (an interrupted build is refused).

    Its metadata is checked, and, unless `verify=False` or `FDBPL_HF_VERIFY=0`, every row is hashed
    and compared with the digests recorded at build time (rows swapped, edited or corrupted fail)."""
    path = expand_path(path)
    meta_path = os.path.join(path, CACHE_METADATA_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path + ".incomplete"):
            raise ValueError(f"the feature cache at {path} was never finished (its build was interrupted); "
                             "call build_feature_cache with the same arguments to resume it")
        raise FileNotFoundError(f"no student-feature cache at {path}")
    metadata = read_metadata_file(meta_path)
    if not isinstance(metadata, dict) or metadata.get("format") != CACHE_FORMAT or not metadata.get("complete"):
        raise ValueError(f"{path} holds no complete student-feature cache")
    check_cache_metadata(metadata, meta_path)
    cache = load_from_disk_named(os.path.join(path, "data"))
    expected = metadata["num_images"] * metadata["epochs"]
    if len(cache) != expected:
        raise ValueError(f"feature cache {path} has {len(cache)} rows, its metadata promises {expected}")
    if verification_enabled(verify):
        verify_cache(cache, metadata, f"student-feature cache {path}")
    return attach_metadata(cache, metadata)


def check_cache_matches_table(cache_meta: dict, table_meta: dict, image_mean: Sequence[float],
                              image_std: Sequence[float]) -> None:
    """Raise if a cache was built from another table or with another normalisation."""
    problems = []
    if cache_meta["table_build_key"] != table_meta.get("build_key"):
        problems.append(f"RIL table: cache built from table {cache_meta['table_build_key']}, "
                        f"used with table {table_meta.get('build_key')}")
    student = cache_meta["student"]
    if [round(v, 6) for v in student["image_mean"]] != [round(float(v), 6) for v in image_mean] or \
            [round(v, 6) for v in student["image_std"]] != [round(float(v), 6) for v in image_std]:
        problems.append(f"image normalisation: cache {student['image_mean']}/{student['image_std']} vs "
                        f"{list(image_mean)}/{list(image_std)}")
    if problems:
        raise ValueError("the student-feature cache does not match its RIL table:\n  - " + "\n  - ".join(problems))


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
    elif meta["student"].get("weights") != (weights := weights_fingerprint(clip)):
        problems.append(f"student weights: the cache was built with another checkpoint "
                        f"({meta['student'].get('name') or 'unnamed'}; weights {meta['student'].get('weights')} vs "
                        f"{weights})")
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

"""Student-feature cache format: its metadata, loading, and the checks that bind it to its RIL
table (`RILDataset` runs them). `features.py` builds caches and checks them against a student."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import datasets

from ..integrity import IntegrityError, expand_path, json_digest, metadata_digest, require_keys, verification_enabled
from .table import attach_metadata, described_metadata, load_from_disk_named, read_metadata_file, verify_rows

CACHE_FORMAT = "fdbpl-feature-cache/1"
CACHE_METADATA_FILE = "feature_cache.json"


def content_key(metadata: dict) -> str:
    """The build key of a feature cache: a hash of everything that determines its rows."""
    return json_digest(metadata, 16)


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
    if content_key(content) != metadata["build_key"]:
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


def check_cache_matches_table(cache_meta: dict, table_meta, image_mean: Sequence[float],
                              image_std: Sequence[float]) -> None:
    """Raise if a cache was built from another table or with another normalisation. `table_meta`
    may be a list: composed tables share their regions, so a cache of any of them fits."""
    problems = []
    keys = [m.get("build_key") for m in (table_meta if isinstance(table_meta, (list, tuple)) else [table_meta])]
    if cache_meta["table_build_key"] not in keys:
        problems.append(f"RIL table: cache built from table {cache_meta['table_build_key']}, "
                        f"used with table {' + '.join(map(str, keys))}")
    student = cache_meta["student"]
    if [round(v, 6) for v in student["image_mean"]] != [round(float(v), 6) for v in image_mean] or \
            [round(v, 6) for v in student["image_std"]] != [round(float(v), 6) for v in image_std]:
        problems.append(f"image normalisation: cache {student['image_mean']}/{student['image_std']} vs "
                        f"{list(image_mean)}/{list(image_std)}")
    if problems:
        raise ValueError("the student-feature cache does not match its RIL table:\n  - " + "\n  - ".join(problems))

"""RIL table format: features, self-describing metadata, loading and compatibility checks.

Layout: one row per region, `row = image_index * num_regions + region`, columns
`box` (uint16[4]: top, left, height, width / 65535), `flip` (bool), `topk_indices`
(int16[K], int32 past 32,767 classes), `topk_logits` (float16[K]) and `teacher_entropy` (float16,
since 0.4). The stored values are the teacher's top-K log-probabilities (logits minus their
logsumexp): every softmax rebuilt from them equals the teacher's, and fp16 is precise near zero
where the informative values sit. `teacher_entropy` is the entropy (nats) of the teacher's full
distribution over all C classes, which the information weights need: the top-K values alone
cannot give it when K < C.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from typing import Any, Optional, Sequence

import datasets
import numpy as np

from ..version import __version__

TABLE_FORMAT = "fdbpl-ril/1"
METADATA_FILE = "ril_metadata.json"
FILL_RULES = ("mr", "dense")
ENTROPY_COLUMN = "teacher_entropy"


def table_features(top_k: int, num_classes: int) -> datasets.Features:
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"
    return datasets.Features({
        "box": datasets.List(datasets.Value("uint16"), length=4),
        "flip": datasets.Value("bool"),
        "topk_indices": datasets.List(datasets.Value(index_dtype), length=top_k),
        "topk_logits": datasets.List(datasets.Value("float16"), length=top_k),
        ENTROPY_COLUMN: datasets.Value("float16"),
    })


def warn_if_weights_from_top_k(table: datasets.Dataset, metadata: dict, where: str) -> None:
    """Tables of 0.3 have no entropy column: at K < C their information weights then come from the
    top-K rebuild, which can never fall below 1 − log K / log C. Say so (they still load)."""
    k, c = int(metadata["top_k"]), len(metadata["class_names"])
    if ENTROPY_COLUMN not in table.column_names and k < c:
        floor = 1 - math.log(k) / math.log(c) if c > 1 else 0.0
        warnings.warn(f"the RIL table {where} has no {ENTROPY_COLUMN!r} column (built by fdbpl_hf "
                      f"{metadata.get('library_version', '< 0.4')}): its region weights come from the top-{k} "
                      f"rebuild, which overstates them at K < C (no weight below {floor:.3f} for {c} classes). "
                      "Rebuild the table with fdbpl_hf >= 0.4 for the paper's weights.", UserWarning, stacklevel=3)


def source_fingerprint(dataset: datasets.Dataset, image_column: str, label_column: Optional[str],
                       num_samples: int = 16) -> str:
    """A content hash of the source dataset: row count, features, and the encoded bytes of
    `num_samples` evenly spaced images with their labels. Cheap to recompute at train time."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    h.update(json.dumps(dataset.features.to_dict(), sort_keys=True).encode())
    if len(dataset):
        raw = dataset.select_columns([c for c in (image_column, label_column) if c]).cast_column(
            image_column, datasets.Image(decode=False))
        for row in sorted(set(np.linspace(0, len(dataset) - 1, num_samples).astype(int).tolist())):
            item = raw[row]
            h.update(image_bytes(item[image_column]))
            if label_column:
                h.update(str(item[label_column]).encode())
    return h.hexdigest()[:32]


def image_bytes(item: dict) -> bytes:
    if item.get("bytes") is not None:
        return item["bytes"]
    with open(item["path"], "rb") as f:
        return f.read()


def build_key(metadata: dict) -> str:
    """Hash of everything that determines a table's content (not the library version)."""
    content = {k: v for k, v in metadata.items() if k not in ("library_version", "build_key", "complete", "stats")}
    # datasets' own fingerprint is random for in-memory datasets; the content hash stands for it.
    content["source"] = {k: v for k, v in content["source"].items() if k != "datasets_fingerprint"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def described_metadata(dataset: datasets.Dataset, fmt: str, error: str) -> dict[str, Any]:
    """The JSON metadata a builder stored in `dataset.info.description`; `ValueError(error)` when
    there is none of format `fmt`."""
    try:
        meta = json.loads(dataset.info.description or "")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(error)
    return meta


def ril_metadata(table: datasets.Dataset) -> dict[str, Any]:
    """The metadata of a table returned by `build_ril_table` or `load_ril_table`."""
    return described_metadata(
        table, TABLE_FORMAT, "this dataset carries no RIL metadata: load tables with fdbpl_hf.load_ril_table(...) "
        "(datasets.load_dataset returns the rows only), or pass metadata= explicitly")


def attach_metadata(table: datasets.Dataset, metadata: dict) -> datasets.Dataset:
    table.info.description = json.dumps(metadata, sort_keys=True)
    return table


def load_ril_table(path_or_repo_id: str, config_name: Optional[str] = None, *, revision: Optional[str] = None,
                   token=None, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load a table from a folder written by `build_ril_table` or from a Hub dataset repo.

    A folder must be complete: an interrupted build leaves only `<dir>.incomplete`, which this
    refuses to load.
    """
    path = str(path_or_repo_id)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        if os.path.isdir(path + ".incomplete"):
            raise ValueError(f"the RIL table at {path} was never finished (its build was interrupted); "
                             "call build_ril_table with the same arguments to resume it")
        raise FileNotFoundError(f"no RIL table at {path}")
    if os.path.isdir(path):
        meta_path = os.path.join(path, METADATA_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path} is not a complete RIL table (no {METADATA_FILE})")
        with open(meta_path, encoding="utf-8") as f:
            metadata = json.load(f)
        if not metadata.get("complete"):
            raise ValueError(f"{path} holds an incomplete RIL table; rerun build_ril_table to resume it")
        table = datasets.load_from_disk(os.path.join(path, "data"))
    else:
        from huggingface_hub import hf_hub_download

        def unreadable(err: Exception) -> FileNotFoundError:
            # "tables/eurosat_s1" is a folder name and a Hub id alike: say both were tried
            return FileNotFoundError(f"no RIL table at {path!r}: no folder {os.path.abspath(path)}, and no Hub "
                                     f"dataset repo {path} could be read ({type(err).__name__}: {err})")

        if config_name is None:
            try:
                names = datasets.get_dataset_config_names(path, revision=revision, token=token)
            except Exception as err:
                raise unreadable(err) from err
            if len(names) != 1:
                raise ValueError(f"{path} has several table configs {names}: pass config_name=")
            config_name = names[0]
        try:
            table = datasets.load_dataset(path, config_name, split="train", revision=revision, token=token,
                                          cache_dir=cache_dir)
        except ValueError as err:  # datasets' "BuilderConfig ... not found. Available: [...]"
            raise ValueError(f"{path} has no table config {config_name!r}: {err}") from err
        except Exception as err:
            raise unreadable(err) from err
        meta_file = hf_hub_download(path, f"{config_name}/{METADATA_FILE}", repo_type="dataset",
                                    revision=revision, token=token, cache_dir=cache_dir)
        with open(meta_file, encoding="utf-8") as f:
            metadata = json.load(f)
    expected_rows = metadata["source"]["num_rows"] * metadata["num_regions"]
    if len(table) != expected_rows:
        raise ValueError(f"RIL table {path} has {len(table)} rows, its metadata promises {expected_rows}")
    warn_if_weights_from_top_k(table, metadata, path)
    return attach_metadata(table, metadata)


def check_table_matches(metadata: dict, *, dataset: Optional[datasets.Dataset] = None,
                        image_column: str = "image", label_column: Optional[str] = "label",
                        class_names: Optional[Sequence[str]] = None, image_size: Optional[int] = None) -> None:
    """Raise a `ValueError` that lists every way the table differs from what it is used with."""
    problems = []
    if dataset is not None:
        src = metadata["source"]
        if len(dataset) != src["num_rows"]:
            problems.append(f"source rows: table {src['num_rows']} vs dataset {len(dataset)}")
        else:
            label = label_column if label_column in dataset.column_names else None
            fp = source_fingerprint(dataset, image_column, label)
            if fp != src["fingerprint"]:
                problems.append(f"source content fingerprint: table {src['fingerprint']} vs dataset {fp} "
                                f"(table built from {src.get('id') or 'another dataset'}, split {src.get('split')})")
    if class_names is not None and list(class_names) != list(metadata["class_names"]):
        table_names = metadata["class_names"]
        if len(class_names) != len(table_names):
            problems.append(f"class count: table {len(table_names)} vs given {len(class_names)}")
        else:
            diffs = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(table_names, class_names)) if a != b]
            problems.append("class names differ at " + ", ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else ""))
    size = metadata["regions"]["output_size"]
    if image_size is not None and image_size != size:
        problems.append(f"input size: table regions are {size}px (teacher input) vs student {image_size}px")
    if problems:
        raise ValueError("the RIL table does not match what it is used with:\n  - " + "\n  - ".join(problems))


def decode_image(item, row: int):
    """Decode one `datasets.Image(decode=False)` cell with an error that names the row."""
    from PIL import Image

    try:
        if isinstance(item, Image.Image):
            item.load()
            return item
        image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"])
        image.load()
        return image
    except Exception as err:  # PIL raises many types for broken files
        raise ValueError(f"row {row} of the source dataset: the image cannot be decoded ({err}). "
                         "Fix or drop that row (e.g. dataset.filter) before building or replaying a table.") from err


def describe_source(dataset: datasets.Dataset, image_column: str, label_column: Optional[str],
                    source_id: Optional[str], source_revision: Optional[str]) -> dict:
    info = dataset.info
    return {
        "id": source_id or info.dataset_name,
        "config": info.config_name,
        "split": str(dataset.split) if dataset.split is not None else None,
        "revision": source_revision or (str(info.version) if info.version else None),
        "num_rows": len(dataset),
        "fingerprint": source_fingerprint(dataset, image_column, label_column),
        "datasets_fingerprint": dataset._fingerprint,
        "image_column": image_column,
        "label_column": label_column,
    }


def library_version() -> str:
    return __version__

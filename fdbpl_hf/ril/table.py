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
import logging
import math
import os
import warnings
from typing import Any, Optional, Sequence

import datasets
import numpy as np

from ..integrity import (
    IMAGE_DIGEST_BYTES, IntegrityError, decode_digests, encode_digests, expand_path, first_differences, json_digest,
    image_digests, metadata_digest, require_keys, verification_enabled, verify_table_digests,
)
from ..validation import check_class_names, class_order_difference
from ..files import read_json
from ..rows import stored_rows
from ..version import __version__
from .compose import REGION_KEY, region_key
from .table_config import FILL_RULES  # noqa: F401  (re-exported: its home before 0.7)

logger = logging.getLogger(__name__)

TABLE_FORMAT = "fdbpl-ril/1"
METADATA_FILE = "ril_metadata.json"
ENTROPY_COLUMN = "teacher_entropy"
# stored log-probabilities are <= 0; fp16 rounding of a value just below 0 stays <= 0, so anything
# above this is not a log-probability
LOG_PROB_TOLERANCE = 1e-3


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
    """The 0.3 source fingerprint (row count, features and `num_samples` evenly spaced images):
    kept only to check tables built before every image got its own digest."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    h.update(json.dumps(dataset.features.to_dict(), sort_keys=True).encode())
    if len(dataset):
        raw = stored_rows(dataset, warn=False).select_columns([c for c in (image_column, label_column) if c]).cast_column(
            image_column, datasets.Image(decode=False))
        for row in sorted(set(np.linspace(0, len(dataset) - 1, num_samples).astype(int).tolist())):
            item = raw[row]
            if item[image_column] is None:
                raise ValueError(f"row {row} of the source dataset has no image (column {image_column!r} is None)")
            h.update(image_bytes(item[image_column]))
            if label_column:
                h.update(str(item[label_column]).encode())
    return h.hexdigest()[:32]


def content_fingerprint(num_rows: int, features: dict, digests: bytes) -> str:
    """The source fingerprint of a table: row count, features and every image's digest, in order."""
    h = hashlib.sha256()
    h.update(str(num_rows).encode())
    h.update(json.dumps(features, sort_keys=True).encode())
    h.update(digests)
    return h.hexdigest()[:32]


def image_bytes(item: dict) -> bytes:
    if item.get("bytes") is not None:
        return item["bytes"]
    with open(item["path"], "rb") as f:
        return f.read()


# keys that describe a stored table, not what determines its content
# (`build_config` holds the build's settings, including the ones that only change its speed; the
# ones that change the rows are also top-level keys, so tables written before 0.5, without it, check alike)
# (`region_key` is derived from the content, like the build key: tables of 0.6 and 0.7 share build keys)
_NOT_CONTENT = ("library_version", "build_key", "complete", "stats", "integrity", "metadata_digest", "build_config",
                REGION_KEY)


def build_key(metadata: dict) -> str:
    """Hash of everything that determines a table's content (not the library version)."""
    content = {k: v for k, v in metadata.items() if k not in _NOT_CONTENT}
    # datasets' own fingerprint is random for in-memory datasets; the content hash stands for it,
    # and covers the per-image digests.
    content["source"] = {k: v for k, v in content["source"].items()
                         if k not in ("datasets_fingerprint", "image_digests")}
    return json_digest(content, 16)


def content_differences(old: dict, new: dict) -> list[str]:
    """The metadata entries (`key` or `key.sub`) that make two tables' build keys differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in _NOT_CONTENT or old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            ignored = ("datasets_fingerprint", "image_digests") if key == "source" else ()
            subs = [f"{key}.{k}" for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)]
            out.extend(subs)
        else:
            out.append(key)
    return out


REQUIRED_KEYS = ("format", "num_regions", "top_k", "seed", "fill", "class_names", "teacher.name",
                 "regions.output_size", "source.num_rows", "source.fingerprint", "source.image_column", "build_key")


def check_metadata(metadata: dict, where: str) -> None:
    """Refuse metadata that lacks a key, or was edited after the build: its build key is recomputed
    from its content, and its digest (tables from 0.4 on) covers the rest."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where} is not a JSON object")
    require_keys(metadata, REQUIRED_KEYS, where)
    recomputed = build_key(metadata)
    if metadata["build_key"] != recomputed:
        raise IntegrityError(f"{where} was edited after the build: its build key {metadata['build_key']} is not "
                             f"the hash of its content ({recomputed}); class names, teacher, regions or source "
                             "changed. Rebuild or re-download the table.")
    if "metadata_digest" in metadata and metadata["metadata_digest"] != metadata_digest(metadata):
        raise IntegrityError(f"{where} was edited after the build (its metadata digest does not match its "
                             "content). Rebuild or re-download the table.")
    if REGION_KEY in metadata and metadata[REGION_KEY] != region_key(metadata):
        raise IntegrityError(f"{where} was edited after the build: its region key {metadata[REGION_KEY]} is not the "
                             f"hash of its regions' settings ({region_key(metadata)}). Rebuild or re-download the "
                             "table.")
    digests = metadata["source"].get("image_digests")
    if digests is not None and len(decode_digests(digests)) != IMAGE_DIGEST_BYTES * int(metadata["source"]["num_rows"]):
        raise IntegrityError(f"{where}: the source image digests do not cover its {metadata['source']['num_rows']} "
                             "images. Rebuild or re-download the table.")


# Tables and caches whose rows were checked against a metadata in this process: (datasets
# fingerprint, which any transform such as shuffle or select changes, the metadata's build key and
# digest). Rows verified against one table's metadata are not verified against another's.
_VERIFIED: set = set()


# Where each table of this process was loaded from (`load_ril_table`), by datasets fingerprint:
# what a training record names it by.
_ORIGINS: dict = {}


def table_origin(table: datasets.Dataset) -> Optional[dict]:
    """Where `table` was loaded from: `{"path": folder}` or `{"hub_id", "config", "revision"}`; None
    for a table `load_ril_table` did not return as is (e.g. shuffled or built in memory)."""
    origin = _ORIGINS.get(table._fingerprint)
    return dict(origin) if origin is not None else None


def _metadata_identity(metadata: Optional[dict]) -> tuple:
    metadata = metadata or {}
    return metadata.get("build_key"), metadata.get("metadata_digest")


def mark_verified(dataset: datasets.Dataset, metadata: Optional[dict] = None) -> None:
    _VERIFIED.add((dataset._fingerprint, _metadata_identity(metadata)))


def is_verified(dataset: datasets.Dataset, metadata: Optional[dict] = None) -> bool:
    """Whether `dataset`'s rows were checked against `metadata` (default: the metadata it carries)."""
    if metadata is None:
        try:
            metadata = json.loads(dataset.info.description or "")
        except json.JSONDecodeError:
            metadata = None
    return (dataset._fingerprint, _metadata_identity(metadata if isinstance(metadata, dict) else None)) in _VERIFIED


def own_metadata(dataset: datasets.Dataset) -> Optional[dict]:
    """The metadata a table or cache carries (`load_ril_table`, `build_*` attach it), or None."""
    try:
        meta = json.loads(dataset.info.description or "")
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and "format" in meta else None


def refuse_foreign_metadata(dataset: datasets.Dataset, metadata: dict, what: str) -> None:
    """Refuse `metadata` given for a table (or cache) that carries another table's metadata, naming
    what differs: rows replayed under another table's classes, regions or layout are wrong."""
    own = own_metadata(dataset)
    if own is None or _metadata_identity(own) == _metadata_identity(metadata):
        return
    differences = content_differences(own, metadata) if own.get("format") == TABLE_FORMAT else []
    detail = ", ".join(differences) or f"build key {own.get('build_key')} vs {metadata.get('build_key')}"
    raise ValueError(f"the metadata= given with {what} belongs to another table ({detail}): rows and metadata must "
                     "come from one table. Leave metadata= out (the table carries its own), or pass "
                     "ril_metadata(table).")


def take_rows(dataset: datasets.Dataset, positions: Sequence[int], columns: Optional[Sequence[str]] = None) -> dict:
    """Rows `positions` of `dataset` as numpy arrays, one per column: the values and dtypes of
    `dataset.with_format("numpy")[positions]` (integers as int64, floats as float32, as datasets'
    formatter widens them), read straight from Arrow. datasets' formatter converts list columns
    row by row in Python (about 2 ms per batch of 256 table rows); here a fixed-length list column
    is one 2-D array. Datasets with an index mapping (`select`, `shuffle`), null cells or other
    column types take datasets' own path."""
    import pyarrow as pa

    names = list(columns) if columns is not None else list(dataset.column_names)
    generic = getattr(dataset, "_indices", None) is not None
    table = dataset.data.table if not generic else None
    out = {}
    if table is not None:
        taken = table.select(names).take(pa.array(np.asarray(positions, dtype=np.int64)))
        for name in names:
            column = taken.column(name).combine_chunks()
            kind = column.type
            if column.null_count:
                break
            if pa.types.is_fixed_size_list(kind) and not pa.types.is_nested(kind.value_type):
                flat = column.flatten()
                if flat.null_count or len(flat) != len(column) * kind.list_size:
                    break
                out[name] = flat.to_numpy(zero_copy_only=False).reshape(len(column), kind.list_size)
            elif pa.types.is_primitive(kind) and not pa.types.is_temporal(kind):
                out[name] = column.to_numpy(zero_copy_only=False)
            else:
                break
        else:
            for name, values in out.items():
                if np.issubdtype(values.dtype, np.integer):
                    out[name] = values.astype(np.int64, copy=False)
                elif np.issubdtype(values.dtype, np.floating):
                    out[name] = values.astype(np.float32, copy=False)
            return out
    formatted = dataset.with_format("numpy", columns=names)[list(positions)]
    return {name: formatted[name] for name in names}


def columns_to_arrow(columns: dict, features: datasets.Features):
    """numpy `columns` as a `pyarrow.Table` of `features`' schema, built from Arrow arrays directly
    (datasets encodes list columns row by row in Python: about 50 us per table row, 25 s per shard
    of 1,000 images at M = 500, with the device idle); None when a column is not a fixed-length list
    or a primitive (then `from_dict` must encode it)."""
    import pyarrow as pa

    schema = features.arrow_schema
    arrays = []
    for name, kind in zip(schema.names, schema.types):
        values = np.asarray(columns[name])
        if pa.types.is_fixed_size_list(kind) and not pa.types.is_nested(kind.value_type) and values.ndim == 2 \
                and values.shape[1] == kind.list_size:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, kind.list_size))
        elif pa.types.is_primitive(kind) and not pa.types.is_temporal(kind) and values.ndim == 1:
            arrays.append(pa.array(values, type=kind))
        else:
            return None
    return pa.Table.from_arrays(arrays, schema=schema)


def columns_to_dataset(columns: dict, features: datasets.Features) -> datasets.Dataset:
    """`datasets.Dataset.from_dict(columns, features=features)`, without its per-row encoding where
    `columns_to_arrow` can build the table: the same schema and rows."""
    table = columns_to_arrow(columns, features)
    if table is None:
        return datasets.Dataset.from_dict(columns, features=features)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def verify_rows(dataset: datasets.Dataset, metadata: dict, what: str, layout: str) -> None:
    """Check `dataset`'s rows against the content digests in `metadata` (when it has them)."""
    record = metadata.get("integrity", {}).get("rows")
    if record is None:
        logger.warning("%s carries no content digests (built before fdbpl_hf 0.4): its rows cannot be verified",
                       what)
        return
    verify_table_digests(dataset, record, what, layout)
    mark_verified(dataset, metadata)


TABLE_COLUMNS = ("box", "flip", "topk_indices", "topk_logits")  # and ENTROPY_COLUMN, from 0.4 on


def check_table_columns(table: datasets.Dataset, metadata: dict, where: str) -> None:
    """Refuse a table without one of the columns replay reads, or whose top-K columns are not
    `top_k` wide (before its content digests, which would only say its rows differ)."""
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{where} has no column {', '.join(map(repr, missing))} (columns: {table.column_names}): it "
                         "is not a whole RIL table; rebuild or re-download it")
    for column in ("topk_indices", "topk_logits"):
        width = getattr(table.features[column], "length", -1)
        if width not in (-1, None) and width != int(metadata["top_k"]):
            raise ValueError(f"{where}: column {column!r} holds {width} classes per region, its metadata says "
                             f"top_k={metadata['top_k']}: rows and metadata of different tables; rebuild or "
                             "re-download it")


def validate_table_rows(rows: dict, num_classes: int, where) -> None:
    """Values no teacher can produce, refused with the row that holds them: log-probabilities above
    0 (beyond fp16 rounding) or not finite, class ids outside 0..C-1 or repeated in a row, empty boxes.
    `where(n)` names row n of the batch. A few whole-batch reductions when all is well (replay
    calls it for every batch, on the CPU)."""
    logits = np.asarray(rows["topk_logits"])
    idx = np.asarray(rows["topk_indices"])
    srt = np.sort(idx, axis=-1)
    box = np.asarray(rows["box"]) if "box" in rows else None
    if ((logits <= LOG_PROB_TOLERANCE) & (logits > -np.inf)).all() and srt[:, 0].min() >= 0 and \
            srt[:, -1].max() < num_classes and (srt[:, 1:] != srt[:, :-1]).all() and \
            (box is None or box[:, 2:].min() > 0):
        return
    finite = np.isfinite(logits).all(axis=-1)
    if not finite.all():
        n = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"non-finite teacher logits in the RIL table ({where(n)}): the table is corrupt; rebuild it")
    positive = (logits > LOG_PROB_TOLERANCE).any(axis=-1)
    if positive.any():
        n = int(np.flatnonzero(positive)[0])
        raise ValueError(f"the RIL table holds a log-probability {float(logits[n].max()):.4g} > 0 ({where(n)}): no "
                         "softmax gives that; the table is corrupt or not a table of log-probabilities")
    outside = ((idx < 0) | (idx >= num_classes)).any(axis=-1)
    if outside.any():
        n = int(np.flatnonzero(outside)[0])
        raise ValueError(f"the RIL table holds class ids {idx[n].tolist()} outside 0-{num_classes - 1} ({where(n)}): "
                         "it was built for other classes, or is corrupt")
    repeated = (srt[:, 1:] == srt[:, :-1]).any(axis=-1)
    if repeated.any():
        n = int(np.flatnonzero(repeated)[0])
        raise ValueError(f"the RIL table repeats a class id within one region, {idx[n].tolist()} ({where(n)}): "
                         "the table is corrupt")
    n = int(np.flatnonzero((box[:, 2] == 0) | (box[:, 3] == 0))[0])
    raise ValueError(f"the RIL table holds an empty box ({where(n)}): the table is corrupt")


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


def read_metadata_file(path: str) -> dict:
    """A metadata JSON file, with errors that name it."""
    return read_json(path, "rebuild or re-download the table or cache (delete its folder first)")


def load_from_disk_named(folder: str) -> datasets.Dataset:
    """`datasets.load_from_disk` with an error naming the folder and its files when they cannot be read."""
    try:
        return datasets.load_from_disk(folder)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError, datasets FileNotFoundError/ValueError
        files = sorted(f for f in os.listdir(folder) if f.endswith(".arrow")) if os.path.isdir(folder) else []
        raise ValueError(f"the data files in {folder} ({', '.join(files) or 'none'}) cannot be read "
                         f"({type(err).__name__}: {err}): they are corrupt or truncated; rebuild the table or "
                         "cache (delete the folder first)") from err


def load_ril_table(path_or_repo_id: str, config_name: Optional[str] = None, *, revision: Optional[str] = None,
                   token=None, cache_dir: Optional[str] = None, verify: Optional[bool] = None) -> datasets.Dataset:
    """Load a table from a folder written by `build_ril_table` or from a Hub dataset repo.

    A folder must be complete: an interrupted build leaves only `<dir>.incomplete`, which this
    refuses to load. The metadata is checked (required keys, build key recomputed from its
    content, metadata digest) and, unless `verify=False` or `FDBPL_HF_VERIFY=0`, every row is
    hashed and compared with the digests recorded at build time (about 1 s per GB on one core).
    """
    path = str(path_or_repo_id)
    if path.startswith("~"):
        path = expand_path(path)
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
        metadata = read_metadata_file(meta_path)
        if not isinstance(metadata, dict) or not metadata.get("complete"):
            raise ValueError(f"{path} holds an incomplete RIL table; rerun build_ril_table to resume it")
        where = meta_path
        table = load_from_disk_named(os.path.join(path, "data"))
        origin = {"path": str(path_or_repo_id)}
    else:
        table, metadata, where, config_name = _load_from_hub(path, config_name, revision, token, cache_dir)
        origin = {"hub_id": path, "config": config_name, "revision": revision}
    check_metadata(metadata, where)
    expected_rows = metadata["source"]["num_rows"] * metadata["num_regions"]
    if len(table) != expected_rows:
        raise ValueError(f"RIL table {path} has {len(table)} rows, its metadata promises {expected_rows}")
    check_table_columns(table, metadata, f"RIL table {path}")
    warn_if_weights_from_top_k(table, metadata, path)
    if verification_enabled(verify):
        verify_rows(table, metadata, f"RIL table {path}", TABLE_LAYOUT)
    _ORIGINS[table._fingerprint] = origin
    return attach_metadata(table, metadata)


TABLE_LAYOUT = "; row = image_index * num_regions + region"


def _load_from_hub(path: str, config_name: Optional[str], revision, token, cache_dir):
    from huggingface_hub import HfApi, hf_hub_download

    def unreadable(err: Exception) -> Exception:
        # "tables/eurosat_s1" is a folder name and a Hub id alike: say both were tried, and
        # whether the repo exists (then its files are the problem, not the name)
        try:
            HfApi(token=token).dataset_info(path, revision=revision)
        except Exception:
            return FileNotFoundError(f"no RIL table at {path!r}: no folder {os.path.abspath(path)}, and no Hub "
                                     f"dataset repo {path} could be read ({type(err).__name__}: {err})")
        return ValueError(f"the Hub dataset repo {path} exists, but its table{f' config {config_name!r}' if config_name else ''} "
                          f"could not be read ({type(err).__name__}: {err}): a data file is corrupt or "
                          "incomplete; push the table again")

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
        if "BuilderConfig" in str(err) or "not found" in str(err):
            raise ValueError(f"{path} has no table config {config_name!r}: {err}") from err
        raise unreadable(err) from err
    except Exception as err:
        raise unreadable(err) from err
    meta_file = hf_hub_download(path, f"{config_name}/{METADATA_FILE}", repo_type="dataset",
                                revision=revision, token=token, cache_dir=cache_dir)
    return table, read_metadata_file(meta_file), f"{path}/{config_name}/{METADATA_FILE}", config_name


def check_table_matches(metadata: dict, *, dataset: Optional[datasets.Dataset] = None,
                        image_column: str = "image", label_column: Optional[str] = "label",
                        class_names: Optional[Sequence[str]] = None, image_size: Optional[int] = None,
                        images: bool = True) -> None:
    """Raise a `ValueError` that lists every way the table differs from what it is used with.

    The dataset is compared image by image (each image's encoded bytes and label against the
    digest the table recorded), so a shuffled, subset, swapped or replaced row is named;
    `images=False` compares its row count only (no image is read).
    """
    problems = []
    if dataset is not None:
        src = metadata["source"]
        if len(dataset) != src["num_rows"]:
            problems.append(f"source rows: table {src['num_rows']} vs dataset {len(dataset)} (a subset or another "
                            "dataset: the table binds every row of the dataset it was built on)")
        elif images:
            label = label_column if label_column in dataset.column_names else None
            recorded_label = src.get("label_column")
            if "label_column" in src and recorded_label is None:
                label = None  # a table built without labels bound the images alone
            if recorded_label is not None and label is None:
                # each image's digest covers its label: without the column every row would differ,
                # and the rows' list would blame the images
                problems.append(f"labels: the table recorded each image with its label from column "
                                f"{recorded_label!r}, and the dataset has no label column "
                                f"{label_column or recorded_label!r} (columns: {dataset.column_names}); pass "
                                "label_column= naming the dataset's label column")
            elif src.get("image_digests") is None:  # a table from before per-image digests
                fp = source_fingerprint(dataset, image_column, label)
                if fp != src["fingerprint"]:
                    problems.append(f"source content fingerprint: table {src['fingerprint']} vs dataset {fp} "
                                    f"(table built from {src.get('id') or 'another dataset'}, split {src.get('split')})")
            else:
                found = image_digests(dataset, image_column, label, len(metadata["class_names"]))
                recorded = decode_digests(src["image_digests"])
                if found != recorded:
                    rows = first_differences(recorded, found)
                    problems.append(f"source images: {', '.join(rows)} of the dataset differ from the images the "
                                    f"table was built on (table built from {src.get('id') or 'another dataset'}, "
                                    f"split {src.get('split')}; shuffled, subset or edited datasets do not match)")
    if class_names is not None:
        class_names = check_class_names("class_names", class_names)
    if class_names is not None and class_names != list(metadata["class_names"]):
        table_names = metadata["class_names"]
        if len(class_names) != len(table_names):
            given, stored = set(class_names), set(table_names)
            missing = [n for n in table_names if n not in given]
            extra = [n for n in class_names if n not in stored]
            problems.append(f"class count: table {len(table_names)} vs given {len(class_names)} "
                            f"({class_order_difference('the table', table_names, 'class_names', class_names)})"
                            + (f"; not given: {_few(missing)}" if missing else "")
                            + (f"; not in the table: {_few(extra)}" if extra else ""))
        else:
            count = sum(a != b for a, b in zip(table_names, class_names))
            first = class_order_difference("the table", table_names, "class_names", class_names)
            problems.append(f"class order: {first} ({count} of {len(table_names)} positions differ)")
    size = metadata["regions"]["output_size"]
    if image_size is not None and image_size != size:
        problems.append(f"input size: table regions are {size}px (teacher input) vs student {image_size}px")
    if problems:
        raise ValueError("the RIL table does not match what it is used with:\n  - " + "\n  - ".join(problems))


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def decode_image(item, row: int, exif_transpose: bool = True):
    """Decode one `datasets.Image(decode=False)` cell with an error that names the row; with
    `exif_transpose`, turned upright by its EXIF orientation as `datasets.Image` decodes it."""
    from PIL import Image, ImageOps

    if item is None or (isinstance(item, dict) and item.get("bytes") is None and not item.get("path")):
        raise ValueError(f"row {row} of the source dataset has no image (None): drop that row (dataset.filter) or "
                         "fill it")
    try:
        if isinstance(item, Image.Image):
            image = item
        else:
            image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"])
        image.load()
        if exif_transpose and image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            image = ImageOps.exif_transpose(image)
        return image
    except Exception as err:  # PIL raises many types for broken files
        path = item.get("path") if isinstance(item, dict) else None
        raise ValueError(f"row {row} of the source dataset{f' (file {path})' if path else ''}: the image cannot be "
                         f"decoded ({err}). "
                         "Fix or drop that row (e.g. dataset.filter) before building or replaying a table.") from err


def describe_source(dataset: datasets.Dataset, image_column: str, label_column: Optional[str],
                    source_id: Optional[str], source_revision: Optional[str],
                    num_classes: Optional[int] = None) -> dict:
    """The source part of a table's metadata: where the images come from and a digest of each
    (8 bytes per image; every label is checked against `num_classes` on the way)."""
    info = dataset.info
    digests = image_digests(dataset, image_column, label_column, num_classes)
    return {
        "id": source_id or info.dataset_name,
        "config": info.config_name,
        "split": str(dataset.split) if dataset.split is not None else None,
        "revision": source_revision or (str(info.version) if info.version else None),
        "num_rows": len(dataset),
        "fingerprint": content_fingerprint(len(dataset), dataset.features.to_dict(), digests),
        "image_digests": encode_digests(digests),
        "datasets_fingerprint": dataset._fingerprint,
        "image_column": image_column,
        "label_column": label_column,
    }


def library_version() -> str:
    return __version__

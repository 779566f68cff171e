"""Publish RIL tables to the Hub: one dataset config per teacher / K / M, with a card that says how to use it."""

from __future__ import annotations

import io
import json
import re
from typing import Optional

import datasets
from huggingface_hub import DatasetCard, HfApi

from .compose import region_key
from .table import ENTROPY_COLUMN, METADATA_FILE, ril_metadata


def default_config_name(metadata: dict) -> str:
    teacher = metadata["teacher"]["name"].split("/")[-1] or "teacher"
    teacher = re.sub(r"[^A-Za-z0-9]+", "_", teacher).strip("_").lower() or "teacher"
    return f"{teacher}_k{metadata['top_k']}_m{metadata['num_regions']}"


def _card_section(config_name: str, metadata: dict, repo_id: str) -> str:
    stats = metadata.get("stats", {})
    src, teacher = metadata["source"], metadata["teacher"]
    size = stats.get("disk_bytes")
    per_region = f" ({stats['bytes_per_region']:.1f} bytes/region)" if stats.get("bytes_per_region") else ""
    lines = [
        f"<!-- fdbpl-ril:{config_name} -->",
        f"## Config `{config_name}`",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{teacher['name']}`{' @ ' + teacher['revision'] if teacher.get('revision') else ''} |",
        f"| templates | {teacher.get('templates', '-')} |",
        f"| regions per image (M) | {metadata['num_regions']} |",
        f"| top-K | {metadata['top_k']} |",
        f"| classes | {len(metadata['class_names'])} |",
        f"| source | {src.get('id') or '-'} / {src.get('config') or '-'} / split {src.get('split')} "
        f"({src['num_rows']} images, fingerprint `{src['fingerprint']}`) |",
        f"| rows (regions) | {src['num_rows'] * metadata['num_regions']} |",
        f"| size on disk (Arrow) | {size if size is not None else '-'} bytes{per_region} |",
        f"| region sampling | {metadata['regions']} |",
        f"| seed | {metadata['seed']} |",
        f"| region key | `{region_key(metadata)}` (tables of the same key hold the same regions: they compose, "
        "`RILDataset(data, [table_a, table_b])`) |",
        f"| fdbpl_hf | {metadata.get('library_version')} |",
        "",
        "```python",
        "import fdbpl_hf",
        f'table = fdbpl_hf.load_ril_table("{repo_id}", "{config_name}")  # rows + metadata',
        "# or the rows alone:",
        "from datasets import load_dataset",
        f'rows = load_dataset("{repo_id}", "{config_name}", split="train")',
        "```",
        f"<!-- /fdbpl-ril:{config_name} -->",
    ]
    return "\n".join(lines)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name)) and ".." not in name


def card_metadata(metadata: dict) -> dict:
    """The YAML entry of one table config: class names (in table order), teacher, K, M, region
    spec, seed and source, as plain JSON types."""
    src, teacher = metadata["source"], metadata["teacher"]
    source = {k: src.get(k) for k in ("id", "config", "split", "num_rows", "fingerprint")
              if src.get(k) is not None and (k != "id" or _looks_like_hub_id(str(src[k])))}
    return json.loads(json.dumps({
        "class_names": list(metadata["class_names"]),
        "teacher": {k: v for k, v in teacher.items() if k in ("name", "revision", "templates") and v is not None},
        "top_k": metadata["top_k"],
        "num_regions": metadata["num_regions"],
        "regions": metadata["regions"],
        "seed": metadata["seed"],
        "region_key": region_key(metadata),
        "source": source,
        "fdbpl_hf_version": metadata.get("library_version"),
    }, default=str))


_CARD_INTRO = """# FDBPL Region Information Lookup tables

Offline teacher soft labels for [FDBPL](https://arxiv.org/abs/2505.18053) prompt learning, built
with [`fdbpl_hf`](https://pypi.org/project/fdbpl-hf/). Each row is one random region of one image
of the source dataset: `box` (top, left, height, width as uint16 / 65535 of the image size),
`flip`, the teacher's top-K class indices with their log-probabilities (float16), and
`teacher_entropy`, the entropy (nats, float16) of the teacher's full distribution over all classes. Row
`i * M + r` is region `r` of source image `i`. Training replays the region on the image and
reads its soft label here instead of running the teacher. The source images are not included.
"""


def push_ril_table(table: datasets.Dataset, repo_id: str, config_name: Optional[str] = None, *,
                   private: Optional[bool] = None, token: Optional[str] = None,
                   commit_message: Optional[str] = None, max_shard_size: Optional[str] = None) -> str:
    """Push a table as config `config_name` (default `<teacher>_k<K>_m<M>`) of dataset repo `repo_id`.

    Writes the Parquet shards (via `DatasetDict.push_to_hub`), `<config>/ril_metadata.json`, and
    a dataset-card section for the config. Returns the config name. Load it back with
    `load_ril_table(repo_id, config_name)` or `datasets.load_dataset(repo_id, config_name)`.
    """
    metadata = ril_metadata(table)
    config_name = config_name or default_config_name(metadata)
    rows = table.select_columns([c for c in ("box", "flip", "topk_indices", "topk_logits", ENTROPY_COLUMN)
                                 if c in table.column_names])
    datasets.DatasetDict({"train": rows}).push_to_hub(
        repo_id, config_name=config_name, private=private, token=token, max_shard_size=max_shard_size,
        commit_message=commit_message or f"Add RIL table config {config_name}",
    )
    api = HfApi(token=token)
    payload = json.dumps(metadata, indent=2, sort_keys=True).encode()
    api.upload_file(path_or_fileobj=io.BytesIO(payload), path_in_repo=f"{config_name}/{METADATA_FILE}",
                    repo_id=repo_id, repo_type="dataset", commit_message=f"RIL metadata for {config_name}")
    card = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    text = card.text
    if "# FDBPL Region Information Lookup tables" not in text:
        text = _CARD_INTRO + "\n" + text
    section = _card_section(config_name, metadata, repo_id)
    pattern = re.compile(rf"<!-- fdbpl-ril:{re.escape(config_name)} -->.*?<!-- /fdbpl-ril:{re.escape(config_name)} -->",
                         re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    tags = set(card.data.get("tags") or []) | {"fdbpl", "ril-table", "knowledge-distillation"}
    card.data["tags"] = sorted(tags)
    # The facts a user of `load_dataset` needs, in the card's YAML (readable with huggingface_hub
    # alone: `DatasetCard.load(repo).data["fdbpl_ril"][config]`), one entry per config. Not inside
    # `configs:`, whose keys `datasets` passes to its builder.
    described = dict(card.data.get("fdbpl_ril") or {})
    described[config_name] = card_metadata(metadata)
    card.data["fdbpl_ril"] = described
    card.data["task_categories"] = sorted(set(card.data.get("task_categories") or [])
                                          | {"zero-shot-image-classification"})
    source = metadata["source"].get("id")
    if source and _looks_like_hub_id(source):
        card.data["source_datasets"] = sorted(set(card.data.get("source_datasets") or []) | {source})
    card.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message=f"Describe RIL config {config_name}")
    return config_name

"""What the integrity checks cost (issue 12): load-time verification of a large synthetic RIL
table, the per-image source digests, and the per-batch value validation at replay.

    python benchmarks/integrity.py --gb 2          # a 2 GB table on disk (K = 20, 91 B/region)
    python benchmarks/integrity.py --gb 0.05 --images 500   # smoke run

Prints a Markdown table; the figure for a 57 GB table is the measured seconds per GB x 57 (the
check is one sequential pass, linear in size; on a cold page cache the disk's read speed is the
floor: 57 GB at 1 GB/s is 57 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import git_commit, load_average, md_table, now  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def synthetic_table(rows: int, top_k: int, seed: int = 0) -> datasets.Dataset:
    from fdbpl_hf.ril.table import table_features

    rng = np.random.default_rng(seed)
    features = table_features(top_k, 1000)
    box = rng.integers(1, 65535, (rows, 4), dtype=np.uint16)
    flip = rng.random(rows) < 0.5
    idx = np.argsort(rng.random((rows, top_k)), axis=1).astype(np.int16)  # distinct ids per row
    logits = -np.sort(rng.exponential(2.0, (rows, top_k)).astype(np.float16), axis=1)
    arrays = [pa.FixedSizeListArray.from_arrays(pa.array(box.reshape(-1)), 4), pa.array(flip),
              pa.FixedSizeListArray.from_arrays(pa.array(idx.reshape(-1)), top_k),
              pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), top_k)]
    names = ["box", "flip", "topk_indices", "topk_logits"]
    if "teacher_entropy" in features:  # 0.4 tables: the full distribution's entropy, fp16
        arrays.append(pa.array(rng.uniform(0, np.log(1000), rows).astype(np.float16)))
        names.append("teacher_entropy")
    table = pa.Table.from_arrays(arrays, names=names)
    return datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="size of the synthetic table on disk")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--images", type=int, default=2000, help="source images for the per-image digests")
    parser.add_argument("--image-kb", type=int, default=110, help="encoded size of each synthetic image")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from fdbpl_hf.integrity import IMAGE_DIGEST_BYTES, encode_digests, image_digests, table_digests, verify_table_digests
    from fdbpl_hf.ril.table import validate_table_rows

    workdir = args.workdir or tempfile.mkdtemp(prefix="fdbpl_integrity_")
    rows_per_gb = int(1e9 / (11 + 4 * args.top_k))
    rows = int(args.gb * rows_per_gb)
    out = []
    try:
        t = now()
        folder = os.path.join(workdir, "table")
        chunk = 2_000_000
        parts = []
        for k, start in enumerate(range(0, rows, chunk)):
            part = synthetic_table(min(chunk, rows - start), args.top_k, seed=k)
            path = os.path.join(workdir, f"part{k}")
            part.save_to_disk(path)
            parts.append(datasets.load_from_disk(path))
        table = datasets.concatenate_datasets(parts)
        table.save_to_disk(folder, max_shard_size="500MB")
        for k in range(len(parts)):
            shutil.rmtree(os.path.join(workdir, f"part{k}"))
        del parts, table
        make_s = now() - t
        disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(folder) for f in fs)
        table = datasets.load_from_disk(folder)

        t = now()
        record = table_digests(table)
        digest_s = now() - t
        t = now()
        verify_table_digests(table, record, "benchmark table")
        verify_s = now() - t
        gb = disk / 1e9
        out += [("synthetic table", f"{len(table):,} rows, K={args.top_k}, {gb:.2f} GB on disk "
                                    f"({disk / len(table):.1f} B/row), written in {make_s:.0f} s"),
                ("content digests at build (hash every row)", f"{digest_s:.1f} s = {digest_s / gb:.2f} s/GB"),
                ("verification at load (same pass, warm page cache)", f"{verify_s:.1f} s = {verify_s / gb:.2f} s/GB"),
                ("extrapolated to a 57 GB table", f"{verify_s / gb * 57:.0f} s of hashing (plus reading 57 GB "
                                                 "from disk when it is not cached)")]

        # value validation, per batch of 32 rows as replay does it
        batch = table.with_format("numpy")[:32]
        reps = 2000
        t = now()
        for _ in range(reps):
            validate_table_rows(batch, 1000, lambda n: str(n))
        out.append(("value validation per batch of 32 rows (replay, CPU)",
                    f"{(now() - t) / reps * 1e6:.1f} us"))

        # per-image source digests: encoded bytes + label, 8 bytes per image
        rng = np.random.default_rng(1)
        blobs = [rng.integers(0, 256, args.image_kb * 1024, dtype=np.uint8).tobytes() for _ in range(args.images)]
        source = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in blobs], "label": list(range(args.images))},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
        t = now()
        digests = image_digests(source, "image", "label")
        per_k = (now() - t) / args.images * 1000
        encoded = len(encode_digests(digests))
        out += [("per-image digest stored", f"{IMAGE_DIGEST_BYTES} B/image ({encoded / args.images:.2f} B/image as "
                                            "base64 in the metadata JSON)"),
                (f"per-image digests computed ({args.image_kb} KB images)", f"{per_k:.2f} s per 1k images")]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    import fdbpl_hf

    print(f"fdbpl_hf {fdbpl_hf.__version__} at {git_commit()}\n")
    print(md_table(["measure", "value"], out))
    print(f"\nload average at the end: {load_average():.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Host time per training batch of the data paths that run in the training process (issue 20).

    python benchmarks/data_path.py            # about a minute on 2 CPU cores
    python benchmarks/data_path.py --quick

The feature-cache mode and the device-store modes read their batches in the training process
(`dataloader_num_workers=0`): every millisecond of host work per batch there is a millisecond the
step loop is not queueing device work, and on an H200 the feature-cache step at batch 256 came out
slower than the pixel step (48.6 vs 41.3 ms), whose batches 12 DataLoader workers prepare. This
script times, on one thread (CPU-time clock), what `FDBPLTrainer`'s DataLoader does per batch on
each path: `RILDataset.__getitems__` (table rows, cache rows, labels, region schedule) and the
collation the trainer uses (`default_data_collator`; `collate_device_replay` for stores). The
first epoch draws each image's region permutation (cold); later epochs may reuse it (warm).
The pixel offline path (decode + crop per item, in DataLoader workers) is shown for scale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (  # noqa: E402
    class_names, cpu_now, git_commit, load_average, md_table, median, save_json, scaled_clip_config,
    synthetic_images,
)
import torch  # noqa: E402
from transformers import CLIPModel, default_data_collator  # noqa: E402
import fdbpl_hf  # noqa: E402
from fdbpl_hf import DeviceImageStore, RegionSpec, RILDataset, build_feature_cache, build_ril_table  # noqa: E402
from fdbpl_hf.ril.device_replay import collate_device_replay  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402


def per_batch_ms(make, collate, batch: int, num_images: int, reps: int) -> tuple[float, float]:
    """(cold, warm) CPU ms per batch: cold on a fresh dataset (first epoch), warm on batches it served."""
    cold, warm = [], []
    for _ in range(reps):
        data = make()
        starts = range(0, num_images - batch + 1, batch)
        for start in starts:
            t0 = cpu_now()
            collate(data.__getitems__(list(range(start, start + batch))))
            cold.append(cpu_now() - t0)
        for start in starts:
            t0 = cpu_now()
            collate(data.__getitems__(list(range(start, start + batch))))
            warm.append(cpu_now() - t0)
    return median(cold) * 1e3, median(warm) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default="data_path.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.images, args.reps = [4], 8, 1
    torch.set_num_threads(1)
    names = class_names(50)
    report = {"commit": git_commit(), "fdbpl_hf": fdbpl_hf.__version__,
              "command": "python benchmarks/data_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "load_average_start": load_average(), "rows": []}
    print(f"# Host time per batch in the training process\n\nfdbpl_hf {fdbpl_hf.__version__} at {report['commit']}, "
          f"{args.images} images of 500 x 375, C = 50, M = 2, one thread, CPU-time clock, load average "
          f"{load_average():.2f}\n", flush=True)
    ds = synthetic_images(args.images, names)
    work = tempfile.mkdtemp(prefix="fdbpl_data_path_")
    try:
        weight = torch.randn(3, len(names), generator=torch.Generator().manual_seed(0))
        table = build_ril_table(ds, lambda px: px.mean((2, 3)) @ weight, num_regions=2, top_k=20,
                                teacher_input_size=224, output_dir=os.path.join(work, "table"),
                                images_per_batch=64, teacher_batch_size=128)
        # ViT-B/32's projection width (512) at negligible cost: the cache rows have the real size
        student = CLIPModel(scaled_clip_config(32, 1, 32, 1, patch=32, image_size=224, proj=512)).eval()
        common = dict(image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224, class_names=names)
        cache = build_feature_cache(RILDataset(ds, table, **common), student, epochs=1, batch_size=128,
                                    output_dir=os.path.join(work, "cache"), progress=False)
        store = DeviceImageStore.from_dataset(ds)
        spec = RegionSpec(output_size=224)
        paths = {
            "feature cache": (lambda: RILDataset(ds, table, feature_cache=cache, **common), default_data_collator),
            "offline store": (lambda: RILDataset(ds, table, **common).use_image_store(store), collate_device_replay),
            "online store": (lambda: RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN,
                                                      image_std=OPENAI_CLIP_STD, region_spec=spec,
                                                      num_regions=2).use_image_store(store), collate_device_replay),
            "pixels, offline (in a DataLoader worker)": (lambda: RILDataset(ds, table, **common),
                                                         default_data_collator),
        }
        rows = []
        for batch in args.batches:
            for name, (make, collate) in paths.items():
                images = args.images if "pixels" not in name else min(args.images, 2 * batch)
                cold, warm = per_batch_ms(make, collate, batch, images, args.reps if "pixels" not in name else 1)
                report["rows"].append({"batch": batch, "path": name, "cold_ms": cold, "warm_ms": warm})
                rows.append([batch, name, f"{cold:.2f}", f"{warm:.2f}"])
                save_json(args.json, report)
        print(md_table(["batch", "path", "ms per batch, first epoch", "ms per batch, later epochs"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = load_average()
    save_json(args.json, report)
    print(f"\nload average at the end {load_average():.2f}; figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

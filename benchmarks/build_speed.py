#!/usr/bin/env python
"""Can a table or feature-cache build keep an accelerator busy? Build throughput against the bare
throughput of a model whose cost is known, on CPU (issue 20, item 4).

    python benchmarks/build_speed.py                      # about 2 minutes on 2 CPU cores
    python benchmarks/build_speed.py --quick              # smoke run

On a GPU the teacher's forward leaves the host idle while it runs: whatever the host does per
region (decode, crop, resize, normalise, top-K, datasets/Arrow, digests) must happen beside it,
or the build runs slower than the teacher. This benchmark stands a *simulated accelerator* in for
the teacher (and for the student of a feature cache): a model that sleeps `--teacher-ms` per
region (it holds no CPU, as a host waiting at a device sync holds none) and returns logits
computed from the pixels, so its bare throughput is known exactly (1000 / ms regions/s). The
ratio build / bare is then the share of the "device" time the build keeps busy; the issue's goal
is >= 0.9 on an H200.

The images are 500 x 375 JPEGs (ImageNet's typical size). Sections:

1. where the host time goes, per region: each stage timed alone on one thread (CPU-time clock),
   and a whole build with a free teacher (what the build adds beyond the stages);
2. table build / bare teacher with the simulated accelerator, for the teacher costs given;
3. feature-cache build / bare student, likewise.

`--host-threads` sets `RILTableConfig.host_threads` / `build_feature_cache(host_threads=)`
(fdbpl_hf >= 0.7; older versions have no such setting and run without it).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (  # noqa: E402
    class_names, cpu_now, git_commit, load_average, md_table, median, now, random_clip, save_json, synthetic_images,
    time_calls, usable_cpus,
)
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import fdbpl_hf  # noqa: E402
from fdbpl_hf import RegionSpec, RILDataset, build_feature_cache, build_ril_table  # noqa: E402
from fdbpl_hf.clip_ops import channel_stats, normalize_pixels  # noqa: E402
from fdbpl_hf.ril.regions import image_to_tensor, region_rng, render_region, sample_regions  # noqa: E402
from fdbpl_hf.ril.table import decode_image  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402


class SimulatedAccelerator(torch.nn.Module):
    """A model with a known cost: `ms_per_region` of sleep per region (no CPU held, as a host
    waiting for a GPU holds none), then logits `[B, num_classes]` from the pixels' channel means
    (cheap, but they depend on every input). An `nn.Module`, so the table's key can fingerprint it."""

    def __init__(self, num_classes: int, ms_per_region: float):
        super().__init__()
        self.ms_per_region = ms_per_region
        self.weight = torch.nn.Parameter(torch.randn(3, num_classes, generator=torch.Generator().manual_seed(0)),
                                         requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.ms_per_region:
            time.sleep(self.ms_per_region * pixel_values.shape[0] / 1e3)
        return pixel_values.float().mean((2, 3)) @ self.weight


def has_setting(fn, name: str) -> bool:
    from fdbpl_hf.ril.table_config import RILTableConfig

    if fn is build_ril_table:
        return name in {f.name for f in __import__("dataclasses").fields(RILTableConfig)}
    return name in inspect.signature(fn).parameters


def stage_costs(ds: datasets.Dataset, regions: int, reps: int) -> list[list]:
    """Per-stage host cost, one thread, CPU-time clock (ms)."""
    cells = ds.cast_column("image", datasets.Image(decode=False))["image"][:8]
    spec = RegionSpec(output_size=224)

    def per(fn, count):
        return median(time_calls(fn, reps, 1, clock=cpu_now)) * 1e3 / count

    images = [decode_image(c, n) for n, c in enumerate(cells)]
    tensor = image_to_tensor(images[0])
    boxes, flips = sample_regions(375, 500, 32, spec, region_rng(0, 5))
    pixels = torch.stack([render_region(tensor, boxes[i], bool(flips[i]), spec) for i in range(32)])
    mean_std = channel_stats(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    logits = torch.randn(256, 50)

    def topk():
        log_p = torch.log_softmax(logits, -1)
        values, idx = log_p.topk(20, -1)
        idx.numpy().astype(np.uint16), values.numpy().astype(np.float16)

    rows = [
        ["JPEG decode (PIL), per image", per(lambda: [decode_image(c, n) for n, c in enumerate(cells)], 8)],
        ["to uint8 tensor, per image", per(lambda: [image_to_tensor(im) for im in images], 8)],
        [f"draw M={regions} boxes, per image", per(lambda: sample_regions(375, 500, regions, spec, region_rng(0, 5)), 1)],
        ["crop + antialiased resize (uint8 renderer), per region",
         per(lambda: [render_region(tensor, boxes[i], bool(flips[i]), spec) for i in range(32)], 32)],
        ["stack a chunk, per region", per(lambda: torch.stack(list(pixels)), 32)],
        ["normalise, per region", per(lambda: normalize_pixels(pixels.clone(), *mean_std, inplace=True), 32)],
        ["log-softmax + top-K + to numpy, per region", per(topk, 256)],
    ]
    return rows


def timed_build(fn, *args, **kwargs) -> tuple[float, float, float, object]:
    """Wall seconds, CPU seconds of the whole process and of the calling thread, and the result."""
    t0, c0, m0 = now(), cpu_now(), time.thread_time()
    out = fn(*args, **kwargs)
    return now() - t0, cpu_now() - c0, time.thread_time() - m0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--regions", type=int, default=4, help="M of the table")
    p.add_argument("--teacher-ms", type=float, nargs="+", default=[2.0, 1.0],
                   help="simulated teacher cost per region (ms)")
    p.add_argument("--student-ms", type=float, nargs="+", default=[1.0],
                   help="simulated student cost per region of the feature cache (ms)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the feature cache (<= --regions)")
    p.add_argument("--images-per-batch", type=int, default=32)
    p.add_argument("--teacher-batch-size", type=int, default=64)
    p.add_argument("--host-threads", type=int, default=None,
                   help="host threads of the build (fdbpl_hf >= 0.7; default: the library's choice)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="build_speed.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.regions, args.teacher_ms, args.student_ms, args.epochs, args.reps = 8, 2, [1.0], [1.0], 2, 1
    torch.set_num_threads(1)  # the simulated models use no CPU; the build's own threads are what is measured
    names = class_names(50)
    report = {"commit": git_commit(), "fdbpl_hf": fdbpl_hf.__version__,
              "command": "python benchmarks/build_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpus": usable_cpus(), "load_average_start": load_average(), "args": vars(args)}
    print(f"# Build throughput against a simulated accelerator\n\nfdbpl_hf {fdbpl_hf.__version__} at "
          f"{report['commit']}, {usable_cpus()} usable CPUs, load average {load_average():.2f}, "
          f"{args.images} images of 500 x 375, M = {args.regions}\n", flush=True)
    ds = synthetic_images(args.images, names)

    print("## 1. Host cost per stage (one thread, CPU time)\n")
    stages = stage_costs(ds, args.regions, args.reps)
    report["stages_ms"] = {name: v for name, v in stages}
    print(md_table(["stage", "ms"], [[n, f"{v:.3f}"] for n, v in stages]), flush=True)

    table_kw = dict(num_regions=args.regions, top_k=20, teacher_input_size=224,
                    images_per_batch=args.images_per_batch, teacher_batch_size=args.teacher_batch_size)
    if args.host_threads is not None and has_setting(build_ril_table, "host_threads"):
        table_kw["host_threads"] = args.host_threads
    cache_kw = {}
    if args.host_threads is not None and has_setting(build_feature_cache, "host_threads"):
        cache_kw["host_threads"] = args.host_threads
    work = tempfile.mkdtemp(prefix="fdbpl_build_speed_")
    try:
        free = SimulatedAccelerator(len(names), 0.0)
        wall, cpu, main_cpu, table = timed_build(build_ril_table, ds, free, output_dir=os.path.join(work, "free"),
                                                 **table_kw)
        n = len(table)
        report["free_teacher"] = {"regions": n, "wall_s": wall, "cpu_s": cpu, "main_thread_cpu_s": main_cpu}
        print(f"\nwhole build with a free teacher: {n} regions in {wall:.2f} s wall; per region "
              f"{1e3 * cpu / n:.3f} CPU-ms in all, {1e3 * main_cpu / n:.3f} of them in the calling thread (the "
              "part that cannot overlap a teacher that holds that thread)", flush=True)

        print("\n## 2. Table build / bare teacher\n")
        rows = []
        for ms in args.teacher_ms:
            teacher = SimulatedAccelerator(len(names), ms)
            pixels = torch.randn(args.teacher_batch_size, 3, 224, 224)
            bare = median(time_calls(lambda: teacher(pixels), 3, 1)) / args.teacher_batch_size
            wall, cpu, _, table = timed_build(build_ril_table, ds, teacher, output_dir=os.path.join(work, f"t{ms}"),
                                              **table_kw)
            ratio = (len(table) / wall) * bare
            report.setdefault("table", []).append({"teacher_ms": ms, "bare_regions_per_s": 1 / bare,
                                                   "build_regions_per_s": len(table) / wall, "ratio": ratio,
                                                   "wall_s": wall, "cpu_s": cpu})
            rows.append([f"{ms:g}", f"{1 / bare:.0f}", f"{len(table) / wall:.0f}", f"**{ratio:.2f}**"])
            save_json(args.json, report)
        print(md_table(["teacher ms/region", "bare regions/s", "build regions/s", "build / bare"], rows), flush=True)

        print("\n## 3. Feature-cache build / bare student\n")
        student = random_clip("tiny", patch=32, image_size=224)
        data = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                          class_names=names)
        rows = []
        for ms in args.student_ms:
            simulated = SimulatedAccelerator(student.config.projection_dim, ms)
            real = student.get_image_features

            def features(pixel_values, _sim=simulated, _real=real):
                _sim(pixel_values)  # the cost
                return _real(pixel_values=pixel_values)

            student.get_image_features = features  # this instance only: the build calls it per batch
            try:
                pixels = torch.randn(64, 3, 224, 224)
                bare = median(time_calls(lambda: simulated(pixels), 3, 1)) / 64
                wall, cpu, _, cache = timed_build(build_feature_cache, data, student, epochs=args.epochs,
                                                  output_dir=os.path.join(work, f"c{ms}"), batch_size=64,
                                                  progress=False, **cache_kw)
            finally:
                del student.get_image_features
            ratio = (len(cache) / wall) * bare
            report.setdefault("cache", []).append({"student_ms": ms, "bare_regions_per_s": 1 / bare,
                                                   "build_regions_per_s": len(cache) / wall, "ratio": ratio,
                                                   "wall_s": wall, "cpu_s": cpu, "epochs": args.epochs})
            rows.append([f"{ms:g}", args.epochs, f"{1 / bare:.0f}", f"{len(cache) / wall:.0f}", f"**{ratio:.2f}**"])
            save_json(args.json, report)
        print(md_table(["student ms/region", "epochs", "bare regions/s", "build regions/s", "build / bare"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = load_average()
    save_json(args.json, report)
    print(f"\nload average at the end {load_average():.2f}; figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

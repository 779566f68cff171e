#!/usr/bin/env python
"""Benchmark of RIL tables (spec §3): build throughput, bytes per region, replay cost, table sizes.

    python benchmarks/ril_table.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/ril_table.py --quick    # smoke run (< 1 minute)

It prints figures and PASS/MISS per goal; nothing is asserted on timings.

(a) build throughput of `build_ril_table` vs the teacher's bare forward on the same crops
    (pre-rendered, normalised, in memory, same teacher batches). Goal >= 0.9.
(b) bytes per region on disk (Arrow as written by the builder; Parquet as `push_ril_table`
    uploads it) vs the floor 11 + 4K bytes (the entropy column included). Goal <= 1.25x.
(c) replay cost of one batch (32 x `RILDataset.__getitem__` + default collate) vs one student
    training step of an FDBPL ViT-B/32. Goal < 5%.
(d) projected table sizes for the 11 benchmark datasets at M=500, K=min(20, classes).

All models have random weights (nothing is downloaded); costs do not depend on the weights.
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import machine_facts, md_table, now, random_clip, section, torch_threads, verdict  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
import fdbpl_hf  # noqa: E402
from fdbpl_hf.testing.worlds import clip_tokenizer, load_digits  # noqa: E402
from fdbpl_hf.ril import build as ril_build  # noqa: E402
from fdbpl_hf.ril.regions import (  # noqa: E402
    RegionSpec, image_to_tensor, normalize, region_rng, render_region, sample_regions,
)
from fdbpl_hf.ril.replay import RILDataset, dense_teacher_logits  # noqa: E402
from fdbpl_hf.ril.table import decode_image, ril_metadata  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CallableTeacher, CLIPTeacher  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"




def synthetic_dataset(num_images: int, num_classes: int, width: int = 500, height: int = 375,
                      seed: int = 0) -> tuple[datasets.Dataset, list[str], float]:
    """ImageNet-like source images: MNIST digits upscaled to `width` x `height`, colourised over a
    random gradient with sensor-like noise, stored as JPEG (quality 90) bytes like a Hub dataset."""
    digits = load_digits(num_per_class=max(1, math.ceil(num_images / 10)), seed=seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / width * 0.6 + yy / height * 0.4)[..., None]
    blobs, sizes = [], []
    for i in range(num_images):
        d = np.asarray(digits[i % len(digits)]["image"].resize((width, height), Image.BICUBIC), np.float32)[..., None]
        d = np.clip(d / 255.0, 0, 1)
        c0, c1, fg = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        bg = c0 * (1 - ramp) + c1 * ramp
        pixels = bg * (1 - d) + fg * d + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append({"bytes": buf.getvalue(), "path": None})
        sizes.append(len(blobs[-1]["bytes"]))
    names = [f"class {c:04d}" for c in range(num_classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": blobs, "label": [i % num_classes for i in range(num_images)]},
                                    features=features)
    return ds, names, float(np.mean(sizes))


# ---------------------------------------------------------------------------------------------
# (a) build throughput

def bench_build(args, workdir: str) -> dict:
    section("(a) Build throughput vs the teacher's bare forward")
    n, m, ipb, tbs = args.build_images, args.build_regions, args.images_per_batch, args.teacher_batch_size
    ds, names, jpeg = synthetic_dataset(n, args.build_classes, seed=1)
    teacher = CLIPTeacher(random_clip(args.teacher), clip_tokenizer(), names)
    spec = RegionSpec(output_size=teacher.input_size)
    seed = 0
    print(f"teacher: random-weight CLIP `{args.teacher}` image tower ({teacher.input_size}px), "
          f"{len(names)} classes; source: {n} JPEG images 500x375 (mean {jpeg / 1e3:.0f} KB); "
          f"M={m}, K=20, images_per_batch={ipb}, teacher_batch_size={tbs}\n")

    # The exact crops the builder will score (same boxes, same renderer), pre-rendered once,
    # chunked as the builder chunks them: per map batch of `ipb` images, `tbs` regions per call.
    raw = ds.cast_column("image", datasets.Image(decode=False))
    threads = torch.get_num_threads()
    t_decode, t_render = 0.0, {1: 0.0, threads: 0.0}
    crops = []
    for row in range(n):
        t0 = now()
        image = image_to_tensor(decode_image(raw[row]["image"], row))
        t_decode += now() - t0
        boxes, flips = sample_regions(image.shape[1], image.shape[2], m, spec, region_rng(seed, row))
        for th in sorted(t_render, reverse=True):  # the same crops at 1 and at all threads
            with torch_threads(th):
                t1 = now()
                rendered = [render_region(image, boxes[r], bool(flips[r]), spec) for r in range(m)]
                t_render[th] += now() - t1
        crops.extend(rendered)
    t_stack = {}
    for th in sorted(t_render, reverse=True):
        with torch_threads(th):
            t0 = now()
            chunks = []
            for start in range(0, n * m, ipb * m):
                batch = crops[start : start + ipb * m]
                chunks += [normalize(torch.stack(batch[i : i + tbs]), teacher.image_mean, teacher.image_std)
                           for i in range(0, len(batch), tbs)]
            t_stack[th] = now() - t0
    del crops
    regions = n * m

    def bare_forward() -> tuple[float, list[torch.Tensor]]:
        out = []
        with torch.inference_mode():
            t = now()
            for c in chunks:
                out.append(teacher(c))
            return now() - t, out

    with torch.inference_mode():
        teacher(chunks[0][: min(8, len(chunks[0]))])  # warm-up
    t_topk = 0.0

    # Instrument the build (timing only): teacher time and labeler (the labeling pipeline of a shard) time.
    spent = {"teacher": 0.0, "labeler": 0.0}
    shares = []
    plain_logits = teacher.logits

    def timed_logits(x):
        t = now()
        try:
            return plain_logits(x)
        finally:
            spent["teacher"] += now() - t

    plain_call = ril_build._RegionLabeler._label

    def timed_call(self, *a, **kw):
        t = now()
        try:
            return plain_call(self, *a, **kw)
        finally:
            spent["labeler"] += now() - t

    # Bare and build runs alternate (bare, build, bare, ...): each build is compared with the
    # mean of the bare runs around it, which cancels slow drifts in the machine's load.
    bare_times, build_times, table = [], [], None
    t_bare, logits = bare_forward()
    bare_times.append(t_bare)
    for rep in range(args.build_repeats):
        t = now()
        for lg in logits:
            torch.log_softmax(lg.float(), -1).topk(20, -1)
        t_topk = now() - t
        out_dir = os.path.join(workdir, f"build-a-{rep}")
        spent.update(teacher=0.0, labeler=0.0)
        teacher.logits = timed_logits
        ril_build._RegionLabeler._label = timed_call
        try:
            t = now()
            table = fdbpl_hf.build_ril_table(ds, teacher, num_regions=m, top_k=20, seed=seed, output_dir=out_dir,
                                             images_per_batch=ipb, teacher_batch_size=tbs)
            build_times.append(now() - t)
            shares.append(spent["teacher"] / build_times[-1])
        finally:
            teacher.logits = plain_logits
            ril_build._RegionLabeler._label = plain_call
        t_bare, logits = bare_forward()
        bare_times.append(t_bare)

    # Sanity: the build scored exactly the pre-rendered crops.
    ref = torch.log_softmax(torch.cat(logits).float(), -1).topk(20, -1).indices
    got = torch.from_numpy(table.with_format("numpy")[:]["topk_indices"].astype(np.int64))
    same_top1 = float((ref[:, 0] == got[:, 0]).float().mean())

    bare = float(np.median(bare_times))
    build = float(np.median(build_times))
    ratio = float(np.median([(bare_times[i] + bare_times[i + 1]) / 2 / b for i, b in enumerate(build_times)]))
    rows = [
        ["teacher bare forward (pre-rendered crops)", f"{regions / bare:.2f}", f"{bare / regions * 1e3:.1f}",
         "runs: " + ", ".join(f"{t:.1f}s" for t in bare_times)],
        ["build_ril_table end to end", f"{regions / build:.2f}", f"{build / regions * 1e3:.1f}",
         "runs: " + ", ".join(f"{t:.1f}s" for t in build_times)],
    ]
    print(md_table(["", "regions/s", "ms/region", "wall"], rows))
    print()
    last_build = build_times[-1]
    other = last_build - spent["labeler"]
    parts = [
        ["teacher forward inside the build", f"{spent['teacher'] / regions * 1e3:.2f}",
         f"{spent['teacher'] / last_build:.1%}"],
        ["labeler minus teacher (decode, sample, render, stack, topk, copy)",
         f"{(spent['labeler'] - spent['teacher']) / regions * 1e3:.2f}",
         f"{(spent['labeler'] - spent['teacher']) / last_build:.1%}"],
        ["outside the labeler (fingerprint, Arrow write, save, assemble)", f"{other / regions * 1e3:.2f}",
         f"{other / last_build:.1%}"],
    ]
    print("Where the last build's time went:\n")
    print(md_table(["stage", "ms/region", "share"], parts))
    print()
    print("Stand-alone costs of the stages (this process, "
          f"{torch.get_num_threads()} torch threads unless said; the builder renders in a background thread "
          "with 1 intra-op thread, overlapped with the teacher):\n")
    print(md_table(["stage", "ms/region", "vs bare forward"], [
        ["JPEG decode + to tensor (per image / M)", f"{t_decode / regions * 1e3:.3f}", f"{t_decode / bare:.1%}"],
        *[[f"render_region (crop + bicubic antialias + flip), {th} thread{'s' * (th > 1)}",
           f"{t_render[th] / regions * 1e3:.3f}", f"{t_render[th] / bare:.1%}"] for th in sorted(t_render)],
        *[[f"stack + normalize, {th} thread{'s' * (th > 1)}", f"{t_stack[th] / regions * 1e3:.3f}",
           f"{t_stack[th] / bare:.1%}"] for th in sorted(t_stack)],
        ["log_softmax + topk", f"{t_topk / regions * 1e3:.3f}", f"{t_topk / bare:.1%}"],
    ]))
    print(f"\nbuild scored the pre-rendered crops: top-1 agreement {same_top1:.1%}")
    share = float(np.median(shares))
    print(f"\nteacher share of the build's wall time: {share:.3f} (the build's own overhead, immune to the load "
          "drifting between runs; the direct ratio below also carries that drift)")
    print(f"\n**(a) build/bare = {ratio:.3f} (median over builds of the mean bare run around each build / build; "
          f"goal >= 0.9): {verdict(ratio >= 0.9)}** "
          f"({regions / build:.2f} vs {regions / bare:.2f} regions/s on cpu, {torch.get_num_threads()} threads; "
          f"teacher share {share:.3f})")
    return {"ratio": ratio, "share": share, "table": table, "dataset": ds}


# ---------------------------------------------------------------------------------------------
# (b) bytes per region

def dir_bytes(path: str, pattern: str = "**/*") -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, pattern), recursive=True) if os.path.isfile(p))


def projection_teacher(num_classes: int, input_size: int = 32, spread: float = 3.0, seed: int = 0) -> CallableTeacher:
    """A teacher whose top-K varies from region to region like a real one's: a fixed random
    projection of the region's pixels (logit std about `spread`). Varied top-K indices and values
    compress worse than a random-weight CLIP's near-constant ones, so the Parquet sizes are not
    flattered."""
    dim = 3 * input_size * input_size
    weight = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(seed)) * (spread / math.sqrt(dim))

    def project(pixels):
        return pixels.flatten(1) @ weight

    return CallableTeacher(project, num_classes, input_size, name=f"random-projection-{num_classes}")


def bench_bytes(args, workdir: str) -> dict:
    section("(b) Bytes per region on disk vs the 11 + 4K floor")
    n, m = args.bytes_images, args.bytes_regions
    configs = [(k, 100) for k in args.top_ks] + [(max(args.top_ks), 1000)]
    sources = {c: synthetic_dataset(n, c, seed=2)[0] for c in sorted({c for _, c in configs})}
    print(f"source: {n} JPEG images 500x375 x M={m} = {n * m} regions; int16 indices; teacher: a fixed random "
          "projection of 32 px regions (the table's size does not depend on the teacher's cost; its top-K varies "
          "from region to region like a real teacher's, so Parquet's compression is not flattered)\n")
    rows, results = [], {}
    for k, c in configs:
        out = os.path.join(workdir, f"bytes-k{k}-c{c}")
        table = fdbpl_hf.build_ril_table(sources[c], projection_teacher(c), num_regions=m, top_k=k, output_dir=out,
                                         images_per_batch=8, teacher_batch_size=512)
        stats = ril_metadata(table)["stats"]
        arrow = dir_bytes(os.path.join(out, "data"), "*.arrow")
        pq_path = os.path.join(workdir, f"k{k}-c{c}.parquet")
        # what push_ril_table uploads: these columns through datasets' own Parquet writer
        table.select_columns(["box", "flip", "topk_indices", "topk_logits", "teacher_entropy"]).to_parquet(pq_path)
        parquet = os.path.getsize(pq_path)
        top1 = float(np.exp(table.with_format("numpy")[:]["topk_logits"][:, 0].astype(np.float32)).mean())
        regions = len(table)
        floor = 11 + 4 * k
        a_bpr, p_bpr = arrow / regions, parquet / regions
        results[(k, c)] = {"arrow": a_bpr, "parquet": p_bpr, "stats": stats["bytes_per_region"], "floor": floor}
        rows.append([k, c, floor, f"{stats['bytes_per_region']:.2f}", f"{a_bpr:.2f}", f"{a_bpr / floor:.3f}x",
                     f"{p_bpr:.2f}", f"{p_bpr / floor:.3f}x", f"{top1:.2f}"])
        shutil.rmtree(out, ignore_errors=True)
        os.remove(pq_path)
    print(md_table(["K", "classes", "floor B", "stats B/region (data dir incl. JSON)", "Arrow *.arrow B/region",
                    "Arrow/floor", "Parquet B/region", "Parquet/floor", "mean top-1 prob"], rows))
    worst = max(max(r["arrow"], r["parquet"]) / r["floor"] for r in results.values())
    print("\nArrow stores `flip` as 1 bit and fixed-size lists without offsets, so it sits at the floor; Parquet "
          "(datasets' writer as push_ril_table uses it: snappy, dictionary encoding, page index, content-defined "
          "chunking) packs the class indices (dictionary codes of about log2(classes) bits) and the box columns.")
    print(f"\n**(b) worst of Arrow/Parquet: {worst:.3f}x the floor (goal <= 1.25x): {verdict(worst <= 1.25)}**")
    return results


# ---------------------------------------------------------------------------------------------
# (c) replay cost vs the student's step

def bench_replay(args, workdir: str) -> dict:
    section("(c) Replay cost per batch vs one student training step")
    from torch.utils.data import default_collate

    n, m, bs = args.replay_images, args.replay_regions, 32
    num_classes = max(100, *args.step_classes)
    ds, names, jpeg = synthetic_dataset(n, num_classes, seed=4)
    proj = torch.randn(3, num_classes, generator=torch.Generator().manual_seed(0)) * 20

    def cheap(pixels):  # the replay table's content does not matter, only its shape
        return pixels.mean(dim=(2, 3)) @ proj

    teacher = CallableTeacher(cheap, num_classes, 224, name="pooled-linear")
    table = fdbpl_hf.build_ril_table(ds, teacher, num_regions=m, top_k=20, output_dir=os.path.join(workdir, "replay"),
                                     images_per_batch=4, teacher_batch_size=256)
    data = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                      class_names=names)
    print(f"source: {n} JPEG images 500x375 (mean {jpeg / 1e3:.0f} KB), table M={m}, K=20, "
          f"{num_classes} classes, regions rendered at 224 px; batch = {bs} items + default_collate\n")

    def one_batch(epoch: int):
        data.set_epoch(epoch)
        return default_collate([data[(epoch * bs + i) % n] for i in range(bs)])

    threads = torch.get_num_threads()
    replay = {}
    for th in sorted({1, threads}):
        with torch_threads(th):
            one_batch(0)
            times = []
            for e in range(args.replay_batches):
                t = now()
                one_batch(e + 1)
                times.append(now() - t)
            replay[th] = float(np.median(times))

    # Per-item breakdown (1 thread, as in a DataLoader worker), replicating __getitem__'s steps.
    with torch_threads(1):
        acc = dict.fromkeys(["region_for (seeded permutation)", "table row (numpy format)", "source row (bytes)",
                             "JPEG decode + to tensor", "render_region", "normalize + tensors"], 0.0)
        keys = list(acc)
        items = args.replay_batches * bs
        for j in range(items):
            i = j % n
            t0 = now()
            region = data.region_for(i, j)
            t1 = now()
            row = data.table[i * data.num_regions + region]
            t2 = now()
            item = data.source[i]
            t3 = now()
            image = image_to_tensor(decode_image(item["image"], i))
            t4 = now()
            pixels = render_region(image, row["box"], bool(row["flip"]), data.spec)
            t5 = now()
            normalize(pixels, data.image_mean, data.image_std)
            torch.from_numpy(row["topk_indices"].astype(np.int64))
            torch.from_numpy(row["topk_logits"].astype(np.float32))
            t6 = now()
            for key, dt in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                acc[key] += dt
        batch = one_batch(0)
        samples = [data[i % n] for i in range(bs)]
        t = now()
        for _ in range(args.replay_batches):
            default_collate(samples)
        collate = (now() - t) / args.replay_batches
        t = now()
        for _ in range(args.replay_batches):
            dense_teacher_logits(batch["topk_indices"], batch["topk_logits"], num_classes, fill=data.fill)
        dense = (now() - t) / args.replay_batches
    total = sum(acc.values())
    breakdown = [[k, f"{v / items * 1e3:.3f}", f"{v / total:.1%}"] for k, v in acc.items()]
    breakdown.append(["default_collate (per batch / 32)", f"{collate / bs * 1e3:.3f}", "-"])
    breakdown.append(["dense_teacher_logits (main process, per batch / 32)", f"{dense / bs * 1e3:.3f}", "-"])

    # The student's training step: FDBPL on a random-weight ViT-B/32, forward + backward + SGD.
    from fdbpl_hf import FDBPLConfig, get_fdbpl_model

    try:
        from fdbpl_hf.losses import fdbpl_loss
    except ImportError:  # pragma: no cover - older trees
        fdbpl_loss = None
    student = get_fdbpl_model(random_clip("vit-b-32", seed=5), FDBPLConfig(), clip_tokenizer())
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    pixels = batch["pixel_values"]

    def step(class_names, teacher_logits):
        opt.zero_grad(set_to_none=True)
        out = student(pixel_values=pixels, class_names=class_names)
        if fdbpl_loss is not None:
            loss = fdbpl_loss(out.pos_logits, out.neg_logits, teacher_logits, out.image_features,
                              out.pos_text_features, out.neg_text_features)["total"]
        else:
            loss = out.pos_logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()

    steps = {}
    for c in args.step_classes:
        class_names = names[:c]
        if c == num_classes:
            teacher_logits = dense_teacher_logits(batch["topk_indices"], batch["topk_logits"], c)
        else:
            teacher_logits = torch.randn(bs, c)
        if not steps:
            step(class_names, teacher_logits)  # warm-up (first call allocates)
        times = []
        for _ in range(args.step_repeats if c <= 100 else 1):
            t = now()
            step(class_names, teacher_logits)
            times.append(now() - t)
        steps[c] = float(np.median(times))

    r1, rn = replay[1], replay[threads]
    print(md_table(["", "ms per batch of 32"], [
        ["replay, 1 torch thread (as in a DataLoader worker)", f"{r1 * 1e3:.1f}"],
        [f"replay, {threads} torch threads (as in the main process, num_workers=0)", f"{rn * 1e3:.1f}"],
    ] + [[f"student step, {c} classes (fwd + bwd + SGD, {threads} threads)", f"{steps[c] * 1e3:.0f}"]
         for c in args.step_classes]))
    print("\nReplay per item (1 thread):\n")
    print(md_table(["step of __getitem__", "ms/item", "share"], breakdown))
    print()
    workers = [1, 2, 4, 8]
    rows = [[f"{c}", f"{rn / steps[c]:.2%}"] + [f"{r1 / w / steps[c]:.2%}" for w in workers]
            for c in args.step_classes]
    print("Replay time / step time. Main process: replay in the training process (num_workers=0, all torch "
          "threads), serial with the step. N workers: the 1-thread per-item cost split across N DataLoader "
          "workers (ideal split; N=1 is the single-process 1-thread figure; on this 2-core machine workers "
          "would share the cores with the step):\n")
    print(md_table(["classes", f"main process ({threads} threads)"] + [f"N={w}" for w in workers], rows))
    worst = max(r1 / steps[c] for c in args.step_classes)
    worst_main = max(rn / steps[c] for c in args.step_classes)
    print("\n**(c) single-process replay / step (1 thread, as a worker pays it) = "
          + ", ".join(f"{r1 / steps[c]:.2%} at {c} classes" for c in args.step_classes)
          + f" (goal < 5%): {verdict(worst < 0.05)}**")
    print(f"\n**(c') in the main process with {threads} threads (num_workers=0) = "
          + ", ".join(f"{rn / steps[c]:.2%} at {c} classes" for c in args.step_classes)
          + f" (goal < 5%): {verdict(worst_main < 0.05)}**")
    return {"replay": replay, "steps": steps, "threads": threads}


# ---------------------------------------------------------------------------------------------
# (d) projected sizes

# CoOp's split_zhou train counts (images) and class counts.
BENCHMARKS = [
    ("ImageNet", 1_281_167, 1000), ("Caltech101", 4_128, 100), ("OxfordPets", 2_944, 37),
    ("StanfordCars", 6_509, 196), ("Flowers102", 4_093, 102), ("Food101", 50_500, 101),
    ("FGVCAircraft", 3_334, 100), ("SUN397", 15_880, 397), ("DTD", 2_820, 47), ("EuroSAT", 13_500, 10),
    ("UCF101", 7_639, 101),
]


def bench_projection(args, measured: dict) -> None:
    section("(d) Projected table sizes, M=500, K=min(20, classes)")
    m = 500
    ks = sorted(k for k, c in measured if c == 100)
    many = max(c for _, c in measured)

    def per_region(k: int, form: str, classes: int) -> float:
        if form == "parquet" and classes >= 300 and (k, many) in measured:
            return measured[(k, many)][form]  # Parquet's index codes grow with the class count
        if k in ks:
            return measured[(k, 100)][form]
        # linear in K between (or beyond) the measured points: overhead + about 4K bytes
        lo = max([x for x in ks if x <= k], default=ks[0])
        hi = min([x for x in ks if x >= k], default=ks[-1])
        if lo == hi:
            lo, hi = ks[0], ks[-1]
        x, y = measured[(lo, 100)][form], measured[(hi, 100)][form]
        return x + (y - x) * (k - lo) / (hi - lo)

    rows, totals = [], {"all": [0, 0], "base": [0, 0], "full": [0, 0]}
    for name, train, classes in BENCHMARKS:
        base = math.ceil(classes / 2)
        cells = [name, f"{train:,}", classes]
        for key, images, c in (("all", 16 * classes, classes), ("base", 16 * base, base), ("full", train, classes)):
            k = min(20, c)
            arrow = images * m * per_region(k, "arrow", c)
            parquet = images * m * per_region(k, "parquet", c)
            totals[key][0] += arrow
            totals[key][1] += parquet
            cells.append(f"{human_bytes(arrow)} / {human_bytes(parquet)}" + ("" if k == 20 else f" (K={k})"))
        rows.append(cells)
    rows.append(["**total**", "", ""] + [f"{human_bytes(a)} / {human_bytes(p)}" for a, p in totals.values()])
    print("Train-set sizes and classes are CoOp's split_zhou counts; 16-shot all = 16 x C images, 16-shot "
          "base = 16 x ceil(C/2) (base-to-novel trains on base classes only, and K = min(20, classes)); cells are "
          f"Arrow / Parquet, using the bytes/region measured in (b) (K in {ks} at 100 classes, other K "
          f"interpolated; Parquet at >= 300 classes uses the {many}-class figure).\n")
    print(md_table(["dataset", "train images", "classes", "16-shot all", "16-shot base", "full train set"], rows))


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fast smoke run (< 1 minute)")
    p.add_argument("--only", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c", "d"])
    p.add_argument("--teacher", default="vit-b-32", help="clip_config size of the (a) teacher")
    p.add_argument("--step-classes", type=int, nargs="+", default=None,
                   help="class counts of the (c) student step (default 100 1000; --quick: 10)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed at the end)")
    args = p.parse_args(argv)
    full = not args.quick
    # (a): N images x M regions; ipb x M must be a multiple of the teacher batch.
    args.build_images, args.build_regions = (8, 32) if full else (2, 16)
    args.images_per_batch, args.teacher_batch_size = (4, 32) if full else (2, 16)
    args.build_classes, args.build_repeats = 100, (2 if full else 1)
    # (b): enough regions that fixed overheads vanish.
    args.bytes_images, args.bytes_regions = (200, 100) if full else (20, 25)
    args.top_ks = (5, 10, 20)
    # (c)
    args.replay_images, args.replay_regions = (16, 500) if full else (4, 50)
    args.replay_batches = 5 if full else 2
    args.step_classes = tuple(args.step_classes or ((100, 1000) if full else (10,)))
    args.step_repeats = 2 if full else 1

    workdir = args.workdir or tempfile.mkdtemp(prefix="ril_bench_")
    os.makedirs(workdir, exist_ok=True)
    start = now()
    print(f"# RIL table benchmark ({'quick' if args.quick else 'full'} run)\n")
    machine_facts()
    summary = []
    try:
        if "a" in args.only:
            a = bench_build(args, workdir)
            summary.append(f"(a) build throughput / bare teacher forward = {a['ratio']:.3f} (goal >= 0.9): "
                           f"{verdict(a['ratio'] >= 0.9)}; teacher share of the build's time {a['share']:.3f}")
        measured = None
        if "b" in args.only or "d" in args.only:
            measured = bench_bytes(args, workdir)
            worst = max(max(r["arrow"], r["parquet"]) / r["floor"] for r in measured.values())
            k = max(args.top_ks)
            summary.append(f"(b) bytes/region at K={k} (floor {11 + 4 * k}): Arrow {measured[(k, 100)]['arrow']:.1f}, "
                           f"Parquet {measured[(k, 100)]['parquet']:.1f} (100 classes) / "
                           f"{measured[(k, 1000)]['parquet']:.1f} (1000 classes); worst {worst:.3f}x the floor "
                           f"(goal <= 1.25x): {verdict(worst <= 1.25)}")
        if "c" in args.only:
            c = bench_replay(args, workdir)
            for label, r in (("1 thread, as in a DataLoader worker", c["replay"][1]),
                             (f"main process, {c['threads']} threads, num_workers=0", c["replay"][c["threads"]])):
                ratios = ", ".join(f"{r / s:.2%} at {k} classes" for k, s in c["steps"].items())
                worst = max(r / s for s in c["steps"].values())
                summary.append(f"(c) replay / student step, single process ({label}) = {ratios} (goal < 5%): "
                               f"{verdict(worst < 0.05)}")
        if "d" in args.only and measured:
            bench_projection(args, measured)
            k = max(args.top_ks)
            arrow, parquet = measured[(k, 100)]["arrow"], measured[(k, 1000)]["parquet"]
            summary.append(f"(d) M=500, K={k}: ImageNet full train set {human_bytes(1_281_167 * 500 * arrow)} Arrow / "
                           f"{human_bytes(1_281_167 * 500 * parquet)} Parquet; ImageNet 16-shot base "
                           f"{human_bytes(16 * 500 * 500 * arrow)} Arrow / {human_bytes(16 * 500 * 500 * parquet)} "
                           "Parquet")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n## Summary\n")
    for line in summary:
        print("- " + line)
    print(f"\n(total wall time {now() - start:.0f} s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Speed claim on real-size models and one accelerator: ViT-L/14 teacher, ViT-B/32 student.

    python benchmarks/speed_real.py                  # on a CUDA GPU (about 2 minutes on an H200)
    python benchmarks/speed_real.py --quick --device cpu --size small   # smoke run of the script itself

Random weights of the real architectures (`fdbpl_hf.testing.worlds.clip_config("vit-l-14")` and
`"vit-b-32"`: costs do not depend on the weights; nothing is downloaded). The source images
are smooth synthetic 500 x 375 JPEGs (ImageNet's typical size), decoded and cropped by the real
replay. For each class count C (50: a typical base split; 500: ImageNet's base classes) it:

1. builds an RIL table with the teacher (timed: regions per second) and a student-feature cache;
2. runs `FDBPLTrainer` (bf16 autocast on CUDA) in five modes on the same images and regions:
   **online** (the teacher scores every batch: PromptKD/KDPL), **offline** (FDBPL: soft labels from
   the table), **cached** (offline plus the student-feature cache: no image tower, no images), and
   the two pixel modes with device-resident replay (`DeviceImageStore`: images decoded once, regions
   cropped and resized in the step by one batched kernel, no DataLoader workers): **online store**
   and **offline store**;
3. times two pure steps without Trainer or data: student image forward + text forward/backward
   + losses + SGD (the floor of online and offline), and text + losses + SGD alone (the floor of
   the cached mode).

With `--compile MODE` every mode also runs compiled (`--torch_compile`: the student, the loss and
the online teacher with the same mode; "reduce-overhead" = CUDA graphs), in the same interleaved
rounds as the eager modes, so eager and compiled ratios come from one run.

A step is the time between consecutive `on_step_end` callbacks, each after a device sync. Figures
are printed as markdown and written to `--json` (after every mode: a run stopped by a time limit
keeps what it measured), with the commit measured (`--commit`, else git) and the command.
The whole GPU measurement of issue 16 is `benchmarks/gpu_measurement.sh`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (  # noqa: E402
    StepTimer, class_names, git_commit, md_table, median, now, random_clip, save_json, sync, synthetic_images,
)
import fdbpl_hf  # noqa: E402
import torch  # noqa: E402
from flops import real_models, step_flops  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from fdbpl_hf import (  # noqa: E402
    CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table, dense_teacher_logits,
    get_fdbpl_model,
)
from fdbpl_hf.losses import fdbpl_loss  # noqa: E402
from fdbpl_hf.testing.worlds import clip_tokenizer  # noqa: E402
from fdbpl_hf.ril.device_replay import DeviceImageStore  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments  # noqa: E402


def trainer_steps(args, model, data, teacher, workdir: str, workers: int, compile_mode=None) -> list[float]:
    from transformers.trainer_callback import PrinterCallback

    steps = args.warmup + args.steps
    on_device = getattr(data, "image_store", None) is not None
    targs = FDBPLTrainingArguments(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=args.batch, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.bf16,
        dataloader_num_workers=0 if on_device else workers,
        dataloader_pin_memory=args.device != "cpu" and not on_device, seed=0, logging_steps=500,
        dataloader_drop_last=True,  # fixed shapes: no recompilation or CUDA-graph re-capture for a last batch
        torch_compile=compile_mode is not None,
        torch_compile_mode=None if compile_mode in (None, "default") else compile_mode,
        torch_compile_backend=getattr(args, "compile_backend", None) if compile_mode is not None else None,
    )
    timer = StepTimer(torch.device(args.device))
    trainer = FDBPLTrainer(model=model, args=targs, train_dataset=data, teacher=teacher, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    ends = timer.end[args.warmup:]
    return [b - a for a, b in zip(ends, ends[1:])]


def pure_steps(args, model, batches: list[dict], num_classes: int, device, use_features: bool,
               compile_mode=None) -> list[float]:
    """Forward (image tower unless `use_features`) + FDBPL loss + backward + SGD on device-resident batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    prepared = []
    for b in batches:
        target = dense_teacher_logits(b["topk_indices"], b["topk_logits"], num_classes).to(device)
        x = b["image_features"] if use_features else b["pixel_values"]
        prepared.append((x.to(device), target))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    model.train()
    step_model = compiled(model, compile_mode)
    loss_fn = compiled(fdbpl_loss, compile_mode)
    times = []
    for i in range(args.warmup + args.steps + 1):
        x, target = prepared[i % len(prepared)]
        sync(device)
        t0 = now()
        with autocast:
            o = step_model(image_features=x) if use_features else step_model(pixel_values=x)
            losses = loss_fn(o.pos_logits, o.neg_logits, target, o.image_features, o.pos_text_features,
                             o.neg_text_features)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(losses["total"].detach())  # the Trainer's per-step loss logging syncs too
        if i > args.warmup:
            times.append(now() - t0)
    return times


_COMPILED: dict = {}
_COMPILE_BACKEND = [None]  # --compile-backend


def compiled(module, mode):
    """`module` itself, or (with --compile) one compiled wrapper per module or function, reused across runs."""
    if mode is None:
        return module
    key = id(module)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(module, mode=None if mode == "default" else mode,
                                       backend=_COMPILE_BACKEND[0] or "inductor")
    return _COMPILED[key]


def piece_times(args, teacher_clip, student, names, device) -> dict:
    """Bare per-batch costs (device-synced wall time, median of repetitions)."""
    b = args.batch
    pixels = torch.randn(b, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def timed(fn, reps=args.piece_reps):
        for _ in range(min(3, reps)):
            fn()
        out = []
        for _ in range(reps):
            sync(device)
            t0 = now()
            fn()
            sync(device)
            out.append(now() - t0)
        return median(out)

    with torch.no_grad(), autocast:
        teacher = timed(lambda: teacher_clip.get_image_features(pixel_values=pixels))
        image = timed(lambda: student.clip.get_image_features(pixel_values=pixels))

    def text():
        with autocast:
            feats = student.get_text_features(names)
            neg = student.get_text_features(names, negative=True)
        (feats.float().sum() + neg.float().sum()).backward()
        student.zero_grad(set_to_none=True)

    return {"teacher_image_fwd": teacher, "student_image_fwd": image, "text_fwd_bwd_2C": timed(text)}


def run_config(args, num_classes: int, teacher_clip, student_clip, tokenizer, device, workdir: str,
               report: dict) -> None:
    names = class_names(num_classes)
    key = f"C={num_classes}"
    res = report.setdefault("configs", {}).setdefault(key, {})
    print(f"\n## C = {num_classes} classes, batch {args.batch}\n", flush=True)
    student = get_fdbpl_model(student_clip, FDBPLConfig(base_model_name_or_path="vit-b-32-random"), tokenizer)
    teacher = CLIPTeacher(teacher_clip, tokenizer, names, "a photo of a {}.", name="vit-l-14-random")
    num_images = args.batch * (args.warmup + args.steps + 1)
    ds = synthetic_images(num_images, names)
    spec = RegionSpec(output_size=224)

    t0 = now()
    table = build_ril_table(ds, teacher, num_regions=args.regions, top_k=min(20, num_classes), region_spec=spec,
                            output_dir=os.path.join(workdir, f"table{num_classes}"), images_per_batch=32,
                            teacher_batch_size=256, device=str(device))
    build_s = now() - t0
    regions = len(table)
    res["table"] = {"images": num_images, "regions": regions, "build_s": build_s,
                    "regions_per_s": regions / build_s}
    print(f"RIL table: {num_images} images x M={args.regions} = {regions} teacher forwards in {build_s:.1f} s "
          f"({regions / build_s:.3g} regions/s, rendering included)", flush=True)

    offline = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                         class_names=names)
    t0 = now()
    cache = build_feature_cache(offline, student, epochs=1, output_dir=os.path.join(workdir, f"cache{num_classes}"),
                                batch_size=256, num_workers=args.workers, progress=False)
    cache_s = now() - t0
    res["feature_cache"] = {"regions": len(cache), "build_s": cache_s, "regions_per_s": len(cache) / cache_s}
    print(f"feature cache: {len(cache)} regions in {cache_s:.1f} s ({len(cache) / cache_s:.3g} regions/s)",
          flush=True)
    cached = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                        class_names=names, feature_cache=cache)
    online = RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                               region_spec=spec, num_regions=args.regions, seed=0)
    t0 = now()
    store = DeviceImageStore.from_dataset(ds, device=device)
    sync(device)
    store_s = now() - t0
    res["image_store"] = {"images": len(store), "bytes": store.nbytes, "build_s": store_s,
                          "bytes_per_image": store.nbytes / len(store)}
    print(f"image store: {len(store)} images decoded once, {store.nbytes / 2**20:.1f} MiB on {store.device}, "
          f"{store_s:.1f} s", flush=True)
    offline_store = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                               class_names=names).use_image_store(store)
    online_store = RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                                     region_spec=spec, num_regions=args.regions, seed=0).use_image_store(store)

    pieces = piece_times(args, teacher_clip, student, names, device)
    res["pieces_ms"] = {k: v * 1e3 for k, v in pieces.items()}
    batches = [default_collate([offline[i] for i in range(s * args.batch, (s + 1) * args.batch)])
               for s in range(min(4, num_images // args.batch))]
    cached_batches = [default_collate([cached[i] for i in range(s * args.batch, (s + 1) * args.batch)])
                      for s in range(len(batches))]

    def modes_for(suffix: str, mode):
        return {
            "online" + suffix: lambda d: trainer_steps(args, student, online, teacher, d, args.workers, mode),
            "offline" + suffix: lambda d: trainer_steps(args, student, offline, None, d, args.workers, mode),
            "cached" + suffix: lambda d: trainer_steps(args, student, cached, None, d, 0, mode),
            "online store" + suffix: lambda d: trainer_steps(args, student, online_store, teacher, d, 0, mode),
            "offline store" + suffix: lambda d: trainer_steps(args, student, offline_store, None, d, 0, mode),
            "pure student step" + suffix: lambda d: pure_steps(args, student, batches, num_classes, device, False,
                                                               mode),
            "pure text step" + suffix: lambda d: pure_steps(args, student, cached_batches, num_classes, device, True,
                                                            mode),
        }

    modes = modes_for("", None)
    variants = [""]
    if args.compile is not None:
        modes.update(modes_for(" compiled", args.compile))
        variants.append(" compiled")
    samples = {k: [] for k in modes}
    order = list(modes)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            run_dir = os.path.join(workdir, f"run-{num_classes}-{r}-{name.split()[0]}")
            try:
                samples[name].extend(modes[name](run_dir))
            except Exception as err:  # keep the other modes' figures
                traceback.print_exc()
                res.setdefault("errors", {})[name] = repr(err)
            shutil.rmtree(run_dir, ignore_errors=True)
            # partial figures after every mode: a run stopped by a time limit keeps what it measured
            res["partial_step_ms"] = {k: median(v) * 1e3 for k, v in samples.items() if v}
            res["partial_rounds"] = r + 1
            save_json(args.json, report)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    step = {k: median(v) for k, v in samples.items()}
    res["step_ms"] = {k: v * 1e3 for k, v in step.items()}
    res["steps_timed"] = {k: len(v) for k, v in samples.items()}
    on, off, ca = step["online"], step["offline"], step["cached"]
    pure, text = step["pure student step"], step["pure text step"]
    limit = on / pure
    res["figures"] = {
        "speedup_offline": on / off, "limit": limit, "share_of_limit": (on / off) / limit,
        "speedup_cached": on / ca, "cached_limit": on / text, "cached_share_of_limit": (on / ca) / (on / text),
    }
    for v in variants:  # per variant (eager, compiled): each mode against the same variant's online baselines
        base, base_store = step["online" + v], step["online store" + v]
        res["figures"]["variant" + v.replace(" ", "_")] = {
            "speedup_offline": base / step["offline" + v],
            "speedup_cached": base / step["cached" + v],
            "speedup_offline_store_vs_online_store": base_store / step["offline store" + v],
            "speedup_offline_store_vs_online": base / step["offline store" + v],
            "limit": base / step["pure student step" + v],
            "cached_limit": base / step["pure text step" + v],
        }
    res["figures"]["table_build_vs_bare_teacher"] = (res["table"]["regions_per_s"]
                                                     * pieces["teacher_image_fwd"] / args.batch)
    prompt_tokens = student._tokenize(names).input_ids.shape[1]
    m = real_models(prompt_tokens)
    flops = step_flops(m["teacher_image"].forward(), m["student_image"].forward(),
                       m["student_text"].forward_backward_frozen(), args.batch, num_classes)
    res["flop_limit"] = flops.limit
    print()
    print(md_table(["mode", "step ms (median)", "steps timed"],
                   [[k, f"{v * 1e3:.2f}", len(samples[k])] for k, v in step.items()]))
    print()
    print(md_table(["figure", "value"], [
        ["**speed-up, offline FDBPL vs online** (online / offline step)", f"**{on / off:.2f}x**"],
        ["limit (online / pure student step)", f"{limit:.2f}x"],
        ["offline speed-up as share of the limit", f"{(on / off) / limit:.1%}"],
        ["**speed-up, offline + feature cache vs online**", f"**{on / ca:.2f}x**"],
        ["cached limit (online / pure text step)", f"{on / text:.2f}x"],
        ["cached speed-up as share of its limit", f"{(on / ca) / (on / text):.1%}"],
        ["limit predicted by FLOPs (online / offline FLOPs)", f"{flops.limit:.2f}x"],
        ["bare teacher image fwd / batch", f"{pieces['teacher_image_fwd'] * 1e3:.2f} ms"],
        ["bare student image fwd / batch", f"{pieces['student_image_fwd'] * 1e3:.2f} ms"],
        ["bare text fwd+bwd, 2C prompts", f"{pieces['text_fwd_bwd_2C'] * 1e3:.2f} ms"],
        ["table build throughput / bare teacher throughput", f"{res['figures']['table_build_vs_bare_teacher']:.2f}"],
    ]), flush=True)
    rows = []
    for v in variants:
        f = res["figures"]["variant" + v.replace(" ", "_")]
        rows.append([v.strip() or "eager", f"{f['speedup_offline']:.2f}x", f"{f['speedup_cached']:.2f}x",
                     f"{f['speedup_offline_store_vs_online_store']:.2f}x",
                     f"{f['speedup_offline_store_vs_online']:.2f}x",
                     f"{f['limit']:.2f}x", f"{f['cached_limit']:.2f}x"])
    print()
    print(md_table(["variant", "offline vs online", "cached vs online", "offline store vs online store",
                    "offline store vs online", "limit", "cached limit"], rows), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("real", "small"), default="real",
                   help="real: ViT-L/14 teacher, ViT-B/32 student; small: tiny stand-ins (smoke test)")
    p.add_argument("--classes", type=int, nargs="+", default=[50, 500])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--regions", type=int, default=2, help="M of the benchmark tables")
    p.add_argument("--piece-reps", type=int, default=10, help="repetitions of each bare-cost measurement")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(12, cores - 2))")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="also run every mode compiled (Trainer: --torch_compile, which compiles the student, the "
                        "loss and the online teacher), e.g. --compile reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager checks the compiled path on CPU quickly)")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse --short HEAD)")
    p.add_argument("--quick", action="store_true", help="1 round, 4 timed steps, C=50 only")
    p.add_argument("--json", default="speed_real.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.classes = 1, 4, 1, args.classes[:1]
    if args.workers is None:
        args.workers = max(0, min(12, (os.cpu_count() or 2) - 2))
    if args.device == "cpu":
        args.bf16 = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _COMPILE_BACKEND[0] = args.compile_backend
    device = torch.device(args.device)
    started = now()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"args": {k: v for k, v in vars(args).items()}, "fdbpl_hf": fdbpl_hf.__version__,
              "commit": args.commit or git_commit(),
              "command": "python benchmarks/speed_real.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__,
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    print(f"# Speed on real-size models\n\nfdbpl_hf {fdbpl_hf.__version__} at {report['commit']}, "
          f"device {report['device_name']}, torch {torch.__version__}, "
          f"bf16 autocast {args.bf16}, {os.cpu_count()} CPUs, DataLoader workers {args.workers}, "
          f"torch.compile {args.compile or 'off'}", flush=True)
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    if args.size == "real":
        teacher_clip = random_clip("vit-l-14", seed=None, device=device, image_size=224)
        student_clip = random_clip("vit-b-32", seed=None, device=device, image_size=224)
    else:  # patch 32 keeps the 224 px smoke run cheap
        teacher_clip = random_clip("base", seed=None, device=device, patch=32, image_size=224)
        student_clip = random_clip("small", seed=None, device=device, patch=32, image_size=224)
    # compiled modes: FDBPLTrainer compiles the online teacher with the student's options (TeacherRunner);
    # the table build and the bare piece timings use the eager teacher
    workdir = tempfile.mkdtemp(prefix="fdbpl_speed_real_")
    try:
        for c in args.classes:
            try:
                run_config(args, c, teacher_clip, student_clip, tokenizer, device, workdir, report)
            except Exception as err:
                traceback.print_exc()
                report.setdefault("errors", {})[f"C={c}"] = repr(err)
            save_json(args.json, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_s"] = now() - started
    save_json(args.json, report)
    print(f"\ntotal {report['total_s']:.0f} s; figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

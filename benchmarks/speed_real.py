#!/usr/bin/env python
"""Speed claim on real-size models and one accelerator: ViT-L/14 teacher, ViT-B/32 student.

    python benchmarks/speed_real.py                        # eager, b32 C=50 and C=500 (about 2 minutes on an H200)
    python benchmarks/speed_real.py --variant compiled --train_arg torch_compile=true \\
        --train_arg torch_compile_mode=reduce-overhead --configs 32x50
    python benchmarks/speed_real.py --quick --device cpu --size small   # smoke run of the script itself

The whole GPU measurement (eager first, then the other variants, then the issue's goals as PASS/MISS
lines) is one device call: `benchmarks/gpu_measurement.sh` (docs/gpu-speed.md).

Random weights of the real architectures (`fdbpl_hf.testing.worlds.clip_config("vit-l-14")` and
`"vit-b-32"`: costs do not depend on the weights; nothing is downloaded). The source images are
smooth synthetic 500 x 375 JPEGs (ImageNet's typical size), decoded and cropped by the real replay.
For each configuration `BATCHxC` (batch size x class count) it:

1. builds an RIL table with the teacher, a student-feature cache and a device image store;
2. times the bare pieces of a step as the real step runs them: the teacher's `logits` (image tower
   and the prompt classifier, under the student's autocast), the student's image forward, and
   ONE text pass over the 2C prompts with its backward (`student(image_features=...)`, as
   `FDBPLCLIPModel.forward` encodes both contexts in one batch);
3. runs `FDBPLTrainer` (bf16 autocast on CUDA) in each mode on the same images and regions:
   **online** (the teacher scores every batch: PromptKD/KDPL), **offline** (FDBPL: soft labels from
   the table, 12 DataLoader workers), **cached** (the student-feature cache: no image tower; read in
   the training process) and **cached workers** (the same, read by the workers), and the device-
   store modes **online store** / **offline store** (images decoded once on the device, regions
   rendered in the step); plus two pure steps without Trainer or data (the floors of the pixel and
   cached modes). Each mode run gets a FRESH student (and teacher): a model that accelerate has
   prepared once comes back unchanged from a second `prepare`, so reusing one would, for example,
   never compile the student of a compiled run.

A variant is a name and training arguments (`--variant NAME --train_arg field=value ...`, any
`FDBPLTrainingArguments` field, applied to every Trainer run; `torch_compile` also compiles the pure
steps with the same mode). One process runs one variant; `benchmarks/speed_goals.py` reads the JSON
of every variant and compares each mode's best configuration against the online baseline's best.
With `--builds`, it first times a larger table build and feature-cache build against the bare
teacher and student at the builds' batch size (issue 20: >= 0.9).

A step is the time between consecutive `on_step_end` callbacks, each after a device sync. The JSON
(`--json`) is written after every mode run (a run stopped by a time limit keeps what it measured),
with the commit measured (`--commit`, else `FDBPL_COMMIT`, else git) and the command.
"""

from __future__ import annotations

import argparse
import copy
import gc
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

MODES = ("online", "offline", "cached", "cached workers", "online store", "offline store", "pure student step",
         "pure text step")
TEMPLATE = "a photo of a {}."


# ---------------------------------------------------------------------------------------------
# training arguments of a variant


def parse_train_args(pairs: list[str]) -> dict:
    """`["field=value", ...]` -> {field: typed value}, parsed as `HfArgumentParser` parses the
    command line of `FDBPLTrainingArguments` (so `torch_compile=true`, `lambda_pcd=0.5`, ...);
    an unknown field or a bad value raises before any model is built."""
    from transformers import HfArgumentParser

    names, flat = [], []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name:
            raise SystemExit(f"--train_arg takes field=value, got {pair!r}")
        names.append(name)
        flat += [f"--{name}", value]
    if not names:
        return {}
    try:
        parsed = HfArgumentParser(FDBPLTrainingArguments).parse_args_into_dataclasses(
            args=["--output_dir", tempfile.gettempdir(), *flat])[0]
    except (ValueError, SystemExit) as err:
        raise SystemExit(f"--train_arg {' '.join(pairs)}: not FDBPLTrainingArguments fields and values ({err})")
    return {name: getattr(parsed, name) for name in names}


def compile_mode_of(train_args: dict):
    """The torch.compile mode the pure steps use for a variant (None: eager): the Trainer's own."""
    if not train_args.get("torch_compile"):
        return None
    return train_args.get("torch_compile_mode") or "default"


# ---------------------------------------------------------------------------------------------
# timed runs


def trainer_steps(args, model, data, teacher, workdir: str, workers: int, compile_mode=None,
                  train_args: dict | None = None, info: dict | None = None) -> list[float]:
    """Seconds per `FDBPLTrainer` step (after `args.warmup` steps); `train_args` override the
    benchmark's training arguments (`compile_mode` is the older shortcut for torch_compile);
    `info` receives whether the Trainer's student was compiled."""
    from transformers.trainer_callback import PrinterCallback

    steps = args.warmup + args.steps
    on_device = getattr(data, "image_store", None) is not None
    kwargs = dict(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=args.batch, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.bf16,
        dataloader_num_workers=0 if on_device else workers,
        dataloader_pin_memory=args.device != "cpu" and not on_device, seed=0, logging_steps=500,
        dataloader_drop_last=True,  # fixed shapes: no recompilation or CUDA-graph re-capture for a last batch
    )
    if compile_mode is not None:
        kwargs.update(torch_compile=True, torch_compile_mode=None if compile_mode == "default" else compile_mode,
                      torch_compile_backend=getattr(args, "compile_backend", None))
    kwargs.update(train_args or {})
    timer = StepTimer(torch.device(args.device))
    trainer = FDBPLTrainer(model=model, args=FDBPLTrainingArguments(**kwargs), train_dataset=data, teacher=teacher,
                           callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    if info is not None:
        # what accelerate's is_compiled_module (not in accelerate 1.3, the floor) checks
        info["student_compiled"] = isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
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
    step_model = compiled(model, compile_mode, getattr(args, "compile_backend", None))
    loss_fn = compiled(fdbpl_loss, compile_mode, getattr(args, "compile_backend", None))
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


def compiled(fn, mode, backend=None):
    """`fn` itself, or (with a compile mode) `torch.compile(fn)`: a new wrapper per call, as every
    mode run has a fresh student."""
    if mode is None:
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode, backend=backend or "inductor")


def release_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device, reps: int) -> float:
    """Median device-synced seconds of `fn()` after min(3, reps) untimed calls."""
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


def piece_times(args, teacher: CLIPTeacher, student, batch: int, device) -> dict:
    """Bare per-batch costs, each as the real step runs it (`student` with its class names set)."""
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad(), autocast:
        # the online step's teacher call: image tower + prompt classifier, under the student's autocast
        teacher_s = timed(lambda: teacher.logits(pixels), device, args.piece_reps)
        image_s = timed(lambda: student.get_image_features(pixels), device, args.piece_reps)
        features = student.get_image_features(pixels)

    def text():  # ONE text pass over the 2C prompts (both contexts), as FDBPLCLIPModel.forward runs it
        with autocast:
            out = student(image_features=features)
        (out.pos_logits.float().sum() + out.neg_logits.float().sum()).backward()
        student.zero_grad(set_to_none=True)

    return {"teacher_logits": teacher_s, "student_image_fwd": image_s, "text_fwd_bwd_2C": timed(text, device,
                                                                                                   args.piece_reps)}


# ---------------------------------------------------------------------------------------------
# one configuration


class Models:
    """The pristine random-weight CLIPs; every mode run gets fresh copies."""

    def __init__(self, teacher_clip, student_clip, tokenizer):
        self.teacher_clip, self.student_clip, self.tokenizer = teacher_clip, student_clip, tokenizer

    def student(self, names=None):
        student = get_fdbpl_model(copy.deepcopy(self.student_clip),
                                  FDBPLConfig(base_model_name_or_path="vit-b-32-random"), self.tokenizer)
        if names is not None:  # the Trainer sets them itself; bare steps need them
            student.set_class_names(names)
        return student

    def teacher(self, names):
        return CLIPTeacher(copy.deepcopy(self.teacher_clip), self.tokenizer, names, TEMPLATE, name="vit-l-14-random")


def run_config(args, batch: int, num_classes: int, models: Models, device, workdir: str, report: dict) -> None:
    names = class_names(num_classes)
    res = report.setdefault("configs", {}).setdefault(f"b{batch} C={num_classes}", {})
    res.update(batch=batch, classes=num_classes)
    cfg = argparse.Namespace(**{**vars(args), "batch": batch,
                                "steps": args.steps if batch <= 64 else args.large_batch_steps,
                                "warmup": args.warmup if batch <= 64 else args.large_batch_warmup})
    res["steps_per_run"], res["warmup_per_run"] = cfg.steps, cfg.warmup
    print(f"\n## b{batch}, C = {num_classes} ({report['variant']})\n", flush=True)
    teacher = models.teacher(names)
    num_images = batch * (cfg.warmup + cfg.steps + 1)
    ds = synthetic_images(num_images, names, distinct=512)
    spec = RegionSpec(output_size=224)
    t0 = now()
    table = build_ril_table(ds, teacher, num_regions=args.regions, top_k=min(20, num_classes), region_spec=spec,
                            output_dir=os.path.join(workdir, f"table{batch}-{num_classes}"),
                            images_per_batch=max(1, 256 // args.regions), teacher_batch_size=256, device=str(device))
    res["table"] = {"images": num_images, "regions": len(table), "build_s": now() - t0}
    common = dict(image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224, class_names=names)
    offline = RILDataset(ds, table, **common)
    t0 = now()
    cache = build_feature_cache(offline, models.student(), epochs=1,
                                output_dir=os.path.join(workdir, f"cache{batch}-{num_classes}"), batch_size=256,
                                progress=False)
    res["feature_cache"] = {"regions": len(cache), "build_s": now() - t0}
    cached = RILDataset(ds, table, feature_cache=cache, **common)
    online = RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                               region_spec=spec, num_regions=args.regions, seed=0)
    t0 = now()
    store = DeviceImageStore.from_dataset(ds, device=device)
    sync(device)
    res["image_store"] = {"images": len(store), "bytes": store.nbytes, "build_s": now() - t0,
                          "bytes_per_image": store.nbytes / len(store)}
    print(f"setup: table {len(table)} regions in {res['table']['build_s']:.1f} s, feature cache "
          f"{res['feature_cache']['build_s']:.1f} s, image store {store.nbytes / 2**20:.0f} MiB in "
          f"{res['image_store']['build_s']:.1f} s", flush=True)
    offline_store = RILDataset(ds, table, **common).use_image_store(store)
    online_store = RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                                     region_spec=spec, num_regions=args.regions, seed=0).use_image_store(store)
    if args.pieces:
        pieces = piece_times(args, teacher, models.student(names), batch, device)
        res["pieces_ms"] = {k: v * 1e3 for k, v in pieces.items()}
        save_json(args.json, report)
    del teacher
    batches = [default_collate(offline.__getitems__(list(range(s * batch, (s + 1) * batch))))
               for s in range(min(4, num_images // batch))]
    cached_batches = [default_collate(cached.__getitems__(list(range(s * batch, (s + 1) * batch))))
                      for s in range(len(batches))]
    train_args = report["train_args"]
    mode = compile_mode_of(train_args)

    def trained(data, with_teacher: bool, workers: int):
        def run(run_dir):
            info = {}
            times = trainer_steps(cfg, models.student(), data, models.teacher(names) if with_teacher else None,
                                  run_dir, workers, train_args=train_args, info=info)
            # the check that 0.6 lacked: a reused student was never compiled by a second Trainer
            res.setdefault("student_compiled", {}).setdefault(run.mode, []).append(info["student_compiled"])
            return times
        return run

    runs = {
        "online": trained(online, True, args.workers),
        "offline": trained(offline, False, args.workers),
        "cached": trained(cached, False, 0),
        "cached workers": trained(cached, False, args.workers),
        "online store": trained(online_store, True, 0),
        "offline store": trained(offline_store, False, 0),
        "pure student step": lambda d: pure_steps(cfg, models.student(names), batches, num_classes, device, False,
                                                  mode),
        "pure text step": lambda d: pure_steps(cfg, models.student(names), cached_batches, num_classes, device, True,
                                               mode),
    }
    for name, run in runs.items():
        run.mode = name
    order = [m for m in args.modes if m in runs]
    samples = {k: [] for k in order}
    for r in range(args.rounds):
        # rotate the order each round: drifts of the machine hit every mode alike
        res["rounds_started"] = r + 1
        for name in order[r % len(order):] + order[: r % len(order)]:
            run_dir = os.path.join(workdir, f"run-{batch}-{num_classes}-{r}-{name.replace(' ', '-')}")
            t0 = now()
            try:
                samples[name].extend(runs[name](run_dir))
            except Exception as err:  # keep the other modes' figures
                traceback.print_exc()
                res.setdefault("errors", {})[name] = repr(err)
            shutil.rmtree(run_dir, ignore_errors=True)
            release_memory(device)  # the run's fresh models and Trainer (reference cycles) go now, not later
            res.setdefault("run_s", {}).setdefault(name, []).append(now() - t0)
            # figures after every mode run: a run stopped by a time limit keeps what it measured
            res["step_ms"] = {k: median(v) * 1e3 for k, v in samples.items() if v}
            res["steps_timed"] = {k: len(v) for k, v in samples.items() if v}
            save_json(args.json, report)
            if name in res["step_ms"]:
                print(f"  {name}: {res['step_ms'][name]:.2f} ms/step (run {now() - t0:.1f} s)", flush=True)
    step = res.get("step_ms", {})
    if "online" in step:
        res["ratios_vs_online"] = {k: step["online"] / v for k, v in step.items() if k != "online"}
    prompt_tokens = models.student()._tokenize(names).input_ids.shape[1]
    m = real_models(prompt_tokens)
    res["flop_limit"] = step_flops(m["teacher_image"].forward(), m["student_image"].forward(),
                                   m["student_text"].forward_backward_frozen(), batch, num_classes).limit
    save_json(args.json, report)
    rows = [[k, f"{v:.2f}", res["steps_timed"].get(k, 0),
             f"{res['ratios_vs_online'][k]:.2f}x" if k in res.get("ratios_vs_online", {}) else ""]
            for k, v in step.items()]
    print()
    print(md_table(["mode", "step ms (median)", "steps timed", "online / mode"], rows), flush=True)
    if "pieces_ms" in res:
        print()
        print(md_table(["bare piece (as the step runs it)", "ms per batch"],
                       [[k, f"{v:.2f}"] for k, v in res["pieces_ms"].items()]), flush=True)


# ---------------------------------------------------------------------------------------------
# builds against the bare models


def run_builds(args, models: Models, device, workdir: str, report: dict) -> None:
    """A table build and a feature-cache build against the bare model at the build's batch size.
    Each is built twice, over a quarter of the images and over all of them: the difference is the
    builds' throughput without their fixed costs (digests, fingerprints, saving, loading), which the
    whole calls include."""
    names = class_names(50)
    res = report.setdefault("builds", {})
    batch = args.build_batch
    teacher, student = models.teacher(names), models.student()
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():  # as the builds run them: no autocast, inference mode
        bare_teacher = timed(lambda: teacher.logits(pixels), device, args.piece_reps) / batch
        bare_student = timed(lambda: student.clip.get_image_features(pixel_values=pixels), device,
                             args.piece_reps) / batch
    del pixels
    sizes = {"quarter": max(1, args.build_images // 4), "all": args.build_images}
    timings = {}
    for label, count in sizes.items():
        ds = synthetic_images(count, names, seed=1 if label == "all" else 2, distinct=512)
        t0 = now()
        table = build_ril_table(ds, teacher, num_regions=args.build_regions, top_k=20, region_spec=RegionSpec(),
                                output_dir=os.path.join(workdir, f"build-table-{label}"), teacher_batch_size=batch,
                                images_per_batch=max(1, batch // args.build_regions), device=str(device))
        table_s = now() - t0
        data = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                          class_names=names)
        t0 = now()
        cache = build_feature_cache(data, student, epochs=args.build_regions, batch_size=batch,
                                    output_dir=os.path.join(workdir, f"build-cache-{label}"), progress=False)
        timings[label] = (len(table), table_s, len(cache), now() - t0)
    (r1, t1, c1, s1), (r2, t2, c2, s2) = timings["quarter"], timings["all"]

    def figures(regions, seconds, regions_small, seconds_small, bare_s):
        marginal = (regions - regions_small) / max(seconds - seconds_small, 1e-9)
        return {"regions": regions, "build_s": seconds, "regions_per_s": regions / seconds,
                "marginal_regions_per_s": marginal, "whole_call_vs_bare": regions / seconds * bare_s,
                "smaller_build": {"regions": regions_small, "build_s": seconds_small}}

    res["table"] = {**figures(r2, t2, r1, t1, bare_teacher), "bare_teacher_regions_per_s": 1 / bare_teacher,
                    "teacher_batch": batch, "images": args.build_images, "num_regions": args.build_regions}
    res["table"]["vs_bare_teacher"] = res["table"]["marginal_regions_per_s"] * bare_teacher
    res["feature_cache"] = {**figures(c2, s2, c1, s1, bare_student), "bare_student_regions_per_s": 1 / bare_student,
                            "batch": batch, "epochs": args.build_regions}
    res["feature_cache"]["vs_bare_student"] = res["feature_cache"]["marginal_regions_per_s"] * bare_student
    save_json(args.json, report)
    rows = []
    for name, key, bare in ((f"RIL table (teacher, M = {args.build_regions})", "table", bare_teacher),
                            (f"feature cache (student, {args.build_regions} epochs)", "feature_cache", bare_student)):
        f = res[key]
        rows.append([name, f["regions"], f"{f['build_s']:.1f}", f"{f['regions_per_s']:.0f}",
                     f"{f['marginal_regions_per_s']:.0f}", f"{1 / bare:.0f}", f"{f['whole_call_vs_bare']:.2f}",
                     f"**{f['marginal_regions_per_s'] * bare:.2f}**"])
    print(md_table(["build", "regions", "s", "regions/s (whole call)", "regions/s (marginal)", "bare model regions/s",
                    "whole call / bare", "**throughput / bare**"], rows), flush=True)


# ---------------------------------------------------------------------------------------------


def parse_configs(values: list[str]) -> list[tuple[int, int]]:
    out = []
    for v in values:
        b, sep, c = v.lower().partition("x")
        if not sep or not b.isdigit() or not c.isdigit():
            raise SystemExit(f"--configs takes BATCHxCLASSES, e.g. 32x50; got {v!r}")
        out.append((int(b), int(c)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("real", "small"), default="real",
                   help="real: ViT-L/14 teacher, ViT-B/32 student; small: tiny stand-ins (smoke test)")
    p.add_argument("--configs", nargs="+", default=None, metavar="BATCHxC",
                   help="configurations, e.g. 32x50 32x500 256x50 (default: --batch x --classes)")
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--classes", type=int, nargs="+", default=[50, 500])
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode run (batch <= 64)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--large-batch-steps", type=int, default=5, help="timed steps per mode run (batch > 64)")
    p.add_argument("--large-batch-warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE",
                   help=f"modes in the order of the first round (default all: {', '.join(MODES)})")
    p.add_argument("--regions", type=int, default=2, help="M of the training tables")
    p.add_argument("--piece-reps", type=int, default=10, help="repetitions of each bare-cost measurement")
    p.add_argument("--no-pieces", dest="pieces", action="store_false", help="skip the bare piece timings")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(12, cores - 2))")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--variant", default=None, help="name of this variant in the JSON (default eager, or compiled "
                                                   "with --compile)")
    p.add_argument("--train_arg", "--train-arg", dest="train_args", action="append", default=[],
                   metavar="FIELD=VALUE", help="an FDBPLTrainingArguments field for every Trainer run (repeatable), "
                                               "e.g. torch_compile=true")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="shortcut: --train_arg torch_compile=true [--train_arg torch_compile_mode=MODE]")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager checks the compiled path on CPU quickly)")
    p.add_argument("--builds", action="store_true", help="also time a table and a cache build against the bare "
                                                         "teacher and student")
    p.add_argument("--build-images", type=int, default=1024)
    p.add_argument("--build-regions", type=int, default=8, help="M of the build measurement (and cache epochs)")
    p.add_argument("--build-batch", type=int, default=256, help="teacher/student batch of the build measurement")
    p.add_argument("--commit", default=None, help="the commit measured (default: FDBPL_COMMIT, else git)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 timed steps, the first configuration only")
    p.add_argument("--json", default="speed_real.json")
    args = p.parse_args(argv)
    args.config_list = parse_configs(args.configs) if args.configs else [(b, c) for b in args.batch
                                                                         for c in args.classes]
    if args.compile is not None:
        args.train_args = ["torch_compile=true"] + ([f"torch_compile_mode={args.compile}"]
                                                    if args.compile != "default" else []) + args.train_args
        if args.compile_backend:
            args.train_args.append(f"torch_compile_backend={args.compile_backend}")
    args.variant = args.variant or ("compiled" if args.compile is not None else "eager")
    if args.quick:
        args.rounds, args.steps, args.warmup, args.config_list = 1, 2, 1, args.config_list[:1]
        args.large_batch_steps, args.large_batch_warmup, args.piece_reps = 2, 1, 2
        args.build_images, args.build_regions, args.build_batch = 16, 2, 8
    if args.workers is None:
        args.workers = max(0, min(12, (os.cpu_count() or 2) - 2))
    if args.device == "cpu":
        args.bf16 = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    train_args = parse_train_args(args.train_args)  # before any model: a typo fails at once
    if args.compile_backend and "torch_compile_backend" not in train_args and train_args.get("torch_compile"):
        train_args["torch_compile_backend"] = args.compile_backend
    device = torch.device(args.device)
    started = now()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"variant": args.variant, "train_args": train_args,
              "args": {k: v for k, v in vars(args).items() if k != "config_list"},
              "configs_requested": [f"b{b} C={c}" for b, c in args.config_list],
              "fdbpl_hf": fdbpl_hf.__version__,
              "commit": args.commit or os.environ.get("FDBPL_COMMIT") or git_commit(),
              "command": "python benchmarks/speed_real.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    save_json(args.json, report)
    print(f"# Speed on real-size models: variant {args.variant}\n\nfdbpl_hf {fdbpl_hf.__version__} at "
          f"{report['commit']}, device {report['device_name']}, torch {torch.__version__}, bf16 autocast "
          f"{args.bf16}, {os.cpu_count()} CPUs, DataLoader workers {args.workers}, training arguments "
          f"{train_args or '(defaults)'}", flush=True)
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    if args.size == "real":
        teacher_clip = random_clip("vit-l-14", seed=None, device=device, image_size=224)
        student_clip = random_clip("vit-b-32", seed=None, device=device, image_size=224)
    else:  # patch 32 keeps the 224 px smoke run cheap
        teacher_clip = random_clip("base", seed=None, device=device, patch=32, image_size=224)
        student_clip = random_clip("small", seed=None, device=device, patch=32, image_size=224)
    models = Models(teacher_clip, student_clip, tokenizer)
    workdir = tempfile.mkdtemp(prefix="fdbpl_speed_real_")
    try:
        if args.builds:  # first: short, and one of the goals
            print("\n## Builds against the bare models\n", flush=True)
            try:
                run_builds(args, models, device, workdir, report)
            except Exception as err:
                traceback.print_exc()
                report.setdefault("errors", {})["builds"] = repr(err)
        for batch, classes in args.config_list:
            try:
                run_config(args, batch, classes, models, device, workdir, report)
            except Exception as err:
                traceback.print_exc()
                report.setdefault("errors", {})[f"b{batch} C={classes}"] = repr(err)
            save_json(args.json, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_s"] = now() - started
    save_json(args.json, report)
    print(f"\ntotal {report['total_s']:.0f} s; figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training-step times of the three FDBPL modes on one GPU, eager first, then the captured step.

    python benchmarks/step_gpu.py --json benchmarks/results/step_gpu_b32_c50.json     # CUDA (issue 20)
    python benchmarks/step_gpu.py --device cpu --size small --steps 3 --warmup 4      # smoke run

Real-size random-weight models (ViT-L/14 teacher, ViT-B/32 student: `fdbpl_hf.testing.worlds`
configs; nothing is downloaded), synthetic 500 x 375 JPEGs, bf16 on CUDA, `FDBPLTrainer` in each
mode with a fresh student per run (a copy of one random CLIP, so the feature cache belongs to it):

- **online** (the live teacher scores each batch: the PromptKD/KDPL baseline, with every
  optimisation the offline modes get), **offline** (soft labels from an RIL table, M = 1) and
  **cached** (the table plus a student-feature cache: no images, no image tower);
- variants, in this order, so that a run stopped by its time limit keeps the eager figures:
  `standard` (the Trainer's own step), `fused` (`--train_step fused`), `cuda_graph` (the fused
  step captured once as a CUDA graph), then `cuda_graph_compiled` (the same with `--torch_compile`:
  inductor compiles the step's forward and loss; compilation takes minutes, hence last).

A step time is the wall time of `--steps` consecutive steps, between two device syncs, divided by
`--steps` (the host is not made to wait for the device in between, as in a real run), after
`--warmup` steps (the captured variant captures during its warm-up). The JSON is rewritten after
every run, with the commit measured and the command. This is issue 20's minimal measurement; the
full benchmark is `benchmarks/speed_real.py`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import class_names, git_commit, md_table, now, random_clip, save_json, sync, synthetic_images  # noqa: E402
import fdbpl_hf  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from fdbpl_hf import (  # noqa: E402
    CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table, get_fdbpl_model,
)
from fdbpl_hf.testing.worlds import clip_tokenizer  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments  # noqa: E402

VARIANTS = {  # name: (train_step, torch_compile)
    "standard": ("standard", False),
    "fused": ("fused", False),
    "cuda_graph": ("cuda_graph", False),
    "cuda_graph_compiled": ("cuda_graph", True),
}


class WindowTimer(TrainerCallback):
    """Device-synced wall time at the end of step `start` and of step `start + count`."""

    def __init__(self, device: torch.device, start: int, count: int):
        self.device, self.start, self.count = device, start, count
        self.t0 = self.t1 = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            sync(self.device)
            self.t0 = now()
        elif state.global_step == self.start + self.count:
            sync(self.device)
            self.t1 = now()

    def step_ms(self) -> float:
        return (self.t1 - self.t0) / self.count * 1e3


def timed_run(args, base_clip, tokenizer, data, teacher, variant: str, workdir: str, device) -> float:
    from transformers.trainer_callback import PrinterCallback

    train_step, compile_ = VARIANTS[variant]
    student = get_fdbpl_model(copy.deepcopy(base_clip), FDBPLConfig(base_model_name_or_path="vit-b-32-random"),
                              tokenizer)
    pixels = data.feature_cache is None and data.image_store is None
    targs = FDBPLTrainingArguments(
        output_dir=workdir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", dataloader_num_workers=args.workers if pixels else 0, seed=0,
        logging_steps=10_000, dataloader_drop_last=True, train_step=train_step, torch_compile=compile_)
    timer = WindowTimer(device, args.warmup, args.steps)
    trainer = FDBPLTrainer(model=student, args=targs, train_dataset=data, teacher=teacher, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.step_ms()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("real", "small"), default="real",
                   help="real: ViT-L/14 teacher, ViT-B/32 student; small: tiny stand-ins (smoke run)")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=8, help="steps before the timed window (the capture happens here)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the pixel modes")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--commit", default=None, help="the commit measured (default: git)")
    p.add_argument("--json", default="step_gpu.json")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = max(0, min(12, (os.cpu_count() or 2) - 2))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = now()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"fdbpl_hf": fdbpl_hf.__version__, "commit": args.commit or git_commit(),
              "command": "python benchmarks/step_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "step_ms": {}, "errors": {}}
    print(f"# Step times, batch {args.batch}, C = {args.classes}: fdbpl_hf {fdbpl_hf.__version__} at "
          f"{report['commit']}, {report['device_name']}, torch {torch.__version__}", flush=True)
    tokenizer = clip_tokenizer()
    names = class_names(args.classes)
    if args.size == "real":
        teacher_clip = random_clip("vit-l-14", seed=1, device=device, image_size=224)
        student_clip = random_clip("vit-b-32", seed=2, device=device, image_size=224)
    else:
        teacher_clip = random_clip("base", seed=1, device=device, patch=32, image_size=224)
        student_clip = random_clip("small", seed=2, device=device, patch=32, image_size=224)
    teacher = CLIPTeacher(teacher_clip, tokenizer, names, "a photo of a {}.", name="vit-l-14-random")
    workdir = tempfile.mkdtemp(prefix="fdbpl_step_gpu_")
    try:
        ds = synthetic_images(args.batch * (args.warmup + args.steps + 1), names)
        spec = RegionSpec(output_size=224)
        t0 = now()
        table = build_ril_table(ds, teacher, num_regions=1, top_k=min(20, args.classes), region_spec=spec,
                                output_dir=os.path.join(workdir, "table"), images_per_batch=32,
                                teacher_batch_size=256, device=str(device))
        report["table_build_s"] = now() - t0
        offline = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                             class_names=names)
        reference = get_fdbpl_model(student_clip, FDBPLConfig(base_model_name_or_path="vit-b-32-random"), tokenizer)
        cache = build_feature_cache(offline, reference, epochs=1, output_dir=os.path.join(workdir, "cache"),
                                    batch_size=256, num_workers=args.workers, progress=False)
        cached = RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=224,
                            class_names=names, feature_cache=cache)
        online = RILDataset.online(ds, class_names=names, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                                   region_spec=spec, num_regions=1, seed=0)
        report["setup_s"] = now() - started
        print(f"setup (models, table, cache) {report['setup_s']:.1f} s", flush=True)
        modes = {"online": (online, teacher), "offline": (offline, None), "cached": (cached, None)}
        for variant in args.variants:
            for mode, (data, mode_teacher) in modes.items():
                key = f"{mode} / {variant}"
                t0 = now()
                try:
                    report["step_ms"][key] = timed_run(args, student_clip, tokenizer, data, mode_teacher, variant,
                                                       os.path.join(workdir, "run"), device)
                    print(f"{key}: {report['step_ms'][key]:.2f} ms per step ({now() - t0:.0f} s)", flush=True)
                except Exception as err:  # keep the other runs' figures
                    traceback.print_exc()
                    report["errors"][key] = repr(err)
                shutil.rmtree(os.path.join(workdir, "run"), ignore_errors=True)
                save_json(args.json, report)
            steps = report["step_ms"]
            if all(f"{m} / {variant}" in steps for m in modes):
                base = steps[f"online / {variant}"]
                report.setdefault("speedup_vs_online", {})[variant] = {
                    m: base / steps[f"{m} / {variant}"] for m in ("offline", "cached")}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best_online = min((v for k, v in report["step_ms"].items() if k.startswith("online")), default=None)
    if best_online:
        report["speedup_best_vs_best_online"] = {
            m: best_online / min(v for k, v in report["step_ms"].items() if k.startswith(m))
            for m in ("offline", "cached") if any(k.startswith(m) for k in report["step_ms"])}
    report["total_s"] = now() - started
    save_json(args.json, report)
    print()
    print(md_table(["mode / variant", "ms per step"], [[k, f"{v:.2f}"] for k, v in report["step_ms"].items()]))
    print(f"\nspeed-ups (best of each mode vs best online): {report.get('speedup_best_vs_best_online')}")
    print(f"total {report['total_s']:.0f} s; figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

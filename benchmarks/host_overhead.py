#!/usr/bin/env python
"""Host time the Trainer adds to a training step, on models where compute is negligible.

    python benchmarks/host_overhead.py            # about 1 minute on 1 CPU core
    python benchmarks/host_overhead.py --classes 500

Why: on an H200 at the paper's batch size (32), the real ViT-B/32 student's step is bound by the
host (Python, op dispatch, kernel launches), not by the GPU: `benchmarks/speed_real.py` measured
the text tower's forward and backward at 30-60 ms whatever the class count, and the Trainer's
offline step about 11 ms slower than a bare step. Every millisecond of host work per step is then
a millisecond of step time, and it narrows the speed-up of offline over online distillation.

This script keeps the real depths (student text tower 12 layers, image tower 12; the structure
and the number of modules and parameters of ViT-B/32 CLIP) at width 16 and 32 px images, so that
the arithmetic is negligible and what is timed is host work. It compares, in interleaved rounds:

- **trainer step**: `FDBPLTrainer` on a student-feature cache (`dataloader_num_workers=0`,
  so the table and cache reads are in the step), median time between `on_step_end` callbacks;
- **bare step**: the same forward, FDBPL loss, backward and SGD step on prepared batches;

and prints their difference (the Trainer's and the data path's host overhead per step), the
costs of the per-step calls the Trainer makes on the model (`train()`, `zero_grad()`, gradient
clipping) and the number of operators dispatched per step. Timings are single-thread CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (  # noqa: E402
    class_names, git_commit, md_table, median, median_ms, scaled_clip_config, synthetic_images,
)
import speed_real  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from transformers import CLIPModel  # noqa: E402
from fdbpl_hf import (  # noqa: E402
    CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table, get_fdbpl_model,
)
from fdbpl_hf.testing.worlds import clip_tokenizer  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments  # noqa: E402
from fdbpl_hf.version import __version__  # noqa: E402


def narrow_clip(text_layers: int, vision_layers: int) -> CLIPModel:
    """Real depth, width 16, 32 px images in 4 patches: structure without arithmetic."""
    config = scaled_clip_config(16, text_layers, 16, vision_layers, patch=16, image_size=32, proj=16, heads=2)
    return CLIPModel(config).eval()


def dispatched_ops(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = class_names(args.classes)
    tokenizer = clip_tokenizer()
    student = get_fdbpl_model(narrow_clip(12, 12), FDBPLConfig(base_model_name_or_path="narrow-b-32"), tokenizer)
    teacher = CLIPTeacher(narrow_clip(12, 24), tokenizer, names, "a photo of a {}.", name="narrow-l-14")
    workdir = tempfile.mkdtemp(prefix="fdbpl_overhead_")
    # speed_real's step helpers read these fields
    run = argparse.Namespace(batch=args.batch, warmup=3, steps=args.steps, bf16=False, device="cpu", compile=None)
    images = synthetic_images(args.batch * (run.warmup + run.steps + 1), names)
    table = build_ril_table(images, teacher, num_regions=1, top_k=min(20, args.classes),
                            region_spec=RegionSpec(output_size=32), output_dir=os.path.join(workdir, "table"))
    pixels = RILDataset(images, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=32,
                        class_names=names)
    cache = build_feature_cache(pixels, student, epochs=1, output_dir=os.path.join(workdir, "cache"), progress=False)
    cached = RILDataset(images, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_size=32,
                        class_names=names, feature_cache=cache)
    batches = [default_collate(cached.__getitems__(list(range(s * args.batch, (s + 1) * args.batch))))
               for s in range(4)]
    device = torch.device("cpu")

    samples: dict[str, list[float]] = {"trainer step": [], "bare step": []}
    for r in range(args.rounds):
        samples["trainer step"] += speed_real.trainer_steps(run, student, cached, None,
                                                            os.path.join(workdir, f"run{r}"), 0)
        samples["bare step"] += speed_real.pure_steps(run, student, batches, args.classes, device, True)
    step = {k: median(v) * 1e3 for k, v in samples.items()}

    # The calls the Trainer makes on the model at every step, timed alone.
    targs = FDBPLTrainingArguments(output_dir=os.path.join(workdir, "calls"), use_cpu=True, report_to="none",
                                   save_strategy="no", max_steps=1)
    trainer = FDBPLTrainer(model=student, args=targs, train_dataset=cached)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    out = student(image_features=batches[0]["image_features"])
    (out.pos_logits.sum() + out.neg_logits.sum()).backward()
    calls = {
        "model.train()": median_ms(student.train),
        "model.zero_grad() (no gradients)": median_ms(student.zero_grad),
        "gradient clipping": median_ms(lambda: trainer._clip_grad_norm(student)),
        "table + cache read and collate, one batch": median_ms(
            lambda: default_collate(cached.__getitems__(list(range(args.batch)))), reps=20),
    }

    def one_bare_step():
        speed_real.pure_steps(argparse.Namespace(**{**vars(run), "warmup": 0, "steps": 0}), student, batches[:1],
                              args.classes, device, True)

    ops = dispatched_ops(one_bare_step)
    modules = sum(1 for _ in student.modules())
    params = sum(1 for _ in student.parameters())
    print(f"# Host overhead per training step (fdbpl_hf {__version__} at {git_commit()}, "
          f"torch {torch.__version__}, 1 thread)\n")
    print(f"student: ViT-B/32 structure at width 16 ({modules} modules, {params} parameter tensors), "
          f"C = {args.classes} classes, batch {args.batch}, {ops} aten ops dispatched per bare step\n")
    print(md_table(["step", "median ms", "steps timed"],
                   [[k, f"{v:.2f}", len(samples[k])] for k, v in step.items()]))
    print()
    print(md_table(["figure", "value"], [
        ["**host time the Trainer and data path add per step**",
         f"**{step['trainer step'] - step['bare step']:.2f} ms**"],
        *[[f"{k} per step", f"{v:.3f} ms"] for k, v in calls.items()],
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

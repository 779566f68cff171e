#!/usr/bin/env python
"""Host time the Trainer adds to a training step, on models where compute is negligible.

    python benchmarks/host_overhead.py            # about 1 minute on 1 CPU core
    python benchmarks/host_overhead.py --classes 500
    python benchmarks/host_overhead.py --device-ops [--json ops.json]   # device ops per step, real ViT-B/32

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

`--device-ops` counts instead the device operations (what a GPU would launch as kernels) of one
training step of the real ViT-B/32 student (random weights, real-size config) at C = 50 classes,
batch 32, eager, with `torch.profiler` on the CPU: every aten op the profiler records that is a
kernel of its own, i.e. not a view, metadata query or bare allocation, not a composite that only
calls other ops (`aten::linear`, `aten::to`, `aten::layer_norm`: their `addmm`, `_to_copy`,
`native_layer_norm` count), and not called from inside another such kernel op (the `copy_` of a
`_to_copy`, the host-side wrapping of a Python scalar a `mul` takes). Autocast's casts count, one
per cast. Rows: the pure offline step (image tower, text
forward and backward, loss, SGD: the count of issue 20) in float32 and in bf16, then the fused
step (`fdbpl_hf.step`) offline and with a feature cache. It runs on older checkouts too (rows
they cannot run are skipped), which is how the "before" figure is measured.
"""

from __future__ import annotations

import argparse
import functools
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


# aten ops that launch no kernel on their own: views, metadata, bare allocations (their children count)
NO_KERNEL = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "expand_as", "unsqueeze", "squeeze", "select",
    "slice", "reshape", "_reshape_alias", "detach", "detach_", "alias", "permute", "split", "split_with_sizes",
    "chunk", "unbind", "narrow", "diagonal", "view_as", "flatten", "unflatten", "empty", "empty_strided",
    "empty_like", "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg", "lift_fresh", "to", "contiguous",
    "type_as", "result_type", "size", "stride", "numel", "set_", "requires_grad_", "_has_compatible_shallow_copy_type",
    "is_same_size", "matrix_H", "mT", "numpy_T", "_nested_tensor_from_mask_left_aligned", "retain_grad",
    "_to_copy_noop"))


@functools.lru_cache(maxsize=None)
def composite(name: str) -> bool:
    """Whether an aten op is CompositeImplicitAutograd in all its (non-out) overloads: it launches
    nothing itself, the ops it decomposes into do (`aten::linear`, `aten::to`, `aten::layer_norm`)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    found = []
    for overload in packet.overloads() if packet is not None else ():
        if overload == "out" or "out" in overload.split("_"):
            continue
        try:
            found.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                name if overload == "default" else f"{name}.{overload}", "CompositeImplicitAutograd"))
        except RuntimeError:  # TorchScript-only overloads
            continue
    return bool(found) and all(found)


def device_ops(fn) -> tuple[int, dict]:
    """(device ops of `fn()`, counts per op name): see the module doc for what counts."""
    import collections

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def kernel(name: str) -> bool:
        return name.startswith("aten::") and name not in NO_KERNEL and not composite(name)

    def launches(event) -> bool:
        if not kernel(event.name):
            return False
        # inside another kernel op (the copy_ of a _to_copy, the fill_ of a zeros, the host-side
        # wrapping of a Python scalar that a mul takes): part of that launch
        parent = event.cpu_parent
        while parent is not None:
            if kernel(parent.name):
                return False
            parent = parent.cpu_parent
        return True

    counted = [e.name for e in prof.events() if launches(e)]
    return len(counted), dict(collections.Counter(counted).most_common())


def device_op_counts(classes: int, batch: int) -> dict:
    """Device ops of one training step of the real ViT-B/32 student (see the module doc)."""
    import contextlib

    from common import random_clip
    from fdbpl_hf import dense_teacher_logits
    from fdbpl_hf.losses import fdbpl_loss

    try:  # 0.7: the frozen towers cast once, and the fused step
        from fdbpl_hf.precision import frozen_weights_in
        from fdbpl_hf.step import FusedStep, FusedStepSGD
    except ImportError:
        frozen_weights_in = FusedStep = FusedStepSGD = None
    torch.manual_seed(0)
    names = class_names(classes)
    student = get_fdbpl_model(random_clip("vit-b-32", seed=0), FDBPLConfig(base_model_name_or_path="vit-b-32"),
                              clip_tokenizer())
    student.set_class_names(names)
    k = min(20, classes)
    batch_data = {"pixel_values": torch.randn(batch, 3, 224, 224),
                  "image_features": torch.randn(batch, student.clip.config.projection_dim),
                  "topk_indices": torch.stack([torch.randperm(classes)[:k] for _ in range(batch)]),
                  "topk_logits": torch.randn(batch, k).sort(dim=-1, descending=True).values,
                  "teacher_entropy": torch.rand(batch) * 3}
    params = [p for p in student.parameters() if p.requires_grad]
    results = {}

    def precision(bf16: bool):
        stack = contextlib.ExitStack()
        if bf16 and frozen_weights_in is not None:  # what FDBPLTrainer does under --bf16
            stack.enter_context(frozen_weights_in(student.frozen_towers(), torch.bfloat16))
        return stack

    for bf16 in (False, True):
        optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

        def pure_step():
            with autocast:
                out = student(pixel_values=batch_data["pixel_values"])
            teacher = dense_teacher_logits(batch_data["topk_indices"], batch_data["topk_logits"], classes)
            losses = fdbpl_loss(out.pos_logits, out.neg_logits, teacher, out.image_features, out.pos_text_features,
                                out.neg_text_features, teacher_entropy=batch_data["teacher_entropy"])
            losses["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with precision(bf16):
            pure_step()  # prepares what is made once (prompts, embeddings, momentum buffers)
            results[f"pure offline step, {'bf16' if bf16 else 'float32'}"] = device_ops(pure_step)
    if FusedStep is None:
        return results
    for bf16 in (False, True):
        for mode in ("offline", "cached"):
            optimizer = FusedStepSGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
            inputs = {key: value for key, value in batch_data.items()
                      if key != ("pixel_values" if mode == "cached" else "image_features")}
            step = FusedStep(student, optimizer, loss_kwargs={},
                             teacher_logits=lambda b, _: dense_teacher_logits(b["topk_indices"], b["topk_logits"],
                                                                              classes),
                             teacher_entropy=lambda b: b.get("teacher_entropy"),
                             autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
            with precision(bf16):
                step(inputs)
                results[f"fused {mode} step, {'bf16' if bf16 else 'float32'}"] = device_ops(lambda: step(inputs))
    # the towers' share of the bf16 step: what no loss or update can go below
    from fdbpl_hf.prompt_encoding import encode_prepared, prepare_text

    contexts = torch.stack([p.detach() for p in params]).requires_grad_(True)

    def text_tower():
        text = encode_prepared(student.clip, prepared, contexts)
        torch.autograd.grad(text, [contexts], grad_outputs=torch.ones_like(text))

    with precision(True):
        prepared = prepare_text(student.clip, student.class_prompts(), 2, contexts.shape[1])  # bf16 embeddings
        student.get_image_features(batch_data["pixel_values"])
        text_tower()
        results["image tower forward (of the offline step), bf16"] = device_ops(
            lambda: student.get_image_features(batch_data["pixel_values"]))
        results["text tower forward + backward (2C prompts), bf16"] = device_ops(text_tower)
    return results


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
    p.add_argument("--device-ops", action="store_true",
                   help="count the device ops of one training step of the real ViT-B/32 student instead")
    p.add_argument("--json", default=None, help="with --device-ops: also write the counts here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.device_ops:
        counts = device_op_counts(args.classes, args.batch)
        print(f"# Device ops per training step (fdbpl_hf {__version__} at {git_commit()}, torch {torch.__version__})\n")
        print(f"real ViT-B/32 structure (random weights), C = {args.classes}, batch {args.batch}, eager, "
              "torch.profiler on CPU\n")
        print(md_table(["step", "device ops", "most frequent"],
                       [[name, n, ", ".join(f"{op.removeprefix('aten::')} {c}" for op, c in list(ops.items())[:6])]
                        for name, (n, ops) in counts.items()]))
        if args.json:
            from common import save_json

            save_json(args.json, {"commit": git_commit(), "fdbpl_hf": __version__, "torch": torch.__version__,
                                  "classes": args.classes, "batch": args.batch,
                                  "command": "python benchmarks/host_overhead.py " + " ".join(
                                      sys.argv[1:] if argv is None else argv),
                                  "device_ops": {k: {"total": n, "ops": ops} for k, (n, ops) in counts.items()}})
        return 0
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

#!/usr/bin/env python
"""Contexts trained by this checkout against those another checkout trains, on the same data.

    python benchmarks/contexts_vs_checkout.py --out new.pt --steps standard fused
    PYTHONPATH=/path/to/other/checkout python /path/to/this/benchmarks/contexts_vs_checkout.py --out old.pt
    python benchmarks/contexts_vs_checkout.py --compare old.pt new.pt

Trains tiny random CLIP students (seed 2, tiny teacher seed 1) on 30 real MNIST digits for 3 epochs
of batch 8 (9 SGD steps at lr 0.05, momentum 0.9), in the four modes: offline table, feature cache,
online teacher, device-resident replay; `--steps` names the `train_step` values to run (a checkout
before 0.7 knows only "standard"). Issue 20 used it to compare 0.7's prepared prompts, fused loss and
fused step with 0.6.0 (benchmarks/README.md). The fdbpl_hf imported is whichever comes first on
`PYTHONPATH` (this script does not put its own checkout there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

MODES = ("offline", "cached", "online", "device replay")


def train_all(steps: list[str]) -> dict:
    from transformers import CLIPModel

    from fdbpl_hf import (CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table,
                          get_fdbpl_model)
    from fdbpl_hf.ril.device_replay import DeviceImageStore
    from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
    from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
    from fdbpl_hf.testing.worlds import DIGIT_NAMES, clip_config, clip_tokenizer, load_digits
    from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments

    def clip(seed: int):
        torch.manual_seed(seed)
        return CLIPModel(clip_config("tiny")).eval()

    tokenizer, digits, tmp = clip_tokenizer(), load_digits(num_per_class=3), tempfile.mkdtemp()
    teacher_clip = clip(1)
    table = build_ril_table(digits, teacher_clip, teacher_tokenizer=tokenizer, num_regions=5, top_k=4,
                            output_dir=tmp + "/table")
    out = {}
    for mode in MODES:
        teacher = None
        if mode == "online":
            data = RILDataset.online(digits, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                                     region_spec=RegionSpec(output_size=32), num_regions=5, seed=0)
            teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)
        else:
            data = RILDataset(digits, table, image_mean=MEAN, image_std=STD)
        if mode == "device replay":
            data.use_image_store(DeviceImageStore.from_dataset(digits))
        if mode == "cached":
            cache = build_feature_cache(data, get_fdbpl_model(clip(2), FDBPLConfig(), tokenizer), epochs=3,
                                        dtype="float32", output_dir=tmp + "/cache", progress=False)
            data = RILDataset(digits, table, image_mean=MEAN, image_std=STD, feature_cache=cache)
        for step in steps:
            model = get_fdbpl_model(clip(2), FDBPLConfig(), tokenizer)
            args = FDBPLTrainingArguments(
                output_dir=tmp + "/run", num_train_epochs=3, per_device_train_batch_size=8, logging_steps=100,
                save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=3, warmup_epochs=0.5,
                learning_rate=0.05, dataloader_drop_last=True, **({} if step == "standard" else {"train_step": step}))
            FDBPLTrainer(model=model, args=args, train_dataset=data, teacher=teacher).train()
            out[f"{mode} / {step}"] = model.prompts.contexts().detach()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="train and save the contexts here")
    p.add_argument("--steps", nargs="+", default=["standard"])
    p.add_argument("--compare", nargs=2, metavar=("REFERENCE", "OTHER"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.out:
        import fdbpl_hf

        torch.save({"fdbpl_hf": fdbpl_hf.__version__, "path": fdbpl_hf.__file__, "contexts": train_all(args.steps)},
                   args.out)
        print(f"fdbpl_hf {fdbpl_hf.__version__} from {fdbpl_hf.__file__}: contexts in {args.out}")
    if args.compare:
        ref, other = (torch.load(path) for path in args.compare)
        print(f"reference: fdbpl_hf {ref['fdbpl_hf']} from {ref['path']}; "
              f"other: {other['fdbpl_hf']} from {other['path']}\n")
        print("| run (other) | max abs difference from the reference's standard run | max abs context |")
        print("|---|---|---|")
        for key, contexts in other["contexts"].items():
            base = ref["contexts"][key.split(" / ")[0] + " / standard"]
            print(f"| {key} | {(contexts - base).abs().max().item():.3g} | {base.abs().max().item():.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

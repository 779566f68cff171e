#!/usr/bin/env python
"""Composed tables (issue 23): how far the mixture of per-teacher tables is from the joint
`EnsembleTeacher` build, and what composing costs per training batch.

    python benchmarks/compose.py                       # both parts (a few minutes on 2 CPU cores)
    python benchmarks/compose.py --part approximation  # numbers world only (needs the numbers zoo)
    python benchmarks/compose.py --part cost           # replay cost only
    python benchmarks/compose.py --quick               # smoke run

(a) approximation, on the numbers world (fdbpl_hf.testing.worlds; the ablations' 100-class world,
    its 50 base classes, 8 shots, seed 1, M = 10 regions of area 0.08-1, no flips): the zoo teacher
    and the weaker zoo model each get a table at K = C = 50, built separately over the same regions,
    and the joint `EnsembleTeacher` of both gets one per weighting (fixed, max_prob, entropy). Tables
    at K < C are the first K columns of those (exactly what a build at K stores: the columns are the
    sorted top-K). Against the reference, the joint table at K = C (the exact mixture, up to fp16):
    the composed mixture at each K, and the joint table at the same K (what training reads from
    it), by KL(reference || rebuilt), top-1 agreement, and the error of the information weight
    1 - H/log C for three entropies of the composed mixture: the weighted stored entropies alone
    (a lower bound), plus the mixture's divergence term from the rebuilds (what fdbpl_hf uses), and
    the entropy of the rebuilt mixture itself (what a top-K rebuild gives). For comparison, the
    mixture of another rebuild that fdbpl_hf does not use ("mass-kept": each table's stored top-K
    probabilities as they are, the rest of its mass spread evenly over the other classes).
(b) cost: CPU time of one batch of 32 items (`RILDataset.__getitems__` + default collation, as the DataLoader
    calls it) from one table, two and three composed tables, with pixels (500 x 375 JPEGs decoded
    and cropped) and with a student-feature cache (no image read), at C = 50 and C = 1000, K = 20;
    and the mixing alone (rebuilds + `mix_soft_labels`).

Figures are printed (markdown) and written as JSON to --out; nothing is asserted on them.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (class_names, cpu_now, git_commit, machine_facts, md_table, median, save_json,  # noqa: E402
                    scaled_clip_config, section, synthetic_images, time_calls, torch_threads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from fdbpl_hf import (CallableTeacher, CLIPTeacher, EnsembleTeacher, FDBPLConfig, RegionSpec, RILDataset,  # noqa: E402
                      build_feature_cache, build_ril_table, dense_teacher_logits, get_fdbpl_model)
from fdbpl_hf.ril.compose import fixed_weights, mix_soft_labels  # noqa: E402

WEIGHTINGS = ("fixed", "max_prob", "entropy")


# ---------------------------------------------------------------------------------------------
# (a) approximation on the numbers world

def _columns(table, k: int) -> dict[str, torch.Tensor]:
    rows = table.with_format("numpy")[:]
    return {"idx": torch.from_numpy(rows["topk_indices"][:, :k].astype(np.int64)),
            "val": torch.from_numpy(rows["topk_logits"][:, :k].astype(np.float32)),
            "entropy": torch.from_numpy(rows["teacher_entropy"].astype(np.float32))}


def _rebuild(cols: dict, num_classes: int) -> torch.Tensor:
    return torch.log_softmax(dense_teacher_logits(cols["idx"], cols["val"], num_classes), dim=-1)


def _mass_kept(cols: dict, num_classes: int) -> torch.Tensor:
    """A rebuild that keeps the stored top-K probabilities as they are and spreads the rest of the mass
    evenly over the other classes (not what fdbpl_hf does: measured for comparison)."""
    kept = cols["val"].exp()
    k = kept.shape[1]
    rest = (1 - kept.sum(-1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
    p = rest.expand(-1, num_classes).clone().scatter_(1, cols["idx"], kept)
    return (p / p.sum(-1, keepdim=True)).clamp_min(1e-30).log()


def _kl(ref: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = ref.exp()
    return torch.where(p > 0, p * (ref - log_q), torch.zeros_like(p)).sum(-1)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


def approximation(args, out: dict) -> None:
    from fdbpl_hf.data import get_dataset_info, training_set
    from fdbpl_hf.testing.zoo import build_zoo
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    section("(a) composed tables vs the joint EnsembleTeacher build, numbers world")
    paths = {"teacher": args.teacher, "student": args.student}
    if not (args.teacher and args.student):
        zoo = build_zoo(world="numbers", num_threads=args.threads, progress=print)
        paths = {k: paths[k] or zoo[k] for k in paths}
    info = get_dataset_info("numbers")
    data = training_set(info, num_shots=args.shots, seed=args.seed, classes="base")
    names = data["class_names"]
    members = []
    for role in ("teacher", "student"):
        path = paths[role]
        proc = CLIPImageProcessorPil.from_pretrained(path)
        members.append(CLIPTeacher(CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), names,
                                   data["template"], proc.image_mean, proc.image_std, name=role))
    spec = RegionSpec(output_size=members[0].input_size, scale=(0.08, 1.0), flip_prob=0.0)
    num_classes = len(names)
    work = tempfile.mkdtemp(prefix="fdbpl_compose_")
    build = dict(class_names=names, num_regions=args.num_regions, top_k=num_classes, seed=args.seed,
                 region_spec=spec)
    singles = [build_ril_table(data["dataset"], t, output_dir=os.path.join(work, t.name), **build) for t in members]
    joints = {w: build_ril_table(data["dataset"], EnsembleTeacher(members, weighting=w),
                                 output_dir=os.path.join(work, f"joint_{w}"), **build) for w in WEIGHTINGS}
    regions = len(singles[0])
    fixed = fixed_weights(None, 2)
    log_c = math.log(num_classes)
    ks = [k for k in args.ks if k <= num_classes]
    rows, records = [], []
    for weighting in WEIGHTINGS:
        ref_cols = _columns(joints[weighting], num_classes)
        ref = _rebuild(ref_cols, num_classes)  # the exact mixture, up to fp16
        ref_h = ref_cols["entropy"]  # the joint build's stored full-distribution entropy
        for k in ks:
            cols = [_columns(t, k) for t in singles]
            log_probs = torch.stack([_rebuild(c, num_classes) for c in cols])
            top = torch.stack([c["val"][:, 0] for c in cols])
            stored = torch.stack([c["entropy"] for c in cols])
            log_mix, h_used, w = mix_soft_labels(log_probs, fixed, weighting, top, stored)
            h_lower = (w * stored).sum(0)
            h_rebuilt = _entropy(log_mix)
            joint_k = _rebuild(_columns(joints[weighting], k), num_classes)
            kept_mix, _, _ = mix_soft_labels(torch.stack([_mass_kept(c, num_classes) for c in cols]), fixed,
                                             weighting, top, stored)
            record = {
                "weighting": weighting, "k": k, "regions": regions,
                "kl_composed": float(_kl(ref, log_mix).mean()), "kl_joint_k": float(_kl(ref, joint_k).mean()),
                "top1_composed": float((log_mix.argmax(-1) == ref.argmax(-1)).float().mean() * 100),
                "top1_joint_k": float((joint_k.argmax(-1) == ref.argmax(-1)).float().mean() * 100),
                "kl_composed_mass_kept": float(_kl(ref, kept_mix).mean()),
                # from what training on the joint table at K reads (its top-K rebuild), not the exact mixture
                "kl_joint_k_to_composed": float(_kl(joint_k, log_mix).mean()),
                "kl_joint_k_to_mass_kept": float(_kl(joint_k, kept_mix).mean()),
                "top1_composed_mass_kept": float((kept_mix.argmax(-1) == ref.argmax(-1)).float().mean() * 100),
                "weight_error_used": float(((h_used - ref_h).abs() / log_c).mean()),
                "weight_error_lower_bound": float(((h_lower - ref_h).abs() / log_c).mean()),
                "weight_error_rebuilt": float(((h_rebuilt - ref_h).abs() / log_c).mean()),
                "weight_bias_used": float(((ref_h - h_used) / log_c).mean()),
                "mean_weight_reference": float((1 - ref_h / log_c).mean()),
            }
            records.append(record)
            rows.append([weighting, k, f"{record['kl_composed']:.4f}", f"{record['kl_joint_k']:.4f}",
                         f"{record['top1_composed']:.1f}", f"{record['top1_joint_k']:.1f}",
                         f"{record['kl_composed_mass_kept']:.4f}", f"{record['top1_composed_mass_kept']:.1f}",
                         f"{record['kl_joint_k_to_composed']:.4f}", f"{record['kl_joint_k_to_mass_kept']:.4f}",
                         f"{record['weight_error_used']:.4f}", f"{record['weight_error_lower_bound']:.4f}",
                         f"{record['weight_error_rebuilt']:.4f}", f"{record['mean_weight_reference']:.3f}"])
    print(f"{regions} regions ({len(data['dataset'])} images x M = {args.num_regions}), C = {num_classes}; "
          "reference: the joint EnsembleTeacher table at K = C. KL in nats, mean over regions; weight error = "
          "mean |w - w_ref|, w = 1 - H / log C.\n")
    print(md_table(["weighting", "K", "KL composed", "KL joint at K", "top-1 agree composed %",
                    "top-1 agree joint at K %", "KL composed, mass-kept rebuild", "top-1 agree mass-kept %",
                    "KL(joint at K, composed)", "KL(joint at K, mass-kept)",
                    "weight error (used: stored + divergence)",
                    "weight error (stored only)", "weight error (rebuilt mixture)", "mean w_ref"], rows))
    out["approximation"] = {"records": records, "teacher": paths["teacher"], "student": paths["student"],
                            "shots": args.shots, "seed": args.seed, "num_regions": args.num_regions,
                            "num_classes": num_classes}


# ---------------------------------------------------------------------------------------------
# (b) replay cost per batch

def _linear_teacher(num_classes: int, seed: int, size: int) -> CallableTeacher:
    weights = torch.randn(3 * 4 * 4, num_classes, generator=torch.Generator().manual_seed(seed))
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))
    with torch.no_grad():
        module[2].weight.copy_(4 * weights.t())
        module[2].bias.zero_()
    return CallableTeacher(module, num_classes, size, name=f"linear{seed}")


def cpu_ms(fn, reps: int) -> float:
    """Median CPU milliseconds per call (one thread: the work itself, not the waits a loaded machine adds)."""
    return median(time_calls(fn, reps, warmup=3, clock=cpu_now)) * 1e3


def cost(args, out: dict) -> None:
    from transformers import CLIPModel
    from fdbpl_hf.testing.worlds import clip_tokenizer

    section("(b) replay cost of one batch: one table vs composed tables")
    size, batch = args.cost_size, 32
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    # a small student at ViT-B/32's input size and feature width: a cache row's size is what matters here
    student = get_fdbpl_model(CLIPModel(scaled_clip_config(64, 1, 64, 1, 32, size, 512)).eval(), FDBPLConfig(),
                              tokenizer)
    records, rows = [], []
    for num_classes in args.cost_classes:
        names = class_names(num_classes) if num_classes <= 500 else [f"class {i}" for i in range(num_classes)]
        data = synthetic_images(args.cost_images, names, seed=1)
        work = tempfile.mkdtemp(prefix="fdbpl_compose_cost_")
        tables = [build_ril_table(data, _linear_teacher(num_classes, s, size), num_regions=args.cost_regions,
                                  top_k=min(20, num_classes), output_dir=os.path.join(work, f"t{s}"))
                  for s in range(3)]
        mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
        single = RILDataset(data, tables[0], image_mean=mean, image_std=std)
        cache = build_feature_cache(single, student, epochs=1, output_dir=os.path.join(work, "cache"), progress=False)
        indices = list(range(batch))
        for path in ("pixels", "feature cache"):
            base = None
            for count in (1, 2, 3):
                chosen = tables[0] if count == 1 else tables[:count]
                kwargs = dict(teacher_weighting="entropy") if count > 1 else {}
                dataset = RILDataset(data, chosen, image_mean=mean, image_std=std, **kwargs)
                if path == "feature cache":
                    dataset = dataset.with_feature_cache(cache)
                with torch_threads(1):
                    ms = cpu_ms(lambda: default_collate(dataset.__getitems__(indices)), args.reps)
                base = ms if count == 1 else base
                records.append({"classes": num_classes, "path": path, "tables": count, "cpu_ms_per_batch": ms})
                rows.append([num_classes, path, count, f"{ms:.2f}",
                             "-" if count == 1 else f"{ms - base:+.2f} ms ({100 * (ms / base - 1):+.0f} %)"])
        # the mixing alone, on the batch's columns (what composing adds beyond reading the other tables' rows)
        cols = [t.with_format("numpy")[: batch] for t in tables[:2]]
        idx = [torch.from_numpy(c["topk_indices"].astype(np.int64)) for c in cols]
        val = [torch.from_numpy(c["topk_logits"].astype(np.float32)) for c in cols]
        ent = torch.stack([torch.from_numpy(c["teacher_entropy"].astype(np.float32)) for c in cols])
        fixed = fixed_weights(None, 2)

        def mix():
            log_probs = torch.stack([torch.log_softmax(dense_teacher_logits(i, v, num_classes), -1)
                                     for i, v in zip(idx, val)])
            return mix_soft_labels(log_probs, fixed, "entropy", torch.stack([v[:, 0] for v in val]), ent)

        with torch_threads(1):
            mix_ms = cpu_ms(mix, args.reps * 4)
        records.append({"classes": num_classes, "path": "mixing alone (2 tables)", "tables": 2,
                        "cpu_ms_per_batch": mix_ms})
        rows.append([num_classes, "mixing alone (2 tables, rebuilds + mix_soft_labels)", 2, f"{mix_ms:.3f}", "-"])
    print(f"batch {batch}, K = 20 (K = C below 20), M = {args.cost_regions}, {args.cost_images} synthetic 500 x 375 "
          f"JPEGs, regions rendered at {size} px; one thread; median CPU time of {args.reps} batches (CPU "
          "time, not wall: the machine's other jobs add waits, not work).\n")
    print(md_table(["C", "path", "tables", "CPU ms per batch", "vs one table"], rows))
    out["cost"] = {"records": records, "batch": batch, "images": args.cost_images, "regions": args.cost_regions}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=("approximation", "cost"), default=["approximation", "cost"])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the numbers zoo's)")
    parser.add_argument("--student", default=None, help="second teacher (default: the numbers zoo's student)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num_regions", type=int, default=10)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 20, 50])
    parser.add_argument("--cost_classes", nargs="+", type=int, default=[50, 1000])
    parser.add_argument("--cost_images", type=int, default=64)
    parser.add_argument("--cost_regions", type=int, default=4)
    parser.add_argument("--cost_size", type=int, default=224, help="region (student input) size of the cost part")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "compose", "compose.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 shot, M = 2, K in {1, C}, C = 50, 3 reps")
    args = parser.parse_args(argv)
    if args.quick:
        args.shots, args.num_regions, args.ks, args.cost_classes, args.reps = 1, 2, [1, 50], [50], 3
        args.cost_images = 32
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/compose.py", *(argv or sys.argv[1:])])
    machine_facts(["command", command])
    out: dict[str, Any] = {"command": command, "commit": git_commit()}
    if "approximation" in args.part:
        approximation(args, out)
    if "cost" in args.part:
        cost(args, out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_json(args.out, out)
    print(f"\nwritten to {args.out}")
    return out


if __name__ == "__main__":
    main()

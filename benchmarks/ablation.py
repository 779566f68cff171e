#!/usr/bin/env python
"""FDBPL ablations on the many-class "numbers" world (100 classes, base 00-49, novel 50-99).

    python benchmarks/ablation.py                          # every subset, seeds 1 2 3
    python benchmarks/ablation.py --subset loss            # one subset (several: --subset loss k)
    python benchmarks/ablation.py --quick --subset loss    # smoke run: 1 seed, 1 epoch, 2 configs

Every run is one `fdbpl_hf.protocol.run_base_to_novel` call (the pipeline of the demo and the
protocol tests) on the numbers zoo (`fdbpl_hf.testing.zoo.build_zoo(world="numbers")`, pretrained once
and cached under $HF_HOME), varying only its arguments:

- `loss`: which loss terms (L+ only; + L-; + sim; + PCD with mean- and sum-over-pairs reductions
  at two lambda_pcd values);
- `k`: top-K of the table, K in {1, 5, 10, 20, C = 50 base classes}, information weights from the stored
  full-distribution entropy vs from the top-K rebuild (`weight_entropy`); accuracy and bytes;
- `m`: regions per image M in {1, 10, 50, 500}; accuracy, table bytes, build time (a run of E
  epochs reads only min(M, E) regions of each image);
- `teachers`: the teacher, a weaker one (the student-sized zoo model), and ensembles of both
  with equal weights and per-region confidence weights (`EnsembleTeacher(weighting=...)`);
- `ood`: base test images (in) vs novel test images (out): the negative prompt's scores vs
  maximum softmax probability, AUROC / FPR95 (from the runs' `evaluate_base_to_novel` results);
- `online`: the online teacher (live logits, K = C) vs the offline table at each K; accuracy and
  training time;
- `compose`: each teacher's table alone, the joint `EnsembleTeacher` table, and the two teachers'
  tables built separately over the same regions and mixed at training time
  (`RILDataset(dataset, [table_a, table_b], teacher_weighting=...)`), fixed and per-region
  confidence weights.

Runs shared by several subsets are run once. Each subset writes `<out>/<subset>.md` and
`<out>/<subset>.json` (every run, every seed, the settings and the command) as soon as it ends.
The settings are smaller than the paper's (epochs, shots: see `--epochs`, `--shots`) so that all
subsets fit in an hour on 2 CPU cores; the markdown says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import cpu_model, git_commit, md_table, now  # noqa: E402

SUBSETS = ("loss", "k", "m", "teachers", "ood", "online", "compose")
# The table covers the classes trained on: the 50 base classes (novel ones are never seen in training).
TABLE_CLASSES = 50
DEFAULT_K = 20  # the paper's trade-off; every subset but `k` uses it

# Every loss setting is spelled out so a run does not depend on the library's defaults.
LOSS_CONFIGS = [
    ("L+ only", dict(lambda_neg=0.0, lambda_sim=0.0, use_pcd=False)),
    ("L+ + L-", dict(lambda_neg=1.0, lambda_sim=0.0, use_pcd=False)),
    ("L+ + L- + sim", dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=False)),
    ("+ PCD mean, λ=0.1", dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=True, pcd_reduction="mean", lambda_pcd=0.1)),
    ("+ PCD mean, λ=1", dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=True, pcd_reduction="mean", lambda_pcd=1.0)),
    ("+ PCD sum, λ=0.1", dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=True, pcd_reduction="sum", lambda_pcd=0.1)),
    ("+ PCD sum, λ=0.01", dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=True, pcd_reduction="sum",
                               lambda_pcd=0.01)),
]
# The base loss of the other subsets: RADP (L+, L-, sim) without PCD, explicit for the same reason.
BASE_LOSS = dict(lambda_neg=1.0, lambda_sim=0.001, use_pcd=False, weight_entropy="full")


def numbers_world(test_per_class: Optional[int]):
    """The "numbers" registry entry, its test split cut to `test_per_class` seeded rows per class
    (None: all 20) so smoke runs evaluate quickly."""
    import dataclasses

    from fdbpl_hf.data import few_shot_indices, get_dataset_info

    info = get_dataset_info("numbers")
    if test_per_class is None:
        return info

    def load(split, **kwargs):
        rows = info.load(split, **kwargs)
        return rows.select(few_shot_indices(rows, test_per_class, seed=0)) if split == info.test_split else rows

    return dataclasses.replace(info, loader=load)


class Runner:
    """Runs `run_base_to_novel` once per distinct (method, settings, seed) and remembers the result."""

    def __init__(self, args: argparse.Namespace, teacher: str, student: str, work_dir: str):
        self.args, self.teacher, self.student, self.work_dir = args, teacher, student, work_dir
        self.memo: dict[str, dict[str, Any]] = {}
        self.world = numbers_world(args.test_per_class)

    def run(self, method: str, seed: int, *, teacher: Any = None, top_k: Optional[int] = DEFAULT_K,
            num_regions: Optional[int] = None, training: Optional[dict] = None,
            teacher_weighting: str = "fixed", compose: bool = False) -> dict[str, Any]:
        from fdbpl_hf.protocol import run_base_to_novel

        a = self.args
        teacher = teacher if teacher is not None else self.teacher
        overrides = {**BASE_LOSS, **(training or {})}
        if method in ("zero-shot", "fdbpl-online"):
            top_k = None  # no table: the student alone, or the teacher's live logits over all C classes
        if method == "zero-shot":
            seed, teacher, overrides, num_regions, teacher_weighting = 0, None, {}, None, "fixed"
        settings = dict(method=method, seed=seed, teacher=teacher, top_k=top_k, num_regions=num_regions,
                        training=overrides, teacher_weighting=teacher_weighting)
        if compose:  # only then: the other runs keep the keys (and records) they had
            settings["compose"] = True
        key = json.dumps(settings, sort_keys=True, default=str)
        if key in self.memo:
            return self.memo[key]
        out = tempfile.mkdtemp(prefix="run-", dir=self.work_dir)
        start = now()
        result = run_base_to_novel(
            method, student=self.student, teacher=teacher if method != "zero-shot" else None, dataset=self.world,
            seed=max(seed, 1), num_shots=a.shots, output_dir=out, num_train_epochs=a.epochs,
            per_device_train_batch_size=a.batch_size, num_regions=num_regions, top_k=top_k, flip_prob=0.0,
            training_overrides={**overrides, "dataloader_num_workers": 0} if method != "zero-shot" else None,
            teacher_weighting=teacher_weighting, compose=compose,
        )
        record = {
            "settings": settings,
            "base_acc": result["base_acc"], "novel_acc": result["novel_acc"], "hm": result["hm"],
            "train_seconds": result.get("train_seconds"), "train_steps": result.get("train_steps"),
            "table_bytes": result.get("table_bytes"), "table_regions": result.get("table_regions"),
            "table_build_seconds": result.get("table_build_seconds"),
            "ood": result.get("ood", {}).get("scores"),
            "wall_seconds": round(now() - start, 2),
        }
        self.memo[key] = record
        name = "zero-shot" if method == "zero-shot" else f"{method} seed {seed}"
        print(f"  {name}: base {record['base_acc']:.1f} novel {record['novel_acc']:.1f} HM {record['hm']:.1f} "
              f"({record['wall_seconds']:.0f}s) {json.dumps(settings, default=str)}", flush=True)
        return record


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _row(label: str, records: list[dict], extra: Optional[list] = None) -> list:
    return [label, _mean_sd([r["base_acc"] for r in records]), _mean_sd([r["novel_acc"] for r in records]),
            _mean_sd([r["hm"] for r in records]), *(extra or [])]


ACC_HEADER = ["setting", "base", "novel", "HM"]


def _seconds(records: list[dict], key: str) -> str:
    values = [r[key] for r in records if r.get(key) is not None]
    return f"{statistics.mean(values):.1f}" if values else "-"


def subset_loss(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    configs = LOSS_CONFIGS[:2] if quick else LOSS_CONFIGS
    rows, runs = [_row("zero-shot student", [r.run("zero-shot", 0)], ["-"])], []
    for label, training in configs:
        records = [r.run("fdbpl-offline", s, training=training) for s in seeds]
        rows.append(_row(label, records, [_seconds(records, "train_seconds")]))
        runs.append({"label": label, "runs": records})
    return [md_table(ACC_HEADER + ["train s"], rows)], runs


def subset_k(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    ks = [1, TABLE_CLASSES] if quick else [1, 5, 10, 20, TABLE_CLASSES]
    rows, runs = [], []
    for k in ks:
        for mode in (("full", "topk") if k < TABLE_CLASSES else ("full",)):
            records = [r.run("fdbpl-offline", s, top_k=k, training={"weight_entropy": mode}) for s in seeds]
            label = f"K={k}, weights from {'stored full entropy' if mode == 'full' else 'top-K rebuild'}"
            bytes_ = records[0]["table_bytes"]
            per_region = bytes_ / records[0]["table_regions"] if bytes_ else None
            rows.append(_row(label, records, [bytes_, f"{per_region:.1f}" if per_region else "-"]))
            runs.append({"label": label, "top_k": k, "weight_entropy": mode, "runs": records})
    return [md_table(ACC_HEADER + ["table bytes", "bytes/region"], rows)], runs


def subset_m(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    ms = [1, 2] if quick else list(r.args.m_values)
    rows, runs = [], []
    for m in ms:
        use = seeds if m <= r.args.m_all_seeds_up_to else seeds[:1]
        # M = epochs is the other subsets' default table: share its runs rather than repeat them.
        regions = None if m == math.ceil(r.args.epochs) else m
        records = [r.run("fdbpl-offline", s, num_regions=regions) for s in use]
        read = min(m, r.args.epochs)
        label = f"M={m} ({len(use)} seed{'s' if len(use) > 1 else ''}; {read} read per image)"
        rows.append(_row(label, records, [records[0]["table_bytes"], _seconds(records, "table_build_seconds")]))
        runs.append({"label": label, "num_regions": m, "regions_read": read, "runs": records})
    return [md_table(ACC_HEADER + ["table bytes", "build s"], rows)], runs


def subset_teachers(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    strong, weak = r.teacher, r.student
    configs = [
        ("teacher (numbers zoo teacher)", strong, "fixed"),
        ("weaker teacher (the student-sized zoo model)", weak, "fixed"),
        ("ensemble, equal weights", [strong, weak], "fixed"),
        ("ensemble, per-region max-prob weights", [strong, weak], "max_prob"),
        ("ensemble, per-region entropy weights", [strong, weak], "entropy"),
    ]
    if quick:
        configs = configs[::2][:2]
    rows, runs = [], []
    for label, teacher, weighting in configs:
        records = [r.run("fdbpl-offline", s, teacher=teacher, teacher_weighting=weighting) for s in seeds]
        rows.append(_row(label, records))
        runs.append({"label": label, "teacher_weighting": weighting, "runs": records})
    return [md_table(ACC_HEADER, rows)], runs


def subset_ood(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    configs = [("zero-shot student", "zero-shot", {})]
    configs += [("FDBPL, L+ only (negative prompt untrained)", "fdbpl-offline", LOSS_CONFIGS[0][1])]
    if not quick:
        configs += [("FDBPL, L+ + L- + sim", "fdbpl-offline", LOSS_CONFIGS[2][1])]
    header = ["setting", "score", "AUROC", "FPR95"]
    rows, runs = [], []
    for label, method, training in configs:
        records = [r.run(method, s, training=training) for s in (seeds if method != "zero-shot" else [0])]
        scores = sorted(records[0]["ood"] or {})
        for score in scores:
            rows.append([label, score, _mean_sd([x["ood"][score]["auroc"] for x in records]),
                         _mean_sd([x["ood"][score]["fpr95"] for x in records])])
        runs.append({"label": label, "runs": records})
    return [md_table(header, rows)], runs


def subset_online(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    ks = [1, TABLE_CLASSES] if quick else [1, 5, 10, 20, TABLE_CLASSES]
    rows, runs = [], []
    online = [r.run("fdbpl-online", s) for s in seeds]
    rows.append(_row("online teacher (live logits, all C)", online, [_seconds(online, "train_seconds"), "-"]))
    runs.append({"label": "online", "runs": online})
    for k in ks:
        records = [r.run("fdbpl-offline", s, top_k=k) for s in seeds]
        rows.append(_row(f"offline table, K={k}", records,
                         [_seconds(records, "train_seconds"), _seconds(records, "table_build_seconds")]))
        runs.append({"label": f"offline K={k}", "top_k": k, "runs": records})
    return [md_table(ACC_HEADER + ["train s", "table build s"], rows)], runs


def subset_compose(r: Runner, seeds: list[int], quick: bool) -> tuple[list, list]:
    strong, weak = r.teacher, r.student
    configs = [
        ("teacher's table alone (numbers zoo teacher)", strong, "fixed", False),
        ("weaker teacher's table alone (the student-sized zoo model)", weak, "fixed", False),
        ("joint EnsembleTeacher table, equal weights", [strong, weak], "fixed", False),
        ("joint EnsembleTeacher table, per-region max-prob weights", [strong, weak], "max_prob", False),
        ("joint EnsembleTeacher table, per-region entropy weights", [strong, weak], "entropy", False),
        ("composed tables, equal weights", [strong, weak], "fixed", True),
        ("composed tables, per-region max-prob weights", [strong, weak], "max_prob", True),
        ("composed tables, per-region entropy weights", [strong, weak], "entropy", True),
    ]
    if quick:
        configs = [configs[2], configs[6]]
    rows, runs = [], []
    for label, teacher, weighting, compose in configs:
        records = [r.run("fdbpl-offline", s, teacher=teacher, teacher_weighting=weighting, compose=compose)
                   for s in seeds]
        rows.append(_row(label, records, [_seconds(records, "train_seconds"), _seconds(records, "table_build_seconds"),
                                          records[0]["table_bytes"]]))
        runs.append({"label": label, "teacher_weighting": weighting, "compose": compose, "runs": records})
    return [md_table(ACC_HEADER + ["train s", "table build s", "table bytes"], rows)], runs


SUBSET_FUNCTIONS = {"loss": subset_loss, "k": subset_k, "m": subset_m, "teachers": subset_teachers,
                    "ood": subset_ood, "online": subset_online, "compose": subset_compose}
TITLES = {"loss": "Loss terms", "k": "Top-K and where the information weight comes from",
          "m": "Regions per image M", "teachers": "Teachers (paper's Q3)",
          "ood": "OOD detection, base test images (in) vs novel test images (out) (paper's Q1)",
          "online": "Offline table at each K vs the online teacher",
          "compose": "Composed tables: per-teacher tables mixed at training time vs the joint ensemble table"}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", nargs="+", choices=SUBSETS, default=list(SUBSETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=10, help="training epochs (paper: 50)")
    parser.add_argument("--shots", type=int, default=8, help="shots per base class (paper: 16)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--m_values", nargs="+", type=int, default=[1, 10, 50, 500])
    parser.add_argument("--m_all_seeds_up_to", type=int, default=50,
                        help="larger M values run with the first seed only (their tables dominate the time)")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the numbers zoo's)")
    parser.add_argument("--student", default=None, help="student checkpoint (default: the numbers zoo's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "ablation"))
    parser.add_argument("--test_per_class", type=int, default=None,
                        help="evaluate on this many test images per class (default: all 20)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 1 epoch, 1 shot, 2 test images per class, 2 configs each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.shots = args.seeds[:1], 1, 1
        args.test_per_class = args.test_per_class or 2

    import datasets
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    teacher, student = args.teacher, args.student
    zoo_marker = None
    if teacher is None or student is None:
        from fdbpl_hf.testing.zoo import build_zoo, read_zoo_marker

        paths = build_zoo(world="numbers", num_threads=args.threads, progress=print)
        teacher, student = teacher or paths["teacher"], student or paths["student"]
        zoo_marker = read_zoo_marker(paths)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/ablation.py", *(argv or sys.argv[1:])])
    os.makedirs(args.out, exist_ok=True)
    facts = {
        "command": command, "commit": git_commit(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "world": "numbers (100 classes, base 00-49, novel 50-99)",
        "teacher": teacher, "student": student,
        "zoo_zero_shot": zoo_marker.get("zero_shot_base_novel") if zoo_marker else None,
        "settings": {"epochs": args.epochs, "shots": args.shots, "batch_size": args.batch_size, "lr": 0.002,
                     "flip_prob": 0.0, "region_scale": [0.08, 1.0], "test_per_class": args.test_per_class or 20,
                     "top_k (unless varied)": DEFAULT_K,
                     "num_regions (unless varied)": "epochs", "seeds": args.seeds,
                     "loss (unless varied)": BASE_LOSS},
    }
    summary: dict[str, Any] = {"facts": facts, "subsets": {}}
    with tempfile.TemporaryDirectory(prefix="fdbpl_ablation_") as work:
        runner = Runner(args, teacher, student, work)
        for name in args.subset:
            print(f"== {name} ==", flush=True)
            start = now()
            tables, runs = SUBSET_FUNCTIONS[name](runner, args.seeds, args.quick)
            seconds = round(now() - start, 1)
            summary["subsets"][name] = {"seconds": seconds, "configs": runs}
            md = [f"# Ablation: {TITLES[name]}", "",
                  f"Command: `{command}` (commit {facts['commit']}); this subset took {seconds:.0f} s "
                  f"(runs shared with an earlier subset of the same command are not rerun).", "",
                  f"World: {facts['world']}. {args.shots} shots per base class, {args.epochs:g} epochs (paper: 16 "
                  f"and 50), batch {args.batch_size}, lr 0.002, no flips, K={DEFAULT_K} and M=epochs unless varied; "
                  f"seeds {args.seeds}, mean ± sd. Accuracies in %.", "", *tables, ""]
            with open(os.path.join(args.out, f"{name}.md"), "w", encoding="utf-8") as f:
                f.write("\n".join(md))
            with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump({"facts": facts, "subset": name, **summary["subsets"][name]}, f, indent=1, default=str)
                f.write("\n")
            print("\n".join(md), flush=True)
    return summary


if __name__ == "__main__":
    main()

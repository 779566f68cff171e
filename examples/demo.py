"""The offline end-to-end job (`make demo`): FDBPL against its baselines on the embedded digit world.

1. the zoo: a stronger teacher CLIP and a weaker student CLIP, pretrained contrastively on real
   MNIST digits from a PyPI wheel (cached after the first run; a few CPU minutes);
2. the protocol: base digits 0-4, novel 5-9, 16 shots per base class, seeds 1/2/3;
3. methods: zero-shot student, CoOp, FDBPL with the online teacher, FDBPL from the RIL table, and
   FDBPL from the table plus a student-feature cache (no image tower at train time);
4. a table of base / novel / HM (mean ± std over seeds), training time and table size,
   written to outputs/demo/ with one results JSON per run.

    python examples/demo.py            # the full protocol
    python examples/demo.py --quick    # one seed, fewer epochs
    python examples/demo.py --verbose  # also the trainer's loss dictionary every 5 steps
"""

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Optional, Sequence

import torch
import transformers

from fdbpl_hf.evaluation import write_results
from fdbpl_hf.files import atomic_write
from fdbpl_hf.protocol import run_base_to_novel
from fdbpl_hf.testing.zoo import build_zoo, read_zoo_marker

METHODS = ("zero-shot", "coop", "fdbpl-online", "fdbpl-offline", "fdbpl-cached")
LABELS = {"zero-shot": "zero-shot student", "coop": "CoOp", "fdbpl-online": "FDBPL, online teacher",
          "fdbpl-offline": "FDBPL, offline RIL table", "fdbpl-cached": "FDBPL, table + feature cache"}


# what one run of the demo writes into its folder (run_base_to_novel, then write_results)
RUN_ENTRIES = tuple(f"{name}{suffix}" for name in ("table", "feature_cache") for suffix in ("", ".incomplete", ".lock")) \
    + ("run", "results.json")


def clear_earlier_run(out: str) -> None:
    """Remove what an earlier run of the demo wrote into `out`, and nothing else: a folder the user
    passed as --output_dir may hold other files (they stay)."""
    for name in RUN_ENTRIES:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, list[dict]]:
    """Run the demo protocol with the command line `argv` (default `sys.argv[1:]`); returns each
    method's per-seed results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=50)
    # The paper's settings: learning rate 0.002, regions of area (0.08, 1) of each image.
    parser.add_argument("--learning_rate", type=float, default=0.002)
    parser.add_argument("--region_scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                        help="area range of the random regions (all trained methods)")
    parser.add_argument("--quick", action="store_true", help="one seed, 10 epochs")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the trainer's loss dictionary every 5 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 10

    # Tiny models: one intra-op thread is faster than two (no per-op synchronisation), and far
    # faster when the machine is busy.
    torch.set_num_threads(1)
    # The zoo's checkpoints load in milliseconds, a dozen times: no "Loading weights" bar for each.
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    zoo = build_zoo(progress=print)
    marker = read_zoo_marker(zoo) or {}
    print(f"zoo: teacher {zoo['teacher']}\n     student {zoo['student']}")
    print(f"zero-shot accuracy on the 1,000 held-out digits (all 10 classes): {marker.get('zero_shot_accuracy')}")

    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    for method in METHODS:
        for seed in (args.seeds[:1] if method == "zero-shot" else args.seeds):
            out = os.path.join(args.output_dir, method, f"seed{seed}")
            clear_earlier_run(out)  # fresh runs: a table left by an older zoo would be refused
            result = run_base_to_novel(method, student=zoo["student"], teacher=zoo["teacher"], seed=seed,
                                       num_shots=16, output_dir=out, num_train_epochs=args.epochs,
                                       learning_rate=args.learning_rate, region_scale=tuple(args.region_scale),
                                       flip_prob=0.0,  # a mirrored digit is another digit or none
                                       print_logs=args.verbose)
            write_results(os.path.join(out, "results.json"), result,
                          {"dataset": "digits", "method": method, "seed": seed, "num_shots": 16, "classes": "base",
                           "epochs": args.epochs, "learning_rate": args.learning_rate,
                           "region_scale": list(args.region_scale), "teacher": zoo["teacher"],
                           "student": zoo["student"]})
            rows[method].append(result)
            print(f"{LABELS[method]:<26} seed {seed}: base {result['base_acc']:.2f}  novel {result['novel_acc']:.2f}  "
                  f"HM {result['hm']:.2f}  train {result['train_seconds']:.1f}s")

    lines = ["| method | base | novel | HM | train time (s) | table |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = rows[method]
        table = "-"
        if method in ("fdbpl-offline", "fdbpl-cached"):
            table = (f"{rs[0]['table_bytes'] / 1024:.0f} KiB, built in "
                     f"{statistics.mean(r['table_build_seconds'] for r in rs):.1f}s")
        if method == "fdbpl-cached":
            table += (f"; cache {rs[0]['cache_bytes'] / 1024:.0f} KiB, built in "
                      f"{statistics.mean(r['cache_build_seconds'] for r in rs):.1f}s")
        lines.append(f"| {LABELS[method]} | {fmt([r['base_acc'] for r in rs])} | {fmt([r['novel_acc'] for r in rs])} "
                     f"| {fmt([r['hm'] for r in rs])} | {fmt([r['train_seconds'] for r in rs])} | {table} |")
    summary = "\n".join(lines)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write(os.path.join(args.output_dir, "summary.md"), summary + "\n")
    atomic_write(os.path.join(args.output_dir, "summary.json"), json.dumps(
        {m: [{k: r[k] for k in ("base_acc", "novel_acc", "hm", "train_seconds", "seed")} for r in rows[m]]
         for m in METHODS}, indent=1))
    print(f"\ndigits, base 0-4 / novel 5-9, 16 shots, seeds {args.seeds}, {args.epochs:g} epochs, "
          f"lr {args.learning_rate:g}, regions of area {args.region_scale[0]:g}-{args.region_scale[1]:g} "
          f"(accuracy %, mean ± std over seeds):\n")
    print(summary)
    print(f"\ntotal {time.perf_counter() - start:.0f}s; results in {args.output_dir}/")
    return rows


if __name__ == "__main__":
    main()

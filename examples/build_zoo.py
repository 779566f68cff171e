"""Build (or reuse) the offline model zoo: a teacher and a student CLIP pretrained on real digits.

    python examples/build_zoo.py                      # default settings, cached under $HF_HOME
    python examples/build_zoo.py --force              # retrain even if cached
    python examples/build_zoo.py --student epochs=4 train_rows_per_class=20
    python examples/build_zoo.py --world numbers     # the 100-class two-digit numbers world

Prints the two checkpoint directories (load them with `CLIPModel.from_pretrained(path)`,
`AutoTokenizer.from_pretrained(path)`, `CLIPImageProcessorPil.from_pretrained(path)`), their
zero-shot accuracies on the held-out test digits and the build times.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from fdbpl_hf.testing.zoo import STUDENT_SPEC, TEACHER_SPEC, WORLDS, build_zoo, read_zoo_marker


def _overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values are parsed as JSON when possible (numbers, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="digits", choices=sorted(WORLDS),
                        help="digits (10 classes) or numbers (100 two-digit numbers)")
    parser.add_argument("--cache_dir", default=None, help="zoo root (default: $HF_HOME/fdbpl_hf/zoo)")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching zoo is cached")
    parser.add_argument("--teacher", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"override teacher settings, e.g. epochs=20 (defaults: {TEACHER_SPEC.to_dict()})")
    parser.add_argument("--student", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"override student settings (defaults: {STUDENT_SPEC.to_dict()})")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch threads while training (default: torch's current setting)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    start = time.perf_counter()
    paths = build_zoo(args.cache_dir, force=args.force, teacher_kwargs=_overrides(args.teacher),
                      student_kwargs=_overrides(args.student), num_threads=args.num_threads, world=args.world)
    elapsed = time.perf_counter() - start
    marker = read_zoo_marker(paths) or {}
    accuracy = marker.get("zero_shot_accuracy", {})
    seconds = marker.get("build_seconds", {})
    cpu = marker.get("build_cpu_seconds", {})
    num_test = marker.get("eval", {}).get("num_rows", "?")
    print(f"zoo: {marker.get('key', '?')}  ({elapsed:.1f}s this call)")
    for role in ("teacher", "student"):
        print(f"{role:8s} {paths[role]}")
        split = marker.get("zero_shot_base_novel", {}).get(role, {})
        print(f"         zero-shot accuracy {accuracy.get(role, float('nan')):.4f} on {num_test} held-out test images "
              f"({marker.get('eval', {}).get('template')!r}; base {split.get('base', float('nan')):.4f}, novel "
              f"{split.get('novel', float('nan')):.4f} among their own classes); trained in "
              f"{seconds.get(role, float('nan')):.1f}s wall, {cpu.get(role, float('nan')):.1f}s CPU")
    return paths


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Issue 20's goals as PASS/MISS lines, from the JSON of `benchmarks/speed_real.py` runs.

    python benchmarks/speed_goals.py benchmarks/results/speed_gpu_*.json

Each JSON holds one variant (eager, compiled, ...). For every configuration the modes are grouped
into the online baseline (online, online store), the offline table (offline, offline store) and the
feature cache (cached, cached workers); each group's best step over all variants and modes is
compared with the online group's best ("best configuration of each mode against best"). A ratio
whose winner ran in a variant where the online baseline was not measured is marked INCOMPLETE:
the baseline did not get the same treatment. A goal without figures is NOT MEASURED.
"""

from __future__ import annotations

import argparse
import json
import sys

GROUPS = {"online": ("online", "online store"), "offline": ("offline", "offline store"),
          "cache": ("cached", "cached workers")}
# (configuration, group, least speed-up over online, wording) — issue 20, "Goals on an H200"
STEP_GOALS = [
    ("b32 C=50", "offline", 4.0, "offline / online at batch 32, C = 50"),
    ("b32 C=50", "cache", 6.0, "feature cache / online at batch 32, C = 50"),
    ("b32 C=500", "offline", 3.0, "offline / online at batch 32, C = 500"),
    ("b256 C=50", "offline", 8.0, "offline / online at batch 256, C = 50"),
]
MOONSHOT = ("b32 C=50", "cache", 10.0, "moonshot: feature cache / online at batch 32, C = 50")
BUILD_GOALS = [("table", "vs_bare_teacher", 0.9, "table build / bare teacher"),
               ("feature_cache", "vs_bare_student", 0.9, "feature-cache build / bare student")]


def load(paths: list[str]) -> list[dict]:
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as err:
            print(f"(skipped {path}: {err})")
    return reports


def best(reports: list[dict], config: str, group: str):
    """(ms, mode, variant) of the group's fastest measured step in `config`, or None."""
    found = []
    for report in reports:
        steps = report.get("configs", {}).get(config, {}).get("step_ms", {})
        found += [(ms, mode, report.get("variant", "?")) for mode, ms in steps.items() if mode in GROUPS[group]]
    return min(found) if found else None


def variants_measured(reports: list[dict], config: str, group: str) -> set:
    return {r.get("variant", "?") for r in reports
            if set(r.get("configs", {}).get(config, {}).get("step_ms", {})) & set(GROUPS[group])}


def goal_lines(reports: list[dict]) -> list[str]:
    lines = []
    for config, group, least, words in STEP_GOALS + [MOONSHOT]:
        base, fast = best(reports, config, "online"), best(reports, config, group)
        if base is None or fast is None:
            lines.append(f"NOT MEASURED  {words} >= {least:g}x")
            continue
        ratio = base[0] / fast[0]
        status = "PASS" if ratio >= least else "MISS"
        if fast[2] not in variants_measured(reports, config, "online"):
            status = f"INCOMPLETE ({status} if the online baseline in variant {fast[2]!r} were no faster)"
        lines.append(f"{status}  {words} >= {least:g}x: {ratio:.2f}x ({fast[1]} [{fast[2]}] {fast[0]:.1f} ms vs "
                     f"{base[1]} [{base[2]}] {base[0]:.1f} ms)")
    builds = [r["builds"] for r in reports if r.get("builds")]
    for key, field, least, words in BUILD_GOALS:
        values = [b[key][field] for b in builds if key in b and field in b[key]]
        if not values:
            lines.append(f"NOT MEASURED  {words} >= {least:g}")
            continue
        value = max(values)
        lines.append(f"{'PASS' if value >= least else 'MISS'}  {words} >= {least:g}: {value:.2f}")
    return lines


def step_table(reports: list[dict]) -> str:
    configs = sorted({c for r in reports for c in r.get("configs", {})},
                     key=lambda c: (int(c.split()[0][1:]), int(c.split("=")[1])))
    rows = ["| configuration | mode | " + " | ".join(r.get("variant", "?") for r in reports) + " |",
            "|---|---|" + "---|" * len(reports)]
    for config in configs:
        modes = []
        for r in reports:
            for mode in r.get("configs", {}).get(config, {}).get("step_ms", {}):
                if mode not in modes:
                    modes.append(mode)
        for mode in modes:
            cells = [r.get("configs", {}).get(config, {}).get("step_ms", {}).get(mode) for r in reports]
            rows.append(f"| {config} | {mode} | " + " | ".join(f"{c:.1f} ms" if c is not None else "-" for c in cells)
                        + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="speed_real.py JSON files (one per variant)")
    args = p.parse_args(argv)
    reports = load(args.json)
    commits = sorted({r.get("commit", "?") for r in reports})
    print(f"# Issue 20 goals (commit {', '.join(commits)}; variants {', '.join(r.get('variant', '?') for r in reports)})\n")
    print(step_table(reports))
    print()
    for line in goal_lines(reports):
        print("GOAL " + line)
    for r in reports:
        for where, err in r.get("errors", {}).items():
            print(f"error in {r.get('variant')} {where}: {err}")
        for config, res in r.get("configs", {}).items():
            for mode, err in res.get("errors", {}).items():
                print(f"error in {r.get('variant')} {config} {mode}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

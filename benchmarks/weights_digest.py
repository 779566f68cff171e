"""What identifying a teacher or student by ALL its weights costs (issue 21): the digest that names
a table's build key (`CLIPTeacher.weights_fingerprint`, the whole CLIP) and a feature cache's
student (its image side), on real-size CLIP structures with random weights.

    python benchmarks/weights_digest.py                      # ViT-L/14 teacher, ViT-B/16 student side
    python benchmarks/weights_digest.py --sizes vit-b-32     # a smoke run

Prints a Markdown table: seconds per digest (median of --reps), GB hashed, GB/s, by thread
count, and 0.6's sampled fingerprint for comparison. A digest is computed once per build.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import cpu_model, git_commit, load_average, md_table, median, now, random_clip  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["vit-l-14", "vit-b-16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    from fdbpl_hf.integrity import sampled_tensor_fingerprint, tensor_fingerprint

    rows = []
    for size in args.sizes:
        t = now()
        clip = random_clip(size)
        built = now() - t
        parts = {"whole CLIP (teacher key)": {"clip": clip},
                 "image side (feature-cache student)": {"vision_model": clip.vision_model,
                                                        "visual_projection": clip.visual_projection}}
        for what, modules in parts.items():
            nbytes = sum(t.numel() * t.element_size() for m in modules.values() for t in m.state_dict().values())
            for threads in args.threads:
                times = []
                for _ in range(args.reps):
                    t = now()
                    digest = tensor_fingerprint(modules, threads=threads)
                    times.append(now() - t)
                s = median(times)
                rows.append([size, what, f"{nbytes / 1e9:.3f}", f"full sha256, {threads} thread(s)", f"{s:.2f}",
                             f"{nbytes / 1e9 / s:.2f}", digest[:15]])
            t = now()
            sampled_tensor_fingerprint(modules)
            rows.append([size, what, f"{nbytes / 1e9:.3f}", "0.6's sampled fingerprint", f"{now() - t:.2f}", "-", "-"])
        print(f"built {size} (random weights) in {built:.0f} s", file=sys.stderr)
        del clip
    import fdbpl_hf

    print(f"fdbpl_hf {fdbpl_hf.__version__} at {git_commit()}; {cpu_model()}, {os.cpu_count()} CPUs\n")
    print(md_table(["model", "what is hashed", "GB", "method", "seconds", "GB/s", "digest"], rows))
    print(f"\nload average at the end: {load_average():.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: clocks and timers, thread setup, the CLIP models and synthetic
data they time, and how they print and save results.

Import it first (`sys.path.insert(0, HERE); import common`): at import it makes runs offline, puts
the checkout ahead of any installed fdbpl_hf, and hides `datasets`' progress bars and chatter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

# read by huggingface_hub / datasets / tokenizers at their import: set before importing them
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # the checkout's fdbpl_hf, not an installed one
    sys.path.insert(0, REPO)

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel, TrainerCallback  # noqa: E402

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# clocks and timers

def now() -> float:
    """Wall clock (monotonic, high resolution)."""
    return time.perf_counter()


def cpu_now() -> float:
    """CPU time of this process, all threads: the reproducible clock on a shared machine."""
    return time.process_time()


CLOCKS: dict[str, Callable[[], float]] = {"wall": now, "cpu": cpu_now}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 3, clock: Callable[[], float] = now) -> list[float]:
    """Seconds per call of `fn`, `reps` times, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def median_ms(fn: Callable[[], Any], reps: int = 50, warmup: int = 3) -> float:
    return median(time_calls(fn, reps, warmup)) * 1e3


def mean_ms(fn: Callable[[], Any], reps: int = 30, warmup: int = 3) -> float:
    return statistics.fmean(time_calls(fn, reps, warmup)) * 1e3


class StepTimer(TrainerCallback):
    """Wall and CPU time at every Trainer step's begin and end; with a CUDA `device`, the end is
    taken after a device sync (a step is then its device work, not just its queueing)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device or torch.device("cpu")
        self.begin, self.end, self.cpu_begin, self.cpu_end = [], [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(now())
        self.cpu_begin.append(cpu_now())

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.end.append(now())
        self.cpu_end.append(cpu_now())


# ---------------------------------------------------------------------------------------------
# threads and machine load

@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """`torch.set_num_threads(n)` inside the block, the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_share_probe(seconds: float = 0.5) -> float:
    """CPU-seconds per second this process gets while all its threads run GEMMs (= threads when idle)."""
    a = torch.randn(512, 512)
    a @ a
    c0, t0 = cpu_now(), now()
    while now() - t0 < seconds:
        a @ a
    return (cpu_now() - c0) / (now() - t0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def git_commit() -> str:
    """The checkout's short commit, so every figure names the code that measured it."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# models

def scaled_clip_config(text_width: int, text_layers: int, vision_width: int, vision_layers: int, patch: int,
                       image_size: int, proj: int, heads: Optional[int] = None) -> CLIPConfig:
    """A CLIPConfig of any width and depth with CLIP's vocabulary and special ids, MLP = 4 x width and
    64-dim heads (`heads` overrides the head count of both towers). The named sizes, up to real
    ViT-B/32 and ViT-L/14, are `fdbpl_hf.testing.worlds.clip_config`."""
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=heads or max(1, text_width // 64),
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=heads or max(1, vision_width // 64),
                           image_size=image_size, patch_size=patch),
        projection_dim=proj,
    )


def random_clip(size: str, seed: Optional[int] = 0, device: Optional[torch.device] = None,
                patch: Optional[int] = None, **config_kwargs) -> CLIPModel:
    """A random-weight CLIP of a named size (`fdbpl_hf.testing.worlds.clip_config`), in eval mode, built on
    `device` (a CPU init of ViT-L/14 takes a while); `seed=None` keeps the current RNG state."""
    from fdbpl_hf.testing.worlds import clip_config

    config = clip_config(size, **config_kwargs)
    if patch:
        config.vision_config.patch_size = patch
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return CLIPModel(config).eval()


# ---------------------------------------------------------------------------------------------
# class names and synthetic images

# Caltech101's 50 base classes (CoOp label order, underscores as spaces): a typical base split
# (Caltech101, Flowers102, Food101, FGVCAircraft and UCF101 all have 50-51 base classes).
CALTECH_BASE = [
    "face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel", "bass", "beaver",
    "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car side",
    "ceiling fan", "cellphone", "chair", "chandelier", "cougar body", "cougar face", "crab", "crayfish",
    "crocodile", "crocodile head", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly", "electric guitar",
    "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo head", "garfield", "gerenuk",
    "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter",
]
WORDS = ["red", "small", "wild", "old", "striped", "spotted", "golden", "northern", "sea", "mountain"]
NOUNS = ["fox", "warbler", "beetle", "lantern", "kettle", "canoe", "violin", "orchid", "lizard", "tractor",
         "sparrow", "teapot", "hammer", "jellyfish", "otter", "snail", "tulip", "bus", "owl", "harp",
         "crab", "mug", "kite", "moth", "llama", "shark", "ladder", "cactus", "drum", "whale",
         "robin", "goose", "spider", "bison", "lamp", "sofa", "piano", "bottle", "zebra", "frog",
         "bridge", "wagon", "clock", "tiger", "yak", "vase", "heron", "parrot", "eel", "lemur"]


def class_names(count: int) -> list[str]:
    """Caltech101's 50 base names, or `count` distinct two-word names (ImageNet-like 2-4 token names)."""
    if count <= len(CALTECH_BASE):
        return CALTECH_BASE[:count]
    names = [f"{w} {n}" for w in WORDS for n in NOUNS]
    if count > len(names):
        raise ValueError(f"at most {len(names)} classes")
    return names[:count]


def synthetic_images(count: int, names: list[str], seed: int = 0, distinct: Optional[int] = None) -> datasets.Dataset:
    """Smooth random 500 x 375 JPEGs (quality 90): photo-like size, file size and decode cost.
    `distinct`: make at most that many different images and repeat them (each row still decodes
    and crops on its own; making a JPEG costs about 4 ms of host time)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, made = [], []
    for i in range(count):
        if distinct is None or len(made) < distinct:
            small = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
            big = np.asarray(small.resize((500, 375), Image.BICUBIC), dtype=np.int16)
            big = np.clip(big + rng.integers(-12, 13, size=big.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(big).save(buf, format="JPEG", quality=90)
            made.append(buf.getvalue())
        rows.append({"image": {"bytes": made[i % len(made)], "path": None}, "label": i % len(names)})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_list(rows, features=features)


# ---------------------------------------------------------------------------------------------
# printing and saving

def md_table(header: list, rows: list) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def section(title: str) -> None:
    """A markdown heading with the machine's load, which inflates and scatters every timing after it."""
    print(f"\n## {title}\n\n(1-minute load average now: {load_average():.2f} on {os.cpu_count()} CPUs; other "
          "processes on the machine inflate and scatter every timing)\n", flush=True)


def machine_facts(*extra_rows: list) -> None:
    """The facts every benchmark prints first (code, versions, CPUs, threads), then `extra_rows`."""
    import pyarrow
    import transformers

    import fdbpl_hf

    print("## Machine\n")
    print(md_table(["fact", "value"], [
        ["fdbpl_hf / commit", f"{fdbpl_hf.__version__} / {git_commit()}"],
        ["device", "cpu (no accelerator used)" if not torch.cuda.is_available() else "cpu (cuda present, unused)"],
        ["cpu", cpu_model()],
        ["os.cpu_count / usable", f"{os.cpu_count()} / {usable_cpus()}"],
        ["torch threads / interop", f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}"],
        ["python / torch / transformers / datasets / pyarrow",
         f"{platform.python_version()} / {torch.__version__} / {transformers.__version__} / "
         f"{datasets.__version__} / {pyarrow.__version__}"],
        ["OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "(unset)")],
        ["1-minute load average at start", f"{load_average():.2f}"],
        *extra_rows,
    ]))


def save_json(path: str, data: Any) -> None:
    """Results as JSON (anything not JSON-native written as its string)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
